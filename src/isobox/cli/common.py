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
