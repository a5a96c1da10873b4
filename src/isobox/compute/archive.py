"""``cp`` out of and into a container's root, without ever leaving it.

The path a user names is resolved with :func:`isobox.silo.rootfs.secure_join` (symlinks
followed as if the root were ``/``), then walked from an fd of the root with ``O_NOFOLLOW``
at every component, so a symlink a container process swaps in meanwhile makes the walk
fail instead of reaching a host path. Reading (:func:`tar_out`) goes on with ``*at`` calls
from directory fds: links are archived as links, never followed. Writing (:func:`tar_in`)
refuses what a user's tar may not carry into a container — ``..``, absolute names, device
nodes, overlay whiteouts — and unpacks with storage's strict layer reader
(:func:`isobox.storage.layer_tar.unpack_layer`), which creates everything with ``*at``
calls below the destination's fd.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from isobox.errors import InvalidArgument, NotFound, UnsafeLayer, from_oserror
from isobox.silo.rootfs import secure_join
from isobox.spec.image import Compression
from isobox.storage.layer_tar import UnpackPolicy, unpack_layer

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 16
_BLOCK = 512


def inside(root: str, path: str) -> list[str]:
    """The components of ``path`` below ``root`` once the root's own symlinks are followed."""
    if not path.startswith("/"):
        path = "/" + path
    if "\x00" in path:
        raise InvalidArgument("path contains a NUL byte")
    joined = secure_join(root, path)
    rel = os.path.relpath(joined, root)
    return [] if rel == "." else rel.split("/")


def open_dir(root_fd: int, parts: list[str], what: str) -> int:
    """An fd of the directory ``parts`` below ``root_fd``, no symlink followed on the way."""
    fd = os.dup(root_fd)
    try:
        for comp in parts:
            try:
                nfd = os.open(comp, _DIR, dir_fd=fd)
            except FileNotFoundError as exc:
                raise NotFound(f"{what}: no such file or directory") from exc
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise InvalidArgument(f"{what}: {comp!r} is not a directory") from exc
                raise from_oserror("open", what, exc) from exc
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _pad(size: int) -> bytes:
    return b"\0" * (-size % _BLOCK)


def _header(ti: tarfile.TarInfo) -> bytes:
    return ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _entry(dir_fd: int, name: str, arc: str, links: dict[tuple[int, int], str]) -> Iterator[bytes]:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return  # vanished while we walked: a running container changes its files
    ti = tarfile.TarInfo(arc)
    ti.mode = stat.S_IMODE(st.st_mode)
    ti.uid, ti.gid, ti.mtime = st.st_uid, st.st_gid, int(st.st_mtime)
    mode = st.st_mode
    if stat.S_ISREG(mode):
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in links:
            ti.type, ti.linkname = tarfile.LNKTYPE, links[key]
            yield _header(ti)
            return
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=dir_fd)
        except OSError:
            return  # replaced by a link or a special file since the stat: skip it
        try:
            fst = os.fstat(fd)
            if not stat.S_ISREG(fst.st_mode):
                return
            links[key] = arc
            ti.size = fst.st_size
            yield _header(ti)
            left = ti.size
            while left:
                chunk = os.read(fd, min(_CHUNK, left))
                if not chunk:  # shrank meanwhile: keep the tar well formed
                    chunk = b"\0" * min(_CHUNK, left)
                left -= len(chunk)
                yield chunk
            yield _pad(ti.size)
        finally:
            os.close(fd)
    elif stat.S_ISDIR(mode):
        ti.type = tarfile.DIRTYPE
        try:
            fd = os.open(name, _DIR, dir_fd=dir_fd)
        except OSError:
            return
        try:
            yield _header(ti)
            for child in sorted(os.listdir(fd)):
                yield from _entry(fd, child, f"{arc}/{child}", links)
        finally:
            os.close(fd)
    elif stat.S_ISLNK(mode):
        ti.type = tarfile.SYMTYPE
        ti.linkname = os.readlink(name, dir_fd=dir_fd)
        yield _header(ti)
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        ti.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
        ti.devmajor, ti.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        yield _header(ti)
    elif stat.S_ISFIFO(mode):
        ti.type = tarfile.FIFOTYPE
        yield _header(ti)
    # sockets are not archived (tar cannot carry them)


def tar_out(root: str, path: str) -> Iterator[bytes]:
    """A tar of ``path`` inside ``root``, named by the path's last component (``.`` for
    the root itself), streamed as it is read.

    As with ``docker cp``, a last component that is a symlink is copied as the link itself
    (its folders are resolved inside the root); ``path/`` or ``path/.`` follows it."""
    base = posixpath.basename(path)
    if base in ("", ".", ".."):
        parts = inside(root, path)
    else:
        parts = [*inside(root, posixpath.dirname(path) or "/"), base]
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise from_oserror("open", root, exc) from exc
    try:
        parent = open_dir(root_fd, parts[:-1], path)
    finally:
        os.close(root_fd)
    try:
        if parts:
            try:
                os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError as exc:
                raise NotFound(f"{path}: no such file or directory") from exc
            yield from _entry(parent, parts[-1], parts[-1], {})
        else:
            yield from _entry(parent, ".", ".", {})
        yield b"\0" * (2 * _BLOCK)
    finally:
        os.close(parent)


class _Tee:
    """Reads from ``src`` and copies every byte to ``spool`` (so it is read once)."""

    def __init__(self, src: BinaryIO, spool: BinaryIO) -> None:
        self.src, self.spool = src, spool

    def read(self, n: int = -1) -> bytes:
        data = self.src.read(n)
        self.spool.write(data)
        return data


def _check_member(m: tarfile.TarInfo) -> None:
    name = m.name
    if name.startswith("/"):
        raise UnsafeLayer(name, "absolute name")
    parts = [p for p in name.split("/") if p and p != "."]
    if ".." in parts:
        raise UnsafeLayer(name, "'..' component")
    if m.isdev():
        raise UnsafeLayer(name, "device nodes may not be copied into a container")
    if parts and parts[-1].startswith(".wh."):
        raise UnsafeLayer(name, "overlay whiteouts may not be copied into a container")
    if m.islnk() and (m.linkname.startswith("/") or ".." in m.linkname.split("/")):
        raise UnsafeLayer(name, "hard link outside the archive")


def _compression(head: bytes) -> Compression:
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    return "none"


def tar_in(root: str, path: str, stream: BinaryIO, *, spool_dir: Path) -> None:
    """Extract the tar ``stream`` into the existing directory ``path`` inside ``root``.

    The tar is read once, checked entry by entry while it is copied to a spool file, and
    only then unpacked: a refused archive changes nothing in the container.
    """
    parts = inside(root, path)
    with tempfile.TemporaryFile(dir=spool_dir) as spool:
        try:
            with tarfile.open(fileobj=_Tee(stream, spool), mode="r|*") as tf:  # type: ignore[call-overload]
                for member in tf:
                    _check_member(member)
        except tarfile.TarError as exc:
            raise InvalidArgument(f"not a valid tar archive: {exc}") from exc
        with contextlib.suppress(Exception):  # the rest (padding) must reach the spool too
            while stream.read(_CHUNK):
                pass
        spool.seek(0)
        head = spool.read(4)
        spool.seek(0)
        try:
            root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise from_oserror("open", root, exc) from exc
        try:
            dest = open_dir(root_fd, parts, path)
        finally:
            os.close(root_fd)
        try:
            unpack_layer(
                spool, _compression(head), Path(f"/proc/self/fd/{dest}"),
                what=f"archive for {path}",
                policy=UnpackPolicy(allowed_devices=frozenset()),
            )
        finally:
            os.close(dest)
