"""Cold start of a utility-VM container: ``isobox run --rm --isolation=vm busybox true``
next to ``--isolation=process``, same warm isoboxd, same run (issue 7).

Both are the whole CLI command against one ``isoboxd`` started before the rounds (its root
and run folders in a short folder under /tmp, busybox bootstrapped there), ``--network
none`` for both (vm isolation has no network device yet). The vm run pays: the plan (the OCI
config converted to the guest's ``SiloConfig`` on the host), the layer's erofs disk (built
once, in the warm-up), a fresh ext4 scratch disk (``mkfs.ext4``), QEMU ``microvm`` boot to
the agent's ``ready`` (kernel, initramfs modules, stage 2, Python), the container's create
and start in the guest (seccomp compiled there), the exit, the guest's clean power-off, and
the removal. No template or clone yet (issue 8 cuts this down). The utility-VM assets come
from ``ISOBOX_UVM_DIR`` (or the benchmark root's ``uvm/``) and are built untimed first.
After the rounds no QEMU, mount or file of the benchmark may be left.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from bench.harness import REPO, Config, Report, Scenario, Step, fmt_s, log, measure
from bench.peers import IsoboxDaemon, environ, mounts_under, venv_bin

NAME = "vm_start"
TITLE = "run --rm busybox true: --isolation=vm (cold utility VM) vs --isolation=process"
VM = "CLI --isolation=vm"
PROCESS = "CLI --isolation=process"






def _qemus() -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = (p / "cmdline").read_bytes()
                if b"qemu-system" in cmd.split(b"\0")[0] and b"isobox-c-" in cmd:
                    out.append(int(p.name))
    return out


def scenarios(d: IsoboxDaemon) -> list[Scenario]:
    def cli(iso: str) -> Scenario:
        def steps(_w: Path) -> list[Step]:
            return [Step("isobox run", [d.cli, "run", "--rm", f"--isolation={iso}",
                                        "--network", "none", "busybox", "true"], env=d.env)]

        return Scenario(VM if iso == "vm" else PROCESS, steps, baseline=iso == "process")

    return [cli("process"), cli("vm")]


def run(config: Config) -> Report:
    from isobox.uvm.accel import probe
    from isobox.uvm.assets import ensure_assets

    folder = Path(tempfile.mkdtemp(prefix="ibvm-", dir="/tmp"))  # sun_path: keep it short
    qemus_before = set(_qemus())
    leftovers: list[str] = []
    d = IsoboxDaemon(folder, venv_bin("isoboxd"), venv_bin("isobox"))
    extra = {} if os.environ.get("ISOBOX_UVM_DIR") else {
        "ISOBOX_UVM_DIR": str(folder / "root" / "uvm")}
    try:
        with environ({**d.env, **extra}):
            log(f"{NAME}: utility-VM assets (built untimed if missing)")
            assets = ensure_assets()
            accel = probe(assets=assets)
            log(f"{NAME}: starting isoboxd in {folder}; accelerator {accel.name}")
            d.start()
            d.isobox("image", "bootstrap", "busybox")
            report = measure(
                NAME, TITLE, scenarios(d), config,
                params={"image": "busybox (bootstrapped by isobox)", "process": "true",
                        "network": "none", "accelerator": f"{accel.name}: {accel.reason}",
                        "vm": "QEMU microvm, 512 MiB, 1 vCPU, no template/clone"},
                notes=[
                    "Both: the whole `isobox run --rm --isolation=ISO --network none busybox "
                    "true` command (interpreter start, imports, round trips to the warm "
                    "isoboxd).",
                    "vm: plan + scratch ext4 + QEMU boot to the guest agent + container "
                    "create/start in the guest + clean power-off + removal; the layer's erofs "
                    "disk is built once (warm-up).",
                ],
                extra_tools={"isobox commit": ["git", "-C", REPO, "describe", "--always",
                                               "--dirty"]},
            )
    finally:
        leftovers += d.stop()
        left = set(_qemus()) - qemus_before
        leftovers += [f"QEMU left: pid {p}" for p in sorted(left)]
        stuck = mounts_under(folder)
        if stuck:
            leftovers.append(f"mounts left under {folder}: {stuck[:5]}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    report.baseline_label = PROCESS
    report.notes += [f"LEFTOVER: {x}" for x in leftovers] or [
        "After the rounds isoboxd was stopped: no QEMU, mount or process of the benchmark "
        "was left."]
    by = {o.name: o for o in report.outcomes}
    a, b = by[VM].stats, by[PROCESS].stats
    if a is not None and b is not None:
        report.notes.append(f"vm - process: median {fmt_s(a.median)} - {fmt_s(b.median)} = "
                            f"{a.median - b.median:.2f} s")
    return report
