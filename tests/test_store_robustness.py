"""Storage under hostile input, interruption and races: review findings, kept as tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

import isobox.storage.store as store_mod
from imagekit import d, f, oci_layout, sha, tar_bytes, tar_dir
from isobox.errors import ImageError, IsoboxError
from isobox.storage.export import save
from isobox.storage.importer import import_path
from isobox.storage.store import ImageStore

pytestmark = pytest.mark.root

BASE = [d("bin"), f("bin/tool", "#!/bin/sh\necho base\n", 0o755), d("etc"), f("etc/os", "base\n")]


def _cli(root: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ISOBOX_ROOT": str(root)}
    return subprocess.run(
        [sys.executable, "-m", "isobox.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _put(layout: Path, data: bytes) -> str:
    digest = sha(data)
    (layout / "blobs" / "sha256" / digest.split(":")[1]).write_bytes(data)
    return digest


def _rewrite(
    layout: Path, *, config: Mapping[str, object] | None = None, layer_size_delta: int = 0
) -> str:
    """Rewrite the single manifest of an imagekit layout (new config and/or lying layer
    sizes); returns the new manifest digest."""
    index = json.loads((layout / "index.json").read_text())
    mdesc = index["manifests"][0]
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / mdesc["digest"].split(":")[1]).read_bytes())
    if config is not None:
        cbytes = json.dumps(config).encode()
        manifest["config"] = {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": _put(layout, cbytes),
            "size": len(cbytes),
        }
    for layer in manifest["layers"]:
        layer["size"] += layer_size_delta
    mbytes = json.dumps(manifest).encode()
    mdesc["digest"] = _put(layout, mbytes)
    mdesc["size"] = len(mbytes)
    (layout / "index.json").write_text(json.dumps(index))
    return str(mdesc["digest"])


# ---- 1. an interrupted gc leaves a half-deleted layer that a later import reuses ---------


def test_interrupted_gc_half_deleted_layer_is_reused_by_next_import(
    tmp_path: Path, isobox_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    oci_layout(tmp_path / "img", [tar_bytes(BASE)])
    store = ImageStore(isobox_env)
    img = import_path(store, tmp_path / "img", "base:1")
    layer = store.layer_diff(img.layers[0].chain_id)
    assert (layer / "etc" / "os").is_file()

    real_rmtree = store_mod._rmtree

    def interrupted_rmtree(path: Path) -> None:
        if (path / "diff" / "etc" / "os").is_file():
            # shutil.rmtree got as far as one file when Ctrl-C / kill -9 arrived.
            os.unlink(path / "diff" / "etc" / "os")
            raise KeyboardInterrupt
        real_rmtree(path)

    monkeypatch.setattr(store_mod, "_rmtree", interrupted_rmtree)
    with pytest.raises(KeyboardInterrupt):
        store.remove("base:1")  # rmi: rows deleted, then gc is interrupted mid-rmtree
    monkeypatch.undo()

    again = import_path(ImageStore(isobox_env), tmp_path / "img", "base:1")
    assert again.digest == img.digest
    # The import found layers/<chain>/diff and reused it without looking inside.
    assert (store.layer_diff(again.layers[0].chain_id) / "etc" / "os").is_file()


# ---- 2. name@digest is looked up as the tag name:latest ------------------------------------


def test_get_by_name_at_digest_returns_the_image_named_by_the_digest(
    tmp_path: Path, isobox_env: Path
) -> None:
    oci_layout(tmp_path / "a", [tar_bytes([f("a", "A")])])
    b = oci_layout(tmp_path / "b", [tar_bytes([f("b", "B")])])
    store = ImageStore(isobox_env)
    import_path(store, tmp_path / "a", "r")  # r:latest -> A
    import_path(store, tmp_path / "b", "r:2")  # r:2 -> B
    assert store.get(f"r@{b.manifest_digest}").digest == b.manifest_digest


def test_rmi_name_at_digest_deletes_a_different_image(tmp_path: Path, isobox_env: Path) -> None:
    a = oci_layout(tmp_path / "a", [tar_bytes([f("a", "A")])])
    b = oci_layout(tmp_path / "b", [tar_bytes([f("b", "B")])])
    store = ImageStore(isobox_env)
    import_path(store, tmp_path / "a", "r")
    import_path(store, tmp_path / "b", "r:2")
    _untagged, deleted = store.remove(f"r@{b.manifest_digest}", force=True)
    assert a.manifest_digest not in deleted  # the user named B; A must survive
    assert store.get("r:latest").digest == a.manifest_digest


# ---- 3. docker save's duplicate-layer symlinks (../<id>/layer.tar) are refused -------------


def test_docker_save_tar_with_relative_duplicate_layer_symlink(
    tmp_path: Path, isobox_env: Path
) -> None:
    layer = tar_bytes([f("x", "1")])
    work = tmp_path / "dk"
    (work / "aaa").mkdir(parents=True)
    (work / "aaa" / "layer.tar").write_bytes(layer)
    (work / "bbb").mkdir()
    os.symlink("../aaa/layer.tar", work / "bbb" / "layer.tar")  # what docker save writes
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [sha(layer), sha(layer)]},
    }
    (work / "c.json").write_text(json.dumps(config))
    (work / "manifest.json").write_text(
        json.dumps(
            [
                {
                    "Config": "c.json",
                    "RepoTags": ["dup:1"],
                    "Layers": ["aaa/layer.tar", "bbb/layer.tar"],
                }
            ]
        )
    )
    tar_dir(work, tmp_path / "dk.tar")
    store = ImageStore(isobox_env)
    assert import_path(store, work).tags == ["dup:1"]  # the same save as a directory works
    assert import_path(store, tmp_path / "dk.tar").tags == ["dup:1"]  # as a tar: refused


# ---- 4. a prepared container's lower layers can be gone (lookup and lease not atomic) ------


def test_prepare_scratch_racing_rmi_returns_missing_lower_dirs(
    tmp_path: Path, isobox_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    oci_layout(tmp_path / "img", [tar_bytes(BASE)])
    store = ImageStore(isobox_env)
    import_path(store, tmp_path / "img", "a")
    real_get = store.get

    def get_then_concurrent_rmi(ref: str):  # type: ignore[no-untyped-def]
        rec = real_get(ref)
        other = ImageStore(isobox_env)  # another `isobox rmi a` process
        other.remove("a")
        other.close()
        return rec

    monkeypatch.setattr(store, "get", get_then_concurrent_rmi)
    try:
        mounts = store.prepare_scratch("c1", "a")
    except IsoboxError:
        return  # refusing is fine; handing out dead lower dirs is not
    assert all(p.is_dir() for p in mounts.lower), mounts.lower


# ---- 5. hostile input that escapes as a raw Python exception (CLI traceback) -------------


def test_deeply_nested_oci_layout_json_is_an_image_error(tmp_path: Path, isobox_env: Path) -> None:
    oci_layout(tmp_path / "img", [tar_bytes(BASE)])
    (tmp_path / "img" / "oci-layout").write_text("[" * 100_000)
    with pytest.raises(ImageError):
        import_path(ImageStore(isobox_env), tmp_path / "img", "x:1")


def test_deeply_nested_docker_manifest_json_is_not_a_docker_save(
    tmp_path: Path, isobox_env: Path
) -> None:
    # A folder whose manifest.json is not a docker manifest is a root filesystem folder.
    (tmp_path / "dk").mkdir()
    (tmp_path / "dk" / "manifest.json").write_text('[{"Layers":' + "[" * 100_000)
    proc = _cli(isobox_env, "import", str(tmp_path / "dk"), "x:1")
    assert "Traceback" not in proc.stderr, proc.stderr[-400:]
    assert proc.returncode == 0
    store = ImageStore(isobox_env)
    img = store.get("x:1")
    assert (store.layer_diff(img.layers[0].chain_id) / "manifest.json").stat().st_size > 100_000


def _blob_is_a_directory(layout: Path, blob: Path) -> None:
    blob.unlink()
    blob.mkdir()


def _blob_is_a_symlink_loop(layout: Path, blob: Path) -> None:
    blob.unlink()
    os.symlink(blob.name, blob)


@pytest.mark.parametrize(
    "damage", [_blob_is_a_directory, _blob_is_a_symlink_loop], ids=["directory", "symlink-loop"]
)
def test_hostile_layout_directory_member_is_an_isobox_error(
    tmp_path: Path, isobox_env: Path, damage: object
) -> None:
    built = oci_layout(tmp_path / "img", [tar_bytes(BASE)])
    blob = tmp_path / "img" / "blobs" / "sha256" / built.layer_digests[0].split(":")[1]
    damage(tmp_path / "img", blob)  # type: ignore[operator]
    with pytest.raises(IsoboxError):  # IsADirectoryError / RuntimeError escape today
        import_path(ImageStore(isobox_env), tmp_path / "img", "x:1")


def test_docker_save_directory_with_overlong_member_name_is_an_isobox_error(
    tmp_path: Path, isobox_env: Path
) -> None:
    work = tmp_path / "dk"
    work.mkdir()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "0" * 64]},
    }
    (work / "c.json").write_text(json.dumps(config))
    (work / "manifest.json").write_text(
        json.dumps([{"Config": "c.json", "RepoTags": ["a:1"], "Layers": ["x" * 5000]}])
    )
    with pytest.raises(IsoboxError):  # OSError ENAMETOOLONG escapes today
        import_path(ImageStore(isobox_env), work)


def test_corrupt_state_db_is_a_clean_cli_error(tmp_path: Path, isobox_env: Path) -> None:
    isobox_env.mkdir(parents=True, exist_ok=True)
    (isobox_env / "state.db").write_bytes(b"this is not a sqlite database at all" * 10)
    proc = _cli(isobox_env, "images")
    assert "Traceback" not in proc.stderr, proc.stderr[-400:]


# ---- 6. a FIFO in a layout directory hangs the import forever ------------------------------


def test_fifo_in_layout_directory_does_not_hang(tmp_path: Path, isobox_env: Path) -> None:
    oci_layout(tmp_path / "img", [tar_bytes(BASE)])
    (tmp_path / "img" / "index.json").unlink()
    os.mkfifo(tmp_path / "img" / "index.json")
    try:
        proc = _cli(isobox_env, "import", str(tmp_path / "img"), "x:1", timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail("import of a layout whose index.json is a FIFO blocked for 15 s")
    assert proc.returncode != 0


# ---- 7. descriptor sizes and document limits not enforced on every path --------------------


def test_lying_layer_size_is_accepted_when_the_blob_is_already_stored(
    tmp_path: Path, isobox_env: Path
) -> None:
    layers = [tar_bytes(BASE)]
    oci_layout(tmp_path / "one", layers)
    oci_layout(tmp_path / "two", layers, cmd=["/bin/other"])
    _rewrite(tmp_path / "two", layer_size_delta=1000)  # the manifest lies about the size
    with pytest.raises(ImageError):  # refused in an empty store...
        import_path(ImageStore(tmp_path / "fresh"), tmp_path / "two", "two:1")
    store = ImageStore(isobox_env)
    import_path(store, tmp_path / "one", "one:1")
    with pytest.raises(ImageError):  # ...but accepted once the blob is in the store
        import_path(store, tmp_path / "two", "two:1")


def test_oversized_config_is_refused_at_import_not_after(tmp_path: Path, isobox_env: Path) -> None:
    built = oci_layout(tmp_path / "img", [tar_bytes(BASE)])
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Labels": {"pad": "x" * (17 << 20)}},
        "rootfs": {"type": "layers", "diff_ids": built.diff_ids},
    }
    _rewrite(tmp_path / "img", config=config)
    store = ImageStore(isobox_env)
    try:
        img = import_path(store, tmp_path / "img", "big:1")
    except ImageError:
        return  # refused up front (MAX_DOC says configs > 4 MiB are): fine
    # Accepted: then the image must be usable.
    store.config(img)
    save(store, "big:1", tmp_path / "out.tar")
