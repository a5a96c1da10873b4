"""An image-backed container root: overlay of the image's layers and a scratch layer."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from isobox.silo.image_root import is_mounted, mount_image_root, unmount_image_root
from isobox.storage.bootstrap import bootstrap_busybox
from isobox.storage.store import ImageStore

pytestmark = [pytest.mark.root, pytest.mark.overlay, pytest.mark.cgroup1]


def test_container_writes_land_in_its_scratch_layer(tmp_path: Path, isobox_env: Path) -> None:
    store = ImageStore(isobox_env)
    img = bootstrap_busybox(store)
    mounts = store.prepare_scratch("c1", "busybox")
    bundle = tmp_path / "bundle"
    rootfs = bundle / "rootfs"
    mount_image_root(mounts, rootfs)
    try:
        subprocess.run([sys.executable, "-m", "isobox.oci.cli", "spec"], cwd=bundle, check=True)
        cfg = json.loads((bundle / "config.json").read_text())
        cfg["process"]["terminal"] = False
        cfg["process"]["args"] = ["sh", "-c", "echo hi > /hello; rm /bin/ls; cat /hello"]
        (bundle / "config.json").write_text(json.dumps(cfg))
        # Container ids name host-wide cgroups (as with runc): keep this one unique.
        cid = f"image-root-{uuid.uuid4().hex[:8]}"
        proc = subprocess.run(
            [sys.executable, "-m", "isobox.oci.cli", "--root", str(tmp_path / "state"), "run",
             cid], cwd=bundle, capture_output=True, text=True, check=False,
        )
        assert (proc.returncode, proc.stdout) == (0, "hi\n"), proc.stderr
    finally:
        unmount_image_root(rootfs)
    assert not is_mounted(rootfs) and not rootfs.exists()
    # The change is in the scratch layer on the host; the image's layer is untouched.
    assert (mounts.upper / "hello").read_text() == "hi\n"
    assert (mounts.upper / "bin" / "ls").is_char_device()  # an overlay whiteout
    assert (store.layer_diff(img.layers[0].chain_id) / "bin" / "ls").is_symlink()
    store.release_scratch("c1")
    assert not mounts.upper.exists()
