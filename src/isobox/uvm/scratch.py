"""The scratch disk: a container's writable layer as an ext4 file on the host.

A VM container's upper layer cannot be a host folder (the guest kernel mounts it), so it
is a sparse file formatted ext4 and attached as a virtio-blk disk (``serial=scratch``); the
guest overlays it on the read-only layers. Sparse + lazy init keeps a new one at ~400 KB of
real blocks and ~20 ms to make (docs/uvm-design.md). One fixed size suits VM clones, which
cache the disk size of their template.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from isobox.errors import InvalidArgument, StoreError, ToolMissing, from_oserror

DEFAULT_SIZE = 256 * 1024 * 1024
MIN_SIZE = 16 * 1024 * 1024  # below this ext4 with a journal is mostly metadata


@dataclass(frozen=True)
class ScratchDisk:
    """An ext4 disk file made by :func:`create_scratch`; ``size`` is its apparent size."""

    path: Path
    size: int

    def allocated(self) -> int:
        """Bytes really used on the host (the file is sparse)."""
        return os.stat(self.path).st_blocks * 512

    def release(self) -> None:
        release_scratch(self.path)


def _mkfs() -> str:
    for name in ("mkfs.ext4", "mke2fs"):
        found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
        if found:
            return found
    raise ToolMissing("mkfs.ext4 is not installed (Debian package e2fsprogs)")


def create_scratch(path: Path, size: int = DEFAULT_SIZE, label: str = "scratch") -> ScratchDisk:
    """Make a new sparse ext4 file of ``size`` bytes at ``path`` (which must not exist:
    a scratch layer is never silently reused). On failure nothing is left at ``path``."""
    if size < MIN_SIZE or size % 4096:
        raise InvalidArgument(f"scratch size {size}: a multiple of 4096, at least {MIN_SIZE}")
    mkfs = _mkfs()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise from_oserror("create scratch disk", str(path), exc) from exc
    try:
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        argv = [mkfs, "-q", "-F", "-t", "ext4", "-m", "0", "-L", label,
                "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard", str(path)]
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
        if proc.returncode != 0:
            why = proc.stderr.strip()[-300:] or f"exit {proc.returncode}"
            raise StoreError(f"mkfs.ext4 {path}: {why}")
    except OSError as exc:
        release_scratch(path)
        raise from_oserror("make scratch disk", str(path), exc) from exc
    except BaseException:
        release_scratch(path)
        raise
    return ScratchDisk(path, size)


def release_scratch(path: Path) -> None:
    """Remove a scratch disk (absent already is fine: release is idempotent)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
