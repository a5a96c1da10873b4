"""Content-addressed blob store: ``<root>/blobs/sha256/<hex>``.

A blob is written to a staging file while its sha256 is computed, checked against the digest
that names it, fsynced, and only then renamed into place; so a blob present under its name is
always whole and correct. Reads are verified too: :meth:`BlobStore.open` returns a reader
that raises :class:`~isobox.errors.DigestMismatch` once the last byte is read if the content
on disk no longer matches (bit rot, tampering).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from isobox.errors import DigestMismatch, ImageError, NotFound, from_oserror

CHUNK = 1 << 20
_HEX_RE = re.compile(r"^[0-9a-f]{64}$")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def digest_stream(fh: BinaryIO) -> tuple[str, int]:
    """``(sha256:<hex>, size)`` of everything left in ``fh``."""
    h = hashlib.sha256()
    size = 0
    while chunk := fh.read(CHUNK):
        h.update(chunk)
        size += len(chunk)
    return "sha256:" + h.hexdigest(), size


def digest_hex(digest: str) -> str:
    """The hex part of ``sha256:<hex>``; refuses anything else (it becomes a file name)."""
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or not _HEX_RE.match(hexpart):
        raise ImageError(f"unsupported or malformed digest {digest!r}")
    return hexpart


class VerifyingReader(io.RawIOBase):
    """Reads a blob file and checks its digest when the last byte has been read."""

    def __init__(self, path: Path, digest: str) -> None:
        super().__init__()
        self._digest = digest
        self._hash = hashlib.sha256()
        try:
            self._fh = open(path, "rb", buffering=0)  # noqa: SIM115 - closed in close()
        except FileNotFoundError as exc:
            raise NotFound(f"blob {digest} is not in the store") from exc
        self._left = os.fstat(self._fh.fileno()).st_size
        self.size = self._left
        self._checked = False
        if self._left == 0:
            self._finish()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        n = self._fh.readinto(buffer)
        if n:
            self._hash.update(memoryview(buffer)[:n])
            self._left -= n
        if self._left <= 0 or not n:
            self._finish()
        return n or 0

    def _finish(self) -> None:
        if self._checked:
            return
        self._checked = True
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self._digest or self._left != 0:
            raise DigestMismatch(f"blob {self._digest} on disk", self._digest, actual)

    def close(self) -> None:
        if not self.closed:
            self._fh.close()
        super().close()


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.dir = root / "blobs" / "sha256"

    def path(self, digest: str) -> Path:
        return self.dir / digest_hex(digest)

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError as exc:
            raise NotFound(f"blob {digest} is not in the store") from exc

    def open(self, digest: str) -> BinaryIO:
        """A buffered reader over the blob that verifies its digest at the end."""
        return io.BufferedReader(VerifyingReader(self.path(digest), digest), CHUNK)

    def read_bytes(self, digest: str, limit: int = 16 << 20) -> bytes:
        """Read a small blob (a manifest or config) whole, verified."""
        if self.size(digest) > limit:
            raise ImageError(f"blob {digest} is larger than {limit} bytes")
        with self.open(digest) as fh:
            return fh.read()

    def digests(self) -> Iterator[str]:
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return
        for name in names:
            if _HEX_RE.match(name):
                yield "sha256:" + name

    def install(self, staged: Path, digest: str) -> None:
        """Move a verified staged file into the store (no-op when the blob is already there)."""
        dest = self.path(digest)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                staged.unlink(missing_ok=True)
                return
            os.chmod(staged, 0o444)
            os.rename(staged, dest)
        except OSError as exc:
            raise from_oserror("install blob", str(dest), exc) from exc

    def remove(self, digest: str) -> int:
        """Delete a blob; returns the bytes freed."""
        p = self.path(digest)
        try:
            size = p.stat().st_size
            p.unlink()
        except FileNotFoundError:
            return 0
        return size


def write_staged(
    src: BinaryIO, staged: Path, *, expected: str | None, what: str, limit: int | None = None
) -> tuple[str, int]:
    """Copy ``src`` to ``staged`` while hashing it; check against ``expected``; fsync.

    Returns ``(digest, size)``. On a mismatch the staged file is removed and
    :class:`DigestMismatch` names ``what``.
    """
    h = hashlib.sha256()
    size = 0
    try:
        with open(staged, "wb") as out:
            while True:
                chunk = src.read(CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if limit is not None and size > limit:
                    raise ImageError(f"{what}: larger than the {limit} bytes allowed")
                h.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        staged.unlink(missing_ok=True)
        raise from_oserror("write", str(staged), exc) from exc
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    digest = "sha256:" + h.hexdigest()
    if expected is not None and digest != expected:
        staged.unlink(missing_ok=True)
        raise DigestMismatch(what, expected, digest)
    return digest, size
