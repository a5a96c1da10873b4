"""``isobox save``: an image as an OCI archive or a ``docker save`` archive.

Both are written to a temporary file beside the destination and renamed over it only when
complete, so a failed save (full disk, a blob that fails verification) leaves no half file.
Every blob is read through the store's verifying reader.

* ``oci``: ``oci-layout``, ``index.json`` (the tag as ``org.opencontainers.image.ref.name``
  and the full name as ``io.containerd.image.name``), ``blobs/sha256/...``; the manifest and
  blobs are the stored bytes, so digests are identical to what was imported. A docker-style
  ``manifest.json`` pointing into ``blobs/`` is added so docker < 25 loads it too.
* ``docker``: ``manifest.json``, ``<config-hex>.json`` and ``<diff-id-hex>/layer.tar``, the
  layers uncompressed as docker's loader expects (their sha256 is the diff ID).
"""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Literal

from isobox.errors import InvalidArgument, from_oserror
from isobox.spec.image import (
    ANNOTATION_CONTAINERD_NAME,
    ANNOTATION_REF_NAME,
    LAYER_COMPRESSION,
    MEDIA_OCI_INDEX,
    MEDIA_OCI_MANIFEST,
    Descriptor,
    Index,
    canonical_json,
)
from isobox.spec.reference import parse_reference
from isobox.storage.blobs import digest_hex
from isobox.storage.store import ImageRecord, ImageStore

Format = Literal["oci", "docker"]


def save(store: ImageStore, ref: str, out: Path, fmt: Format = "oci") -> ImageRecord:
    image = store.get(ref)
    tagged = _tag_for(image, ref)
    with _atomic(out) as fh, tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tar:
        if fmt == "oci":
            _write_oci(store, image, tagged, tar)
        elif fmt == "docker":
            _write_docker(store, image, tagged, tar)
        else:
            raise InvalidArgument(f"unknown save format {fmt!r} (oci or docker)")
    return image


def _tag_for(image: ImageRecord, ref: str) -> str | None:
    try:
        key = parse_reference(ref).tagged
    except InvalidArgument:
        key = None
    if key in image.tags:
        return key
    return image.tags[0] if image.tags else None


@contextmanager
def _atomic(out: Path) -> Iterator[BinaryIO]:
    out = out.absolute()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as exc:
        raise from_oserror("create", str(out), exc) from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.rename(tmp, out)
    except OSError as exc:
        os.unlink(tmp)
        raise from_oserror("write", str(out), exc) from exc
    except BaseException:
        os.unlink(tmp)
        raise


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    import io

    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _add_blob(tar: tarfile.TarFile, store: ImageStore, name: str, digest: str) -> None:
    info = tarfile.TarInfo(name)
    info.size = store.blobs.size(digest)
    info.mode = 0o644
    with store.blobs.open(digest) as fh:
        tar.addfile(info, fh)
        fh.read(1)  # reach EOF so the verifying reader checks the digest


def _write_oci(
    store: ImageStore, image: ImageRecord, tagged: str | None, tar: tarfile.TarFile
) -> None:
    annotations: dict[str, str] | None = None
    if tagged is not None:
        annotations = {
            ANNOTATION_REF_NAME: tagged.rsplit(":", 1)[1],
            ANNOTATION_CONTAINERD_NAME: tagged,
        }
    manifest_desc = Descriptor(
        media_type=image.media_type or MEDIA_OCI_MANIFEST,
        digest=image.digest,
        size=store.blobs.size(image.digest),
        annotations=annotations,
    )
    index = Index(schema_version=2, media_type=MEDIA_OCI_INDEX, manifests=[manifest_desc])
    _add_bytes(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
    _add_bytes(tar, "index.json", canonical_json(index))
    seen: set[str] = set()
    for digest in [image.digest, image.config_digest, *(la.blob for la in image.layers)]:
        if digest not in seen:
            seen.add(digest)
            _add_blob(tar, store, f"blobs/sha256/{digest_hex(digest)}", digest)
    # Also docker's manifest.json pointing into blobs/, as docker 25 and `ctr export` write:
    # docker before 25 reads only this file. Its layers are the stored (compressed) blobs,
    # which docker's loader decompresses.
    entry = {
        "Config": f"blobs/sha256/{digest_hex(image.config_digest)}",
        "RepoTags": [tagged] if tagged else [],
        "Layers": [f"blobs/sha256/{digest_hex(la.blob)}" for la in image.layers],
    }
    _add_bytes(tar, "manifest.json", json.dumps([entry]).encode())


def _write_docker(
    store: ImageStore, image: ImageRecord, tagged: str | None, tar: tarfile.TarFile
) -> None:
    from isobox.storage.layer_tar import decompress_to

    config_name = f"{digest_hex(image.config_digest)}.json"
    _add_blob(tar, store, config_name, image.config_digest)
    layer_names: list[str] = []
    for layer in image.layers:
        name = f"{digest_hex(layer.diff_id)}/layer.tar"
        if name not in layer_names:
            compression = LAYER_COMPRESSION[layer.media_type]
            if compression == "none":
                _add_blob(tar, store, name, layer.blob)
            else:
                with tempfile.TemporaryFile() as tmp, store.blobs.open(layer.blob) as src:
                    size = decompress_to(src, compression, tmp, expect_digest=layer.diff_id)
                    tmp.seek(0)
                    info = tarfile.TarInfo(name)
                    info.size = size
                    info.mode = 0o644
                    tar.addfile(info, tmp)
        layer_names.append(name)
    entry = {
        "Config": config_name,
        "RepoTags": [tagged] if tagged else [],
        "Layers": layer_names,
    }
    _add_bytes(tar, "manifest.json", json.dumps([entry]).encode())
