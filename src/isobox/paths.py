"""Where isobox keeps things: ``ISOBOX_ROOT`` (state) and ``ISOBOX_RUN`` (sockets)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

DEFAULT_ROOT = "/var/lib/isobox"
DEFAULT_RUN = "/run/isobox"


def root_dir() -> Path:
    return Path(os.environ.get("ISOBOX_ROOT") or DEFAULT_ROOT)


def run_dir() -> Path:
    return Path(os.environ.get("ISOBOX_RUN") or DEFAULT_RUN)


BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")


def is_static_elf(path: str | Path) -> bool:
    """A static ELF has no program interpreter: no ``ld-linux`` path in its first page."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    return head.startswith(b"\x7fELF") and b"ld-linux" not in head


def installed_static_busybox() -> Path | None:
    """The host's static busybox (Debian's busybox-static), if installed."""
    return next((Path(p) for p in BUSYBOX_CANDIDATES if is_static_elf(p)), None)


@contextlib.contextmanager
def socket_name(path: Path) -> Iterator[str]:
    """A name for the unix socket at ``path`` that fits ``sun_path`` (108 bytes): the path
    itself, or for a long one the same file through an ``O_PATH`` descriptor of its folder
    (``/proc/self/fd/N/name``), valid in this process while the context lasts. The daemon,
    the monitors and their clients all bind and connect through it."""
    if len(os.fsencode(str(path))) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)
