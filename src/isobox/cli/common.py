"""What every verb of ``isobox`` shares: the daemon's client and the one-line failure."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import click

from isobox.client import Client
from isobox.errors import IsoboxError


def client() -> Client:
    """The daemon's client; the daemon is started when it is not running (unless
    ``ISOBOX_AUTOSTART=0``)."""
    return Client(autostart=os.environ.get("ISOBOX_AUTOSTART", "1") != "0")


def fail(exc: IsoboxError, code: int) -> NoReturn:
    click.echo(f"isobox: {exc}", err=True)
    sys.exit(code)


_UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def moment(text: str | None) -> str | None:
    """A ``--since``/``--until`` value for the API: RFC 3339 and unix seconds pass as they
    are; a docker duration (``10m``, ``1h30m``, ``2.5s``) means that long ago."""
    if text is None:
        return None
    import re

    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|ms|s|m|h)", text)
    if parts and "".join(n + u for n, u in parts) == text:
        import time

        ago = sum(float(n) * _UNITS[u] for n, u in parts)
        return f"{time.time() - ago:.6f}"
    return text
