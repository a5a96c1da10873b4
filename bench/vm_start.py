"""Start of a utility-VM container: ``isobox run --rm --isolation=vm busybox true`` as a
clone of a pre-booted template, next to a cold boot, ``--isolation=process``, docker and
podman, same warm isoboxd, same run, interleaved rounds (issue 8).

Scenarios (every one ``true`` in busybox with ``--network none``):

* clone CLI (the baseline): ``isobox run --rm --isolation=vm --network none busybox true``
  against one ``isoboxd`` started before the rounds (root and run folders in a short folder
  under /tmp: QEMU's sockets must fit sun_path). The VM is a clone of the template
  (``src/isobox/uvm/template.py``): QEMU started with ``-incoming defer``, its RAM the
  template's tmpfs file mapped copy-on-write, device state restored, ``cont``; then the
  agent's hello (clock, CRNG reseed, hostname), the scratch disk mounted, the container
  created and started in the guest, its exit, the VM's end and the removal;
* clone SDK: the same through ``isobox.client`` from this (warm) Python process:
  ``Client().containers.run("busybox", ["true"], auto_remove=True, network="none",
  isolation="vm")``;
* cold CLI: the clone CLI command with ``--no-template``: QEMU boots the kernel, the
  initramfs and the agent (~5-8 s under TCG), so it runs in fewer rounds (a third of them,
  at least 3, spread over the run; its other rounds are skipped, not timed);
* process CLI: ``--isolation=process``, the same daemon;
* docker / podman: ``docker run --rm --network none busybox true`` and ``podman run ...``,
  the engines brought up exactly as bench/compute_run.py does (its ``Peers`` and
  ``scenarios``, imported: same image archive, same configurations).

The template lives in a folder of the benchmark's own on tmpfs (``ISOBOX_TEMPLATE_DIR``)
and is built untimed before the rounds by one clone run. Every VM run is checked: a
watcher (inotify) copies each container's ``vm.json`` the moment the daemon writes it
(``--rm`` removes the folder a few ms later), and a clone scenario in which any run was not
``mode: clone`` (or could not be checked) is reported "failed" instead of timed: a cold
boot measured as a clone would be a lie. The utility-VM assets come from
``ISOBOX_UVM_DIR`` (or the benchmark root's ``uvm/``) and are built untimed first. After
the rounds no QEMU, mount, process or template of the benchmark may be left.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import shutil
import statistics
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import compute_run
from bench.harness import (
    FAILED,
    OK,
    REPO,
    Config,
    Report,
    Scenario,
    Step,
    fmt_s,
    log,
    measure,
)
from bench.peers import IsoboxDaemon, environ, mounts_under, processes_mentioning

NAME = "vm_start"
TITLE = ("run --rm busybox true: --isolation=vm as a template clone (CLI, SDK) vs cold boot, "
         "--isolation=process, docker, podman")
CLONE = "CLI vm clone"
SDK = "SDK vm clone"
COLD = "CLI vm cold (--no-template)"
PROCESS = "CLI --isolation=process"
DOCKER = compute_run.DOCKER
PODMAN = compute_run.PODMAN

GOAL_CLONE_S = 0.150
GOAL_VS_DOCKER = 0.5
GOAL_VS_COLD = 0.1


# ---- the benchmark's folders, daemon and template -------------------------------------------


@dataclass
class VmBench:
    """A short folder under /tmp (sun_path) for the daemon, and a template folder on tmpfs,
    both the benchmark's own; the environment the daemon, the CLI and the SDK get."""

    folder: Path
    template_dir: Path
    env: dict[str, str]

    @classmethod
    @contextlib.contextmanager
    def make(cls, prefix: str) -> Iterator[VmBench]:
        folder = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
        template_dir = Path(tempfile.mkdtemp(prefix=f"{prefix}tpl-", dir=shm))
        env = {"ISOBOX_TEMPLATE_DIR": str(template_dir)}
        if not os.environ.get("ISOBOX_UVM_DIR"):
            env["ISOBOX_UVM_DIR"] = str(folder / "isobox" / "root" / "uvm")
        try:
            yield cls(folder, template_dir, env)
        finally:
            shutil.rmtree(template_dir, ignore_errors=True)
            if not mounts_under(folder):
                shutil.rmtree(folder, ignore_errors=True)

    def leftovers(self) -> list[str]:
        """QEMUs of the benchmark still running (killed: they are ours) and mounts."""
        found = []
        for pid in qemus(str(self.folder)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
            found.append(f"QEMU left: pid {pid}, killed")
        stuck = mounts_under(self.folder)
        if stuck:
            found.append(f"mounts left under {self.folder}, not removed: {stuck[:5]}")
        return found


def qemus(mentioning: str) -> list[int]:
    """QEMU processes whose command line holds ``mentioning``."""
    out = []
    for pid in processes_mentioning(mentioning):
        with contextlib.suppress(OSError):
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
            if b"qemu-system" in argv0:
                out.append(pid)
    return out


def prepare_vm_assets(what: str) -> tuple[str, str]:
    """The utility-VM assets built (untimed) if missing; the accelerator's name and why."""
    from isobox.uvm.accel import probe
    from isobox.uvm.assets import ensure_assets

    log(f"{what}: utility-VM assets (built untimed if missing)")
    assets = ensure_assets()
    accel = probe(assets=assets)
    log(f"{what}: accelerator {accel.name}")
    return accel.name, accel.reason


def build_template(d: IsoboxDaemon, template_dir: Path, what: str) -> dict[str, Any]:
    """One untimed clone run through the CLI, which builds the template; its meta.json."""
    log(f"{what}: building the template (one untimed run)")
    t0 = time.monotonic()
    d.isobox("run", "--rm", "--isolation=vm", "--network", "none", "busybox", "true")
    metas = [json.loads(p.read_text()) for p in template_dir.glob("*/meta.json")]
    if len(metas) != 1:
        raise RuntimeError(f"expected one template in {template_dir} after a vm run, found "
                           f"{len(metas)}")
    log(f"{what}: template {metas[0]['key']} built in {time.monotonic() - t0:.1f} s")
    return dict(metas[0])


def template_summary(meta: dict[str, Any], ram: Path) -> str:
    du = ram.stat().st_blocks * 512 if ram.exists() else 0
    return (f"{meta.get('key')}: {meta.get('memoryMib')} MiB, {meta.get('cpus')} vCPU, "
            f"{meta.get('accel')}, built (boot + warm + save) in "
            f"{meta.get('buildSeconds')} s, saved in {meta.get('saveSeconds')} s; RAM file "
            f"{du / 2**20:.0f} MiB allocated on tmpfs")


# ---- vm.json of every run -----------------------------------------------------------------

IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x1000000
IN_ISDIR = 0x40000000
_EVENT = struct.Struct("iIII")


@dataclass
class Seen:
    """One container folder the daemon made while a scenario ran, and its vm.json."""

    label: str
    cid: str
    info: dict[str, Any] | None = None
    error: str = ""


@dataclass
class VmJsonWatcher:
    """Reads each container's ``vm.json`` the moment the daemon renames it into place
    (inotify on ``$ISOBOX_ROOT/containers`` and on each new container folder), so that the
    runs with ``--rm`` can be checked too. ``label`` (set before each run by the scenario's
    prepare hook) names the scenario the folders created from then on belong to. Its cost
    during a run: a few syscalls in a thread of this process, blocked in ``select`` the
    rest of the time."""

    containers: Path
    label: str = ""
    seen: dict[str, Seen] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = self._libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self._wds: dict[int, str] = {}
        self._root_wd = self._watch(self.containers, IN_CREATE | IN_ONLYDIR)
        self._stop_r, self._stop_w = os.pipe()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="vm.json watcher", daemon=True)
        self._thread.start()

    def _watch(self, path: Path, mask: int) -> int:
        wd = int(self._libc.inotify_add_watch(self._fd, os.fsencode(path), mask))
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
        return wd

    def _loop(self) -> None:
        while True:
            ready, _, _ = select.select([self._fd, self._stop_r], [], [])
            self._drain()
            if self._stop_r in ready:
                return

    def _drain(self) -> None:
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return
            pos = 0
            while pos < len(data):
                wd, mask, _cookie, size = _EVENT.unpack_from(data, pos)
                raw = data[pos + _EVENT.size: pos + _EVENT.size + size]
                pos += _EVENT.size + size
                self._event(wd, mask, raw.rstrip(b"\0").decode(errors="replace"))

    def _event(self, wd: int, mask: int, name: str) -> None:
        if mask & IN_Q_OVERFLOW:
            self.problems.append("inotify queue overflowed: some vm.json not seen")
        elif wd == self._root_wd and mask & IN_CREATE and mask & IN_ISDIR:
            with self._lock:
                self.seen[name] = Seen(self.label, name)
            try:
                self._wds[self._watch(self.containers / name, IN_MOVED_TO | IN_ONLYDIR)] = name
            except OSError as exc:
                self.seen[name].error = f"folder gone before it could be watched ({exc})"
                return
            if (self.containers / name / "vm.json").exists():  # written before the watch
                self._read(name)
        elif mask & IN_MOVED_TO and name == "vm.json" and wd in self._wds:
            self._read(self._wds[wd])
        elif mask & IN_IGNORED:
            self._wds.pop(wd, None)

    def _read(self, cid: str) -> None:
        try:
            info = json.loads((self.containers / cid / "vm.json").read_text())
        except (OSError, ValueError) as exc:
            self.seen[cid].error = f"vm.json gone before it could be read ({exc})"
            return
        self.seen[cid].info, self.seen[cid].error = info, ""

    def begin(self, label: str) -> None:
        """The containers made from now on belong to ``label``."""
        time.sleep(0.02)  # the previous run's last events are in by now
        with self._lock:
            self.label = label

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(10)
        for fd in (self._fd, self._stop_r, self._stop_w):
            os.close(fd)

    def of(self, label: str) -> list[Seen]:
        return [s for s in self.seen.values() if s.label == label]


def check_modes(runs: Sequence[Seen], expected_runs: int, mode: str) -> str | None:
    """Why the runs of a scenario cannot be vouched for as ``mode`` VMs, or None."""
    if len(runs) != expected_runs:
        return (f"{expected_runs} VM runs but {len(runs)} container folders seen: the check "
                "of vm.json is incomplete")
    bad = [f"{s.cid[:12]}: {s.error}" if s.info is None
           else f"{s.cid[:12]}: mode={s.info.get('mode')} ({s.info.get('coldReason')})"
           for s in runs if s.info is None or s.info.get("mode") != mode]
    if bad:
        return f"{len(bad)} of {len(runs)} runs were not verified as {mode}: {'; '.join(bad)}"
    return None


# ---- scenarios ----------------------------------------------------------------------------


def cold_rounds(rounds: int) -> set[int]:
    """The rounds (0-based) in which the cold boot runs: a third of them, at least 3 (or
    all, if fewer), spread evenly over the run."""
    n = min(rounds, max(3, rounds // 3))
    return {i * rounds // n for i in range(n)}


@dataclass
class Skipper:
    """The cold scenario's steps: all of them in the warm-up and in the rounds of
    `cold_rounds`, none (a run that is dropped from the times afterwards) in the others."""

    steps: Callable[[Path], list[Step]]
    warmup: int
    rounds: set[int]
    skipped: list[bool] = field(default_factory=list)  # one per timed run, in order
    calls: int = 0

    def __call__(self, w: Path) -> list[Step]:
        self.calls += 1
        if self.calls <= self.warmup:
            return self.steps(w)
        round_ = self.calls - self.warmup - 1
        skip = round_ not in self.rounds
        self.skipped.append(skip)
        return [] if skip else self.steps(w)

    def drop_skipped(self, times: list[float]) -> list[float]:
        return [t for t, skip in zip(times, self.skipped, strict=False) if not skip]


def _sdk_call(cold: bool = False) -> Callable[[], object]:
    """The SDK's run under vm isolation, on a client made once (the warm process keeps it);
    the client finds the daemon through ISOBOX_RUN, set around measure()."""
    client: list[Any] = []

    def call() -> object:
        if not client:
            from isobox.client import Client

            client.append(Client())
        kwargs: dict[str, Any] = {"vm_template": False} if cold else {}
        return client[0].containers.run("busybox", ["true"], auto_remove=True,
                                        network="none", isolation="vm", **kwargs)

    return call


def scenarios(peers: compute_run.Peers, watcher: VmJsonWatcher,
              config: Config) -> tuple[list[Scenario], Skipper]:
    d = peers.isobox
    assert d is not None

    def cli(*args: str) -> Callable[[Path], list[Step]]:
        def steps(_w: Path) -> list[Step]:
            return [Step("isobox run", [d.cli, "run", "--rm", *args, "--network", "none",
                                        "busybox", "true"], env=d.env)]
        return steps

    def labelled(name: str) -> Callable[[Path], None]:
        return lambda _w: watcher.begin(name)

    sdk = _sdk_call()
    skipper = Skipper(cli("--isolation=vm", "--no-template"), config.warmup,
                      cold_rounds(config.rounds))
    # docker and podman exactly as compute_run runs them (its steps, its unavailability).
    peer = {s.name: s for s in compute_run.scenarios(peers, Path("/nonexistent"))}
    isobox_version: dict[str, list[str | Path]] = {"isobox": [d.cli, "--version"]}
    return [
        Scenario(CLONE, cli("--isolation=vm"), baseline=True, prepare=labelled(CLONE),
                 versions=isobox_version),
        Scenario(SDK, lambda _w: [Step("containers.run", call=sdk)], prepare=labelled(SDK)),
        Scenario(COLD, skipper, prepare=labelled(COLD)),
        Scenario(PROCESS, cli("--isolation=process"), prepare=labelled(PROCESS)),
        peer[DOCKER],
        peer[PODMAN],
    ], skipper


# ---- the report ---------------------------------------------------------------------------


def step_medians(runs: Sequence[Seen]) -> dict[str, float]:
    """The median of each step the daemon timed (vm.json ``steps``; ``secondsToAgent`` as
    "to agent": QEMU spawn until the agent answered), in the daemon's order."""
    values: dict[str, list[float]] = {}
    for s in runs:
        info = s.info or {}
        for key, value in (info.get("steps") or {}).items():
            values.setdefault(str(key), []).append(float(value))
        if "secondsToAgent" in info:
            values.setdefault("to agent", []).append(float(info["secondsToAgent"]))
    return {key: statistics.median(v) for key, v in values.items()}


def _goal(report: Report, label: str, a: str, b: str | None, goal: float | None) -> str:
    """One goal line: a's median against an absolute bound (``b`` None), or a's median over
    b's against ``goal`` (None: the ratio only)."""
    by = {o.name: o for o in report.outcomes}
    sa = by[a].stats
    sb = by[b].stats if b is not None else None
    if sa is None or (b is not None and sb is None):
        missing = by[a] if sa is None else by[b or a]
        why = f"{missing.status}: {missing.reason[:200]}" if missing.reason else missing.status
        return f"{label}: not computed ({missing.name} {why})"
    if sb is None:
        assert goal is not None
        verdict = "met" if sa.median <= goal else "NOT met"
        return f"{label}: {fmt_s(sa.median)} -> {verdict}"
    ratio = sa.median / sb.median
    verdict = "" if goal is None else (" -> met" if ratio <= goal else " -> NOT met")
    return f"{label}: {fmt_s(sa.median)} / {fmt_s(sb.median)} = {ratio:.3f}{verdict}"


NOTES = [
    "clone CLI: the whole `isobox run --rm --isolation=vm --network none busybox true` "
    "command (interpreter start, imports, round trips to the warm isoboxd) and the "
    "daemon's work: plan, the layer's erofs disk (built once, in the template run) padded "
    "to its slot, the scratch disk, QEMU spawned with -incoming defer and restored from "
    "the template's state (RAM: the template's tmpfs file mapped copy-on-write), the "
    "agent's hello (clock, CRNG reseed, hostname), the scratch mounted, the container "
    "created and started in the guest, its exit, the VM's end and the removal.",
    "clone SDK: the same daemon work from this benchmark's warm Python process (one "
    "isobox.client.Client made in the warm-up run; no interpreter start or imports).",
    "cold CLI: as clone CLI with --no-template: QEMU boots the kernel, initramfs and agent "
    "instead of restoring the template; timed in fewer rounds (the rounds in between are "
    "skipped, not timed).",
    "process CLI: `isobox run --rm --isolation=process --network none busybox true`, the "
    "same daemon (bench/compute_run.py compares it with the runtimes).",
    "docker / podman: brought up and run exactly as in bench/compute_run.py (its Peers and "
    "scenarios, imported): dockerd -> containerd -> runc v2 shim -> runc, overlay2; podman "
    "-> conmon -> runc, overlay. (compute_run's Peers also brings up a containerd, idle "
    "here.)",
]


def run(config: Config) -> Report:
    leftovers: list[str] = []
    checks: dict[str, str | None] = {}
    steps: dict[str, dict[str, float]] = {}
    accels: set[str] = set()
    with VmBench.make("ibvm-") as vb, environ(vb.env):
        accel, accel_reason = prepare_vm_assets(NAME)
        log(f"{NAME}: preparing busybox and the peers in {vb.folder}")
        archive, image_id = compute_run.seed_archive(vb.folder)
        with contextlib.ExitStack() as stack:
            peers = compute_run.Peers(vb.folder, stack)
            peers.bring_up(archive, image_id)
            stack.callback(lambda: leftovers.extend(peers.leftovers))
            d = peers.isobox
            if d is None:
                raise RuntimeError(f"isoboxd did not start: {peers.why}")
            meta = build_template(d, vb.template_dir, NAME)
            watcher = VmJsonWatcher(d.root / "containers")
            stack.callback(watcher.close)
            scen, skipper = scenarios(peers, watcher, config)
            cpu = compute_run.CpuUse(peers)
            with environ(d.env):
                report = measure(
                    NAME, TITLE, scen, config,
                    params={
                        "image": f"busybox ({image_id}); isoboxd's copy: {peers.image_check}",
                        "process": "true", "network": "none",
                        "accelerator": f"{accel}: {accel_reason}",
                        "vm": "QEMU microvm, 512 MiB, 1 vCPU (the defaults)",
                        "template": template_summary(meta, vb.template_dir / meta["key"] /
                                                     "ram"),
                        "cold rounds (0-based)": sorted(skipper.rounds),
                        "engine start-up, untimed (s)": {
                            k: round(v, 2) for k, v in peers.setup_s.items()}},
                    notes=NOTES,
                    extra_tools={"isobox commit": ["git", "-C", REPO, "describe", "--always",
                                                   "--dirty"],
                                 "qemu": ["qemu-system-x86_64", "--version"],
                                 "docker client": ["/usr/bin/docker", "--version"]},
                )
            load_note = cpu.summary()
            time.sleep(0.2)
            # Each VM scenario's runs: the warm-up ones and the timed ones.
            by = {o.name: o for o in report.outcomes}
            cold_out = by[COLD]
            cold_out.times = skipper.drop_skipped(cold_out.times)
            for name, mode in ((CLONE, "clone"), (SDK, "clone"), (COLD, "cold")):
                o = by[name]
                if o.status != OK:
                    continue
                runs = watcher.of(name)
                checks[name] = check_modes(runs, config.warmup + len(o.times), mode)
                steps[name] = step_medians(runs[config.warmup:])
                accels |= {str(s.info.get("accel")) for s in runs if s.info}
                if checks[name] is not None:
                    o.status, o.reason = FAILED, f"vm.json check: {checks[name]}"
                    log(f"{NAME}: {name}: FAILED: {o.reason}")
            stray = [s for s in watcher.of(PROCESS) if s.info is not None]
            if stray:
                leftovers.append(f"process runs with a vm.json: {[s.cid for s in stray]}")
            leftovers += watcher.problems
        leftovers += vb.leftovers()
    if vb.template_dir.exists():
        leftovers.append(f"template folder left: {vb.template_dir}")

    report.baseline_label = CLONE
    by_name = {o.name: o for o in report.outcomes}
    for name, mode in ((CLONE, "clone"), (SDK, "clone"), (COLD, "cold")):
        if name in checks and checks[name] is None:
            n = len(watcher.of(name))
            report.notes.append(f"{name}: all {n} runs (warm-up included) checked in their "
                                f"vm.json: mode={mode}.")
            if steps.get(name):
                st = by_name[name].stats
                top = sum(v for k, v in steps[name].items()
                          if not k.startswith("guest.") and k != "to agent")
                rest = (f"; the rest of the median run ({fmt_s(st.median)} - "
                        f"{fmt_s(top)} = {fmt_s(st.median - top)}: the client's start and "
                        "round trips, the container's run and exit, the VM's end, the "
                        "removal) is not in vm.json" if st is not None else "")
                report.notes.append(
                    f"{name}, the daemon's steps to the container started (vm.json, median "
                    "of the timed runs; guest.* are parts of create, 'to agent' = qemu + "
                    "restore/boot + hello): "
                    + ", ".join(f"{k} {fmt_s(v)}" for k, v in steps[name].items()) + rest
                    + ".")
    report.notes.append(f"Accelerator of the VM runs (vm.json): {', '.join(sorted(accels))}.")
    report.notes.append(f"{load_note} The VM runs' QEMUs (one per run) are not counted as "
                        f"the benchmark's either. {os.cpu_count()} cores.")
    report.notes += [f"LEFTOVER: {x}" for x in leftovers] or [
        "After the rounds every engine was stopped: no QEMU, process, mount or template of "
        "the benchmark was left."]
    for x in leftovers:
        log(f"{NAME}: LEFTOVER: {x}")
    report.notes.append("; ".join([
        _goal(report, f"Goal clone CLI median <= {fmt_s(GOAL_CLONE_S)}", CLONE, None,
              GOAL_CLONE_S),
        _goal(report, f"Goal clone/docker <= {GOAL_VS_DOCKER:g}", CLONE, DOCKER,
              GOAL_VS_DOCKER),
        _goal(report, f"Goal clone/cold <= {GOAL_VS_COLD:g}", CLONE, COLD, GOAL_VS_COLD),
        _goal(report, "clone/process (no goal)", CLONE, PROCESS, None),
        _goal(report, "clone/podman (no goal)", CLONE, PODMAN, None),
    ]))
    return report
