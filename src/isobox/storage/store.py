"""The image store: images, tags, unpacked layers and leases, over blobs and SQLite.

On disk, under ``ISOBOX_ROOT``::

    state.db                  images, tags, layers, leases (schema "images")
    blobs/sha256/<hex>        manifests, configs and layer blobs (see blobs.py)
    layers/<chain-hex>/diff   a layer unpacked once per chain ID, in overlay "diff" form;
                              read-only lower layer for every container that uses it
    layers/<chain-hex>/layer.erofs
                              the same layer as an erofs image, built on first use by a
                              utility VM (a read-only disk shared by every VM; erofs.py)
    tmp/                      staging areas of imports in progress
    store.lock                imports hold it shared, garbage collection exclusive
    locks/<chain-hex>.lock    held while a chain is checked, unpacked and committed

An import is a transaction. Blobs are written and verified into a staging folder under
``tmp/``, layers are unpacked there, and only when everything checked out are the files
renamed into place and the rows written in one SQLite transaction. An import that fails
removes its staging folder: the store is exactly as before. An import killed with -9 leaves
at most a staging folder, or files with no rows; those are *garbage*, invisible to lookups,
and :meth:`ImageStore.gc` (run by ``image prune`` and ``rmi``) removes them. Anything found
under a final name is complete, because only complete files are renamed there.

Concurrent imports of the same image serialise on the per-chain lock, so a layer is unpacked
once; the database keeps one row per image, layer and tag.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import BinaryIO

from pydantic import ValidationError

from isobox.errors import (
    Conflict,
    DigestMismatch,
    ImageError,
    ImageInUse,
    ImageNotFound,
    InvalidArgument,
    from_oserror,
)
from isobox.paths import root_dir
from isobox.spec.image import LAYER_COMPRESSION, Compression, ImageConfig, Manifest
from isobox.spec.reference import parse_reference
from isobox.statedb import Schema, StateDB
from isobox.storage.blobs import BlobStore, digest_hex, write_staged
from isobox.storage.sources import MAX_DOC, ResolvedImage

IMAGES_SCHEMA = Schema(
    "images",
    [
        # 1: images, their layers, tags, unpacked layers, layer leases
        """
        CREATE TABLE images (
            digest        TEXT PRIMARY KEY,      -- manifest digest
            config_digest TEXT NOT NULL,
            media_type    TEXT NOT NULL,
            size          INTEGER NOT NULL,      -- manifest + config + layer blobs
            created       TEXT,
            architecture  TEXT NOT NULL,
            os            TEXT NOT NULL,
            added_at      REAL NOT NULL
        );
        CREATE INDEX images_config ON images(config_digest);
        CREATE TABLE image_layers (
            image      TEXT NOT NULL REFERENCES images(digest) ON DELETE CASCADE,
            position   INTEGER NOT NULL,
            blob       TEXT NOT NULL,
            media_type TEXT NOT NULL,
            size       INTEGER NOT NULL,
            diff_id    TEXT NOT NULL,
            chain_id   TEXT NOT NULL,
            PRIMARY KEY (image, position)
        );
        CREATE INDEX image_layers_chain ON image_layers(chain_id);
        CREATE TABLE tags (
            name  TEXT PRIMARY KEY,              -- name:tag
            image TEXT NOT NULL REFERENCES images(digest) ON DELETE CASCADE
        );
        CREATE TABLE layers (
            chain_id TEXT PRIMARY KEY,
            diff_id  TEXT NOT NULL,
            parent   TEXT,
            size     INTEGER NOT NULL,           -- bytes of regular files unpacked
            added_at REAL NOT NULL
        );
        CREATE TABLE layer_blobs (
            blob    TEXT PRIMARY KEY,            -- a layer blob whose diff_id was verified
            diff_id TEXT NOT NULL
        );
        CREATE TABLE leases (
            owner    TEXT NOT NULL,              -- e.g. container:<id>
            chain_id TEXT NOT NULL,
            PRIMARY KEY (owner, chain_id)
        );
        """,
    ],
)


def chain_ids(diff_ids: list[str]) -> list[str]:
    """OCI chain IDs: ``C0 = D0``, ``Cn = sha256(Cn-1 + " " + Dn)``."""
    out: list[str] = []
    for d in diff_ids:
        if not out:
            out.append(d)
        else:
            out.append("sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


@dataclass(frozen=True)
class LayerInfo:
    blob: str
    media_type: str
    size: int
    diff_id: str
    chain_id: str


@dataclass(frozen=True)
class ImageRecord:
    digest: str
    config_digest: str
    media_type: str
    size: int
    created: str | None
    architecture: str
    os: str
    tags: list[str]
    layers: list[LayerInfo] = field(default_factory=list)

    @property
    def id(self) -> str:
        """The image ID, as docker shows it: the config digest."""
        return self.config_digest

    @property
    def short_id(self) -> str:
        return digest_hex(self.config_digest)[:12]


@dataclass(frozen=True)
class GCReport:
    blobs_removed: int
    layers_removed: int
    staging_removed: int
    bytes_freed: int
    images_removed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Mounts:
    """What a container's root filesystem is made of; the runtime performs the mount.

    ``lower`` is ordered top layer first, as overlayfs' ``lowerdir`` wants it.
    """

    lower: list[Path]
    upper: Path
    work: Path

    def overlay_options(self) -> str:
        lower = ":".join(str(p) for p in self.lower)
        return f"lowerdir={lower},upperdir={self.upper},workdir={self.work}"


class ImageStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or root_dir()
        try:
            for sub in ("blobs/sha256", "layers", "tmp", "locks"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise from_oserror("create store folder", str(self.root), exc) from exc
        self.blobs = BlobStore(self.root)
        self.db = StateDB(self.root / "state.db", [IMAGES_SCHEMA])

    def close(self) -> None:
        self.db.close()

    # ---- locks -------------------------------------------------------------------------

    @contextmanager
    def _flock(self, path: Path, mode: int) -> Iterator[None]:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)

    def _store_lock(self, exclusive: bool) -> AbstractContextManager[None]:
        return self._flock(self.root / "store.lock", fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)

    # ---- paths -------------------------------------------------------------------------

    def layer_dir(self, chain_id: str) -> Path:
        return self.root / "layers" / digest_hex(chain_id)

    def layer_diff(self, chain_id: str) -> Path:
        return self.layer_dir(chain_id) / "diff"

    def _chain_lock(self, chain_id: str) -> AbstractContextManager[None]:
        """The lock an import holds while it checks, unpacks and commits the chain."""
        return self._flock(self.root / "locks" / f"{digest_hex(chain_id)}.lock", fcntl.LOCK_EX)

    # ---- erofs images of layers, for utility VMs ---------------------------------------

    def layer_erofs(self, chain_id: str) -> Path:
        """The layer as an uncompressed erofs image, ``layers/<chain-hex>/layer.erofs``.

        Built on first use and kept with the layer (gc removes both together). Builders
        serialise on the chain's lock, so concurrent callers build it once; they hold the
        store lock shared meanwhile, so gc cannot delete the layer under mkfs.erofs. The
        temporary file lives in ``tmp/``: a builder killed midway leaves garbage that gc
        removes, never a partial image under the final name. The caller keeps the layer
        alive afterwards with a lease (:meth:`lease`), as for ``diff``.
        Raises ToolMissing without mkfs.erofs, ImageNotFound for an unknown layer.
        """
        from isobox.storage.erofs import build_erofs

        path = self.layer_dir(chain_id) / "layer.erofs"
        if path.is_file():
            return path
        with self._store_lock(exclusive=False), self._chain_lock(chain_id):
            if path.is_file():
                return path
            known = self.db.query("SELECT 1 FROM layers WHERE chain_id = ?", (chain_id,))
            diff = self.layer_diff(chain_id)
            if not known or not diff.is_dir():
                raise ImageNotFound(f"no such layer: {chain_id}")
            build_erofs(diff, path, tmp_dir=self.root / "tmp")
        return path

    def image_erofs_layers(self, ref: str) -> list[Path]:
        """The erofs images of an image's layers, top layer first (as :attr:`Mounts.lower`)."""
        chains = [layer.chain_id for layer in self.get(ref).layers]
        return [self.layer_erofs(c) for c in reversed(chains)]

    # ---- lookups -----------------------------------------------------------------------

    def resolve(self, ref: str) -> str:
        """The manifest digest that ``ref`` names: a tag, a digest, or an ID prefix.

        ``name@sha256:…`` is resolved by its digest alone, never by the name's tag.
        """
        key = _tag_key(ref)
        rows = self.db.query("SELECT image FROM tags WHERE name = ?", (key,)) if key else []
        if rows:
            return str(rows[0]["image"])
        if "@" in ref:
            digest = parse_reference(ref).digest
            if self.db.query("SELECT 1 FROM images WHERE digest = ?", (digest,)):
                return str(digest)
        else:
            hexpart = ref.removeprefix("sha256:")
            if 4 <= len(hexpart) <= 64 and all(c in "0123456789abcdef" for c in hexpart):
                like = f"sha256:{hexpart}%"
                found = {
                    str(r["digest"])
                    for r in self.db.query(
                        "SELECT digest FROM images WHERE digest LIKE ? OR config_digest LIKE ?",
                        (like, like),
                    )
                }
                if len(found) > 1:
                    raise InvalidArgument(f"image ID prefix {ref!r} is ambiguous")
                if found:
                    return found.pop()
        raise ImageNotFound(f"no such image: {ref}")

    def get(self, ref: str) -> ImageRecord:
        return self._record(self.resolve(ref))

    def _record(self, digest: str) -> ImageRecord:
        rows = self.db.query("SELECT * FROM images WHERE digest = ?", (digest,))
        if not rows:
            raise ImageNotFound(f"no such image: {digest}")
        r = rows[0]
        tags = [
            str(t["name"])
            for t in self.db.query("SELECT name FROM tags WHERE image = ? ORDER BY name", (digest,))
        ]
        layers = [
            LayerInfo(
                str(x["blob"]), str(x["media_type"]), int(x["size"]), str(x["diff_id"]),
                str(x["chain_id"]),
            )
            for x in self.db.query(
                "SELECT * FROM image_layers WHERE image = ? ORDER BY position", (digest,)
            )
        ]
        return ImageRecord(
            digest=digest,
            config_digest=str(r["config_digest"]),
            media_type=str(r["media_type"]),
            size=int(r["size"]),
            created=r["created"],
            architecture=str(r["architecture"]),
            os=str(r["os"]),
            tags=tags,
            layers=layers,
        )

    def images(self) -> list[ImageRecord]:
        rows = self.db.query("SELECT digest FROM images ORDER BY added_at DESC")
        return [self._record(str(r["digest"])) for r in rows]

    def config(self, image: ImageRecord) -> ImageConfig:
        return ImageConfig.model_validate_json(self.blobs.read_bytes(image.config_digest))

    def manifest_bytes(self, image: ImageRecord) -> bytes:
        return self.blobs.read_bytes(image.digest)

    # ---- import ------------------------------------------------------------------------

    def import_image(self, img: ResolvedImage, name: str | None) -> ImageRecord:
        """Import a resolved image (OCI layout/archive or docker save) as one transaction."""
        tag = parse_reference(name).tagged if name else None
        with self._store_lock(exclusive=False), _Staging(self) as st:
            return st.run(img, tag)

    def tag(self, ref: str, new: str) -> None:
        digest = self.resolve(ref)
        key = parse_reference(new).tagged
        with self.db.transaction() as tx:
            tx.execute(
                "INSERT INTO tags(name, image) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET image = excluded.image",
                (key, digest),
            )

    # ---- removal and garbage -----------------------------------------------------------

    def remove(self, ref: str, *, force: bool = False) -> tuple[list[str], list[str]]:
        """Untag, and delete the image when no tag is left. Returns (untagged, deleted)."""
        untagged: list[str] = []
        deleted: list[str] = []
        key = _tag_key(ref)
        with self.db.transaction() as tx:
            row = (
                tx.execute("SELECT image FROM tags WHERE name = ?", (key,)).fetchone()
                if key else None
            )
            if row is not None and key is not None:
                digest = str(row["image"])
                tx.execute("DELETE FROM tags WHERE name = ?", (key,))
                untagged.append(key)
            else:
                digest = self.resolve(ref)
                names = [
                    str(r["name"])
                    for r in tx.execute("SELECT name FROM tags WHERE image = ?", (digest,))
                ]
                if len(names) > 1 and not force:
                    raise ImageInUse(
                        f"image {ref} is tagged {', '.join(names)}; remove the tags or use --force"
                    )
                tx.execute("DELETE FROM tags WHERE image = ?", (digest,))
                untagged.extend(names)
            left = tx.execute("SELECT 1 FROM tags WHERE image = ?", (digest,)).fetchone()
            if left is None:
                tx.execute("DELETE FROM images WHERE digest = ?", (digest,))
                deleted.append(digest)
        if deleted:
            self.gc()
        return untagged, deleted

    def prune(self) -> GCReport:
        """Remove images with no tag, then everything no image or lease references."""
        with self.db.transaction() as tx:
            dangling = [
                str(r["digest"])
                for r in tx.execute(
                    "SELECT digest FROM images WHERE digest NOT IN (SELECT image FROM tags)"
                )
            ]
            for d in dangling:
                tx.execute("DELETE FROM images WHERE digest = ?", (d,))
        report = self.gc()
        return GCReport(
            report.blobs_removed, report.layers_removed, report.staging_removed,
            report.bytes_freed, dangling,
        )

    def gc(self) -> GCReport:
        """Delete blobs, layers and staging folders that nothing references."""
        with self._store_lock(exclusive=True):
            # Holding the exclusive lock, no import runs: every staging folder is dead.
            staging = 0
            for entry in os.scandir(self.root / "tmp"):
                _rmtree(Path(entry.path))
                staging += 1
            used_blobs = {
                str(r[0])
                for r in self.db.query(
                    "SELECT digest FROM images UNION SELECT config_digest FROM images "
                    "UNION SELECT blob FROM image_layers"
                )
            }
            used_chains = {
                str(r[0])
                for r in self.db.query(
                    "SELECT chain_id FROM image_layers UNION SELECT chain_id FROM leases"
                )
            }
            freed = 0
            blobs = 0
            for digest in list(self.blobs.digests()):
                if digest not in used_blobs:
                    freed += self.blobs.remove(digest)
                    blobs += 1
            # Rows first: a layer folder without rows is garbage, never trusted by an import.
            with self.db.transaction() as tx:
                for row in tx.execute("SELECT chain_id FROM layers").fetchall():
                    if str(row[0]) not in used_chains:
                        tx.execute("DELETE FROM layers WHERE chain_id = ?", (row[0],))
                tx.execute(
                    "DELETE FROM layer_blobs WHERE blob NOT IN (SELECT blob FROM image_layers)"
                )
            layers = 0
            for entry in os.scandir(self.root / "layers"):
                chain = "sha256:" + entry.name
                if chain not in used_chains:
                    # Out of its final name in one atomic step, then deleted: an interrupted
                    # delete leaves a half folder in tmp/ (garbage), never under layers/.
                    doomed = self.root / "tmp" / f"gc-{entry.name}-{uuid.uuid4().hex[:8]}"
                    os.rename(entry.path, doomed)
                    _rmtree(doomed)
                    layers += 1
            for entry in os.scandir(self.root / "locks"):
                if entry.name.endswith(".lock") and "sha256:" + entry.name[:-5] not in used_chains:
                    with suppress(FileNotFoundError):
                        os.unlink(entry.path)
        return GCReport(blobs, layers, staging, freed)

    # ---- leases and scratch layers -----------------------------------------------------

    def lease(self, owner: str, ref: str) -> list[Path]:
        """Keep an image's layers alive for ``owner``; returns lower dirs, top first.

        The lookup and the lease are one transaction under the shared store lock, so a
        concurrent ``rmi`` + gc either runs before (the image is gone: an error) or after
        (the lease keeps the layers).
        """
        digest = self.resolve(ref)
        with self._store_lock(exclusive=False), self.db.transaction() as tx:
            chains = [
                str(r["chain_id"])
                for r in tx.execute(
                    "SELECT chain_id FROM image_layers WHERE image = ? ORDER BY position",
                    (digest,),
                )
            ]
            if not chains:
                raise ImageNotFound(f"no such image: {ref}")
            tx.executemany(
                "INSERT OR IGNORE INTO leases(owner, chain_id) VALUES (?, ?)",
                [(owner, c) for c in chains],
            )
        return [self.layer_diff(c) for c in reversed(chains)]

    def release(self, owner: str) -> None:
        with self.db.transaction() as tx:
            tx.execute("DELETE FROM leases WHERE owner = ?", (owner,))

    def leases(self, owner: str) -> list[str]:
        rows = self.db.query("SELECT chain_id FROM leases WHERE owner = ?", (owner,))
        return [str(r[0]) for r in rows]

    def prepare_scratch(self, container_id: str, ref: str) -> Mounts:
        """Give a container its writable scratch layer over the image's read-only layers.

        The scratch layer is a plain folder on the host (``containers/<id>/scratch``), so
        the host can look at what a container changed. Storage only *describes* the overlay
        mount; the runtime performs it. Undo with :meth:`release_scratch`.
        """
        if not container_id or "/" in container_id or container_id.startswith("."):
            raise InvalidArgument(f"invalid container id {container_id!r}")
        base = self.root / "containers" / container_id / "scratch"
        try:
            base.mkdir(parents=True, exist_ok=False)
        except FileExistsError as exc:
            raise Conflict(f"container {container_id} already has a scratch layer") from exc
        except OSError as exc:
            raise from_oserror("create scratch layer", str(base), exc) from exc
        try:
            (base / "upper").mkdir(mode=0o755)
            (base / "work").mkdir(mode=0o700)
            lower = self.lease(f"container:{container_id}", ref)
        except BaseException:
            _rmtree(base)
            raise
        return Mounts(lower, base / "upper", base / "work")

    def release_scratch(self, container_id: str) -> None:
        """Delete a container's scratch layer and drop its lease (idempotent)."""
        _rmtree(self.root / "containers" / container_id / "scratch")
        self.release(f"container:{container_id}")


def _tag_key(ref: str) -> str | None:
    """The ``name:tag`` key a reference looks up; None for a reference by digest."""
    try:
        parsed = parse_reference(ref)
    except InvalidArgument:
        return ref
    return None if parsed.digest else parsed.tagged


def _rmtree(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except NotADirectoryError:
        path.unlink(missing_ok=True)


@dataclass(frozen=True)
class _Rows:
    image_layers: list[tuple[object, ...]]
    layers: list[tuple[object, ...]]
    verified: list[tuple[str, str]]


class _Staging:
    """One import in progress: a staging folder under tmp/ and the chain locks it holds."""

    def __init__(self, store: ImageStore) -> None:
        self.store = store
        self.dir = store.root / "tmp" / f"import-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._lock_fds: list[int] = []
        self._blobs: dict[str, Path] = {}  # staged blobs to install: digest -> path
        self._layers: dict[str, Path] = {}  # staged layer dirs to install: chain -> dir

    def __enter__(self) -> _Staging:
        try:
            self.dir.mkdir(parents=True)
        except OSError as exc:
            raise from_oserror("create staging folder", str(self.dir), exc) from exc
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self._lock_fds:
            os.close(fd)
        _rmtree(self.dir)

    def _lock_chain(self, chain: str) -> None:
        path = self.store.root / "locks" / f"{digest_hex(chain)}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._lock_fds.append(fd)

    def blob_path(self, digest: str) -> Path:
        """Where a blob can be read now: the store's copy or our staged one."""
        if digest in self._blobs:
            return self._blobs[digest]
        return self.store.blobs.path(digest)

    def ensure_blob(
        self, digest: str, size: int | None, what: str,
        opener: Callable[[], BinaryIO] | None = None, data: bytes | None = None,
    ) -> None:
        """Stage a verified copy of a blob unless the store (or this import) has it."""
        if self.store.blobs.has(digest) or digest in self._blobs:
            have = self.blob_path(digest).stat().st_size
            if size is not None and have != size:
                raise ImageError(f"{what}: size is {have} bytes, the manifest says {size}")
            return
        staged = self.dir / f"blob-{digest_hex(digest)}"
        if data is not None:
            write_staged(io.BytesIO(data), staged, expected=digest, what=what)
        else:
            assert opener is not None
            with opener() as src:
                _, got = write_staged(src, staged, expected=digest, what=what, limit=size)
            if size is not None and got != size:
                staged.unlink(missing_ok=True)
                raise ImageError(f"{what}: size is {got} bytes, the manifest says {size}")
        self._blobs[digest] = staged

    def run(self, img: ResolvedImage, tag: str | None) -> ImageRecord:
        from isobox.storage.layer_tar import unpack_layer

        store = self.store
        manifest: Manifest = img.manifest
        # Manifest and config first: small, and they say what the layers must be.
        self.ensure_blob(img.digest, None, "manifest", data=img.manifest_bytes)
        cdesc = manifest.config
        if cdesc.size > MAX_DOC:
            raise ImageError(f"config {cdesc.digest}: {cdesc.size} bytes, more than {MAX_DOC}")
        self.ensure_blob(
            cdesc.digest, cdesc.size, f"config {cdesc.digest}",
            opener=lambda: img.open_blob(cdesc.digest),
        )
        try:
            config = ImageConfig.model_validate_json(self.blob_path(cdesc.digest).read_bytes())
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise ImageError(f"image config {cdesc.digest}: {loc}: {first['msg']}") from exc
        diff_ids = config.rootfs.diff_ids
        if len(diff_ids) != len(manifest.layers):
            raise ImageError(
                f"manifest lists {len(manifest.layers)} layers but the config has "
                f"{len(diff_ids)} diff_ids"
            )
        chains = chain_ids(diff_ids)
        layer_rows: list[tuple[object, ...]] = []
        layer_meta: list[tuple[object, ...]] = []
        verified: list[tuple[str, str]] = []
        for pos, (desc, diff_id, chain) in enumerate(
            zip(manifest.layers, diff_ids, chains, strict=True)
        ):
            what = f"layer {pos} ({desc.digest[:19]})"
            compression = LAYER_COMPRESSION.get(desc.media_type)
            if compression is None:
                raise ImageError(f"{what}: unsupported media type {desc.media_type!r}")
            self.ensure_blob(
                desc.digest, desc.size, what, opener=partial(img.open_blob, desc.digest)
            )
            self._lock_chain(chain)
            known = store.db.query("SELECT diff_id FROM layer_blobs WHERE blob = ?", (desc.digest,))
            present = store.layer_diff(chain).is_dir()
            if present and known and str(known[0][0]) == diff_id:
                size_row = store.db.query("SELECT size FROM layers WHERE chain_id = ?", (chain,))
                size = int(size_row[0][0]) if size_row else 0
            elif present:
                # The layer exists (another image, or an import that died before its rows):
                # check that this blob really is that diff before relying on it.
                _verify_diff_id(self.blob_path(desc.digest), compression, diff_id, what)
                size = 0
            else:
                dest = self.dir / f"layer-{digest_hex(chain)}"
                (dest / "diff").mkdir(parents=True)
                with open(self.blob_path(desc.digest), "rb") as raw:
                    result = unpack_layer(raw, compression, dest / "diff", what=what)
                if result.diff_id != diff_id:
                    raise DigestMismatch(f"{what}: uncompressed content", diff_id, result.diff_id)
                size = result.size
                self._layers[chain] = dest
            verified.append((desc.digest, diff_id))
            layer_meta.append((chain, diff_id, chains[pos - 1] if pos else None, size))
            layer_rows.append((pos, desc.digest, desc.media_type, desc.size, diff_id, chain))
        rows = _Rows(layer_rows, layer_meta, verified)
        return self._commit(img, config, tag, rows)

    def _commit(
        self, img: ResolvedImage, config: ImageConfig, tag: str | None, rows: _Rows
    ) -> ImageRecord:
        store = self.store
        for digest, staged in self._blobs.items():
            store.blobs.install(staged, digest)
        for chain, staged_dir in self._layers.items():
            final = store.layer_dir(chain)
            try:
                os.rename(staged_dir, final)
            except OSError as exc:
                if not final.is_dir():
                    raise from_oserror("install layer", str(final), exc) from exc
        manifest = img.manifest
        size = len(img.manifest_bytes) + manifest.config.size + sum(d.size for d in manifest.layers)
        now = time.time()
        with store.db.transaction() as tx:
            tx.execute(
                "INSERT OR IGNORE INTO images(digest, config_digest, media_type, size, created,"
                " architecture, os, added_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (img.digest, manifest.config.digest,
                 manifest.media_type or "application/vnd.oci.image.manifest.v1+json", size,
                 config.created, config.architecture, config.os, now),
            )
            tx.executemany(
                "INSERT OR IGNORE INTO image_layers(image, position, blob, media_type, size,"
                " diff_id, chain_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(img.digest, *row) for row in rows.image_layers],
            )
            tx.executemany(
                "INSERT OR IGNORE INTO layers(chain_id, diff_id, parent, size, added_at)"
                " VALUES (?, ?, ?, ?, ?)",
                [(*row, now) for row in rows.layers],
            )
            tx.executemany(
                "INSERT OR IGNORE INTO layer_blobs(blob, diff_id) VALUES (?, ?)", rows.verified
            )
            if tag is not None:
                tx.execute(
                    "INSERT INTO tags(name, image) VALUES (?, ?) "
                    "ON CONFLICT(name) DO UPDATE SET image = excluded.image",
                    (tag, img.digest),
                )
        return store._record(img.digest)


def _verify_diff_id(path: Path, compression: Compression, diff_id: str, what: str) -> None:
    from isobox.storage.layer_tar import decompressed_digest

    with open(path, "rb") as fh:
        actual = decompressed_digest(fh, compression, what=what)
    if actual != diff_id:
        raise DigestMismatch(f"{what}: uncompressed content", diff_id, actual)
