"""``isobox cp``: files between a container and the host, as tar archives through the API.

``tarfile``, ``tempfile`` and ``pathlib`` are imported here only, so no other verb pays
for them."""

from __future__ import annotations

import os
import sys
import tarfile
import tempfile
from pathlib import Path

import click

from isobox.cli.common import client
from isobox.client import Container
from isobox.errors import InvalidArgument, IsoboxError, NotFound


def _split(arg: str) -> tuple[str | None, str]:
    """``CONTAINER:PATH`` -> (container, path); a local path (``./a:b``, ``/x``) -> (None, p)."""
    head, sep, tail = arg.partition(":")
    if not sep or not head or head.startswith((".", "/")):
        return None, arg
    return head, tail


def _remote_kind(ct: Container, path: str) -> str | None:
    """``dir``, ``file`` or None (absent): from the first header of the path's archive."""
    try:
        chunks = ct.get_archive(path)
    except NotFound:
        return None
    head = b""
    try:
        for chunk in chunks:
            head += chunk
            if len(head) >= tarfile.BLOCKSIZE:
                break
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    try:
        member = tarfile.TarInfo.frombuf(head[: tarfile.BLOCKSIZE], "utf-8", "surrogateescape")
    except tarfile.TarError:
        return "file"
    return "dir" if member.isdir() else "file"


def _copy_out(ct: Container, src: str, dst: str) -> None:
    chunks = ct.get_archive(src)
    if dst == "-":
        for chunk in chunks:
            sys.stdout.buffer.write(chunk)
        return
    with tempfile.TemporaryFile() as spool:
        for chunk in chunks:
            spool.write(chunk)
        spool.seek(0)
        target = Path(dst)
        name = os.path.basename(src.rstrip("/")) or "."
        # filter="tar": symlinks are copied as links, as docker does (the "data" filter
        # drops one with an absolute target); names and link-followed paths that leave the
        # destination are still refused.
        with tarfile.open(fileobj=spool, mode="r:") as tar:
            if target.is_dir():
                tar.extractall(target, filter="tar")
                return
            # Copy under the new name: extract beside it, then rename the top entry.
            parent = target.absolute().parent
            if not parent.is_dir():
                raise InvalidArgument(f"{parent}: no such directory")
            with tempfile.TemporaryDirectory(dir=parent, prefix=".isobox-cp-") as tmp:
                tar.extractall(tmp, filter="tar")
                os.replace(Path(tmp, name), target)


def _copy_in(ct: Container, src: str, dst: str) -> None:
    source = Path(src)
    if not source.exists():
        raise InvalidArgument(f"{src}: no such file or directory")
    if dst.endswith("/") or _remote_kind(ct, dst) == "dir":
        folder, name = dst, source.name
    else:
        folder, name = os.path.dirname(dst.rstrip("/")) or "/", os.path.basename(dst)
    with tempfile.TemporaryFile() as spool:
        with tarfile.open(fileobj=spool, mode="w", format=tarfile.PAX_FORMAT) as tar:
            tar.add(source, arcname=name)
        spool.seek(0)
        ct.put_archive(folder, spool)


@click.command()
@click.argument("src")
@click.argument("dst")
def cp(src: str, dst: str) -> None:
    """Copy files between a container and the host: CONTAINER:PATH on one side."""
    (sc, sp), (dc, dp) = _split(src), _split(dst)
    if (sc is None) == (dc is None):
        raise InvalidArgument("cp: give CONTAINER:PATH as exactly one of SRC and DST")
    c = client()
    try:
        if sc is not None:
            _copy_out(c.containers.get(sc), sp, dp)
        else:
            assert dc is not None
            _copy_in(c.containers.get(dc), sp, dp)
    except (OSError, tarfile.TarError) as exc:  # one line, not a traceback
        raise IsoboxError(f"cp {src} {dst}: {exc}") from exc
