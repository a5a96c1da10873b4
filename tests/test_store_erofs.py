"""ImageStore.layer_erofs: an image's layers as erofs disks for utility VMs.

The content checks mount the built images (``mount -t erofs -o loop,ro`` inside a private
mount namespace, so nothing stays mounted) and compare every entry against the diff folder:
``fsck.erofs --extract`` of erofs-utils 1.5 does not restore xattrs, so it cannot prove that
overlay's opaque markers survive. Run as a script, this module prints a tree snapshot (the
mount namespace runs it).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from imagekit import oci_layout
from isobox.errors import ImageNotFound, StoreError, ToolMissing
from isobox.storage.bootstrap import bootstrap_busybox
from isobox.storage.importer import import_path
from isobox.storage.store import ImageStore

pytestmark = pytest.mark.root  # layers keep owners, device nodes and trusted.* xattrs

MKFS = "/usr/bin/mkfs.erofs"


def snapshot(root: str) -> dict[str, dict[str, Any]]:
    """Everything a container sees of a tree, entry by entry (directory sizes aside, which
    are filesystem-specific); hard links as ``link`` to the first path of their inode."""
    out: dict[str, dict[str, Any]] = {}
    first: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in ["", *sorted(dirnames + filenames)] if dirpath == root else sorted(
            dirnames + filenames
        ):
            path = os.path.join(dirpath, name) if name else dirpath
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            e: dict[str, Any] = {
                "mode": oct(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
                "mtime": st.st_mtime_ns,
                "xattrs": {
                    k: os.getxattr(path, k, follow_symlinks=False).hex()
                    for k in sorted(os.listxattr(path, follow_symlinks=False))
                },
            }
            if stat.S_ISLNK(st.st_mode):
                e["target"] = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                e["rdev"] = [os.major(st.st_rdev), os.minor(st.st_rdev)]
            if not stat.S_ISDIR(st.st_mode):
                e["nlink"] = st.st_nlink
                if st.st_nlink > 1:
                    e["link"] = first.setdefault(st.st_ino, rel)
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as fh:
                    e["sha256"] = hashlib.sha256(fh.read()).hexdigest()
                e["size"] = st.st_size
            out[rel] = e
    return out


def _in_private_ns(script: str) -> str:
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-ec", script],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def mounted_snapshot(image: Path, mnt: Path) -> dict[str, dict[str, Any]]:
    mnt.mkdir(exist_ok=True)
    out = _in_private_ns(
        f"mount -t erofs -o loop,ro {image} {mnt}\n"
        f"exec {sys.executable} {__file__} snapshot {mnt}"
    )
    result: dict[str, dict[str, Any]] = json.loads(out)
    return result


def assert_nothing_left(image: Path, mnt: Path) -> None:
    """No mount and, once the namespace is gone, no loop device holds the image."""
    assert str(mnt) not in Path("/proc/self/mountinfo").read_text()
    deadline = time.monotonic() + 5
    while True:
        held = subprocess.run(["losetup", "-j", str(image)], capture_output=True,
                              text=True, check=True).stdout.strip()
        if not held or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert held == "", held


def chains(store: ImageStore, ref: str) -> list[str]:
    return [layer.chain_id for layer in store.get(ref).layers]


def fsck(image: Path) -> None:
    proc = subprocess.run(["fsck.erofs", str(image)], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- the busybox image ------------------------------------------------------------------

def test_busybox_layer_built_once_and_cached(tmp_path: Path, isobox_env: Path) -> None:
    store = ImageStore()
    bootstrap_busybox(store)
    (chain,) = chains(store, "busybox")
    t0 = time.monotonic()
    path = store.layer_erofs(chain)
    took = time.monotonic() - t0
    assert path == store.layer_dir(chain) / "layer.erofs"
    st = path.stat()
    assert st.st_size > 0 and stat.S_IMODE(st.st_mode) == 0o444
    print(f"busybox layer.erofs: {st.st_size} bytes in {took:.3f} s")
    fsck(path)
    # A second call (and another store object) reuses the file: same inode, untouched.
    again = ImageStore().layer_erofs(chain)
    st2 = again.stat()
    assert again == path and (st2.st_ino, st2.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    assert store.image_erofs_layers("busybox") == [path]
    assert list((isobox_env / "tmp").iterdir()) == []
    # It really is the layer: the whole tree, modes, owners and symlinks match the diff.
    mnt = tmp_path / "mnt"
    assert mounted_snapshot(path, mnt) == snapshot(str(store.layer_diff(chain)))
    assert_nothing_left(path, mnt)


def test_concurrent_builders_make_it_once(tmp_path: Path, isobox_env: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    bootstrap_busybox(ImageStore())
    # A counting mkfs.erofs in front of the real one: how many builds really ran.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "mkfs.log"
    wrapper = bindir / "mkfs.erofs"
    wrapper.write_text(f'#!/bin/sh\necho "$$" >> {log}\nsleep 0.3\nexec {MKFS} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    (chain,) = chains(ImageStore(), "busybox")
    barrier = threading.Barrier(4)
    results: list[tuple[Path, int]] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            store = ImageStore()  # one per thread, like separate processes
            barrier.wait()
            path = store.layer_erofs(chain)
            results.append((path, path.stat().st_ino))
            store.close()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert len(results) == 4 and len(set(results)) == 1
    assert len(log.read_text().split()) == 1
    assert list((isobox_env / "tmp").iterdir()) == []


# ---- content: owners, devices, xattrs, whiteouts ----------------------------------------

def _tar(entries: list[tarfile.TarInfo], data: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info in entries:
            info.mtime = info.mtime or 1_700_000_000
            body = data.get(info.name)
            if body is not None:
                info.size = len(body)
            tar.addfile(info, io.BytesIO(body) if body is not None else None)
    return buf.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, uid: int = 0,
          gid: int = 0, **extra: Any) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid = kind, mode, uid, gid
    for k, v in extra.items():
        setattr(info, k, v)
    return info


def _layers() -> list[bytes]:
    lower = _tar([
        _info("etc", tarfile.DIRTYPE, 0o755),
        _info("etc/keep"),
        _info("etc/gone"),
        _info("opq", tarfile.DIRTYPE, 0o750, 1000, 1000),
        _info("opq/old"),
        _info("bin", tarfile.DIRTYPE, 0o755),
        _info("bin/su", mode=0o4755, mtime=1_234_567_890),
        _info("bin/login", tarfile.LNKTYPE, linkname="bin/su"),
        _info("bin/sh", tarfile.SYMTYPE, 0o777, linkname="su"),
        _info("home", tarfile.DIRTYPE, 0o755),
        _info("home/user", tarfile.DIRTYPE, 0o700, 1000, 1001),
        _info("home/user/notes", mode=0o600, uid=1000, gid=1001,
              pax_headers={"SCHILY.xattr.user.note": "kept"}),
        _info("bin/ping", mode=0o755,
              pax_headers={"SCHILY.xattr.security.capability":
                           "\x01\x00\x00\x02\x00\x20\x00\x00" + "\x00" * 12}),
        _info("dev", tarfile.DIRTYPE, 0o755),
        _info("dev/null", tarfile.CHRTYPE, 0o666, devmajor=1, devminor=3),
        _info("run", tarfile.DIRTYPE, 0o755),
        _info("run/fifo", tarfile.FIFOTYPE, 0o600),
        _info("empty"),
    ], {"etc/keep": b"k", "etc/gone": b"g", "opq/old": b"o", "bin/su": b"\x7fELF" * 1000,
        "home/user/notes": b"n", "bin/ping": b"p"})
    upper = _tar([
        _info("etc", tarfile.DIRTYPE, 0o755),
        _info("etc/.wh.gone"),
        _info("opq", tarfile.DIRTYPE, 0o750, 1000, 1000),
        _info("opq/.wh..wh..opq"),
        _info("opq/new", uid=1000),
    ], {"etc/.wh.gone": b"", "opq/.wh..wh..opq": b"", "opq/new": b"n"})
    return [lower, upper]


def test_erofs_keeps_modes_owners_links_devices_xattrs_whiteouts(
    tmp_path: Path, isobox_env: Path
) -> None:
    oci_layout(tmp_path / "img", _layers())
    store = ImageStore()
    import_path(store, tmp_path / "img", "wh:1")
    top, bottom = store.image_erofs_layers("wh:1")
    lower_chain, upper_chain = chains(store, "wh:1")
    assert (top, bottom) == (store.layer_erofs(upper_chain), store.layer_erofs(lower_chain))
    for chain, image in ((lower_chain, bottom), (upper_chain, top)):
        fsck(image)
        diff = snapshot(str(store.layer_diff(chain)))
        got = mounted_snapshot(image, tmp_path / "mnt")
        assert got == diff
    # What the test is about really is in the diff (and so in the image).
    up = snapshot(str(store.layer_diff(upper_chain)))
    assert up["etc/gone"]["rdev"] == [0, 0] and stat.S_ISCHR(int(up["etc/gone"]["mode"], 8))
    assert up["opq"]["xattrs"] == {"trusted.overlay.opaque": b"y".hex()}
    low = snapshot(str(store.layer_diff(lower_chain)))
    assert low["bin/su"]["mode"] == oct(0o104755) and low["bin/su"]["link"] == "bin/login"
    assert low["home/user/notes"]["uid"] == 1000 and low["home/user/notes"]["gid"] == 1001
    assert "security.capability" in low["bin/ping"]["xattrs"]
    assert low["dev/null"]["rdev"] == [1, 3] and stat.S_ISFIFO(int(low["run/fifo"]["mode"], 8))

    # Stacked the way the guest stacks them, overlayfs honours the whiteouts and the
    # opaque directory read from the erofs disks.
    m0, m1, merged = tmp_path / "l0", tmp_path / "l1", tmp_path / "merged"
    for m in (m0, m1, merged):
        m.mkdir()
    out = _in_private_ns(
        f"mount -t erofs -o loop,ro {bottom} {m0}\n"
        f"mount -t erofs -o loop,ro {top} {m1}\n"
        f"mount -t overlay overlay -o lowerdir={m1}:{m0} {merged}\n"
        f"ls -A {merged}/etc {merged}/opq\n"
    ).split()
    assert out == [f"{merged}/etc:", "keep", f"{merged}/opq:", "new"]
    for image in (top, bottom):
        assert_nothing_left(image, tmp_path / "mnt")
    assert_nothing_left(top, merged)


# ---- garbage collection ------------------------------------------------------------------

def test_rmi_and_prune_remove_the_erofs_with_the_layer(isobox_env: Path) -> None:
    store = ImageStore()
    bootstrap_busybox(store)
    (chain,) = chains(store, "busybox")
    path = store.layer_erofs(chain)
    # A lease keeps the layer, and its disk, after rmi: a running VM still uses it.
    store.lease("vm:x", "busybox")
    store.remove("busybox")
    assert path.is_file()
    store.release("vm:x")
    store.gc()
    assert not path.exists() and not store.layer_dir(chain).exists()
    with pytest.raises(ImageNotFound):
        store.layer_erofs(chain)
    # Prune: an untagged image goes, with its erofs.
    bootstrap_busybox(store, "bb:1")
    path = store.layer_erofs(chain)
    store.remove("bb:1")  # untag and delete, gc runs
    assert not path.exists()
    bootstrap_busybox(store, "bb:2")
    path = store.layer_erofs(chain)
    with store.db.transaction() as tx:
        tx.execute("DELETE FROM tags")  # dangling, as after a re-tag
    report = store.prune()
    assert report.layers_removed == 1 and not path.exists()
    assert list((isobox_env / "tmp").iterdir()) == []


# ---- failures -----------------------------------------------------------------------------

def test_failed_build_leaves_no_temp_file(tmp_path: Path, isobox_env: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    store = ImageStore()
    bootstrap_busybox(store)
    (chain,) = chains(store, "busybox")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "mkfs.erofs"
    # Writes half an image to its output (argument 3), then fails.
    fake.write_text('#!/bin/sh\n/usr/bin/head -c 8192 /dev/zero > "$3"\n'
                    'echo "mkfs.erofs: disk on fire" >&2\nexit 3\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(bindir))
    with pytest.raises(StoreError, match="disk on fire"):
        store.layer_erofs(chain)
    assert not (store.layer_dir(chain) / "layer.erofs").exists()
    assert sorted(p.name for p in store.layer_dir(chain).iterdir()) == ["diff"]
    assert list((isobox_env / "tmp").iterdir()) == []
    # Without any mkfs.erofs: ToolMissing, naming the package.
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    with pytest.raises(ToolMissing, match="erofs-utils"):
        store.layer_erofs(chain)
    # With the real tool back, the next call builds it.
    monkeypatch.setenv("PATH", os.path.dirname(MKFS))
    fsck(store.layer_erofs(chain))


def test_unknown_layer(isobox_env: Path) -> None:
    store = ImageStore()
    with pytest.raises(ImageNotFound):
        store.layer_erofs("sha256:" + "ab" * 32)
    assert not (store.layer_dir("sha256:" + "ab" * 32)).exists()


if __name__ == "__main__" and sys.argv[1:2] == ["snapshot"]:
    print(json.dumps(snapshot(sys.argv[2])))
