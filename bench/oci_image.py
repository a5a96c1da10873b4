"""A deterministic test image for the benchmarks, written as an OCI image layout.

`ensure_image()` returns an OCI layout directory (``oci-layout``, ``index.json``,
``blobs/sha256/...``) that skopeo, umoci and isobox all read. Its content comes from a
seeded ``random.Random``, so the same spec always gives the same bytes and digests; it is
built once and cached under ``bench/.cache/`` in a folder named after GENERATOR_VERSION and
a hash of the spec. Bump GENERATOR_VERSION whenever the output of this module changes.

What an image holds, per layer (gzip-compressed tar, PAX format, sorted paths, fixed mtime):

- many small text-like files (log-normal sizes, Zipf-distributed pseudo-words: they
  compress about as well as source code, docs and config files do);
- some MB-sized "binaries", half random and half zero bytes, in 64 KiB blocks;
- nested directories, with an entry for every parent directory in every layer;
- symlinks: relative, absolute, dangling, and Debian's merged-/usr top-level links
  (``bin -> usr/bin`` ...);
- a few hardlinks, one setuid binary, a few files owned by uid 1000, a few mode 0600;
- in the last layer, whiteouts: deleted files (``.wh.NAME``) and one opaque directory
  (``.wh..wh..opq``), as real images built with RUN rm ... have.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import math
import os
import random
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GENERATOR_VERSION = "1"

MTIME = 1_700_000_000  # 2023-11-14, every entry
REF_NAME = "latest"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"

_BLOCK = 64 * 1024
_TEXT_EXTENSIONS = (".txt", ".py", ".h", ".c", ".conf", ".json", ".md", ".html", ".sh", "")


@dataclass(frozen=True)
class LayerSpec:
    """One layer: where its files go and how many of each kind it holds."""

    created_by: str
    roots: tuple[str, ...]  # directories its content is spread under
    text_files: int
    binaries: int
    binary_bytes: int  # shared out among the binaries
    symlinks: int
    hardlinks: int
    whiteouts: int = 0  # files of lower layers this layer deletes
    opaque_dirs: int = 0  # lower-layer directories this layer replaces wholesale


@dataclass(frozen=True)
class ImageSpec:
    seed: int
    layers: tuple[LayerSpec, ...]
    text_median_bytes: int = 4000
    gzip_level: int = 6  # what docker and containerd use by default

    def key(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


# ~200 MB uncompressed, ~6000 files, 3 layers: a distro base, a language runtime, an app.
DEFAULT_SPEC = ImageSpec(
    seed=20261121,
    layers=(
        LayerSpec(
            created_by="base: debootstrap-like userland",
            roots=(
                "usr/bin",
                "usr/sbin",
                "usr/lib/x86_64-linux-gnu",
                "usr/share/doc",
                "usr/share/locale",
                "etc",
                "var/lib/dpkg",
            ),
            text_files=3000,
            binaries=24,
            binary_bytes=78_000_000,
            symlinks=120,
            hardlinks=10,
        ),
        LayerSpec(
            created_by="runtime: a language runtime and its libraries",
            roots=("usr/lib/python3/dist-packages", "usr/local/lib", "opt/runtime"),
            text_files=1900,
            binaries=22,
            binary_bytes=60_000_000,
            symlinks=60,
            hardlinks=6,
        ),
        LayerSpec(
            created_by="app: the application, its assets and clean-up of the base",
            roots=("app", "app/static", "srv/data"),
            text_files=800,
            binaries=14,
            binary_bytes=16_000_000,
            symlinks=20,
            hardlinks=4,
            whiteouts=3,
            opaque_dirs=1,
        ),
    ),
)


@dataclass(frozen=True)
class ImageInfo:
    """A generated image: where it is and what is in it."""

    path: Path  # the OCI layout directory
    ref: str  # its tag in index.json (org.opencontainers.image.ref.name)
    manifest_digest: str
    layers: int
    uncompressed_bytes: int  # sum of the layer tars
    compressed_bytes: int  # sum of the gzip blobs
    files: int  # regular files, symlinks and hardlinks over all layers
    dirs: int

    def summary(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["path"] = str(self.path)
        return d


def ensure_image(cache_dir: Path, spec: ImageSpec = DEFAULT_SPEC) -> ImageInfo:
    """The image for ``spec``, generated on first use and cached in ``cache_dir``."""
    target = cache_dir / f"oci-image-v{GENERATOR_VERSION}-{spec.key()}"
    info_file = target / "bench-image.json"
    if info_file.exists():
        return _load_info(info_file, target)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache_dir))
    try:
        _write_layout(tmp, spec)
        tmp.chmod(0o755)  # mkdtemp made it 0700
        try:
            tmp.rename(target)
        except OSError:
            if not info_file.exists():  # not a concurrent run having finished first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return _load_info(info_file, target)


def _load_info(info_file: Path, target: Path) -> ImageInfo:
    raw = json.loads(info_file.read_text())
    raw["path"] = target
    return ImageInfo(**raw)


# --- content --------------------------------------------------------------------------


@dataclass
class _Entry:
    path: str
    kind: str  # "dir", "text", "binary", "symlink", "hardlink", "whiteout"
    size: int = 0
    target: str = ""  # symlink text or hardlink target path
    mode: int = 0o644
    uid: int = 0


class _Words:
    """Pseudo-words with Zipf-like frequencies, so text compresses like real text does."""

    def __init__(self, rng: random.Random, count: int = 3000) -> None:
        letters = "etaoinshrdlucmfwypvbgkqjxz_"
        weights = [12, 9, 8, 8, 7, 7, 6, 6, 6, 4, 3, 3, 3, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 2]
        words: set[str] = set()
        while len(words) < count:
            words.add("".join(rng.choices(letters, weights, k=rng.randint(2, 10))))
        self.words = sorted(words)
        rng.shuffle(self.words)
        total = 0.0
        self.cum: list[float] = []
        for i in range(len(self.words)):
            total += 1.0 / (i + 1)
            self.cum.append(total)

    def text(self, rng: random.Random, nbytes: int) -> bytes:
        words = rng.choices(self.words, cum_weights=self.cum, k=max(1, nbytes // 6))
        lines = (" ".join(words[i : i + 10]) for i in range(0, len(words), 10))
        return ("\n".join(lines) + "\n").encode()[:nbytes]

    def name(self, rng: random.Random) -> str:
        n = rng.choice((1, 1, 1, 2))
        return "-".join(rng.choice(self.words[:800]) for _ in range(n))


def _binary(rng: random.Random, size: int) -> bytes:
    """Half random, half zero bytes, in 64 KiB blocks (code and data sections, padding)."""
    out = bytearray()
    while len(out) < size:
        n = min(_BLOCK, size - len(out))
        out += rng.randbytes(n) if rng.random() < 0.5 else bytes(n)
    return bytes(out)


def _plan_layer(
    rng: random.Random,
    *,
    words: _Words,
    spec: LayerSpec,
    text_median: int,
    used: set[str],
    lower_files: list[str],
    lower_dirs: list[str],
) -> list[_Entry]:
    """The entries of one layer (without parent directories, added when writing)."""
    entries: list[_Entry] = []
    dirs = list(spec.roots)

    # Names this layer's roots claim can never become files.
    used.update(p for root in spec.roots for p in _parents(root))

    def fresh(parent: str, suffix: str = "") -> str:
        while True:
            path = f"{parent}/{words.name(rng)}{suffix}"
            if path not in used:
                used.add(path)
                return path

    # Nested directories: about one per dozen files, up to 7 levels deep.
    for _ in range((spec.text_files + spec.binaries) // 12):
        parent = rng.choice(dirs)
        if parent.count("/") < 6:
            dirs.append(fresh(parent))
    for d in dirs:
        entries.append(_Entry(d, "dir", mode=0o755))

    regular: list[_Entry] = []
    mu = math.log(text_median)
    for _ in range(spec.text_files):
        ext = rng.choice(_TEXT_EXTENSIONS)
        size = int(min(256 * 1024, max(16, rng.lognormvariate(mu, 1.2))))
        mode = 0o755 if ext == ".sh" else (0o600 if rng.random() < 0.01 else 0o644)
        regular.append(_Entry(fresh(rng.choice(dirs), ext), "text", size=size, mode=mode))
    shares = [rng.uniform(0.5, 1.5) for _ in range(spec.binaries)]
    for share in shares:
        size = int(spec.binary_bytes * share / sum(shares))
        regular.append(_Entry(fresh(rng.choice(dirs)), "binary", size=size, mode=0o755))
    if regular and spec.roots[0].endswith("bin"):
        regular[-1].mode = 0o4755  # a setuid binary, like su or passwd
    for e in rng.sample(regular, k=min(len(regular), 20)):
        e.uid = 1000 if e.mode != 0o4755 else 0
    entries += regular

    for i in range(spec.symlinks):
        target = rng.choice(regular)
        if i % 3 == 0:  # absolute: resolves only inside the container's root
            entries.append(_Entry(fresh(rng.choice(dirs)), "symlink", target="/" + target.path))
        else:  # relative, beside its target, the way libfoo.so -> libfoo.so.1 are
            parent, base = target.path.rsplit("/", 1)
            entries.append(_Entry(fresh(parent, ".so"), "symlink", target=base))
    for target in rng.sample(regular, k=spec.hardlinks):
        # The link's path extends its target's, so it sorts after it, as tar needs.
        link = f"{target.path}-{words.name(rng)}"
        if link not in used:
            used.add(link)
            entries.append(_Entry(link, "hardlink", target=target.path))

    candidates = [f for f in lower_files if "/" in f]
    for victim in rng.sample(candidates, k=min(spec.whiteouts, len(candidates))):
        parent, base = victim.rsplit("/", 1)
        entries.append(_Entry(f"{parent}/.wh.{base}", "whiteout"))
        lower_files.remove(victim)
    deep = [d for d in lower_dirs if d.count("/") >= 2]
    for d in rng.sample(deep, k=min(spec.opaque_dirs, len(deep))):
        entries.append(_Entry(f"{d}/.wh..wh..opq", "whiteout"))
        for _ in range(5):  # what the directory holds from now on
            entries.append(_Entry(fresh(d, ".conf"), "text", size=rng.randint(100, 4000)))
    return entries


def _parents(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def _tarinfo(e: _Entry) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(e.path)
    ti.mtime = MTIME
    ti.mode = e.mode
    ti.uid = ti.gid = e.uid
    ti.uname = ti.gname = "root" if e.uid == 0 else ""
    if e.kind == "dir":
        ti.type = tarfile.DIRTYPE
    elif e.kind == "symlink":
        ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, e.target, 0o777
    elif e.kind == "hardlink":
        ti.type, ti.linkname = tarfile.LNKTYPE, e.target
    else:
        ti.size = e.size
    return ti


class _HashingWriter:
    """Forwards writes to a file, keeping their sha256 and length."""

    def __init__(self, out: io.BufferedWriter) -> None:
        self.out = out
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, b: bytes, /) -> int:
        self.sha.update(b)
        self.size += len(b)
        return self.out.write(b)

    def flush(self) -> None:
        self.out.flush()


def _write_layer(
    tmp: Path,
    blobs: Path,
    *,
    rng: random.Random,
    words: _Words,
    entries: list[_Entry],
    level: int,
) -> tuple[str, str, int, int, int]:
    """Write one layer blob; returns its digest, diff_id, compressed and uncompressed
    sizes, and how many directory entries it holds."""
    all_dirs = {p for e in entries for p in _parents(e.path)[:-1]}
    all_dirs |= {e.path for e in entries if e.kind == "dir"}
    modes = {e.path: e for e in entries if e.kind == "dir"}
    items = [modes.get(d, _Entry(d, "dir", mode=0o755)) for d in all_dirs]
    items += [e for e in entries if e.kind != "dir"]
    items.sort(key=lambda e: e.path)

    tar_path = tmp / "layer.tar"
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        for e in items:
            ti = _tarinfo(e)
            if e.kind == "text":
                tar.addfile(ti, io.BytesIO(words.text(rng, e.size)))
            elif e.kind == "binary":
                tar.addfile(ti, io.BytesIO(_binary(rng, e.size)))
            else:
                tar.addfile(ti)

    diff = hashlib.sha256()
    raw_size = 0
    gz_tmp = blobs / ".layer.tmp"
    with tar_path.open("rb") as src, gz_tmp.open("wb") as out:
        sink = _HashingWriter(out)
        with gzip.GzipFile(
            filename="", mode="wb", compresslevel=level, fileobj=sink, mtime=0
        ) as gz:
            while chunk := src.read(1 << 20):
                diff.update(chunk)
                raw_size += len(chunk)
                gz.write(chunk)
    tar_path.unlink()
    digest = sink.sha.hexdigest()
    gz_tmp.rename(blobs / digest)
    return f"sha256:{digest}", f"sha256:{diff.hexdigest()}", sink.size, raw_size, len(all_dirs)


def _write_blob(blobs: Path, doc: dict[str, Any]) -> tuple[str, int]:
    data = json.dumps(doc, indent=2, sort_keys=True).encode()
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return f"sha256:{digest}", len(data)


def _write_layout(out: Path, spec: ImageSpec) -> None:
    blobs = out / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    # Seeded generators make reproducible test data; nothing here is a secret.
    words = _Words(random.Random(f"{spec.seed}:words"))  # noqa: S311
    # The merged-/usr links and etc/mtab are added to layer 0 after planning.
    used: set[str] = {"bin", "sbin", "lib", "etc/mtab"}
    lower_files: list[str] = []
    lower_dirs: list[str] = []
    layer_descs: list[dict[str, Any]] = []
    diff_ids: list[str] = []
    history: list[dict[str, Any]] = []
    files = dirs = raw_total = gz_total = 0

    for n, layer in enumerate(spec.layers):
        rng = random.Random(f"{spec.seed}:layer:{n}")  # noqa: S311
        entries = _plan_layer(
            rng,
            words=words,
            spec=layer,
            text_median=spec.text_median_bytes,
            used=used,
            lower_files=lower_files,
            lower_dirs=lower_dirs,
        )
        if n == 0:  # Debian's merged /usr
            for name in ("bin", "sbin", "lib"):
                entries.append(_Entry(name, "symlink", target=f"usr/{name}"))
            entries.append(_Entry("etc/mtab", "symlink", target="../proc/self/mounts"))
        digest, diff_id, gz_size, raw_size, ndirs = _write_layer(
            out, blobs, rng=rng, words=words, entries=entries, level=spec.gzip_level
        )
        layer_descs.append({"mediaType": MEDIA_LAYER_GZIP, "digest": digest, "size": gz_size})
        diff_ids.append(diff_id)
        history.append({"created": "2023-11-14T22:13:20Z", "created_by": layer.created_by})
        files += sum(1 for e in entries if e.kind not in ("dir", "whiteout"))
        dirs += ndirs
        raw_total += raw_size
        gz_total += gz_size
        lower_files += [e.path for e in entries if e.kind == "text"]
        lower_dirs += [e.path for e in entries if e.kind == "dir"]

    config = {
        "created": "2023-11-14T22:13:20Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/sh"],
            "WorkingDir": "/app",
            "Labels": {"org.isobox.bench.generator": GENERATOR_VERSION},
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    }
    config_digest, config_size = _write_blob(blobs, config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": config_size},
        "layers": layer_descs,
    }
    manifest_digest, manifest_size = _write_blob(blobs, manifest)
    index = {
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [
            {
                "mediaType": MEDIA_MANIFEST,
                "digest": manifest_digest,
                "size": manifest_size,
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {"org.opencontainers.image.ref.name": REF_NAME},
            }
        ],
    }
    (out / "index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    (out / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    info = ImageInfo(
        path=out,
        ref=REF_NAME,
        manifest_digest=manifest_digest,
        layers=len(spec.layers),
        uncompressed_bytes=raw_total,
        compressed_bytes=gz_total,
        files=files,
        dirs=dirs,
    )
    summary = info.summary()
    del summary["path"]
    (out / "bench-image.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    os.sync()  # the layout is read by timed runs: have it on disk, not only dirty pages
