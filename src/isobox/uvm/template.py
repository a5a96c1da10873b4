"""Utility-VM templates: boot once, save, start every later VM as a clone of that state.

A template is one booted utility VM, paused once its agent is ready and warm (modules
imported, the seccomp program of the containers compiled), whose guest RAM lives in a
file (``memory-backend-file,share=on``) and whose device state QEMU wrote to ``state``
(``migrate`` with ``x-ignore-shared``: the RAM is not copied, it *is* the file). A clone
is a QEMU with the same devices (:data:`~isobox.uvm.vm.LAYOUT`), its RAM the template's file
mapped copy-on-write (``share=off``), started with ``-incoming defer`` and restored from
``state`` (:meth:`UtilityVM.restore`); it has its own agent channel, disks, shares and tap.
What a clone must make its own before a container runs (clock, CRNG, MAC, IP, hostname)
is the caller's: ``hello(reseed=True)`` and the agent's ``network`` op.

One template per configuration. Its key hashes everything the saved state depends on: the
assets (kernel, initramfs, image, agent sources), memory size, vCPUs, accelerator, the
QEMU binary, the slot layout and this module's format version. A changed input is a new
key, built lazily on first use (or by ``isobox uvm build``); templates of other assets are
pruned when a new one is built. Running clones keep their mapping of a pruned file.

Layout: ``template_root()/<key>/`` holds ``ram`` (guest memory; on tmpfs, so clones share
its pages in the page cache), ``state`` (~60 KB of device state), ``empty/`` (what an
unused share slot exports) and ``meta.json`` (written last: a folder without it is not a
template). Builds are serialised by a lock file and made in a temporary folder that is
renamed into place, so a reader never sees half a template.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from isobox.errors import InvalidArgument, IsoboxError, VmError, from_oserror
from isobox.uvm.accel import AccelName, AccelResult, probe, qemu_binary
from isobox.uvm.vm import LAYOUT, BootAssets, Disk, Share, UtilityVM, VmConfig

TEMPLATE_FORMAT = 1
BUILD_TIMEOUT = 180.0  # a cold boot under TCG takes 4-6 s here; a loaded machine more
_STALE_TMP = 3600.0
FAILURE_TTL = 600.0
UNUSED_TTL = 7 * 86400.0


def template_root() -> Path:
    """``$ISOBOX_TEMPLATE_DIR``, else ``/dev/shm/isobox-templates`` (tmpfs: the guest RAM
    of every template is page cache that all its clones share)."""
    env = os.environ.get("ISOBOX_TEMPLATE_DIR")
    if env:
        return Path(env)
    return Path("/dev/shm/isobox-templates")


@dataclass(frozen=True)
class Template:
    key: str
    dir: Path
    memory_mib: int
    cpus: int
    accel: str
    protocol_version: int
    build_seconds: float
    save_seconds: float
    assets_key: str

    @property
    def ram(self) -> Path:
        return self.dir / "ram"

    @property
    def state(self) -> Path:
        return self.dir / "state"

    @property
    def empty(self) -> Path:
        return self.dir / "empty"

    def clone_config(self, *, disks: list[Disk], shares: list[Share], tap: str | None = None,
                     mac: str | None = None) -> VmConfig:
        """The VM config of one clone: the template's shape, the caller's devices."""
        return VmConfig(memory_mib=self.memory_mib, cpus=self.cpus, disks=disks,
                        shares=shares, tap=tap, mac=mac, layout=LAYOUT,
                        memory_file=self.ram, incoming=True, empty_share=self.empty)


@functools.cache
def _qemu_identity() -> str:
    binary = qemu_binary()
    st = os.stat(binary)
    return f"{binary}:{st.st_size}:{st.st_mtime_ns}"


def _assets_key(assets: BootAssets) -> str:
    key = getattr(assets, "key", None)
    if isinstance(key, str) and key:
        return key
    parts = []
    for p in (assets.kernel, assets.initrd, assets.image):
        st = os.stat(p)
        parts.append(f"{p}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def template_key(assets: BootAssets, memory_mib: int, cpus: int, accel: str) -> str:
    """The hash of every input the saved state depends on."""
    inputs = {"format": TEMPLATE_FORMAT, "assets": _assets_key(assets),
              "cmdline": assets.cmdline_base, "memoryMib": memory_mib, "cpus": cpus,
              "accel": accel, "qemu": _qemu_identity(), "layout": asdict(LAYOUT)}
    raw = json.dumps(inputs, sort_keys=True).encode()
    return hashlib.sha256(raw).hexdigest()[:24]


def _accel_name(accel: AccelResult | AccelName | None, assets: BootAssets) -> AccelName:
    if accel is None:
        accel = probe(assets=assets)
    return accel if isinstance(accel, str) else accel.name


def _read(folder: Path, key: str) -> Template | None:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("key") != key:
        return None
    if not all((folder / n).exists() for n in ("ram", "state", "empty")):
        return None
    try:
        return Template(key=key, dir=folder, memory_mib=int(meta["memoryMib"]),
                        cpus=int(meta["cpus"]), accel=str(meta["accel"]),
                        protocol_version=int(meta["protocolVersion"]),
                        build_seconds=float(meta.get("buildSeconds", 0.0)),
                        save_seconds=float(meta.get("saveSeconds", 0.0)),
                        assets_key=str(meta.get("assetsKey", "")))
    except (KeyError, TypeError, ValueError):
        return None


def load_template(assets: BootAssets, memory_mib: int, cpus: int, *,
                  accel: AccelResult | AccelName | None = None) -> Template | None:
    """The current template of that configuration, or None (never builds)."""
    name = _accel_name(accel, assets)
    key = template_key(assets, memory_mib, cpus, name)
    return _read(template_root() / key, key)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise from_oserror("utility-VM templates folder", str(root), exc) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure_template(assets: BootAssets, memory_mib: int = 512, cpus: int = 1, *,
                    accel: AccelResult | AccelName | None = None,
                    warm_seccomp: list[dict[str, Any]] | None = None,
                    force: bool = False, run_root: Path | None = None) -> Template:
    """The template of that configuration, built now if it is missing or stale (one boot,
    ~5 s under TCG here; concurrent callers wait for one build). ``warm_seccomp``: seccomp
    profiles (as the host sends them in a container's config) the template compiles."""
    name = _accel_name(accel, assets)
    key = template_key(assets, memory_mib, cpus, name)
    root = template_root()
    final = root / key
    if not force:
        found = _read(final, key)
        if found is not None:
            with contextlib.suppress(OSError):
                os.utime(final / "meta.json")  # in use: not pruned
            return found
    failed = root / f".{key}.failed"
    with _locked(root):
        if not force:
            found = _read(final, key)
            if found is not None:
                return found
            _recent_failure(failed)
        try:
            tpl = _build(assets, memory_mib, cpus, name, key, root=root,
                         warm_seccomp=_warm_profiles(warm_seccomp), run_root=run_root)
        except IsoboxError as exc:
            # Remembered for a while: every container start would pay a failing boot.
            with contextlib.suppress(OSError):
                failed.write_text(str(exc)[-2000:])
            raise
        with contextlib.suppress(FileNotFoundError):
            failed.unlink()
        _prune(root, keep=key)
        return tpl


def _warm_profiles(extra: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The engine's default seccomp profile (what most containers carry), then the
    caller's: whoever builds the template first, its clones have the usual one compiled."""
    from isobox._sys import seccomp
    from isobox.spec.runtime import DEFAULT_CAPABILITIES

    profiles = [seccomp.default_profile(DEFAULT_CAPABILITIES)]
    keys = {seccomp.profile_key(profiles[0])}
    for p in extra or []:
        if seccomp.profile_key(p) not in keys:
            profiles.append(p)
            keys.add(seccomp.profile_key(p))
    return profiles


def _recent_failure(marker: Path) -> None:
    try:
        st = marker.stat()
    except FileNotFoundError:
        return
    if time.time() - st.st_mtime < FAILURE_TTL:
        why = marker.read_text(errors="replace").strip()
        raise VmError(f"the utility-VM template failed to build "
                      f"{int(time.time() - st.st_mtime)} s ago (retried after "
                      f"{int(FAILURE_TTL)} s, or by `isobox uvm build`): {why}")


def _build(assets: BootAssets, memory_mib: int, cpus: int, accel: AccelName, key: str, *,
           root: Path, warm_seccomp: list[dict[str, Any]], run_root: Path | None) -> Template:
    from isobox.agent.client import AgentClient

    tmp = root / f".{key}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(mode=0o700)
        (tmp / "empty").mkdir(mode=0o555)
    except OSError as exc:
        raise from_oserror("make template folder", str(tmp), exc) from exc
    started = time.monotonic()
    try:
        cfg = VmConfig(memory_mib=memory_mib, cpus=cpus, layout=LAYOUT,
                       memory_file=tmp / "ram", memory_shared=True, empty_share=tmp / "empty")
        vm = UtilityVM(f"tpl-{key[:12]}-{os.getpid()}", assets, cfg, accel=accel,
                       run_root=run_root)
        with vm:
            vm.start(BUILD_TIMEOUT)
            assert vm.agent is not None
            agent = AgentClient(vm.agent, timeout=BUILD_TIMEOUT)
            try:
                version = agent.connect(BUILD_TIMEOUT)
                try:
                    warm = agent.warm(warm_seccomp)
                except IsoboxError as exc:
                    # An agent without ``warm`` predates templates: it would not reseed
                    # its CRNG in a clone either. Never clone it.
                    raise VmError(f"the utility-VM image's agent cannot be a template "
                                  f"({exc}); rebuild it with `isobox uvm build`") from exc
                # The guest is idle in its loop now; nothing is in flight on the channel.
                save = vm.save_state(tmp / "state")
            finally:
                agent.closed = True  # the channel dies with QEMU; no error to report
            vm.quit()
        build = time.monotonic() - started
        meta = {"key": key, "format": TEMPLATE_FORMAT, "assetsKey": _assets_key(assets),
                "assetsDir": str(getattr(assets, "dir", "") or assets.image.parent),
                "memoryMib": memory_mib, "cpus": cpus, "accel": accel,
                "protocolVersion": version, "buildSeconds": round(build, 3),
                "saveSeconds": round(save, 4), "warm": warm, "layout": asdict(LAYOUT),
                "builtAt": time.time()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        final = root / key
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, IsoboxError | KeyboardInterrupt | SystemExit):
            raise
        raise VmError(f"building the utility-VM template {key}: {exc}") from exc
    found = _read(final, key)
    if found is None:
        raise VmError(f"the utility-VM template {key} was built but cannot be read")
    return found


def _prune(root: Path, *, keep: str) -> None:
    """Remove templates whose assets are gone (rebuilt: their inputs changed) or that no
    VM started from for :data:`UNUSED_TTL`, and temporary folders of builds that died.
    Another engine's templates (other assets, still there) are left alone. Clones of a
    removed template keep their mapping of its memory."""
    now = time.time()
    for entry in root.iterdir():
        if entry.name == keep or not entry.is_dir():
            continue
        if entry.name.startswith("."):
            with contextlib.suppress(OSError):
                if now - entry.stat().st_mtime > _STALE_TMP:
                    shutil.rmtree(entry, ignore_errors=True)
            continue
        try:
            meta = json.loads((entry / "meta.json").read_text())
            gone = not Path(str(meta.get("assetsDir") or "/nonexistent")).is_dir()
            stale = gone or now - (entry / "meta.json").stat().st_mtime > UNUSED_TTL
        except (OSError, ValueError, AttributeError):
            stale = True
        if stale:
            shutil.rmtree(entry, ignore_errors=True)


def discard_template(tpl: Template) -> None:
    """Remove one template (QEMU refused its state): the next start builds it again."""
    with contextlib.suppress(IsoboxError), _locked(tpl.dir.parent):
        shutil.rmtree(tpl.dir, ignore_errors=True)


def remove_templates() -> int:
    """Remove every template (``isobox uvm build --force``, tests); the count removed."""
    root = template_root()
    if not root.is_dir():
        return 0
    n = 0
    with _locked(root):
        for entry in root.iterdir():
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
                n += 1
    return n


def fits(layer_sizes: list[int], shares: int) -> str | None:
    """Why a container cannot run in a clone (None: it can): too many layers or mapped
    folders for the template's slots, or a layer larger than a slot."""
    if len(layer_sizes) > LAYOUT.ro_disks:
        return f"{len(layer_sizes)} image layers (a clone has {LAYOUT.ro_disks} layer slots)"
    if shares > LAYOUT.shares:
        return f"{shares} mapped folders (a clone has {LAYOUT.shares} share slots)"
    big = [s for s in layer_sizes if s > LAYOUT.ro_disk_bytes]
    if big:
        return f"a layer of {big[0]} bytes (a slot takes {LAYOUT.ro_disk_bytes})"
    return None


def pad_layer(path: Path) -> None:
    """Give a layer's erofs file its slot's size (sparse zeros after the file system,
    which erofs ignores): the guest knows each slot's size from the template."""
    size = path.stat().st_size
    if size > LAYOUT.ro_disk_bytes:
        raise InvalidArgument(f"layer {path} is larger than a template slot")
    if size < LAYOUT.ro_disk_bytes:
        os.truncate(path, LAYOUT.ro_disk_bytes)


__all__ = ["Template", "discard_template", "ensure_template", "fits", "load_template",
           "pad_layer",
           "remove_templates", "template_key", "template_root"]
