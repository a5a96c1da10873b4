"""A container's root from an image: the image's read-only layers plus its own scratch layer.

Storage *describes* the mount (:meth:`isobox.storage.store.ImageStore.prepare_scratch`
returns :class:`~isobox.storage.store.Mounts`); this module performs it, as an overlay at
the bundle's ``rootfs``, in the engine's mount namespace. The container then sees one
writable tree; every change lands in the scratch folder on the host, where the host can look
at what the container changed (the seeds' sandbox file). Unmounting leaves the scratch
folder in place until storage releases it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from isobox._sys import linux as L
from isobox.errors import SystemError_
from isobox.storage.store import Mounts


def mount_image_root(mounts: Mounts, target: Path) -> None:
    """Mount the overlay of ``mounts`` at ``target`` (created if missing)."""
    target.mkdir(parents=True, exist_ok=True)
    if not mounts.lower:
        raise SystemError_("mount overlay", str(target), 22)
    L.mount("overlay", str(target), "overlay", L.MS_NODEV, mounts.overlay_options())


def unmount_image_root(target: Path) -> None:
    """Undo :func:`mount_image_root` (idempotent); the mount point folder is removed too."""
    try:
        L.umount2(str(target), L.MNT_DETACH)
    except SystemError_ as exc:
        if exc.errno not in (22, 2):  # EINVAL: not mounted; ENOENT: no such folder
            raise
    with contextlib.suppress(FileNotFoundError, OSError):
        os.rmdir(target)


def is_mounted(target: Path) -> bool:
    real = os.path.realpath(target)
    with open("/proc/self/mountinfo") as fh:
        return any(line.split()[4] == real for line in fh)
