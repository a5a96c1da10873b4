"""The daemon's image service: :mod:`isobox.storage` behind the shapes the API sends.

The API's handlers stay thin: they call this service and send what it returns. Everything is
JSON-ready (``ImageInfo`` and plain dicts). Imports arrive as a byte stream (the body of
``POST /v1/images/import``): it is spooled to a file under ``$ISOBOX_ROOT/tmp`` and given to
the same importer ``isobox import`` always used, so every accepted format and every check
stays in one place. The spool is written while holding the store's shared lock, because
garbage collection (exclusive) empties ``tmp/``.

Exports are written completely to an unlinked temporary file before the first byte is
returned, so a bad reference or a damaged blob is an error the API can still answer with a
status code, never a tar cut in the middle of a 200.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from isobox.errors import InvalidArgument, from_oserror
from isobox.spec.reference import parse_reference
from isobox.spec.wire import ImageInfo
from isobox.storage.store import ImageRecord, ImageStore

CHUNK = 1 << 16
FORMATS = ("oci", "docker")
BOOTSTRAP_KINDS = {"busybox": "busybox:latest", "debian": "debian:bookworm"}


def image_info(img: ImageRecord) -> ImageInfo:
    return {
        "id": img.id,
        "tags": list(img.tags),
        "digest": img.digest,
        "size": img.size,
        "created": img.created,
        "layers": len(img.layers),
    }


class ImageService:
    """The image half of the compute service; one per daemon, over one store."""

    def __init__(self, store: ImageStore) -> None:
        self.store = store

    def list(self) -> list[ImageInfo]:
        return [image_info(i) for i in self.store.images()]

    def inspect(self, ref: str) -> dict[str, Any]:
        """The record, its config and manifest documents, and where its layers are unpacked
        (what ``isobox image inspect`` has always printed)."""
        img = self.store.get(ref)
        return {
            "id": img.id,
            "digest": img.digest,
            "tags": list(img.tags),
            "created": img.created,
            "size": img.size,
            "architecture": img.architecture,
            "os": img.os,
            "media_type": img.media_type,
            "layers": [
                {
                    "digest": la.blob,
                    "media_type": la.media_type,
                    "size": la.size,
                    "diff_id": la.diff_id,
                    "chain_id": la.chain_id,
                }
                for la in img.layers
            ],
            "config": json.loads(self.store.blobs.read_bytes(img.config_digest)),
            "manifest": json.loads(self.store.manifest_bytes(img)),
            "layer_dirs": [str(self.store.layer_diff(la.chain_id)) for la in img.layers],
        }

    def remove(self, ref: str, force: bool = False) -> dict[str, Any]:
        untagged, deleted = self.store.remove(ref, force=force)
        return {"untagged": untagged, "deleted": deleted}

    def tag(self, ref: str, new: str) -> None:
        self.store.tag(ref, new)

    def prune(self) -> dict[str, Any]:
        r = self.store.prune()
        return {
            "images_removed": r.images_removed,
            "blobs_removed": r.blobs_removed,
            "layers_removed": r.layers_removed,
            "staging_removed": r.staging_removed,
            "bytes_freed": r.bytes_freed,
        }

    def import_stream(self, stream: BinaryIO, tag: str | None = None) -> ImageInfo:
        """Import an image tar read from ``stream`` (OCI archive, docker save, rootfs tar,
        plain or compressed). ``tag`` is checked before a byte is read."""
        from isobox.storage.importer import import_path

        if tag is not None:
            parse_reference(tag)
        tmp = self.store.root / "tmp"
        with self.store._store_lock(exclusive=False):  # gc empties tmp/ under the exclusive one
            try:
                fd, name = tempfile.mkstemp(prefix="spool-", suffix=".tar", dir=tmp)
            except OSError as exc:
                raise from_oserror("create spool file in", str(tmp), exc) from exc
            path = Path(name)
            try:
                with os.fdopen(fd, "wb") as out:
                    try:
                        shutil.copyfileobj(stream, out, CHUNK)
                    except OSError as exc:
                        raise from_oserror("spool image to", name, exc) from exc
                if path.stat().st_size == 0:
                    raise InvalidArgument("image import: the request body is empty")
                img = import_path(self.store, path, tag)
            finally:
                path.unlink(missing_ok=True)
        return image_info(img)

    def export(self, ref: str, fmt: str = "oci") -> Iterator[bytes]:
        """The image as an OCI archive or a docker save archive, in chunks.

        Not a generator: the archive is complete (and every blob verified) when this
        returns, so errors are raised here, before the caller sends a status line.
        """
        from isobox.storage.export import save

        if fmt not in FORMATS:
            raise InvalidArgument(f"unknown export format {fmt!r} (oci or docker)")
        tmp = self.store.root / "tmp"
        with self.store._store_lock(exclusive=False):
            workdir = Path(tempfile.mkdtemp(prefix="export-", dir=tmp))
            try:
                out = workdir / "image.tar"
                save(self.store, ref, out, fmt)  # type: ignore[arg-type]
                fh = open(out, "rb")  # noqa: SIM115 - handed to the iterator, which closes it
            finally:
                shutil.rmtree(workdir, ignore_errors=True)  # the open file lives on, unlinked
        return _chunks(fh)

    def bootstrap(self, kind: str = "busybox", name: str | None = None) -> ImageInfo:
        """Build a base image from the host's Debian packages (no registry)."""
        from isobox.storage import bootstrap

        if kind not in BOOTSTRAP_KINDS:
            raise InvalidArgument(
                f"unknown bootstrap kind {kind!r} ({', '.join(BOOTSTRAP_KINDS)})")
        tag = name or BOOTSTRAP_KINDS[kind]
        parse_reference(tag)
        if kind == "busybox":
            img = bootstrap.bootstrap_busybox(self.store, tag)
        else:
            img = bootstrap.bootstrap_debian(self.store, tag)
        return image_info(img)


def _chunks(fh: BinaryIO) -> Iterator[bytes]:
    with fh:
        while chunk := fh.read(CHUNK):
            yield chunk
