"""The utility-VM assets: a guest kernel, an initramfs and a read-only image, built from
Debian's packages and isobox's guest code, cached by the hash of everything that went in.

Layout under :func:`uvm_dir` (``$ISOBOX_ROOT/uvm``, or ``$ISOBOX_UVM_DIR``)::

    current -> <key>             the assets in use (a symlink, replaced atomically)
    <key>/vmlinux initrd.cpio uvm.erofs manifest.json
    debs/                        downloaded .debs (apt-get download), reused by rebuilds
    apt-versions.json            resolved package versions, keyed by apt's lists
    .lock                        one build at a time (flock)

A build happens in ``.build-*`` next to the result and is renamed into place; a failure
removes it and leaves ``current`` as it was. The kernel half (vmlinux + initramfs) and the
image half have their own input hashes, so editing the guest agent rebuilds the image
only and links the kernel files from the previous assets.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from isobox import paths
from isobox.errors import ToolMissing, UvmAssetsError
from isobox.uvm import assets_apt, assets_kernel, image, initramfs

BUILDER_VERSION = "1"
IMAGE_SERIAL = "uvm"  # the image disk's virtio-blk serial; stage 1 mounts the disk by it
KERNEL_FILE, INITRD_FILE, IMAGE_FILE, MANIFEST_FILE = (
    "vmlinux", "initrd.cpio", "uvm.erofs", "manifest.json")
# Tools a build needs, checked before any work (apt-cache is checked when resolving).
BUILD_TOOLS = ("apt-get", "dpkg-deb", "mkfs.erofs", "chroot", "ldconfig")

_CMDLINE = ("console=ttyS0 quiet loglevel=1 {tsc}tsc=reliable no_timer_check "
            "mitigations=off init_on_alloc=0 cryptomgr.notests audit=0 apparmor=0 "
            "panic=-1 reboot=t")


@dataclass(frozen=True)
class Assets:
    """Built assets: the files QEMU is given, and the manifest that describes them."""

    dir: Path
    kernel: Path  # uncompressed vmlinux, booted through PVH: `-kernel`
    initrd: Path  # uncompressed cpio: `-initrd`
    image: Path  # raw erofs: a read-only virtio-blk disk with serial=IMAGE_SERIAL
    cmdline_base: str
    manifest: dict[str, Any] = field(repr=False)
    built: bool = False  # True when this call built them (False: cache hit)

    @property
    def key(self) -> str:
        return str(self.manifest["key"])


def uvm_dir(root: Path | None = None) -> Path:
    """Where the assets live: ``root/uvm``; without ``root``, ``$ISOBOX_UVM_DIR`` if set
    (tests share one build across their per-test roots), else ``$ISOBOX_ROOT/uvm``."""
    if root is not None:
        return root / "uvm"
    env = os.environ.get("ISOBOX_UVM_DIR")
    return Path(env) if env else paths.root_dir() / "uvm"


def host_tsc_khz() -> int | None:
    """The host TSC frequency in kHz (``cpu MHz`` of /proc/cpuinfo): the guest is told it
    rather than calibrating against the PIT, which hung ~1 boot in 4 under TCG."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":", 1)[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None


def cmdline_base() -> str:
    khz = host_tsc_khz()
    tsc = f"tsc_early_khz={khz} lpj={khz * 4} " if khz else ""
    return _CMDLINE.format(tsc=tsc)


def _sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _builder_hash() -> str:
    """The builder's own code and guest scripts: changing how assets are made rebuilds."""
    here = Path(__file__).resolve().parent
    files = [here / f"{m}.py" for m in ("assets", "assets_apt", "assets_kernel", "image",
                                        "initramfs")]
    files += sorted(p for p in initramfs.GUEST_INIT.iterdir() if p.is_file())
    h = hashlib.sha256(BUILDER_VERSION.encode())
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


@dataclass
class _Inputs:
    versions: dict[str, str]
    busybox: Path
    sources: list[Path]
    src: Path
    record: dict[str, Any]
    kernel_key: str
    image_key: str
    key: str


def _inputs(base: Path, guest_src: Path | None) -> _Inputs:
    busybox = paths.installed_static_busybox()
    if busybox is None:
        raise ToolMissing("no static busybox (/bin/busybox from Debian's busybox-static); "
                          "the utility-VM initramfs and image need it")
    base.mkdir(parents=True, exist_ok=True)
    versions = assets_apt.resolve(image.USERLAND, base / "apt-versions.json")
    src = guest_src or image.SRC
    sources = image.guest_sources(src)
    record: dict[str, Any] = {
        "builder_version": BUILDER_VERSION,
        "builder_sha256": _builder_hash(),
        "kernel_package": versions["kernel"],
        "packages": {n: versions[n] for n in image.USERLAND},
        "busybox_sha256": _sha256_file(busybox),
        "guest_sources_sha256": image.sources_hash(sources, src),
        "guest_sources": [str(f.relative_to(src)) for f in sources],
        "modules": list(assets_kernel.WANTED_MODULES),
    }
    kernel_key = _digest([record[k] for k in ("builder_sha256", "kernel_package",
                                              "busybox_sha256", "modules")]
                         + [versions[versions["kernel"]]])
    image_key = _digest([record[k] for k in ("builder_sha256", "packages", "busybox_sha256",
                                             "guest_sources_sha256")])
    key = _digest([kernel_key, image_key])[:20]
    return _Inputs(versions, busybox, sources, src, record, kernel_key, image_key, key)


def load_assets(root: Path | None = None) -> Assets | None:
    """The current assets if they exist and are complete; never builds, never asks apt."""
    base = uvm_dir(root)
    d = base / "current"
    try:
        manifest = json.loads((d / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    d = d.resolve()
    kernel, initrd, img = d / KERNEL_FILE, d / INITRD_FILE, d / IMAGE_FILE
    if not (kernel.is_file() and initrd.is_file() and img.is_file()):
        return None
    return Assets(d, kernel, initrd, img, cmdline_base=cmdline_base(), manifest=manifest)


def ensure_assets(root: Path | None = None, *, force: bool = False,
                  progress: Callable[[str], None] | None = None,
                  guest_src: Path | None = None) -> Assets:
    """The assets for the current inputs: the cached ones when their input hash matches
    (~0.1 s), else a new build (seconds to a minute: downloads, compile, mkfs).

    ``force`` rebuilds everything. ``guest_src`` replaces ``src/isobox`` as the source of
    the guest packages (tests). Raises ToolMissing or UvmAssetsError; a failed build leaves
    the previous assets in place and no temporary files.
    """
    base = uvm_dir(root)
    base.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda _msg: None)
    with open(base / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        inputs = _inputs(base, guest_src)
        cur = load_assets(root)
        if cur is not None and not force and cur.manifest.get("key") == inputs.key:
            return cur
        for t in BUILD_TOOLS:
            assets_apt.tool(t)
        for stale in base.glob(".build-*"):
            shutil.rmtree(stale, ignore_errors=True)
        manifest = _build(base, inputs, None if force else cur, say)
        new = load_assets(root)
        if new is None or new.manifest.get("key") != inputs.key:
            raise UvmAssetsError(f"the new utility-VM assets in {base} are incomplete")
        _prune(base, keep={new.dir.name, cur.dir.name if cur else ""})
        assets_apt.prune(base / "debs", [
            assets_apt.deb_path(base / "debs", n, inputs.versions[n])
            for n in (inputs.versions["kernel"], *image.USERLAND)])
        return Assets(new.dir, new.kernel, new.initrd, new.image, new.cmdline_base,
                      manifest, built=True)


def _prune(base: Path, keep: set[str]) -> None:
    """Old builds go; the previous one stays (a VM starting right now may still open it)."""
    for d in base.iterdir():
        if d.is_dir() and not d.is_symlink() and len(d.name) == 20 and d.name not in keep:
            shutil.rmtree(d, ignore_errors=True)


def _reuse(cur: Assets | None, what: str, key: str, names: tuple[str, ...],
           dest: Path) -> bool:
    """Hard-link files of the previous assets whose half (kernel or image) is unchanged."""
    if cur is None or cur.manifest.get("components", {}).get(what) != key:
        return False
    for n in names:
        os.link(cur.dir / n, dest / n)
    return True


def _build(base: Path, inp: _Inputs, cur: Assets | None,
           say: Callable[[str], None]) -> dict[str, Any]:
    t0 = time.monotonic()
    steps: dict[str, float] = {}
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=base))
    try:
        out = tmp / "out"
        out.mkdir()
        reused: list[str] = []
        if _reuse(cur, "kernel", inp.kernel_key, (KERNEL_FILE, INITRD_FILE), out):
            reused += [KERNEL_FILE, INITRD_FILE]
            kmeta = {k: cur.manifest[k] for k in ("kernel_release", "module_order")} \
                if cur else {}
        else:
            kmeta = _build_kernel(base, inp, tmp, out, steps=steps, say=say)
        if _reuse(cur, "image", inp.image_key, (IMAGE_FILE,), out):
            reused.append(IMAGE_FILE)
        else:
            _build_image(base, inp, tmp, out, steps=steps, say=say)
        manifest: dict[str, Any] = {
            "key": inp.key,
            "components": {"kernel": inp.kernel_key, "image": inp.image_key},
            "inputs": inp.record,
            **kmeta,
            "image_serial": IMAGE_SERIAL,
            "files": {n: (out / n).stat().st_size for n in (KERNEL_FILE, INITRD_FILE,
                                                             IMAGE_FILE)},
            "reused": reused,
            "steps_seconds": {k: round(v, 2) for k, v in steps.items()},
            "build_seconds": round(time.monotonic() - t0, 2),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        final = base / inp.key
        if final.exists():
            shutil.rmtree(final)
        os.rename(out, final)
        link = base / f".build-current-{os.getpid()}"
        link.symlink_to(inp.key)
        os.replace(link, base / "current")
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for stray in base.glob(f".build-current-{os.getpid()}"):
            stray.unlink(missing_ok=True)


def _timed(steps: dict[str, float], name: str, say: Callable[[str], None]) -> Callable[[], None]:
    say(f"{name}...")
    t = time.monotonic()

    def done() -> None:
        steps[name] = steps.get(name, 0.0) + time.monotonic() - t
    return done


def _build_kernel(base: Path, inp: _Inputs, tmp: Path, out: Path, *,
                  steps: dict[str, float], say: Callable[[str], None]) -> dict[str, Any]:
    kpkg = inp.versions["kernel"]
    done = _timed(steps, f"download {kpkg}", say)
    debs = assets_apt.download({kpkg: inp.versions[kpkg]}, base / "debs")
    done()
    done = _timed(steps, "extract kernel", say)
    ktree = tmp / "kpkg"
    assets_apt.extract(debs[kpkg], ktree)
    release, vmlinuz, mods = assets_kernel.find_kernel(ktree)
    done()
    done = _timed(steps, "vmlinux", say)
    (out / KERNEL_FILE).write_bytes(assets_kernel.vmlinux_from_bzimage(vmlinuz.read_bytes()))
    done()
    done = _timed(steps, "initramfs", say)
    order = assets_kernel.module_order(mods)
    initramfs.build_initramfs(tmp / "initrd", out / INITRD_FILE, inp.busybox, mods, order)
    done()
    shutil.rmtree(ktree, ignore_errors=True)
    return {"kernel_release": release, "module_order": order}


def _build_image(base: Path, inp: _Inputs, tmp: Path, out: Path, *,
                 steps: dict[str, float], say: Callable[[str], None]) -> None:
    done = _timed(steps, "download userland", say)
    debs = assets_apt.download({n: inp.versions[n] for n in image.USERLAND}, base / "debs")
    done()
    done = _timed(steps, "image tree", say)
    tree = tmp / "root"
    tree.mkdir()
    image.build_tree(tree, [debs[n] for n in image.USERLAND], inp.busybox, inp.sources, inp.src)
    done()
    done = _timed(steps, "mkfs.erofs", say)
    image.make_erofs(tree, out / IMAGE_FILE)
    done()

