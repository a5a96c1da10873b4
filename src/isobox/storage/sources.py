"""Readers for the things ``isobox import`` accepts.

* an OCI image layout directory, or an OCI archive (the same layout in a tar);
* a ``docker save`` archive (``manifest.json`` + config + layer tars), tar or directory;
* anything else is a root filesystem: a tar (plain, gzip or zstd) or a directory.

The two image kinds are read through one small interface, :class:`Bundle`, over either a
directory or a tar file, and resolved to a :class:`ResolvedImage`: the manifest bytes and a
way to open the blobs it names. Nothing here writes anything; nothing is ever extracted from
an archive to disk (members are read as streams), and a path named inside a document is
normalised and refused if it would leave the archive.
"""

from __future__ import annotations

import json
import os
import platform
import posixpath
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TypeVar, cast

from pydantic import ValidationError

from isobox.errors import ImageError, ImageNotFound, InvalidArgument
from isobox.spec.image import (
    ANNOTATION_CONTAINERD_NAME,
    ANNOTATION_REF_NAME,
    INDEX_TYPES,
    MANIFEST_TYPES,
    MEDIA_OCI_CONFIG,
    MEDIA_OCI_LAYER,
    MEDIA_OCI_MANIFEST,
    Compression,
    Descriptor,
    DockerSaveEntry,
    Index,
    Manifest,
    canonical_json,
)
from isobox.storage.blobs import digest_hex, digest_stream, sha256_digest

MAX_DOC = 4 << 20  # manifests, indexes and configs larger than this are refused


class Bundle:
    """Named files inside a directory or a tar archive."""

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def open(self, name: str) -> BinaryIO:
        raise NotImplementedError

    def close(self) -> None:
        return None

    def read_doc(self, name: str) -> bytes:
        with self.open(name) as fh:
            data = fh.read(MAX_DOC + 1)
        if len(data) > MAX_DOC:
            raise ImageError(f"{name}: document larger than {MAX_DOC} bytes")
        return data


def _norm(name: str) -> str:
    """Normalise a member name; refuse one that leaves the bundle."""
    if name.startswith("/") or ".." in name.split("/"):
        raise ImageError(f"archive member {name!r} points outside the archive")
    return posixpath.normpath(name)


class DirBundle(Bundle):
    def __init__(self, path: Path) -> None:
        self.path = path

    def _p(self, name: str) -> Path:
        return self.path / _norm(name)

    def exists(self, name: str) -> bool:
        return self._p(name).is_file()

    def open(self, name: str) -> BinaryIO:
        p = self._p(name)
        try:
            # The file must be inside the directory even after symlinks are resolved...
            real = p.resolve(strict=True)
            if not real.is_relative_to(self.path.resolve()):
                raise ImageError(f"{name}: resolves outside {self.path}")
            # ...and be a regular file: O_NONBLOCK so a FIFO cannot hang us, O_NOFOLLOW so
            # a symlink swapped in after the check is refused, fstat on what was opened.
            fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise ImageError(f"{self.path}: {name} is missing") from exc
        except (OSError, RuntimeError) as exc:
            raise ImageError(f"{self.path}: {name} cannot be opened: {exc}") from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ImageError(f"{self.path}: {name} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")


class TarBundle(Bundle):
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._tar = tarfile.open(path, "r:*")  # noqa: SIM115 - closed in close()
            members = self._tar.getmembers()
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ImageError(f"{path}: not a readable tar archive: {exc}") from exc
        self._members: dict[str, tarfile.TarInfo] = {}
        for m in members:
            try:
                self._members[_norm(m.name).rstrip("/")] = m
            except ImageError:
                continue  # a stray hostile member is never looked up by name

    def names(self) -> list[str]:
        return list(self._members)

    def _member(self, name: str, depth: int = 0) -> tarfile.TarInfo:
        m = self._members.get(_norm(name))
        if m is None:
            raise ImageError(f"{self.path}: {name} is missing from the archive")
        if (m.issym() or m.islnk()) and depth < 8:
            # docker save links duplicate layers (bbb/layer.tar -> ../aaa/layer.tar):
            # resolve the link inside the archive, refusing anything that leaves it.
            base = posixpath.dirname(_norm(name)) if m.issym() else ""
            target = posixpath.normpath(posixpath.join(base, m.linkname))
            if m.linkname.startswith("/") or target == ".." or target.startswith("../"):
                raise ImageError(f"{self.path}: {name} links outside the archive")
            return self._member(target, depth + 1)
        if not m.isfile():
            raise ImageError(f"{self.path}: {name} is not a regular file")
        return m

    def exists(self, name: str) -> bool:
        try:
            self._member(name)
        except ImageError:
            return False
        return True

    def open(self, name: str) -> BinaryIO:
        fh = self._tar.extractfile(self._member(name))
        if fh is None:
            raise ImageError(f"{self.path}: {name} cannot be read")
        return cast(BinaryIO, fh)

    def close(self) -> None:
        self._tar.close()


@dataclass
class ResolvedImage:
    """An image found in a bundle: its manifest and how to read the blobs it names."""

    manifest_bytes: bytes
    manifest: Manifest
    open_blob: Callable[[str], BinaryIO]
    names: list[str] = field(default_factory=list)  # name:tag hints found in the source

    @property
    def digest(self) -> str:
        return sha256_digest(self.manifest_bytes)


def host_platform() -> tuple[str, str]:
    machine = platform.machine()
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le"}.get(
        machine, machine
    )
    return "linux", arch


_Doc = TypeVar("_Doc", Index, Manifest)


def _parse(model: type[_Doc], data: bytes, what: str) -> _Doc:
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        kind = model.__name__.lower()
        raise ImageError(f"{what}: invalid {kind}: {loc}: {first['msg']}") from exc


def resolve_oci(bundle: Bundle, want_tag: str | None, where: str) -> ResolvedImage:
    """Pick the manifest in an OCI layout: by ref name, else the only one, for this host."""
    layout = bundle.read_doc("oci-layout")
    try:
        version = json.loads(layout).get("imageLayoutVersion")
    except (ValueError, AttributeError, RecursionError) as exc:
        raise ImageError(f"{where}: oci-layout is not JSON") from exc
    if version != "1.0.0":
        raise ImageError(f"{where}: unsupported imageLayoutVersion {version!r}")
    index = _parse(Index, bundle.read_doc("index.json"), f"{where}: index.json")

    def blob_name(digest: str) -> str:
        return f"blobs/sha256/{digest_hex(digest)}"

    def open_blob(digest: str) -> BinaryIO:
        return bundle.open(blob_name(digest))

    candidates = index.manifests
    names: list[str] = []
    if want_tag is not None:
        tagged = [d for d in candidates if _ref_names(d) & {want_tag, want_tag.split(":")[-1]}]
        if not tagged and len(candidates) != 1:
            have = sorted({n for d in candidates for n in _ref_names(d)})
            raise ImageNotFound(f"{where}: no image named {want_tag!r} (it has: {have})")
        candidates = tagged or candidates
    if len(candidates) != 1:
        have = sorted({n for d in candidates for n in _ref_names(d)})
        raise InvalidArgument(
            f"{where}: holds {len(candidates)} images; name the one to import (one of {have})"
        )
    desc = candidates[0]
    if desc.annotations:
        full = desc.annotations.get(ANNOTATION_CONTAINERD_NAME)
        if full:
            names.append(full)
    for _ in range(4):  # follow nested indexes to this host's platform
        if desc.media_type in INDEX_TYPES:
            sub = _parse(Index, _read_verified(open_blob, desc), f"{where}: index {desc.digest}")
            desc = _pick_platform(sub.manifests, where)
            continue
        break
    if desc.media_type not in MANIFEST_TYPES:
        raise ImageError(f"{where}: unsupported manifest media type {desc.media_type!r}")
    data = _read_verified(open_blob, desc)
    manifest = _parse(Manifest, data, f"{where}: manifest {desc.digest}")
    return ResolvedImage(data, manifest, open_blob, names)


def _ref_names(desc: Descriptor) -> set[str]:
    ann = desc.annotations or {}
    return {v for k, v in ann.items() if k in (ANNOTATION_REF_NAME, ANNOTATION_CONTAINERD_NAME)}


def _pick_platform(descs: list[Descriptor], where: str) -> Descriptor:
    os_name, arch = host_platform()
    for d in descs:
        if d.platform and d.platform.os == os_name and d.platform.architecture == arch:
            return d
    raise ImageError(f"{where}: no manifest for platform {os_name}/{arch}")


def _read_verified(open_blob: Callable[[str], BinaryIO], desc: Descriptor) -> bytes:
    with open_blob(desc.digest) as fh:
        data = fh.read(MAX_DOC + 1)
    if len(data) > MAX_DOC:
        raise ImageError(f"blob {desc.digest}: document larger than {MAX_DOC} bytes")
    actual = sha256_digest(data)
    if actual != desc.digest or len(data) != desc.size:
        from isobox.errors import DigestMismatch

        raise DigestMismatch(f"blob {desc.digest} ({len(data)} bytes)", desc.digest, actual)
    return data


def resolve_docker(bundle: Bundle, want_tag: str | None, where: str) -> ResolvedImage:
    """Read a ``docker save`` archive into an OCI manifest (layers uncompressed)."""
    try:
        raw = json.loads(bundle.read_doc("manifest.json"))
        entries = [DockerSaveEntry.model_validate(e) for e in raw]
    except (ValueError, ValidationError, TypeError, RecursionError) as exc:
        raise ImageError(f"{where}: manifest.json is not a docker save manifest") from exc
    if want_tag is not None:
        chosen = [e for e in entries if want_tag in (e.repo_tags or [])]
        if not chosen and len(entries) == 1:
            chosen = entries
    else:
        chosen = entries
    if len(chosen) != 1:
        have = sorted(t for e in entries for t in e.repo_tags or [])
        raise InvalidArgument(f"{where}: holds {len(entries)} images; name one of {have}")
    entry = chosen[0]
    config_bytes = bundle.read_doc(entry.config)
    config_digest = sha256_digest(config_bytes)
    # Layer files may be named by anything; map each digest we compute back to its file.
    by_digest: dict[str, str] = {config_digest: entry.config}
    layers: list[Descriptor] = []
    for name in entry.layers:
        digest, size = _hash_member(bundle, name)
        by_digest[digest] = name
        layers.append(Descriptor(media_type=MEDIA_OCI_LAYER, digest=digest, size=size))
    manifest = Manifest(
        schema_version=2,
        media_type=MEDIA_OCI_MANIFEST,
        config=Descriptor(
            media_type=MEDIA_OCI_CONFIG, digest=config_digest, size=len(config_bytes)
        ),
        layers=layers,
    )

    def open_blob(digest: str) -> BinaryIO:
        if digest not in by_digest:
            raise ImageError(f"{where}: no member for {digest}")
        return bundle.open(by_digest[digest])

    return ResolvedImage(canonical_json(manifest), manifest, open_blob, list(entry.repo_tags or []))


def _hash_member(bundle: Bundle, name: str) -> tuple[str, int]:
    with bundle.open(name) as fh:
        return digest_stream(fh)


@dataclass
class Detected:
    kind: str  # "oci" | "docker" | "rootfs-tar" | "rootfs-dir"
    bundle: Bundle | None


def detect(path: Path) -> Detected:
    """Tell what ``path`` is, by looking inside it."""
    if not path.exists():
        raise InvalidArgument(f"{path}: no such file or directory")
    if path.is_dir():
        d = DirBundle(path)
        if (path / "oci-layout").is_file():
            return Detected("oci", d)
        if (path / "manifest.json").is_file() and _looks_docker(d):
            return Detected("docker", d)
        return Detected("rootfs-dir", None)
    if not path.is_file():
        raise InvalidArgument(f"{path}: not a regular file or directory")
    compression = sniff_compression(path)
    if compression != "none":
        # Compressed: an OCI archive or docker save is never compressed by their tools, and
        # scanning a compressed rootfs for their marker files would decompress it twice.
        if compression == "gzip" and _gz_tar_has_layout(path):
            return Detected("oci", TarBundle(path))
        return Detected("rootfs-tar", None)
    if not tarfile.is_tarfile(path):
        raise InvalidArgument(f"{path}: neither a directory nor a tar archive")
    t = TarBundle(path)
    names = set(t.names())
    if "oci-layout" in names:
        return Detected("oci", t)
    if "manifest.json" in names and _looks_docker(t):
        return Detected("docker", t)
    t.close()
    return Detected("rootfs-tar", None)


def sniff_compression(path: Path) -> Compression:
    """gzip or zstd by their magic numbers; anything else is taken as uncompressed."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head == b"\x28\xb5\x2f\xfd":
        return "zstd"
    return "none"


def _gz_tar_has_layout(path: Path) -> bool:
    try:
        with tarfile.open(path, "r:gz") as t:
            for i, m in enumerate(t):
                if _safe_norm(m.name) == "oci-layout":
                    return True
                if i > 8:
                    return False
    except (tarfile.TarError, EOFError, OSError):
        return False
    return False


def _safe_norm(name: str) -> str | None:
    try:
        return _norm(name)
    except ImageError:
        return None


def _looks_docker(bundle: Bundle) -> bool:
    try:
        data = json.loads(bundle.read_doc("manifest.json"))
    except (ValueError, ImageError, OSError, RecursionError):
        return False
    return isinstance(data, list) and all(isinstance(e, dict) and "Layers" in e for e in data)
