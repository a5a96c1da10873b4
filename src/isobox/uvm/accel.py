"""Which accelerator utility VMs run on: KVM when a probe VM really boots on it, else TCG.

Flags lie: on this kind of host ``/dev/kvm`` opens but is a paravirtual KVM on which a stock
kernel stalls (default CPU model) or QEMU aborts (``-cpu host``: MSR 0x10a). So the probe
boots the real guest kernel under ``-accel kvm -cpu host`` with ``rdinit=/bin/busybox --
poweroff -f`` and a deadline; a clean power-off (QEMU exit 0) means KVM works. Anything
else is TCG, and the reason says what KVM did.

The answer is cached in ``$ISOBOX_ROOT/uvm/accel.json`` keyed by what can change it: the
host kernel, the QEMU binary (its identity, with its version recorded) and the guest kernel.
A cached answer costs two ``stat`` calls and a small read; ``probe(force=True)`` re-boots.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from isobox.errors import ToolMissing
from isobox.paths import root_dir

QEMU = "qemu-system-x86_64"
KVM_DEVICE = "/dev/kvm"
PROBE_DEADLINE = 3.0  # a KVM boot to rdinit takes well under a second
CACHE_VERSION = 1

AccelName = Literal["kvm", "tcg"]


class KernelAssets(Protocol):
    """What the probe needs of the utility-VM assets (``isobox.uvm.assets.Assets`` fits)."""

    @property
    def kernel(self) -> Path: ...
    @property
    def initrd(self) -> Path: ...
    @property
    def cmdline_base(self) -> str: ...


@dataclass(frozen=True)
class AccelResult:
    """``name``: the accelerator utility VMs use; ``reason``: why (for ``isobox info``)."""

    name: AccelName
    reason: str
    cached: bool = False  # True when read from accel.json rather than probed just now


def qemu_binary() -> str:
    """The QEMU system emulator's path, or :class:`ToolMissing`."""
    found = shutil.which(QEMU)
    if found is None:
        raise ToolMissing(f"{QEMU} is not installed (Debian package qemu-system-x86)")
    return found


def accel_args(name: AccelName) -> list[str]:
    """The QEMU arguments for an accelerator. TCG: ``-cpu max`` (every feature the guest
    kernel may use) and a 32 MiB code cache (8 MiB made commands 10x slower; the default
    is 1 GiB of address space per VM)."""
    if name == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg,tb-size=32", "-cpu", "max"]


def cache_path(root: Path | None = None) -> Path:
    return (root or root_dir()) / "uvm" / "accel.json"


def _identity(path: str | Path) -> str:
    st = os.stat(path)
    return f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def _cache_key(qemu: str, assets: KernelAssets) -> dict[str, str]:
    uname = os.uname()
    try:
        kvm = str(os.stat(KVM_DEVICE).st_rdev)
    except OSError:
        kvm = "absent"
    return {
        "host_kernel": f"{uname.release} {uname.version}",
        "qemu": _identity(qemu),
        "guest_kernel": _identity(assets.kernel),
        "kvm_device": kvm,
    }


def _qemu_version(qemu: str) -> str:
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True,
                             timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.splitlines()[0].strip() if out else "unknown"


def cached_result(assets: KernelAssets, root: Path | None = None) -> AccelResult | None:
    """The cached answer if it is still valid for this host, QEMU and guest kernel; never
    boots anything (what ``isobox info`` shows)."""
    try:
        doc = json.loads(cache_path(root).read_text())
        key = _cache_key(qemu_binary(), assets)
    except (OSError, ValueError, ToolMissing):
        return None
    if not isinstance(doc, dict) or doc.get("version") != CACHE_VERSION or doc.get("key") != key:
        return None
    name, reason = doc.get("name"), doc.get("reason")
    if name not in ("kvm", "tcg") or not isinstance(reason, str):
        return None
    return AccelResult("kvm" if name == "kvm" else "tcg", reason, cached=True)


def probe(force: bool = False, assets: KernelAssets | None = None,
          root: Path | None = None, deadline: float = PROBE_DEADLINE) -> AccelResult:
    """KVM when a probe VM boots and powers off on it within ``deadline`` seconds, else
    TCG. Cached (see the module docstring) unless ``force``. ``assets`` default to the
    current utility-VM assets (built if missing)."""
    if assets is None:
        from isobox.uvm.assets import ensure_assets

        assets = ensure_assets(root)
    qemu = qemu_binary()
    if not force:
        hit = cached_result(assets, root)
        if hit is not None:
            return hit
    key = _cache_key(qemu, assets)
    started = time.monotonic()
    name, reason = _probe_kvm(qemu, assets, deadline)
    doc: dict[str, Any] = {
        "version": CACHE_VERSION, "key": key, "name": name, "reason": reason,
        "qemu_version": _qemu_version(qemu),
        "probe_seconds": round(time.monotonic() - started, 3),
        "probed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_atomic(cache_path(root), json.dumps(doc, indent=2) + "\n")
    return AccelResult(name, reason)


def _probe_kvm(qemu: str, assets: KernelAssets, deadline: float) -> tuple[AccelName, str]:
    try:
        fd = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return "tcg", f"KVM unavailable: cannot open {KVM_DEVICE}: {exc.strerror}"
    os.close(fd)
    argv = [
        qemu, "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=on", *accel_args("kvm"),
        "-m", "128", "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
        "-no-reboot", "-serial", "none",
        "-kernel", str(assets.kernel), "-initrd", str(assets.initrd),
        "-append", f"{assets.cmdline_base} rdinit=/bin/busybox -- poweroff -f",
    ]
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=deadline)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return "tcg", (f"KVM probe VM did not power off within {deadline:g} s "
                       "(the guest stalls under KVM here); using TCG")
    finally:
        if proc.poll() is None:  # interrupted: never leave the probe VM behind
            proc.kill()
            proc.wait()
    took = time.monotonic() - started
    if proc.returncode == 0:
        return "kvm", f"a probe VM booted and powered off under KVM in {took:.2f} s"
    lines = [ln.strip() for ln in err.decode(errors="replace").splitlines() if ln.strip()]
    detail = "; ".join(lines[-2:]) if lines else "no message"
    how = (f"died of {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
           else f"exited {proc.returncode}")
    return "tcg", (f"KVM probe VM failed: QEMU {how} after {took:.2f} s "
                   f"({detail}); using TCG")


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
