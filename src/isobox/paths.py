"""Where isobox keeps things: ``ISOBOX_ROOT`` (state) and ``ISOBOX_RUN`` (sockets)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_ROOT = "/var/lib/isobox"
DEFAULT_RUN = "/run/isobox"


def root_dir() -> Path:
    return Path(os.environ.get("ISOBOX_ROOT") or DEFAULT_ROOT)


def run_dir() -> Path:
    return Path(os.environ.get("ISOBOX_RUN") or DEFAULT_RUN)
