"""Round trips with the real tools of the field: umoci and skopeo write, isobox reads, and back."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import require_tool
from isobox.storage.bootstrap import bootstrap_busybox
from isobox.storage.export import save
from isobox.storage.importer import import_path
from isobox.storage.store import ImageStore

pytestmark = [pytest.mark.root, pytest.mark.tools]


def run(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{' '.join(argv)}: {proc.stderr}"
    return proc.stdout


def index_digest(layout: Path) -> str:
    return str(json.loads((layout / "index.json").read_text())["manifests"][0]["digest"])


@pytest.fixture
def umoci_image(tmp_path: Path) -> Path:
    """An image written by umoci: a base layer and a second layer with a deletion."""
    require_tool("umoci")
    layout = tmp_path / "umoci"
    run("umoci", "init", "--layout", str(layout))
    run("umoci", "new", "--image", f"{layout}:v1")
    bundle = tmp_path / "bundle"
    run("umoci", "unpack", "--image", f"{layout}:v1", str(bundle))
    root = bundle / "rootfs"
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc" / "motd").write_text("from umoci\n")
    (root / "etc" / "remove-me").write_text("x")
    (root / "bin").mkdir(exist_ok=True)
    (root / "bin" / "link").symlink_to("/etc/motd")
    run("umoci", "repack", "--image", f"{layout}:v1", str(bundle))
    # umoci diffs against the bundle's unpack: unpack again for the second layer.
    bundle2 = tmp_path / "bundle2"
    run("umoci", "unpack", "--image", f"{layout}:v1", str(bundle2))
    (bundle2 / "rootfs" / "etc" / "remove-me").unlink()
    (bundle2 / "rootfs" / "etc" / "second").write_text("2")
    run("umoci", "repack", "--image", f"{layout}:v1", str(bundle2))
    return layout


def test_umoci_image_imports_with_identical_digests(
    umoci_image: Path, isobox_env: Path
) -> None:
    store = ImageStore(isobox_env)
    img = import_path(store, umoci_image, "um:v1")
    assert img.digest == index_digest(umoci_image)
    manifest = json.loads(
        (umoci_image / "blobs" / "sha256" / img.digest.split(":")[1]).read_text()
    )
    assert [la.blob for la in img.layers] == [x["digest"] for x in manifest["layers"]]
    top = store.layer_diff(img.layers[-1].chain_id)
    # umoci's whiteout for the deleted file became an overlay whiteout (char 0:0).
    import os
    import stat

    st = os.lstat(top / "etc" / "remove-me")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert (top / "etc" / "second").read_text() == "2"


def test_skopeo_archives_import_with_identical_digests(
    umoci_image: Path, tmp_path: Path, isobox_env: Path
) -> None:
    require_tool("skopeo")
    run("skopeo", "copy", f"oci:{umoci_image}:v1", f"oci-archive:{tmp_path}/sk.tar:v1")
    run("skopeo", "copy", f"oci:{umoci_image}:v1", f"docker-archive:{tmp_path}/dk.tar:sk:v1")
    store = ImageStore(isobox_env)
    a = import_path(store, tmp_path / "sk.tar", "sk:oci")
    assert a.digest == index_digest(umoci_image)
    b = import_path(store, tmp_path / "dk.tar")
    assert b.tags == ["sk:v1"]
    assert [la.diff_id for la in b.layers] == [la.diff_id for la in a.layers]


def test_isobox_saves_are_read_by_skopeo_and_umoci(
    umoci_image: Path, tmp_path: Path, isobox_env: Path
) -> None:
    require_tool("skopeo")
    store = ImageStore(isobox_env)
    img = import_path(store, umoci_image, "rt:1")
    save(store, "rt:1", tmp_path / "rt-oci.tar", "oci")
    save(store, "rt:1", tmp_path / "rt-docker.tar", "docker")
    back = tmp_path / "back"
    run("skopeo", "copy", f"oci-archive:{tmp_path}/rt-oci.tar:1", f"oci:{back}:1")
    assert index_digest(back) == img.digest  # bytes kept: same manifest digest
    bundle = tmp_path / "unpacked"
    run("umoci", "unpack", "--image", f"{back}:1", str(bundle))
    assert (bundle / "rootfs" / "etc" / "motd").read_text() == "from umoci\n"
    assert not (bundle / "rootfs" / "etc" / "remove-me").exists()
    info = json.loads(run("skopeo", "inspect", f"docker-archive:{tmp_path}/rt-docker.tar"))
    assert info["Layers"] and len(info["Layers"]) == len(img.layers)
    fromdocker = tmp_path / "fromdocker"
    run("skopeo", "copy", f"docker-archive:{tmp_path}/rt-docker.tar", f"oci:{fromdocker}:d")
    blobs = fromdocker / "blobs" / "sha256"
    manifest = json.loads((blobs / index_digest(fromdocker).split(":")[1]).read_text())
    config = json.loads((blobs / manifest["config"]["digest"].split(":")[1]).read_text())
    assert config["rootfs"]["diff_ids"] == [la.diff_id for la in img.layers]


def test_busybox_bootstrap_is_deterministic_and_runs(tmp_path: Path, isobox_env: Path) -> None:
    store = ImageStore(isobox_env)
    img = bootstrap_busybox(store)
    assert img.tags == ["busybox:latest"]
    other = ImageStore(tmp_path / "second")
    assert bootstrap_busybox(other).digest == img.digest  # same package, same digest
    assert bootstrap_busybox(store).digest == img.digest  # and again is a no-op
    root = store.layer_diff(img.layers[0].chain_id)
    assert (root / "bin" / "sh").is_symlink()
    out = run("chroot", str(root), "/bin/sh", "-c", "echo hi from $(basename $(readlink /bin/sh))")
    assert out == "hi from busybox\n"
    save(store, "busybox", tmp_path / "bb.tar")
    bundle = tmp_path / "bb-bundle"
    run("skopeo", "copy", f"oci-archive:{tmp_path}/bb.tar:latest", f"oci:{tmp_path}/bb:latest")
    run("umoci", "unpack", "--image", f"{tmp_path}/bb:latest", str(bundle))
    assert (bundle / "rootfs" / "bin" / "busybox").stat().st_size > 500_000


@pytest.mark.slow
def test_debian_bootstrap_has_a_working_python(isobox_env: Path) -> None:
    require_tool("debootstrap")
    from isobox.storage.bootstrap import bootstrap_debian

    store = ImageStore(isobox_env)
    img = bootstrap_debian(store)
    assert img.tags == ["debian:bookworm"]
    root = store.layer_diff(img.layers[0].chain_id)
    out = run("chroot", str(root), "python3", "-c", "import json, sys; print(sys.version_info[:2])")
    assert out == "(3, 11)\n"
    assert not any((root / "var/cache/apt/archives").glob("*.deb"))
