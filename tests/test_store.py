"""The image store, for real: blobs on disk, SQLite, unpacked layers, overlay mounts."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from imagekit import (
    d,
    docker_save,
    f,
    hard,
    oci_layout,
    sha,
    sym,
    tar_bytes,
    tar_dir,
    tree_snapshot,
)
from isobox.errors import (
    DigestMismatch,
    ImageError,
    ImageInUse,
    ImageNotFound,
    InvalidReference,
    UnsafeLayer,
)
from isobox.storage.export import save
from isobox.storage.importer import import_path
from isobox.storage.store import ImageStore

pytestmark = pytest.mark.root  # layers keep owners and whiteout device nodes

BASE = [d("bin"), f("bin/tool", "#!/bin/sh\necho base\n", 0o755), d("etc"), f("etc/os", "base\n")]
APP = [d("app"), f("app/main", "hello\n"), hard("app/alias", "app/main"), sym("app/os", "/etc/os")]


def _store(root: Path) -> ImageStore:
    return ImageStore(root)


def db_dump(store: ImageStore) -> dict[str, list[tuple[object, ...]]]:
    tables = ["images", "image_layers", "tags", "layers", "layer_blobs", "leases"]
    return {t: sorted(tuple(r) for r in store.db.query(f"SELECT * FROM {t}")) for t in tables}  # noqa: S608


def state(store: ImageStore) -> tuple[object, object]:
    return tree_snapshot(store.root), db_dump(store)


def test_import_oci_layout_unpacks_and_lists(tmp_path: Path, isobox_env: Path) -> None:
    built = oci_layout(tmp_path / "img", [tar_bytes(BASE), tar_bytes(APP)])
    store = _store(isobox_env)
    img = import_path(store, tmp_path / "img", "app:1")
    assert img.digest == built.manifest_digest
    assert img.config_digest == built.config_digest
    assert [la.diff_id for la in img.layers] == built.diff_ids
    assert img.tags == ["app:1"]
    top = store.layer_diff(img.layers[1].chain_id)
    assert (top / "app" / "main").read_text() == "hello\n"
    assert os.stat(top / "app" / "main").st_ino == os.stat(top / "app" / "alias").st_ino
    assert os.readlink(top / "app" / "os") == "/etc/os"  # stored verbatim, never followed
    base = store.layer_diff(img.layers[0].chain_id)
    assert os.stat(base / "bin" / "tool").st_mode & 0o777 == 0o755
    for digest in [img.digest, img.config_digest, *built.layer_digests]:
        assert sha(store.blobs.path(digest).read_bytes()) == digest
    # Importing again changes nothing.
    before = state(store)
    assert import_path(store, tmp_path / "img", "app:1").digest == img.digest
    assert state(store) == before
    assert [i.digest for i in store.images()] == [img.digest]


def test_layers_are_shared_and_removal_keeps_what_others_use(
    tmp_path: Path, isobox_env: Path
) -> None:
    oci_layout(tmp_path / "a", [tar_bytes(BASE), tar_bytes(APP)])
    oci_layout(tmp_path / "b", [tar_bytes(BASE), tar_bytes([f("other", "b")])])
    store = _store(isobox_env)
    a = import_path(store, tmp_path / "a", "a")
    b = import_path(store, tmp_path / "b", "b")
    assert a.layers[0].chain_id == b.layers[0].chain_id
    assert len(os.listdir(store.root / "layers")) == 3  # base unpacked once
    store.remove("a")
    assert store.layer_diff(b.layers[0].chain_id).is_dir()  # still used by b
    assert not store.layer_diff(a.layers[1].chain_id).exists()
    assert not store.blobs.has(a.layers[1].blob)
    with pytest.raises(ImageNotFound):
        store.get("a")
    store.remove("b")
    assert os.listdir(store.root / "layers") == []
    assert list(store.blobs.digests()) == []
    assert db_dump(store)["layers"] == []


def test_a_container_lease_keeps_layers_after_rmi(tmp_path: Path, isobox_env: Path) -> None:
    oci_layout(tmp_path / "a", [tar_bytes(BASE), tar_bytes(APP)])
    store = _store(isobox_env)
    img = import_path(store, tmp_path / "a", "a")
    mounts = store.prepare_scratch("c1", "a")
    assert mounts.lower == [store.layer_diff(la.chain_id) for la in reversed(img.layers)]
    store.remove("a")
    assert all(p.is_dir() for p in mounts.lower)
    store.release_scratch("c1")
    store.gc()
    assert os.listdir(store.root / "layers") == []
    assert not (store.root / "containers" / "c1" / "scratch").exists()


@pytest.mark.overlay
def test_scratch_layer_overlay_with_whiteouts(tmp_path: Path, isobox_env: Path) -> None:
    lower = [d("etc"), f("etc/keep", "k"), f("etc/gone", "g"), d("opq"), f("opq/old", "o")]
    upper = [d("etc"), f("etc/.wh.gone", ""), d("opq"), f("opq/.wh..wh..opq", ""),
             f("opq/new", "n")]
    oci_layout(tmp_path / "img", [tar_bytes(lower), tar_bytes(upper)])
    store = _store(isobox_env)
    import_path(store, tmp_path / "img", "wh")
    mounts = store.prepare_scratch("c2", "wh")
    merged = tmp_path / "merged"
    merged.mkdir()
    script = (
        f"mount -t overlay overlay -o {mounts.overlay_options()} {merged} && "
        f"ls -A {merged}/etc {merged}/opq && "
        f"echo changed > {merged}/etc/keep && rm {merged}/opq/new"
    )
    out = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    assert out == [f"{merged}/etc:", "keep", f"{merged}/opq:", "new"]
    # The scratch layer on the host shows what the container changed; the image is intact.
    assert (mounts.upper / "etc" / "keep").read_text() == "changed\n"
    assert (mounts.lower[1] / "etc" / "keep").read_text() == "k"
    store.release_scratch("c2")
    assert not mounts.upper.exists()


def test_docker_save_import_and_export_round_trip(tmp_path: Path, isobox_env: Path) -> None:
    built = docker_save(tmp_path / "save.tar", [tar_bytes(BASE), tar_bytes(APP)], "dk:v1")
    store = _store(isobox_env)
    img = import_path(store, tmp_path / "save.tar")
    assert img.tags == ["dk:v1"]
    assert img.config_digest == built.config_digest
    assert [la.diff_id for la in img.layers] == built.diff_ids
    save(store, "dk:v1", tmp_path / "out-docker.tar", "docker")
    save(store, "dk:v1", tmp_path / "out-oci.tar", "oci")
    other = _store(tmp_path / "other")
    again = import_path(other, tmp_path / "out-docker.tar")
    assert again.config_digest == img.config_digest and again.tags == ["dk:v1"]
    oci = import_path(other, tmp_path / "out-oci.tar", "dk:oci")
    assert oci.digest == img.digest  # OCI save keeps the stored manifest bytes


def test_oci_archive_save_keeps_digests(tmp_path: Path, isobox_env: Path) -> None:
    built = oci_layout(tmp_path / "img", [tar_bytes(BASE)])
    tar_dir(tmp_path / "img", tmp_path / "img.tar")
    store = _store(isobox_env)
    img = import_path(store, tmp_path / "img.tar", "x:1")
    assert img.digest == built.manifest_digest
    save(store, "x:1", tmp_path / "back.tar")
    with tarfile.open(tmp_path / "back.tar") as t:
        index = json.load(t.extractfile("index.json"))  # type: ignore[arg-type]
        names = set(t.getnames())
    assert index["manifests"][0]["digest"] == built.manifest_digest
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "1"
    assert {f"blobs/sha256/{x.split(':')[1]}" for x in built.layer_digests} <= names


def test_rootfs_tar_and_directory_import(tmp_path: Path, isobox_env: Path) -> None:
    (tmp_path / "rootfs.tar").write_bytes(tar_bytes(BASE))
    src = tmp_path / "dir"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "x").write_text("x")
    store = _store(isobox_env)
    a = import_path(store, tmp_path / "rootfs.tar", "fromtar")
    b = import_path(store, src, "fromdir")
    assert a.layers[0].diff_id == sha(tar_bytes(BASE))  # an uncompressed tar is the layer
    assert (store.layer_diff(b.layers[0].chain_id) / "bin" / "x").read_text() == "x"
    cfg = store.config(b)
    assert cfg.config is not None and cfg.config.cmd == ["/bin/sh"]


def test_references_by_digest_and_id(tmp_path: Path, isobox_env: Path) -> None:
    built = oci_layout(tmp_path / "img", [tar_bytes(BASE)])
    store = _store(isobox_env)
    import_path(store, tmp_path / "img", "r:1")
    store.tag("r:1", "r:2")
    assert store.get(f"r@{built.manifest_digest}").digest == built.manifest_digest
    assert store.get(built.config_digest.split(":")[1][:12]).tags == ["r:1", "r:2"]
    with pytest.raises(ImageInUse):
        store.remove(built.config_digest[:19])  # two tags: refuse without --force
    untagged, deleted = store.remove(built.config_digest[:19], force=True)
    assert sorted(untagged) == ["r:1", "r:2"] and deleted == [built.manifest_digest]
    with pytest.raises(InvalidReference):
        import_path(store, tmp_path / "img", "Bad Name")


# ---- hostile and broken input: a clear error, and the store exactly as before ----------


def _assert_refused(store: ImageStore, path: Path, exc: type[Exception], match: str) -> None:
    before = state(store)
    with pytest.raises(exc, match=match):
        import_path(store, path, "hostile:1")
    assert state(store) == before
    assert os.listdir(store.root / "tmp") == []


def test_layer_digest_mismatch(tmp_path: Path, isobox_env: Path) -> None:
    built = oci_layout(tmp_path / "img", [tar_bytes(BASE)])
    blob = tmp_path / "img" / "blobs" / "sha256" / built.layer_digests[0].split(":")[1]
    data = bytearray(blob.read_bytes())
    data[-20] ^= 0xFF
    blob.write_bytes(bytes(data))
    store = _store(isobox_env)
    import_path(store, _fresh_layout(tmp_path), "ok")  # a store with something in it
    _assert_refused(store, tmp_path / "img", DigestMismatch, "layer 0")


def test_diff_id_mismatch(tmp_path: Path, isobox_env: Path) -> None:
    oci_layout(tmp_path / "img", [tar_bytes(BASE)], diff_ids=["sha256:" + "0" * 64])
    _assert_refused(_store(isobox_env), tmp_path / "img", DigestMismatch, "uncompressed")


def test_manifest_digest_mismatch(tmp_path: Path, isobox_env: Path) -> None:
    built = oci_layout(tmp_path / "img", [tar_bytes(BASE)])
    mpath = tmp_path / "img" / "blobs" / "sha256" / built.manifest_digest.split(":")[1]
    mpath.write_bytes(mpath.read_bytes().replace(b'"schemaVersion": 2', b'"schemaVersion":2 '))
    _assert_refused(_store(isobox_env), tmp_path / "img", DigestMismatch, "blob")


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        ([f("../escape", "x")], r"\.\."),
        ([f("/etc/evil", "x")], "absolute"),
        ([sym("link", "/tmp"), f("link/evil", "x")], "symlink"),
        ([hard("h", "/etc/passwd")], "absolute"),
    ],
    ids=["dotdot", "absolute", "symlink-then-write", "hardlink-outside"],
)
def test_unsafe_layers_are_refused(
    tmp_path: Path, isobox_env: Path, entries: list[object], match: str
) -> None:
    oci_layout(tmp_path / "img", [tar_bytes(BASE), tar_bytes(entries)])  # type: ignore[arg-type]
    store = _store(isobox_env)
    import_path(store, _fresh_layout(tmp_path), "ok")
    _assert_refused(store, tmp_path / "img", UnsafeLayer, match)
    assert not (tmp_path / "escape").exists()


def test_truncated_layer(tmp_path: Path, isobox_env: Path) -> None:
    # A layer cut short whose digest matches (the manifest was made for the cut bytes).
    cut = tar_bytes([f("big", b"x" * 100_000)])[:50_000]
    oci_layout(tmp_path / "img", [cut], compress=False)
    _assert_refused(_store(isobox_env), tmp_path / "img", ImageError, "layer 0")


def _fresh_layout(tmp_path: Path) -> Path:
    out = tmp_path / "fine"
    if not out.exists():
        oci_layout(out, [tar_bytes([f("fine", "1")])])
    return out


def test_corrupted_blob_on_disk_is_caught_on_read(tmp_path: Path, isobox_env: Path) -> None:
    oci_layout(tmp_path / "img", [tar_bytes(BASE)])
    store = _store(isobox_env)
    img = import_path(store, tmp_path / "img", "c")
    p = store.blobs.path(img.layers[0].blob)
    os.chmod(p, 0o644)
    data = bytearray(p.read_bytes())
    data[10] ^= 1
    p.write_bytes(bytes(data))
    with pytest.raises(DigestMismatch):
        save(store, "c", tmp_path / "out.tar")
    assert not (tmp_path / "out.tar").exists()
    assert [x for x in os.listdir(tmp_path) if x.startswith(".out.tar")] == []


# ---- concurrency and crashes -------------------------------------------------------------


def _import_worker(root: str, path: str) -> str:
    return import_path(ImageStore(Path(root)), Path(path), "same:1").digest


def test_concurrent_imports_end_with_one_copy(tmp_path: Path, isobox_env: Path) -> None:
    layers = [tar_bytes(BASE), tar_bytes([f(f"f{i}", os.urandom(2000)) for i in range(300)])]
    oci_layout(tmp_path / "img", layers)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        digests = pool.starmap(_import_worker, [(str(isobox_env), str(tmp_path / "img"))] * 4)
    assert len(set(digests)) == 1
    store = _store(isobox_env)
    assert len(store.images()) == 1
    assert len(os.listdir(store.root / "layers")) == 2
    assert os.listdir(store.root / "tmp") == []
    dump = db_dump(store)
    assert len(dump["layers"]) == 2 and len(dump["tags"]) == 1 and len(dump["image_layers"]) == 2


def test_kill_9_midway_leaves_a_usable_store(tmp_path: Path, isobox_env: Path) -> None:
    rng = __import__("random").Random(7)
    big = [f(f"d{i // 100}/f{i}", rng.randbytes(20_000)) for i in range(3000)]
    oci_layout(tmp_path / "img", [tar_bytes(BASE), tar_bytes(big)])
    env = {**os.environ, "ISOBOX_ROOT": str(isobox_env)}
    # The import runs in the process that is killed (the CLI would hand it to isoboxd).
    script = ("import sys; from pathlib import Path; from isobox.storage.store import ImageStore; "
              "from isobox.storage.importer import import_path; "
              "import_path(ImageStore(), Path(sys.argv[1]), 'big:1')")
    cmd = [sys.executable, "-c", script, str(tmp_path / "img")]
    proc = subprocess.Popen(cmd, env=env)
    staging = isobox_env / "tmp"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until the import is unpacking
        if staging.is_dir() and any(
            (staging / s).is_dir() and any(n.startswith("layer-") for n in os.listdir(staging / s))
            for s in os.listdir(staging)
        ):
            break
        time.sleep(0.005)
    else:
        pytest.fail("the import never reached the unpacking stage")
    proc.kill()
    assert proc.wait() == -9
    store = _store(isobox_env)
    assert store.images() == []  # nothing half-imported is visible
    report = store.prune()
    assert report.staging_removed >= 1
    img = import_path(store, tmp_path / "img", "big:1")
    assert (store.layer_diff(img.layers[1].chain_id) / "d29" / "f2999").stat().st_size == 20_000
    store.prune()
    used = {img.digest, img.config_digest, *(la.blob for la in img.layers)}
    assert set(store.blobs.digests()) == used
    assert os.listdir(store.root / "tmp") == []


def test_full_disk_is_a_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    rng = __import__("random").Random(3)
    oci_layout(tmp_path / "img", [tar_bytes([f("big", rng.randbytes(6_000_000))])],
               compress=False)
    root = tmp_path / "tiny"
    root.mkdir()
    script = (
        f"mount -t tmpfs -o size=8m tmpfs {root} && "
        f"ISOBOX_ROOT={root} {sys.executable} -m isobox.cli.main import {tmp_path}/img full:1;"
        f" echo rc=$?; for d in tmp layers blobs/sha256; do echo $d=$(ls -A {root}/$d | wc -l);"
        " done"
    )
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        capture_output=True, text=True, check=False,
    )
    assert "no space left on device" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.split()
    assert lines[0] == "rc=1"
    assert lines[1:] == ["tmp=0", "layers=0", "blobs/sha256=0"]
