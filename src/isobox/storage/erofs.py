"""Unpacked layers as erofs images: how a utility VM sees an image's read-only layers.

A VM cannot use the host's ``layers/<chain>/diff`` folders as overlay lower dirs; it gets
each layer as a read-only virtio-blk disk holding an erofs filesystem, built once per chain
ID and shared by every VM (docs/uvm-design.md, section 4). The image is a faithful copy of
the diff folder: modes (setuid included), owners, mtimes, symlinks, hard links, device
nodes, FIFOs and every xattr — in particular overlay's whiteouts (char devices 0/0) and
opaque directories (``trusted.overlay.opaque=y``), so the guest's overlayfs stacks the
disks exactly as the host's overlayfs stacks the folders. mkfs.erofs 1.5 keeps ``trusted.*``
xattrs and device nodes with its defaults (``-x`` only tunes xattr sharing; ``-x -1`` would
drop them); tests/test_store_erofs.py mounts a built image and checks all of it.

Uncompressed on purpose: the design note measured a raw erofs booting faster under TCG than
lz4hc (3.41 s vs 3.68 s to agent-ready); disk is cheap and shared, guest CPU is not.

The build is atomic: mkfs.erofs writes a temporary file, which is synced and renamed onto
the final name only when complete, so a file found under the final name is always whole.
Callers serialise builders (the store does it under the chain's lock).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Final

from isobox.errors import StoreError, StoreFull, ToolMissing, from_oserror

MKFS: Final = "mkfs.erofs"
# Fail a build that hangs rather than hold the chain lock forever; a multi-GB layer takes
# seconds (mkfs.erofs writes uncompressed data at disk speed).
BUILD_TIMEOUT: Final = 1800.0


def mkfs_erofs() -> str:
    """The path of mkfs.erofs, or ToolMissing naming the Debian package that has it."""
    found = shutil.which(MKFS)
    if found is None:
        raise ToolMissing(
            f"{MKFS} not found on PATH (Debian package erofs-utils); "
            "utility VMs need it to turn image layers into disks"
        )
    return found


def build_erofs(src: Path, dest: Path, *, tmp_dir: Path | None = None) -> int:
    """Build an uncompressed erofs image of the folder ``src`` at ``dest``; returns its size.

    The temporary file goes to ``tmp_dir`` (default: next to ``dest``), which must be on the
    same filesystem as ``dest`` so the final rename is atomic. On any failure the temporary
    file is removed and ``dest`` is untouched.
    """
    tool = mkfs_erofs()
    where = tmp_dir if tmp_dir is not None else dest.parent
    tmp = where / f"erofs-{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp"
    argv = [tool, "--quiet", "--preserve-mtime", str(tmp), str(src)]
    try:
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise StoreError(f"{MKFS} {src}: no result after {BUILD_TIMEOUT:.0f} s") from exc
        except OSError as exc:
            raise from_oserror(f"run {MKFS}", str(src), exc) from exc
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip()[-600:]
            if "No space left" in tail:
                raise StoreFull(f"{MKFS} {src}: no space left on device")
            raise StoreError(f"{MKFS} {src} exited {proc.returncode}: {tail}")
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            os.chmod(tmp, 0o444)  # a shared read-only disk: nobody writes it in place
            os.rename(tmp, dest)
            _fsync_dir(dest.parent)
        except OSError as exc:
            raise from_oserror("install erofs image", str(dest), exc) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
