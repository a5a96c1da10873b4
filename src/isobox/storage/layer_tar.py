"""OCI layer tars to directories and back: the one place isobox reads or writes layer tars.

:func:`unpack_layer` streams a (possibly compressed) layer tar into an empty directory in the
overlay "diff" form that overlayfs lower directories use: an OCI whiteout ``dir/.wh.NAME``
becomes a character device 0:0 ``dir/NAME`` and an opaque marker ``dir/.wh..wh..opq`` becomes
the xattr ``trusted.overlay.opaque=y`` on ``dir``. :func:`pack_layer` is the inverse: a
deterministic PAX tar of a directory. :func:`decompressed_digest` and :func:`decompress_to`
compute a layer's diff ID and write out its plain tar without looking inside.

Safety: a layer is untrusted input. Nothing is ever created or changed outside ``dest``:
every parent directory is reached by walking from an fd of ``dest`` one component at a time
with ``O_NOFOLLOW|O_DIRECTORY``, and the last component is created with the ``*at`` calls
(``dir_fd=``, no following). A parent that is a symlink is refused, not followed.

The tar reader is this module's own (ustar, PAX and GNU long names; written from the POSIX
pax spec), not ``tarfile``'s. ``tarfile``'s reader has had denial-of-service bugs on hostile
input that are fixed only in recent patch releases (quadratic PAX parsing, CVE-2024-6232;
an endless loop on negative offsets, CVE-2025-8194; the project venv runs 3.11.7), it takes a
corrupt header in the middle of an archive for the end of the archive, and in stream mode it
keeps every member it has read in memory. Writing uses ``tarfile``: the input is our own tree.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import queue
import shutil
import stat
import tarfile
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Final, Protocol, cast

import zstandard

from isobox.errors import (
    DigestMismatch,
    ImageError,
    InvalidArgument,
    UnsafeLayer,
    from_oserror,
)
from isobox.spec.image import Compression

if TYPE_CHECKING:
    from hashlib import _Hash

__all__ = [
    "RUNC_DEVICES",
    "PackResult",
    "UnpackPolicy",
    "UnpackResult",
    "decompress_to",
    "decompressed_digest",
    "default_policy",
    "pack_layer",
    "unpack_layer",
]

log = logging.getLogger(__name__)

#: The device nodes runc itself creates in a container's /dev; a layer may carry these.
RUNC_DEVICES: Final[frozenset[tuple[str, int, int]]] = frozenset(
    {
        ("c", 1, 3),  # null
        ("c", 1, 5),  # zero
        ("c", 1, 7),  # full
        ("c", 1, 8),  # random
        ("c", 1, 9),  # urandom
        ("c", 5, 0),  # tty
        ("c", 5, 1),  # console
        ("c", 5, 2),  # ptmx
    }
)

_CHUNK: Final = 1 << 20  # file data is copied in (at most) 1 MiB pieces
_RAW_CHUNK: Final = 256 << 10  # compressed bytes read from the source at a time
_BLOCK: Final = 512
_ZERO_BLOCK: Final = bytes(_BLOCK)
_MAX_META: Final = 1 << 20  # largest PAX / GNU long-name header data accepted
_GZIP_LEVEL: Final = 6
_ZSTD_LEVEL: Final = 3

_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC

_WH_PREFIX: Final = b".wh."
_WH_META: Final = b".wh..wh."
_WH_OPAQUE: Final = b".wh..wh..opq"
_OPAQUE_XATTR: Final = b"trusted.overlay.opaque"
_XATTR_KEY: Final = b"SCHILY.xattr."
# overlayfs keeps its own state in these namespaces; a layer must not control overlayfs
# other than through whiteouts, and such state never belongs in a layer we write.
_OVERLAY_XATTRS: Final = (b"trusted.overlay.", b"user.overlay.")
_OVERLAY_XATTRS_STR: Final = ("trusted.overlay.", "user.overlay.")

# tar type flags
_REG_TYPES: Final = frozenset({b"0", b"\0", b"7"})
_T_LINK: Final = b"1"
_T_SYM: Final = b"2"
_T_CHR: Final = b"3"
_T_BLK: Final = b"4"
_T_DIR: Final = b"5"
_T_FIFO: Final = b"6"
_META_TYPES: Final = frozenset({b"x", b"g", b"L", b"K"})

_NS: Final = 1_000_000_000
_MAX_ID: Final = (1 << 32) - 2  # (uid_t)-1 means "unchanged" to chown


def _euid_is_root() -> bool:
    return os.geteuid() == 0


@dataclass(frozen=True)
class UnpackPolicy:
    """What an unpacked layer may contain beyond plain files, and how big it may get."""

    preserve_owners: bool = field(default_factory=_euid_is_root)
    allowed_devices: frozenset[tuple[str, int, int]] = RUNC_DEVICES
    max_entries: int = 1_000_000
    max_name: int = 4096


def default_policy() -> UnpackPolicy:
    """Owners kept when running as root; only the device nodes runc creates allowed."""
    return UnpackPolicy()


@dataclass(frozen=True)
class UnpackResult:
    diff_id: str  # sha256 of the whole uncompressed stream, trailing padding included
    size: int  # sum of the sizes of the regular files written
    entries: int


@dataclass(frozen=True)
class PackResult:
    diff_id: str  # sha256 of the uncompressed tar
    digest: str  # sha256 of the bytes written (== diff_id without compression)
    size: int  # bytes written


# --------------------------------------------------------------------------------------
# Reading: decompressing sources, a read-ahead thread that hashes, a block reader


class _Corrupt(Exception):
    """The stream is not a well-formed (compressed) tar; becomes :class:`ImageError`."""


class _Source(Protocol):
    def read(self) -> bytes:
        """The next piece of the decompressed stream (at most _CHUNK bytes); b"" at its end."""
        ...


class _PlainSource:
    __slots__ = ("_raw",)

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw

    def read(self) -> bytes:
        return self._raw.read(_CHUNK)


class _GzipSource:
    """Multi-member gzip via zlib; zlib checks each member's CRC and length. Zero bytes
    between or after members are skipped (as gzip(1) and Python's gzip module do)."""

    __slots__ = ("_d", "_done", "_pending", "_raw")

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._d = zlib.decompressobj(31)
        self._pending = b""
        self._done = False

    def read(self) -> bytes:
        try:
            while not self._done:
                d = self._d
                if d.eof:
                    rest = d.unused_data.lstrip(b"\0")
                    while not rest:
                        more = self._raw.read(_RAW_CHUNK)
                        if not more:
                            self._done = True
                            return b""
                        rest = more.lstrip(b"\0")
                    self._d = d = zlib.decompressobj(31)
                    self._pending = rest
                data = self._pending or self._raw.read(_RAW_CHUNK)
                if not data:
                    raise _Corrupt("truncated gzip data")
                out = d.decompress(data, _CHUNK)
                self._pending = d.unconsumed_tail
                if out:
                    return out
        except zlib.error as exc:
            raise _Corrupt(f"bad gzip data: {exc}") from None
        return b""


class _ZstdFrames:
    """Passes the compressed bytes through and follows their frame structure (RFC 8878:
    frame header, then block headers, whose sizes say how far to skip), so that the end of
    the input can be checked to fall on a frame boundary. zstandard's stream reader does not
    report a stream cut short inside a frame."""

    __slots__ = ("_acc", "_checksum", "_frames", "_need", "_raw", "_skip", "_state")

    _MAGIC, _SKIPPABLE_SIZE, _FRAME_HEADER, _BLOCK_HEADER = range(4)

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._state = self._MAGIC
        self._need = 4  # bytes wanted in _acc before the next step
        self._acc = b""
        self._skip = 0  # bytes to pass over first
        self._checksum = False
        self._frames = 0

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        pos, end = 0, len(data)
        while pos < end:
            if self._skip:
                k = min(self._skip, end - pos)
                self._skip -= k
                pos += k
                continue
            k = min(self._need - len(self._acc), end - pos)
            self._acc += data[pos : pos + k]
            pos += k
            if len(self._acc) == self._need:
                acc, self._acc = self._acc, b""
                self._step(acc)
        return data

    def _step(self, b: bytes) -> None:
        value = int.from_bytes(b, "little")
        if self._state == self._MAGIC:
            if value == 0xFD2FB528:
                self._state, self._need = self._FRAME_HEADER, 1
            elif value & 0xFFFFFFF0 == 0x184D2A50:
                self._state, self._need = self._SKIPPABLE_SIZE, 4
            else:
                raise _Corrupt("bad zstd data: not a zstd frame")
        elif self._state == self._SKIPPABLE_SIZE:
            self._skip = value
            self._state, self._need = self._MAGIC, 4
            self._frames += 1
        elif self._state == self._FRAME_HEADER:
            single_segment = bool(value & 0x20)
            self._checksum = bool(value & 0x04)
            content_size = (1 if single_segment else 0, 2, 4, 8)[value >> 6]
            self._skip = (0 if single_segment else 1) + (0, 1, 2, 4)[value & 3] + content_size
            self._state, self._need = self._BLOCK_HEADER, 3
        else:
            block_type = (value >> 1) & 3
            if block_type == 3:
                raise _Corrupt("bad zstd data: reserved block type")
            self._skip = 1 if block_type == 1 else value >> 3
            if value & 1:  # the frame's last block
                self._skip += 4 if self._checksum else 0
                self._state, self._need = self._MAGIC, 4
                self._frames += 1

    def complete(self) -> bool:
        return self._state == self._MAGIC and not self._acc and not self._skip and self._frames > 0


class _ZstdSource:
    """All frames of a zstd stream; the input must end where a frame ends."""

    __slots__ = ("_frames", "_reader")

    def __init__(self, raw: BinaryIO) -> None:
        self._frames = _ZstdFrames(raw)
        # The reader only ever calls read() on its source.
        self._reader = zstandard.ZstdDecompressor().stream_reader(
            cast("BinaryIO", self._frames),
            read_size=_RAW_CHUNK,
            read_across_frames=True,
            closefd=False,
        )

    def read(self) -> bytes:
        try:
            out = self._reader.read(_CHUNK)
        except zstandard.ZstdError as exc:
            raise _Corrupt(f"bad zstd data: {exc}") from None
        if not out and not self._frames.complete():
            raise _Corrupt("truncated zstd data")
        return out


def _source(raw: BinaryIO, compression: Compression) -> _Source:
    if compression == "gzip":
        return _GzipSource(raw)
    if compression == "zstd":
        return _ZstdSource(raw)
    if compression == "none":
        return _PlainSource(raw)
    raise InvalidArgument(f"unknown compression {compression!r}")


class _ReadAhead:
    """Decompresses and hashes on a helper thread, a few chunks ahead of the tar parser.

    zlib, zstandard, hashlib and os.write all release the GIL, so inflating the next chunk
    overlaps with writing the current one. At most ``_AHEAD`` chunks are held in memory.
    """

    _AHEAD: Final = 4

    def __init__(self, src: _Source, digest: _Hash) -> None:
        self._src = src
        self._hash = digest
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(self._AHEAD)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, name="layer-read-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                chunk = self._src.read()
                if chunk:
                    self._hash.update(chunk)
                self._queue.put(chunk)
                if not chunk:
                    return
        except BaseException as exc:  # handed to the reading thread, raised there
            self._queue.put(exc)

    def read(self) -> bytes:
        if self._done:
            return b""
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if not item:
            self._done = True
        return item

    def close(self) -> None:
        """Stop the helper (it may be blocked handing over a chunk) and wait for it."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(0.05)


class _Reader:
    """Sequential reads over a source (which has hashed what it returns)."""

    __slots__ = ("_buf", "_pos", "_src", "_what")

    def __init__(self, src: _Source, what: str) -> None:
        self._src = src
        self._what = what
        self._buf = b""
        self._pos = 0

    def _fill(self) -> bool:
        try:
            chunk = self._src.read()
        except OSError as exc:
            raise from_oserror("read", self._what, exc) from exc
        if not chunk:
            return False
        if self._pos < len(self._buf):
            self._buf = self._buf[self._pos :] + chunk
        else:
            self._buf = chunk
        self._pos = 0
        return True

    def read(self, n: int) -> bytes:
        """Exactly n bytes, or fewer at the end of the stream."""
        while len(self._buf) - self._pos < n:
            if not self._fill():
                break
        pos = self._pos
        out = self._buf[pos : pos + n]
        self._pos = pos + len(out)
        return out

    def skip(self, n: int) -> None:
        while n:
            avail = len(self._buf) - self._pos
            if not avail:
                if not self._fill():
                    raise _Corrupt("unexpected end of data")
                continue
            k = min(avail, n)
            self._pos += k
            n -= k

    def copy_to(self, fd: int, n: int) -> None:
        while n:
            avail = len(self._buf) - self._pos
            if not avail:
                if not self._fill():
                    raise _Corrupt("unexpected end of data")
                continue
            k = min(avail, n)
            view = memoryview(self._buf)[self._pos : self._pos + k]
            while view:
                view = view[os.write(fd, view) :]
            self._pos += k
            n -= k

    def drain(self) -> None:
        """Read (and hash) whatever follows the end-of-archive marker."""
        self._pos = len(self._buf)
        while self._fill():
            self._pos = len(self._buf)


# --------------------------------------------------------------------------------------
# Tar header parsing


def _nts(field: bytes) -> bytes:
    i = field.find(b"\0")
    return field if i < 0 else field[:i]


def _num(field: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 when the top bit is set."""
    if field and field[0] & 0x80:
        if field[0] & 0x40:
            raise _Corrupt("negative number in header")
        return int.from_bytes(bytes([field[0] & 0x3F]) + field[1:], "big")
    text = _nts(field).strip(b" ")
    if not text:
        return 0
    if not text.isdigit():
        raise _Corrupt(f"bad number {text!r} in header")
    try:
        return int(text, 8)
    except ValueError:
        raise _Corrupt(f"bad octal number {text!r} in header") from None


def _checksum_ok(hdr: bytes) -> bool:
    stored = _num(hdr[148:156])
    unsigned = sum(hdr) - sum(hdr[148:156]) + 8 * 32
    if stored == unsigned:
        return True
    # Some old tars summed signed chars.
    signed = unsigned - 256 * sum(1 for b in hdr[:148] + hdr[156:] if b > 127)
    return stored == signed


def _parse_pax(data: bytes, out: dict[bytes, bytes]) -> None:
    """``"%d %s=%s\\n"`` records, each ``%d`` bytes long; linear time, strict."""
    pos, end = 0, len(data)
    while pos < end:
        sp = data.find(b" ", pos, pos + 21)
        digits = data[pos:sp]
        if sp < 0 or not digits.isdigit():
            raise _Corrupt("malformed PAX record length")
        rec_end = pos + int(digits)
        if rec_end > end or rec_end < sp + 3 or data[rec_end - 1] != 0x0A:
            raise _Corrupt("malformed PAX record")
        eq = data.find(b"=", sp + 1, rec_end - 1)
        if eq <= sp + 1:
            raise _Corrupt("malformed PAX record (no keyword)")
        out[data[sp + 1 : eq]] = data[eq + 1 : rec_end - 1]
        pos = rec_end


def _pax_int(value: bytes, what: str) -> int:
    if not value.isdigit():
        raise _Corrupt(f"bad PAX {what} {value[:40]!r}")
    return int(value)


def _pax_time_ns(value: bytes) -> int:
    neg = value.startswith(b"-")
    whole, _, frac = (value[1:] if neg else value).partition(b".")
    if not whole.isdigit() or (frac and not frac.isdigit()) or len(whole) > 18:
        raise _Corrupt(f"bad PAX mtime {value[:40]!r}")
    ns = int(whole) * _NS + (int((frac + b"000000000")[:9]) if frac else 0)
    return -ns if neg else ns


def _show(name: bytes) -> str:
    return name.decode("utf-8", "backslashreplace")


# --------------------------------------------------------------------------------------
# Unpacking


class _Entry:
    """One archive member, extended headers applied."""

    __slots__ = (
        "gid",
        "kind",
        "linkname",
        "major",
        "minor",
        "mode",
        "mtime",
        "name",
        "size",
        "uid",
        "xattrs",
    )

    def __init__(self, kind: bytes, name: bytes, linkname: bytes, size: int) -> None:
        self.kind = kind
        self.name = name
        self.linkname = linkname
        self.size = size
        self.mode = 0
        self.uid = 0
        self.gid = 0
        self.mtime = 0  # ns
        self.major = 0
        self.minor = 0
        self.xattrs: dict[bytes, bytes] | None = None


class _Unpacker:
    def __init__(self, root_fd: int, policy: UnpackPolicy, what: str) -> None:
        self.root = root_fd
        self.policy = policy
        self.what = what
        self.preserve = policy.preserve_owners
        # The directory stack: fds of the components of the most recent parent directory.
        self.names: list[bytes] = []
        self.fds: list[int] = []
        # Directory modes and mtimes are applied after everything is written.
        self.dirs: dict[bytes, tuple[int, int]] = {}
        self.size = 0
        self.warned: set[str] = set()

    # ---- errors

    def unsafe(self, name: bytes, reason: str) -> UnsafeLayer:
        return UnsafeLayer(_show(name), f"{reason} (in {self.what})")

    def warn_once(self, key: str, msg: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            log.warning("%s: %s", self.what, msg)

    # ---- directory walking

    def close(self) -> None:
        self.truncate(0)

    def truncate(self, depth: int) -> None:
        fds = self.fds
        while len(fds) > depth:
            os.close(fds.pop())
        del self.names[depth:]

    def open_dir(
        self, at: int, parts: list[bytes], i: int, name: bytes, *, create: bool, link: bool
    ) -> int:
        comp = parts[i]
        try:
            return os.open(comp, _DIR_FLAGS, dir_fd=at)
        except FileNotFoundError:
            if not create:
                raise
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            where = _show(b"/".join(parts[: i + 1]))
            st = os.stat(comp, dir_fd=at, follow_symlinks=False)
            what = "hardlink target's parent" if link else "parent"
            if stat.S_ISLNK(st.st_mode):
                raise self.unsafe(
                    name, f"{what} {where!r} is a symlink; refusing to go through it"
                ) from None
            raise self.unsafe(name, f"{what} {where!r} is not a directory") from None
        os.mkdir(comp, 0o755, dir_fd=at)
        fd = os.open(comp, _DIR_FLAGS, dir_fd=at)
        os.chmod(fd, 0o755)  # whatever the umask
        return fd

    def parent(self, parts: list[bytes], name: bytes, *, create: bool = True) -> int:
        """An fd of the directory ``parts`` below the root (kept open until the next call)."""
        names = self.names
        if parts == names:
            return self.fds[-1] if names else self.root
        depth = 0
        for a, b in zip(names, parts, strict=False):
            if a != b:
                break
            depth += 1
        self.truncate(depth)
        fd = self.fds[-1] if depth else self.root
        for i in range(depth, len(parts)):
            fd = self.open_dir(fd, parts, i, name, create=create, link=False)
            self.fds.append(fd)
            names.append(parts[i])
        return fd

    def clear(self, at: int, base: bytes) -> None:
        """Remove whatever is at ``base`` in ``at`` (a directory with all it holds)."""
        st = os.stat(base, dir_fd=at, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(base, dir_fd=at)
        else:
            os.unlink(base, dir_fd=at)

    # ---- metadata

    def set_xattrs(self, target: int | bytes, xattrs: dict[bytes, bytes], name: bytes) -> None:
        for key, value in xattrs.items():
            try:
                if isinstance(target, int):
                    os.setxattr(target, key, value)
                else:
                    os.setxattr(target, key, value, follow_symlinks=False)
            except OSError as exc:
                if exc.errno in (errno.ENOTSUP, errno.EPERM):
                    self.warn_once(
                        f"xattr:{key!r}:{exc.errno}",
                        f"cannot set xattr {_show(key)} (first on {_show(name)!r}): "
                        f"{os.strerror(exc.errno)}; skipped",
                    )
                    continue
                raise

    def special_meta(self, at: int, base: bytes, e: _Entry, *, chmod: bool) -> None:
        """Owner, mode, xattrs and mtime of a non-directory that cannot be opened."""
        if self.preserve:
            os.chown(base, e.uid, e.gid, dir_fd=at, follow_symlinks=False)
        if chmod:
            os.chmod(base, e.mode, dir_fd=at, follow_symlinks=False)
        if e.xattrs:
            self.set_xattrs(b"/proc/self/fd/%d/%s" % (at, base), e.xattrs, e.name)
        os.utime(base, ns=(e.mtime, e.mtime), dir_fd=at, follow_symlinks=False)

    # ---- one entry

    def split(self, path: bytes, name: bytes, what: str) -> list[bytes]:
        if len(path) > self.policy.max_name:
            raise self.unsafe(name, f"{what} longer than {self.policy.max_name} bytes")
        if b"\0" in path:
            raise self.unsafe(name, f"{what} contains a NUL byte")
        if path[:1] == b"/":
            raise self.unsafe(name, f"{what} is absolute")
        parts = [p for p in path.split(b"/") if p and p != b"."]
        if b".." in parts:
            raise self.unsafe(name, f"{what} has a '..' component")
        return parts

    def entry(self, reader: _Reader, e: _Entry) -> bool:
        """Write one entry. Returns True when it consumed the entry's data."""
        kind, name, linkname = e.kind, e.name, e.linkname
        mode, uid, gid, mtime, xattrs = e.mode, e.uid, e.gid, e.mtime, e.xattrs
        parts = self.split(name, name, "name")
        if self.preserve and not (0 <= uid <= _MAX_ID and 0 <= gid <= _MAX_ID):
            raise self.unsafe(name, f"owner {uid}:{gid} out of range")

        if not parts:  # "." or "./": the layer root itself
            if kind != _T_DIR:
                raise self.unsafe(name, "would replace the layer root with a non-directory")
            if self.preserve:
                os.chown(self.root, uid, gid)
            if xattrs:
                self.set_xattrs(self.root, xattrs, name)
            self.dirs[b""] = (mode, mtime)
            return False

        base = parts[-1]
        if base.startswith(_WH_PREFIX):
            self.whiteout(parts, e)
            return False
        if _WH_META in name and any(p.startswith(_WH_META) for p in parts):
            return False  # inside an aufs metadata directory (.wh..wh.plnk and the like)

        at = self.parent(parts[:-1], name)

        if kind in _REG_TYPES:
            try:
                fd = os.open(base, _NEW_FILE_FLAGS, 0o600, dir_fd=at)
            except FileExistsError:
                self.clear(at, base)
                fd = os.open(base, _NEW_FILE_FLAGS, 0o600, dir_fd=at)
            try:
                reader.copy_to(fd, e.size)
                if self.preserve:
                    os.chown(fd, uid, gid)
                os.chmod(fd, mode)  # after chown, which clears set-id bits
                if xattrs:
                    self.set_xattrs(fd, xattrs, name)  # after writing, which drops caps
                os.utime(fd, ns=(mtime, mtime))
            finally:
                os.close(fd)
            self.size += e.size
            return True

        if kind == _T_DIR:
            try:
                os.mkdir(base, 0o700, dir_fd=at)
            except FileExistsError:
                st = os.stat(base, dir_fd=at, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    os.unlink(base, dir_fd=at)
                    os.mkdir(base, 0o700, dir_fd=at)
            if self.preserve:
                os.chown(base, uid, gid, dir_fd=at, follow_symlinks=False)
            if xattrs:
                fd = os.open(base, _DIR_FLAGS, dir_fd=at)
                try:
                    self.set_xattrs(fd, xattrs, name)
                finally:
                    os.close(fd)
            self.dirs[b"/".join(parts)] = (mode, mtime)
            return False

        if kind == _T_SYM:
            if not linkname:
                raise self.unsafe(name, "symlink with an empty target")
            if len(linkname) > self.policy.max_name or b"\0" in linkname:
                raise self.unsafe(name, "symlink target too long or contains a NUL byte")
            try:
                os.symlink(linkname, base, dir_fd=at)
            except FileExistsError:
                self.clear(at, base)
                os.symlink(linkname, base, dir_fd=at)
            self.special_meta(at, base, e, chmod=False)
            return False

        if kind == _T_LINK:
            self.hardlink(at, parts, linkname, name)
            return False

        if kind in (_T_CHR, _T_BLK, _T_FIFO):
            if kind == _T_FIFO:
                fmt, dev = stat.S_IFIFO, 0
            else:
                letter = "c" if kind == _T_CHR else "b"
                if (letter, e.major, e.minor) not in self.policy.allowed_devices:
                    raise self.unsafe(
                        name, f"device node {letter} {e.major}:{e.minor} is not allowed"
                    )
                fmt = stat.S_IFCHR if kind == _T_CHR else stat.S_IFBLK
                dev = os.makedev(e.major, e.minor)
            try:
                os.mknod(base, fmt | 0o600, dev, dir_fd=at)
            except FileExistsError:
                self.clear(at, base)
                os.mknod(base, fmt | 0o600, dev, dir_fd=at)
            except PermissionError:
                if kind == _T_FIFO:
                    raise
                self.warn_once(
                    "mknod", f"no permission to create device nodes; skipped {_show(name)!r}"
                )
                return False
            self.special_meta(at, base, e, chmod=True)
            return False

        raise self.unsafe(name, f"unsupported entry type {kind.decode('latin-1')!r}")

    def whiteout(self, parts: list[bytes], e: _Entry) -> None:
        name = e.name
        base = parts[-1]
        if base == _WH_OPAQUE:
            at = self.parent(parts[:-1], name)
            os.setxattr(at, _OPAQUE_XATTR, b"y")
            return
        if base.startswith(_WH_META):
            return  # other aufs metadata: ignored
        hidden = base[len(_WH_PREFIX) :]
        if hidden in (b"", b".", b".."):
            raise self.unsafe(name, "whiteout of an invalid name")
        at = self.parent(parts[:-1], name)
        try:
            os.mknod(hidden, stat.S_IFCHR, 0, dir_fd=at)
        except FileExistsError:
            self.clear(at, hidden)
            os.mknod(hidden, stat.S_IFCHR, 0, dir_fd=at)
        e.xattrs = None
        self.special_meta(at, hidden, e, chmod=True)

    def hardlink(self, at: int, parts: list[bytes], linkname: bytes, name: bytes) -> None:
        target = self.split(linkname, name, "hardlink target")
        if not target:
            raise self.unsafe(name, "hardlink to the layer root")
        if target == parts:
            raise self.unsafe(name, "hardlink to itself")
        tparent = target[:-1]
        missing = f"hardlink target {_show(linkname)!r} does not exist in this layer"
        opened: list[int] = []
        try:
            if tparent == parts[:-1]:
                tat = at
            else:
                tat = self.root
                for i in range(len(tparent)):
                    try:
                        tat = self.open_dir(tat, tparent, i, name, create=False, link=True)
                    except FileNotFoundError:
                        raise self.unsafe(name, missing) from None
                    opened.append(tat)
            for attempt in (1, 2):
                try:
                    os.link(
                        target[-1], parts[-1], src_dir_fd=tat, dst_dir_fd=at, follow_symlinks=False
                    )
                    return
                except FileExistsError:
                    if attempt == 2:
                        raise
                    self.clear(at, parts[-1])
                except FileNotFoundError:
                    raise self.unsafe(name, missing) from None
                except PermissionError:
                    st = os.stat(target[-1], dir_fd=tat, follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode):
                        raise self.unsafe(name, "hardlink to a directory") from None
                    raise
        finally:
            for fd in opened:
                os.close(fd)

    def finish(self) -> None:
        """Directory modes and mtimes, deepest first, once nothing more is written."""
        self.truncate(0)
        for path in sorted(self.dirs, reverse=True):
            mode, mtime = self.dirs[path]
            if not path:
                os.chmod(self.root, mode)
                os.utime(self.root, ns=(mtime, mtime))
                continue
            parts = path.split(b"/")
            try:
                at = self.parent(parts[:-1], path, create=False)
                fd = os.open(parts[-1], _DIR_FLAGS, dir_fd=at)
            except UnsafeLayer:
                continue  # replaced by a non-directory later in the layer
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    continue
                raise
            try:
                os.chmod(fd, mode)
                os.utime(fd, ns=(mtime, mtime))
            finally:
                os.close(fd)
        self.truncate(0)

    # ---- the archive

    @staticmethod
    def apply_pax(e: _Entry, pax: dict[bytes, bytes]) -> None:
        for key, value in pax.items():
            if key == b"path":
                if value:
                    e.name = value
            elif key == b"linkpath":
                if value:
                    e.linkname = value
            elif key == b"size":
                e.size = _pax_int(value, "size")
            elif key == b"uid":
                e.uid = _pax_int(value, "uid")
            elif key == b"gid":
                e.gid = _pax_int(value, "gid")
            elif key == b"mtime":
                e.mtime = _pax_time_ns(value)
            elif key.startswith(_XATTR_KEY):
                xname = key[len(_XATTR_KEY) :]
                if xname and not xname.startswith(_OVERLAY_XATTRS):
                    if e.xattrs is None:
                        e.xattrs = {}
                    e.xattrs[xname] = value
            elif key.startswith(b"GNU.sparse."):
                raise _Corrupt("sparse files are not supported")

    def run(self, reader: _Reader) -> int:
        policy = self.policy
        entries = 0
        pax: dict[bytes, bytes] = {}
        longname: bytes | None = None
        longlink: bytes | None = None
        name = b""
        try:
            while True:
                hdr = reader.read(_BLOCK)
                if len(hdr) < _BLOCK:
                    pending = pax or longname is not None or longlink is not None
                    if not hdr and not entries and not pending:
                        return 0  # an empty stream: an empty layer
                    raise _Corrupt(
                        "truncated header"
                        if hdr
                        else "archive ends without an end-of-archive marker"
                    )
                if hdr == _ZERO_BLOCK:
                    if pax or longname is not None or longlink is not None:
                        raise _Corrupt("extended header not followed by an entry")
                    return entries
                if not _checksum_ok(hdr):
                    raise _Corrupt("bad header checksum")
                kind = hdr[156:157]
                size = _num(hdr[124:136])

                if kind in _META_TYPES:
                    if size > _MAX_META:
                        raise _Corrupt(f"oversized extended header ({size} bytes)")
                    data = reader.read(size)
                    if len(data) < size:
                        raise _Corrupt("unexpected end of data")
                    reader.skip(-size % _BLOCK)
                    if kind == b"x":
                        _parse_pax(data, pax)
                    elif kind == b"L":
                        longname = _nts(data)
                    elif kind == b"K":
                        longlink = _nts(data)
                    # b"g": global PAX headers are ignored (as containerd does)
                    continue

                name = _nts(hdr[0:100])
                if hdr[257:263] == b"ustar\0":
                    prefix = _nts(hdr[345:500])
                    if prefix:
                        name = prefix + b"/" + name
                e = _Entry(kind, name, _nts(hdr[157:257]), size)
                e.mode = _num(hdr[100:108]) & 0o7777
                e.uid = _num(hdr[108:116])
                e.gid = _num(hdr[116:124])
                e.mtime = _num(hdr[136:148]) * _NS
                if kind in (_T_CHR, _T_BLK):
                    e.major = _num(hdr[329:337])
                    e.minor = _num(hdr[337:345])
                if longname is not None:
                    e.name, longname = longname, None
                if longlink is not None:
                    e.linkname, longlink = longlink, None
                if pax:
                    self.apply_pax(e, pax)
                    pax = {}
                name = e.name
                if kind == b"\0" and name.endswith(b"/"):
                    e.kind = kind = _T_DIR  # pre-POSIX directory
                elif kind == b"S":
                    raise _Corrupt("sparse files are not supported")

                entries += 1
                if entries > policy.max_entries:
                    raise self.unsafe(name, f"layer has more than {policy.max_entries} entries")
                try:
                    consumed = self.entry(reader, e)
                except OSError as exc:
                    where = f"{self.what}: entry {_show(name)!r}"
                    raise from_oserror("unpack", where, exc) from exc
                except (OverflowError, ValueError) as exc:
                    raise ImageError(f"{self.what}: entry {_show(name)!r}: {exc}") from exc
                if kind in _REG_TYPES:
                    if not consumed:
                        reader.skip(e.size)
                    reader.skip(-e.size % _BLOCK)
        except _Corrupt as exc:
            where = f" (at or after entry {_show(name)!r})" if name else ""
            raise ImageError(f"{self.what}: {exc}{where}") from None


def unpack_layer(
    src: BinaryIO,
    compression: Compression,
    dest: Path,
    *,
    what: str,
    policy: UnpackPolicy | None = None,
) -> UnpackResult:
    """Stream the layer tar ``src`` into ``dest``, an existing empty directory, in overlay
    diff form. On error ``dest`` is left half written; the caller removes it."""
    pol = policy if policy is not None else default_policy()
    digest = hashlib.sha256()
    try:
        root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise from_oserror("open", str(dest), exc) from exc
    try:
        ahead = _ReadAhead(_source(src, compression), digest)
    except BaseException:
        os.close(root_fd)
        raise
    reader = _Reader(ahead, what)
    unpacker = _Unpacker(root_fd, pol, what)
    try:
        entries = unpacker.run(reader)
        try:
            unpacker.finish()
        except OSError as exc:
            raise from_oserror("unpack", f"{what}: directory metadata", exc) from exc
        try:
            reader.drain()
        except _Corrupt as exc:
            raise ImageError(f"{what}: {exc} (after the end of the archive)") from None
    finally:
        ahead.close()
        unpacker.close()
        os.close(root_fd)
    return UnpackResult(diff_id="sha256:" + digest.hexdigest(), size=unpacker.size, entries=entries)


def _stream(
    src: BinaryIO, compression: Compression, what: str, digest: _Hash, out: BinaryIO | None
) -> int:
    source = _source(src, compression)
    total = 0
    while True:
        try:
            chunk = source.read()
        except _Corrupt as exc:
            raise ImageError(f"{what}: {exc}") from None
        except OSError as exc:
            raise from_oserror("read", what, exc) from exc
        if not chunk:
            return total
        digest.update(chunk)
        total += len(chunk)
        if out is not None:
            try:
                out.write(chunk)
            except OSError as exc:
                raise from_oserror("write", what, exc) from exc


def decompressed_digest(src: BinaryIO, compression: Compression, *, what: str) -> str:
    """``sha256:<hex>`` of the whole decompressed stream (a layer's diff ID), nothing kept."""
    digest = hashlib.sha256()
    _stream(src, compression, what, digest, None)
    return "sha256:" + digest.hexdigest()


def decompress_to(
    src: BinaryIO,
    compression: Compression,
    out: BinaryIO,
    *,
    expect_digest: str | None = None,
    what: str | None = None,
) -> int:
    """Write the decompressed stream to ``out`` and return its size. With ``expect_digest``,
    raise :class:`DigestMismatch` when what was written does not hash to it (the caller then
    discards ``out``)."""
    label = what or (f"layer {expect_digest}" if expect_digest else "layer")
    digest = hashlib.sha256()
    size = _stream(src, compression, label, digest, out)
    actual = "sha256:" + digest.hexdigest()
    if expect_digest is not None and actual != expect_digest:
        raise DigestMismatch(f"{label}: uncompressed content", expect_digest, actual)
    return size


# --------------------------------------------------------------------------------------
# Packing


class _Sink:
    """What tarfile writes into: hashes the tar, compresses, hashes and writes the output."""

    def __init__(self, out: BinaryIO, compression: Compression) -> None:
        self._out = out
        self.tar_hash = hashlib.sha256()
        self.out_hash = hashlib.sha256()
        self.tar_size = 0
        self.size = 0
        self._gzip: zlib._Compress | None = None
        self._zstd: zstandard.ZstdCompressionObj | None = None
        if compression == "gzip":
            # wbits 31: a gzip wrapper with mtime 0, no file name, OS "unix".
            self._gzip = zlib.compressobj(_GZIP_LEVEL, zlib.DEFLATED, 31)
        elif compression == "zstd":
            self._zstd = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compressobj()
        elif compression != "none":
            raise InvalidArgument(f"unknown compression {compression!r}")

    def _emit(self, data: bytes) -> None:
        if data:
            self.out_hash.update(data)
            self._out.write(data)
            self.size += len(data)

    def write(self, b: bytes) -> int:
        self.tar_hash.update(b)
        self.tar_size += len(b)
        if self._gzip is not None:
            self._emit(self._gzip.compress(b))
        elif self._zstd is not None:
            self._emit(self._zstd.compress(b))
        else:
            self._emit(b)
        return len(b)

    def finish(self) -> None:
        if self._gzip is not None:
            self._emit(self._gzip.flush())
        elif self._zstd is not None:
            self._emit(self._zstd.flush())

    def tell(self) -> int:
        return self.tar_size

    def read(self, size: int, /) -> bytes:
        raise OSError(errno.EBADF, "write-only")

    def seek(self, pos: int, /) -> int:
        raise OSError(errno.ESPIPE, "not seekable")

    def close(self) -> None:
        pass


# one item to write: (tar name, kind, path on disk, lstat, xattrs)
_Item = tuple[bytes, str, bytes, os.stat_result, dict[str, bytes]]


def _read_xattrs(path: bytes, drop_overlay: bool) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    out: dict[str, bytes] = {}
    for key in sorted(names):
        if drop_overlay and key.startswith(_OVERLAY_XATTRS_STR):
            continue
        try:
            out[key] = os.getxattr(path, key, follow_symlinks=False)
        except OSError as exc:
            if exc.errno != errno.ENODATA:  # removed meanwhile
                raise
    return out


def _scan(root: bytes, overlay_whiteouts: bool) -> list[_Item]:
    items: list[_Item] = []
    todo: list[bytes] = [b""]
    while todo:
        rel = todo.pop()
        with os.scandir(root + b"/" + rel if rel else root) as it:
            for de in it:
                name = rel + b"/" + de.name if rel else de.name
                path = de.path
                st = de.stat(follow_symlinks=False)
                fmt = stat.S_IFMT(st.st_mode)
                if fmt == stat.S_IFSOCK:
                    continue  # tar has no sockets
                xattrs = _read_xattrs(path, overlay_whiteouts)
                if fmt == stat.S_IFDIR:
                    todo.append(name)
                    if overlay_whiteouts:
                        try:
                            opaque = os.getxattr(path, _OPAQUE_XATTR, follow_symlinks=False)
                        except OSError:
                            opaque = b""
                        if opaque[:1] == b"y":
                            items.append((name + b"/" + _WH_OPAQUE, "opaque", path, st, {}))
                    items.append((name, "dir", path, st, xattrs))
                elif overlay_whiteouts and fmt == stat.S_IFCHR and st.st_rdev == 0:
                    slash = name.rfind(b"/") + 1
                    wh = name[:slash] + _WH_PREFIX + name[slash:]
                    items.append((wh, "whiteout", path, st, {}))
                else:
                    items.append((name, "other", path, st, xattrs))
    items.sort(key=lambda item: item[0])
    return items


def pack_layer(
    root: Path,
    out: BinaryIO,
    *,
    compression: Compression = "gzip",
    mtime: int | None = None,
    overlay_whiteouts: bool = False,
) -> PackResult:
    """Write a deterministic PAX tar of the contents of ``root`` to ``out``.

    Entries are sorted by name (bytes order); owners, modes (set-id bits included), xattrs,
    symlinks, hardlinks, FIFOs and device nodes are kept; user and group names are left
    empty; mtimes are clamped to ``mtime`` when given. With ``overlay_whiteouts`` the overlay
    diff form is turned back into OCI whiteouts.
    """
    sink = _Sink(out, compression)
    root_b = os.fsencode(root)
    try:
        items = _scan(root_b, overlay_whiteouts)
        tar = tarfile.TarFile(
            fileobj=sink,
            mode="w",
            format=tarfile.PAX_FORMAT,
            encoding="utf-8",
            errors="surrogateescape",
            copybufsize=_CHUNK,
        )
        links: dict[tuple[int, int], str] = {}
        for name, kind, path, st, xattrs in items:
            info = tarfile.TarInfo(name.decode("utf-8", "surrogateescape"))
            info.mode = stat.S_IMODE(st.st_mode)
            info.uid = st.st_uid
            info.gid = st.st_gid
            info.uname = info.gname = ""
            secs = st.st_mtime_ns // _NS
            info.mtime = secs if mtime is None else min(secs, mtime)
            if xattrs:
                info.pax_headers = {
                    "SCHILY.xattr." + key: value.decode("utf-8", "surrogateescape")
                    for key, value in xattrs.items()
                }
            fmt = stat.S_IFMT(st.st_mode)
            if kind == "opaque":
                info.mode = 0o644
                tar.addfile(info)
                continue
            if kind == "whiteout":
                tar.addfile(info)
                continue
            if fmt == stat.S_IFDIR:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                continue
            if st.st_nlink > 1:
                first = links.setdefault((st.st_dev, st.st_ino), info.name)
                if first != info.name:
                    info.type = tarfile.LNKTYPE
                    info.linkname = first
                    tar.addfile(info)
                    continue
            if fmt == stat.S_IFREG:
                info.size = st.st_size
                fd = os.open(path, _READ_FLAGS)
                with open(fd, "rb", buffering=0) as f:
                    tar.addfile(info, f)
            elif fmt == stat.S_IFLNK:
                info.type = tarfile.SYMTYPE
                info.linkname = os.readlink(path).decode("utf-8", "surrogateescape")
                tar.addfile(info)
            elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
                info.type = tarfile.CHRTYPE if fmt == stat.S_IFCHR else tarfile.BLKTYPE
                info.devmajor = os.major(st.st_rdev)
                info.devminor = os.minor(st.st_rdev)
                tar.addfile(info)
            elif fmt == stat.S_IFIFO:
                info.type = tarfile.FIFOTYPE
                tar.addfile(info)
        tar.close()
        sink.finish()
    except OSError as exc:
        raise from_oserror("pack", str(root), exc) from exc
    return PackResult(
        diff_id="sha256:" + sink.tar_hash.hexdigest(),
        digest="sha256:" + sink.out_hash.hexdigest(),
        size=sink.size,
    )
