"""``isobox import``: any accepted input, turned into one :class:`ResolvedImage` and stored.

A root filesystem (tar or directory) becomes a one-layer image: a tar is stored as the layer
blob as it is (plain, gzip or zstd), a directory is packed into a deterministic gzip layer
first. Its config gets a default ``PATH`` and ``/bin/sh`` as command.
"""

from __future__ import annotations

import io
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, cast

from isobox.errors import InvalidArgument
from isobox.spec.image import (
    MEDIA_OCI_CONFIG,
    MEDIA_OCI_LAYER,
    MEDIA_OCI_LAYER_GZIP,
    MEDIA_OCI_LAYER_ZSTD,
    MEDIA_OCI_MANIFEST,
    Compression,
    Descriptor,
    ExecConfig,
    HistoryEntry,
    ImageConfig,
    Manifest,
    RootFS,
    canonical_json,
)
from isobox.spec.reference import familiar, parse_reference
from isobox.storage.blobs import digest_stream, sha256_digest
from isobox.storage.sources import (
    ResolvedImage,
    detect,
    host_platform,
    resolve_docker,
    resolve_oci,
    sniff_compression,
)
from isobox.storage.store import ImageRecord, ImageStore

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_MEDIA = {"none": MEDIA_OCI_LAYER, "gzip": MEDIA_OCI_LAYER_GZIP, "zstd": MEDIA_OCI_LAYER_ZSTD}


def import_path(store: ImageStore, path: Path, name: str | None = None) -> ImageRecord:
    """Import ``path`` (OCI layout/archive, docker save, rootfs tar or directory)."""
    if name is not None:
        parse_reference(name)  # refuse a bad name before any work
    found = detect(path)
    where = str(path)
    if found.kind in ("oci", "docker"):
        assert found.bundle is not None
        try:
            if found.kind == "oci":
                img = resolve_oci(found.bundle, name, where)
            else:
                img = resolve_docker(found.bundle, name, where)
            return store.import_image(img, name or _hint(img))
        finally:
            found.bundle.close()
    if found.kind == "rootfs-tar":
        compression = sniff_compression(path)
        with open(path, "rb") as fh:
            img = layer_image(fh, compression, history="isobox import " + path.name)
            return store.import_image(img, name)
    # A plain directory: pack it into a deterministic layer in a temporary file.
    from isobox.storage.layer_tar import pack_layer

    with tempfile.TemporaryFile() as tmp:
        pack_layer(path, tmp, compression="gzip")
        tmp.seek(0)
        img = layer_image(tmp, "gzip", history="isobox import " + path.name)
        return store.import_image(img, name)


def _hint(img: ResolvedImage) -> str | None:
    for n in img.names:
        try:
            return parse_reference(familiar(n)).tagged
        except InvalidArgument:
            continue
    return None


def layer_image(
    layer: BinaryIO,
    compression: Compression,
    *,
    history: str,
    exec_config: ExecConfig | None = None,
    created: str | None = None,
) -> ResolvedImage:
    """A one-layer image around a layer blob that is read from ``layer`` (seekable).

    The diff ID is computed here by decompressing once; the store checks it again while it
    unpacks, so a blob that changes underneath is caught.
    """
    from isobox.storage.layer_tar import decompressed_digest

    layer.seek(0)
    diff_id = decompressed_digest(layer, compression, what="root filesystem")
    layer.seek(0)
    digest, size = digest_stream(layer)
    os_name, arch = host_platform()
    when = created or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    config = ImageConfig(
        created=when,
        architecture=arch,
        os=os_name,
        config=exec_config or ExecConfig(env=[DEFAULT_PATH], cmd=["/bin/sh"]),
        rootfs=RootFS(type="layers", diff_ids=[diff_id]),
        history=[HistoryEntry(created=when, created_by=history)],
    )
    config_bytes = canonical_json(config)
    manifest = Manifest(
        schema_version=2,
        media_type=MEDIA_OCI_MANIFEST,
        config=Descriptor(
            media_type=MEDIA_OCI_CONFIG, digest=sha256_digest(config_bytes), size=len(config_bytes)
        ),
        layers=[Descriptor(media_type=_MEDIA[compression], digest=digest, size=size)],
    )

    def open_blob(want: str) -> BinaryIO:
        if want == manifest.config.digest:
            return io.BytesIO(config_bytes)
        if want == digest:
            layer.seek(0)
            return cast(BinaryIO, _NoClose(layer))
        raise InvalidArgument(f"no blob {want} in this image")

    return ResolvedImage(canonical_json(manifest), manifest, open_blob)


class _NoClose(io.RawIOBase):
    """Lets the store read (and 'close') a stream that its owner closes later."""

    def __init__(self, fh: BinaryIO) -> None:
        super().__init__()
        self._fh = fh

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        data = self._fh.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)
