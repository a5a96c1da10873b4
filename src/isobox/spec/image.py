"""Pydantic models of the OCI image documents (image-spec v1.1) and docker's save manifest.

Only the fields isobox reads are typed; unknown fields are kept (``extra="allow"``) so a
document round-trips byte-for-byte through :func:`canonical_json` only when isobox wrote it,
and otherwise the original bytes are kept in the blob store and never re-serialised.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MEDIA_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"

MANIFEST_TYPES = frozenset({MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST})
INDEX_TYPES = frozenset({MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST})
Compression = Literal["none", "gzip", "zstd"]
LAYER_COMPRESSION: dict[str, Compression] = {
    MEDIA_OCI_LAYER: "none",
    MEDIA_DOCKER_LAYER: "none",
    MEDIA_OCI_LAYER_GZIP: "gzip",
    MEDIA_DOCKER_LAYER_GZIP: "gzip",
    MEDIA_OCI_LAYER_ZSTD: "zstd",
}

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def check_digest(value: str) -> str:
    if not _DIGEST_RE.match(value):
        raise ValueError(f"not a sha256 digest: {value!r}")
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class Platform(_Model):
    architecture: str
    os: str
    variant: str | None = None


class Descriptor(_Model):
    media_type: str = Field(alias="mediaType")
    digest: str
    size: int = Field(ge=0)
    annotations: dict[str, str] | None = None
    platform: Platform | None = None

    @field_validator("digest")
    @classmethod
    def _digest(cls, v: str) -> str:
        return check_digest(v)


class Index(_Model):
    schema_version: Literal[2] = Field(alias="schemaVersion")
    media_type: str | None = Field(default=None, alias="mediaType")
    manifests: list[Descriptor]
    annotations: dict[str, str] | None = None


class Manifest(_Model):
    schema_version: Literal[2] = Field(alias="schemaVersion")
    media_type: str | None = Field(default=None, alias="mediaType")
    config: Descriptor
    layers: list[Descriptor]
    annotations: dict[str, str] | None = None


class RootFS(_Model):
    type: Literal["layers"]
    diff_ids: list[str]

    @field_validator("diff_ids")
    @classmethod
    def _ids(cls, v: list[str]) -> list[str]:
        return [check_digest(d) for d in v]


class ExecConfig(_Model):
    user: str | None = Field(default=None, alias="User")
    exposed_ports: dict[str, Any] | None = Field(default=None, alias="ExposedPorts")
    env: list[str] | None = Field(default=None, alias="Env")
    entrypoint: list[str] | None = Field(default=None, alias="Entrypoint")
    cmd: list[str] | None = Field(default=None, alias="Cmd")
    volumes: dict[str, Any] | None = Field(default=None, alias="Volumes")
    working_dir: str | None = Field(default=None, alias="WorkingDir")
    labels: dict[str, str] | None = Field(default=None, alias="Labels")
    stop_signal: str | None = Field(default=None, alias="StopSignal")


class HistoryEntry(_Model):
    created: str | None = None
    created_by: str | None = None
    comment: str | None = None
    empty_layer: bool | None = None


class ImageConfig(_Model):
    created: str | None = None
    architecture: str
    os: str
    config: ExecConfig | None = None
    rootfs: RootFS
    history: list[HistoryEntry] | None = None


class DockerSaveEntry(_Model):
    """One element of a ``docker save`` archive's ``manifest.json``."""

    config: str = Field(alias="Config")
    repo_tags: list[str] | None = Field(default=None, alias="RepoTags")
    layers: list[str] = Field(alias="Layers")


def canonical_json(model: BaseModel) -> bytes:
    """The bytes isobox writes for a document it creates: stable key order, no spaces."""
    data = model.model_dump(by_alias=True, exclude_none=True)
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
