"""Build test images by hand, independently of isobox's own writers.

Layers are tars made with Python's tarfile; layouts and archives are written file by file
following the OCI image-layout spec and docker's save format, so a bug in isobox's exporter
cannot hide a matching bug in its importer.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Entry:
    name: str
    data: bytes | None = None  # regular file when not None
    kind: str = "file"  # file | dir | symlink | hardlink
    target: str = ""
    mode: int = 0o644


def f(name: str, data: bytes | str, mode: int = 0o644) -> Entry:
    return Entry(name, data.encode() if isinstance(data, str) else data, mode=mode)


def d(name: str, mode: int = 0o755) -> Entry:
    return Entry(name, kind="dir", mode=mode)


def sym(name: str, target: str) -> Entry:
    return Entry(name, kind="symlink", target=target, mode=0o777)


def hard(name: str, target: str) -> Entry:
    return Entry(name, kind="hardlink", target=target)


def tar_bytes(entries: list[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.mode = e.mode
            info.mtime = 1_700_000_000
            if e.kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif e.kind == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = e.target
                tar.addfile(info)
            elif e.kind == "hardlink":
                info.type = tarfile.LNKTYPE
                info.linkname = e.target
                tar.addfile(info)
            else:
                data = e.data or b""
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Built:
    manifest_digest: str
    config_digest: str
    diff_ids: list[str]
    layer_digests: list[str]


def _put(blobs: Path, data: bytes) -> str:
    digest = sha(data)
    blobs.mkdir(parents=True, exist_ok=True)
    (blobs / digest.split(":")[1]).write_bytes(data)
    return digest


def oci_layout(
    out: Path,
    layers: list[bytes],
    *,
    tag: str = "latest",
    compress: bool = True,
    diff_ids: list[str] | None = None,
    cmd: list[str] | None = None,
) -> Built:
    """Write an OCI image layout with the given uncompressed layer tars."""
    blobs = out / "blobs" / "sha256"
    real_diff_ids = [sha(layer) for layer in layers]
    descs = []
    for layer in layers:
        data = gzip.compress(layer, mtime=0) if compress else layer
        mt = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if compress else "")
        descs.append({"mediaType": mt, "digest": _put(blobs, data), "size": len(data)})
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": cmd or ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids or real_diff_ids},
    }
    cbytes = json.dumps(config).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": _put(blobs, cbytes),
            "size": len(cbytes),
        },
        "layers": descs,
    }
    mbytes = json.dumps(manifest).encode()
    mdigest = _put(blobs, mbytes)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": mdigest,
                "size": len(mbytes),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (out / "index.json").write_text(json.dumps(index))
    (out / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    return Built(mdigest, sha(cbytes), real_diff_ids, [x["digest"] for x in descs])


def tar_dir(src: Path, out: Path) -> None:
    """Pack a directory (an OCI layout or a docker save folder) into a plain tar."""
    with tarfile.open(out, "w") as tar:
        for p in sorted(src.rglob("*")):
            tar.add(p, arcname=str(p.relative_to(src)), recursive=False)


def docker_save(out: Path, layers: list[bytes], repo_tag: str) -> Built:
    """Write a classic ``docker save`` archive (uncompressed layers) as a tar file."""
    work = out.with_suffix(".d")
    work.mkdir()
    diff_ids = [sha(layer) for layer in layers]
    names = []
    for layer, diff in zip(layers, diff_ids, strict=True):
        name = f"{diff.split(':')[1]}/layer.tar"
        (work / name).parent.mkdir(exist_ok=True)
        (work / name).write_bytes(layer)
        names.append(name)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    cbytes = json.dumps(config).encode()
    cname = sha(cbytes).split(":")[1] + ".json"
    (work / cname).write_bytes(cbytes)
    (work / "manifest.json").write_text(
        json.dumps([{"Config": cname, "RepoTags": [repo_tag], "Layers": names}])
    )
    tar_dir(work, out)
    return Built("", sha(cbytes), diff_ids, diff_ids)


def tree_snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its mode and size: to prove nothing changed."""
    snap: dict[str, tuple[int, int]] = {}
    if not root.exists():
        return snap
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if rel.startswith(("state.db", "locks", "store.lock")):
                continue  # the database is compared by content; lock files are harmless
            snap[rel] = (st.st_mode, st.st_size if not os.path.isdir(p) else 0)
    return snap
