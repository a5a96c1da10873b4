"""``isobox run --rm busybox true`` against a warm isoboxd, and the SDK's run, vs the peers.

Issue 5's goal: the CLI's median at most 2x ``crun run``'s and at most 0.2x ``docker
run``'s. Every scenario runs ``true`` in the same busybox image (bootstrapped once, saved
as a docker archive and loaded into each engine; the runtimes get its root filesystem as a
bundle), in the same run, interleaved by the harness:

* isobox CLI (the baseline): ``isobox run --rm --network none busybox true`` against an
  ``isoboxd`` started once before the rounds, with ``ISOBOX_ROOT``/``ISOBOX_RUN`` in the
  benchmark's folder and busybox bootstrapped there through the CLI (``--network none``
  as for podman and docker; bench/network_cost.py measures the default network's cost);
* isobox SDK: ``Client().containers.run("busybox", ["true"], auto_remove=True,
  network="none")`` timed in this (warm) Python process, same daemon;
* crun run / runc run: the bundle (runc's default spec, ``/bin/true``), in the same
  ``unshare -m`` wrapper as bench/runtime_start.py (crun refuses this host's hybrid
  cgroups otherwise);
* podman / docker / ctr: each engine brought up by bench/peers.py with its state in the
  benchmark's folder, stopped and checked for leftovers after the rounds.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.harness import REPO, Config, Report, Scenario, Step, fmt_s, log, measure
from bench.peers import (
    Containerd,
    Dockerd,
    IsoboxDaemon,
    PeerError,
    Podman,
    cpu_seconds,
    environ,
    mounts_under,
    venv_bin,
)

NAME = "compute_run"
TITLE = "run --rm busybox true: isobox CLI and SDK (warm daemon) vs crun, runc, podman, " \
        "docker, ctr"
IMAGE = "busybox:latest"
CTR_IMAGE = "docker.io/library/busybox:latest"  # how containerd names a loaded busybox:latest
WRAP = "umount /sys/fs/cgroup/unified 2>/dev/null; exec \"$@\""
ID_PREFIX = "isobox-bench-"  # container IDs of crun, runc and ctr runs (they name cgroups)
_IDS = itertools.count(1)


def _container_id() -> str:
    """A unique ID that runc, crun and containerd all accept (containerd: no ``_``)."""
    return f"{ID_PREFIX}{os.getpid()}-{next(_IDS)}"
GOAL_VS_CRUN = 2.0
GOAL_VS_DOCKER = 0.2

CLI = "isobox CLI"
SDK = "isobox SDK"
CRUN = "crun run"
RUNC = "runc run"
PODMAN = "podman run --rm --network none"
DOCKER = "docker run --rm --network none"
CTR = "ctr run --rm"




# ---- the image ----------------------------------------------------------------------------


def seed_archive(folder: Path) -> tuple[Path, str]:
    """busybox bootstrapped into a store of its own and saved as a docker archive (which
    podman, ctr and docker all load); the archive and the image ID. Done with isobox's
    storage library, so the peers do not depend on the CLI being rewritten."""
    from isobox.storage.bootstrap import bootstrap_busybox
    from isobox.storage.export import save
    from isobox.storage.store import ImageStore

    store = ImageStore(folder / "seed")
    try:
        image = bootstrap_busybox(store, IMAGE)
        archive = folder / "busybox.docker.tar"
        save(store, IMAGE, archive, "docker")
    finally:
        store.close()
    return archive, image.id


def bundle_from_archive(archive: Path, bundle: Path) -> Path:
    """A runtime bundle: the archive's layers extracted in order as ``rootfs`` and the
    config ``runc spec`` writes, with no terminal and ``/bin/true`` as the process."""
    rootfs = bundle / "rootfs"
    rootfs.mkdir(parents=True)
    with tarfile.open(archive) as outer:
        fh = outer.extractfile("manifest.json")
        if fh is None:
            raise PeerError(f"{archive}: no manifest.json")
        layers: list[str] = json.load(fh)[0]["Layers"]
        for name in layers:
            layer = outer.extractfile(name)
            if layer is None:
                raise PeerError(f"{archive}: layer {name} missing")
            subprocess.run(["tar", "-x", "-p", "-C", str(rootfs)], input=layer.read(),
                           check=True, capture_output=True)
    spec = "runc" if shutil.which("runc") else str(venv_bin("isobox-runtime"))
    subprocess.run([spec, "spec"], cwd=bundle, check=True, capture_output=True)
    cfg = json.loads((bundle / "config.json").read_text())
    cfg["process"]["terminal"] = False
    cfg["process"]["args"] = ["/bin/true"]
    (bundle / "config.json").write_text(json.dumps(cfg))
    return bundle


# ---- scenarios ----------------------------------------------------------------------------


class Peers:
    """The engines brought up for this run, and why those that are not could not be."""

    def __init__(self, folder: Path, stack: contextlib.ExitStack) -> None:
        self.folder = folder
        self.stack = stack
        self.why: dict[str, str] = {}
        self.leftovers: list[str] = []
        self.isobox: IsoboxDaemon | None = None
        self.podman: Podman | None = None
        self.containerd: Containerd | None = None
        self.dockerd: Dockerd | None = None
        self.setup_s: dict[str, float] = {}
        self.image_check = "not bootstrapped"

    def bring_up(self, archive: Path, image_id: str) -> None:
        isoboxd, cli = venv_bin("isoboxd"), venv_bin("isobox")
        if not isoboxd.is_file():
            self.why[CLI] = self.why[SDK] = f"{isoboxd} is not installed (no compute service)"
        else:
            d = IsoboxDaemon(self.folder / "isobox", isoboxd, cli)
            self._start("isoboxd", d, d.start, (CLI, SDK))
            if self.why.get(CLI) is None:
                self.isobox = d
                try:  # the daemon's store gets busybox the way a user would give it
                    d.isobox("image", "bootstrap", "busybox")
                except PeerError as exc:
                    self.why[CLI] = self.why[SDK] = f"image bootstrap through the CLI: {exc}"
                else:
                    self._same_image(d, image_id)
        if shutil.which("podman") and shutil.which("conmon") and shutil.which("runc"):
            p = Podman(self.folder / "podman")
            if self._start("podman", p, lambda: p.start(archive), (PODMAN,)):
                self.podman = p
        if shutil.which("containerd") and shutil.which("ctr") and shutil.which("runc"):
            c = Containerd(self.folder / "containerd")
            if self._start("containerd", c, lambda: c.start(archive), (CTR,)):
                self.containerd = c
        if shutil.which("dockerd"):
            k = Dockerd(self.folder / "dockerd")
            if self._start("dockerd", k, lambda: k.start(archive), (DOCKER,)):
                self.dockerd = k

    def _start(self, what: str, peer: Any, start: Callable[[], None],
               scenarios: tuple[str, ...]) -> bool:
        """Start a peer; on failure mark its scenarios "not available". Its stop (and the
        leftover check) is registered either way: a failed start may leave something."""
        self.stack.callback(lambda: self.leftovers.extend(peer.stop()))
        log(f"{NAME}: starting {what}")
        t0 = time.monotonic()
        try:
            start()
        except PeerError as exc:
            for s in scenarios:
                self.why[s] = f"{what} did not start: {exc}"
            log(f"{NAME}: {what} did not start: {exc}")
            return False
        self.setup_s[what] = time.monotonic() - t0
        return True

    def _same_image(self, d: IsoboxDaemon, image_id: str) -> None:
        """Say whether the daemon's bootstrapped busybox is the very image the peers got."""
        try:
            out = d.isobox("image", "inspect", "busybox")
            ids = {i.get("id") or i.get("Id") for i in json.loads(out)}
        except (PeerError, ValueError, AttributeError) as exc:
            self.image_check = f"not compared ({exc})"
        else:
            self.image_check = ("the same image ID" if image_id in ids
                                else f"a different image: {sorted(map(str, ids))}")
        log(f"{NAME}: isoboxd's busybox: {self.image_check}")


def _sdk_call(env: dict[str, str]) -> Callable[[], object]:
    """The SDK's run, on a client made once (the warm process keeps it)."""
    client: list[Any] = []

    def call() -> object:
        if not client:
            # Looked up at run time: the SDK may not exist yet (the scenario's probe says so).
            client.append(importlib.import_module("isobox.client").Client())
        return client[0].containers.run("busybox", ["true"], auto_remove=True, network="none")

    del env  # the client finds the daemon through ISOBOX_RUN, set around measure()
    return call


def scenarios(peers: Peers, bundle: Path) -> list[Scenario]:
    d, p, c, k = peers.isobox, peers.podman, peers.containerd, peers.dockerd

    def cli_steps(_w: Path) -> list[Step]:
        assert d is not None
        return [Step("isobox run", [d.cli, "run", "--rm", "--network", "none", "busybox", "true"],
                     env=d.env)]

    sdk = _sdk_call(d.env if d else {})

    def sdk_steps(_w: Path) -> list[Step]:
        return [Step("containers.run", call=sdk)]

    def runtime(binary: str) -> Callable[[Path], list[Step]]:
        def steps(w: Path) -> list[Step]:
            return [Step(f"{binary} run", ["unshare", "-m", "--propagation", "private", "sh",
                                           "-c", WRAP, "wrap", binary, "--root", w / "state",
                                           "run", "--bundle", bundle, _container_id()])]
        return steps

    def podman_steps(_w: Path) -> list[Step]:
        assert p is not None
        keys = ("CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF", "TMPDIR")
        return [Step("podman run", p.argv("run", "--rm", "--network", "none", IMAGE, "true"),
                     env={key: p.env[key] for key in keys})]

    def docker_steps(_w: Path) -> list[Step]:
        assert k is not None
        return [Step("docker run", k.docker("run", "--rm", "--network", "none", IMAGE, "true"),
                     env={"DOCKER_CONFIG": k.env["DOCKER_CONFIG"]})]

    def ctr_steps(w: Path) -> list[Step]:
        assert c is not None
        return [Step("ctr run", c.run_argv(_container_id(), CTR_IMAGE, "true"))]

    py = sys.executable
    return [
        Scenario(CLI, cli_steps, baseline=True, unavailable=peers.why.get(CLI),
                 probe=[venv_bin("isobox"), "run", "--help"],
                 versions={"isobox": [venv_bin("isobox"), "--version"]}),
        Scenario(SDK, sdk_steps, unavailable=peers.why.get(SDK),
                 probe=[py, "-c", "from isobox.client import Client"]),
        Scenario(CRUN, runtime("crun"), requires=["crun", "unshare"],
                 versions={"crun": ["crun", "--version"]}),
        Scenario(RUNC, runtime("runc"), requires=["runc", "unshare"],
                 versions={"runc": ["runc", "--version"]}),
        Scenario(PODMAN, podman_steps, requires=["podman", "conmon", "runc"],
                 unavailable=peers.why.get(PODMAN), versions={"podman": ["podman", "--version"]}),
        Scenario(DOCKER, docker_steps, requires=["dockerd"], unavailable=peers.why.get(DOCKER),
                 versions={"dockerd": ["dockerd", "--version"]}),
        Scenario(CTR, ctr_steps, requires=["containerd", "ctr"],
                 unavailable=peers.why.get(CTR),
                 versions={"containerd": ["containerd", "--version"]}),
    ]




def _cgroups_named(prefix: str) -> list[str]:
    found = []
    for hierarchy in os.listdir("/sys/fs/cgroup"):
        for dirpath, dirs, _files in os.walk(Path("/sys/fs/cgroup", hierarchy)):
            found += [os.path.join(dirpath, x) for x in dirs if x.startswith(prefix)]
    return found


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


class CpuUse:
    """How busy the host's CPUs were while the benchmark ran, and roughly how much of that
    was the benchmark: this process, the commands it ran (waited for) and the engines'
    long-lived processes (the daemons; short-lived shims and monitors escape the count)."""

    def __init__(self, peers: Peers) -> None:
        self.peers = peers
        self.host0 = self._host()
        self.own0 = self._own()
        self.daemons0 = cpu_seconds(self._daemon_pids())

    @staticmethod
    def _host() -> tuple[float, float]:
        """(busy, total) CPU seconds of the whole host since boot, from /proc/stat."""
        line = Path("/proc/stat").read_text().split("\n", 1)[0]
        fields = [int(x) for x in line.split()[1:9]]  # user nice system idle iowait irq...
        tick = os.sysconf("SC_CLK_TCK")
        return (sum(fields) - fields[3] - fields[4]) / tick, sum(fields) / tick

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def _daemon_pids(self) -> list[int]:
        peers = (self.peers.isobox, self.peers.podman, self.peers.containerd, self.peers.dockerd)
        return [pid for p in peers if p is not None for pid in p.pids()]

    def summary(self) -> str:
        busy1, total1 = self._host()
        busy, total = busy1 - self.host0[0], max(1e-9, total1 - self.host0[1])
        daemons1 = cpu_seconds(self._daemon_pids())
        ours = self._own() - self.own0 + sum(
            t - self.daemons0.get(pid, 0.0) for pid, t in daemons1.items())
        return (f"Host load: the CPUs were {busy / total:.0%} busy during the warm-up and "
                f"rounds ({busy:.1f} of {total:.1f} CPU-seconds); at least "
                f"{min(ours, busy) / total:.0%} of the capacity was the benchmark's own (its "
                f"commands, the SDK calls, the engines' daemons; detached shims, conmon and "
                f"monitors are not counted); the rest is other work on this machine.")


# ---- the report ---------------------------------------------------------------------------


def _goal(report: Report, peer: str, goal: float) -> str:
    """One goal line: the CLI's median over a peer's, against the issue's bound."""
    by = {o.name: o for o in report.outcomes}
    cli, other = by[CLI].stats, by[peer].stats
    label = f"Goal CLI/{peer.split(maxsplit=1)[0]} <= {goal:g}"
    if cli is None or other is None:
        missing = by[CLI] if cli is None else by[peer]
        why = f"{missing.status}: {missing.reason[:200]}" if missing.reason else missing.status
        return f"{label}: not computed ({missing.name} {why})"
    ratio = cli.median / other.median
    verdict = "met" if ratio <= goal else "NOT met"
    return f"{label}: {fmt_s(cli.median)} / {fmt_s(other.median)} = {ratio:.2f} -> {verdict}"


NOTES = [
    "isobox CLI: the whole `isobox run --rm --network none busybox true` command: the "
    "Python interpreter's start and the CLI's imports, then 3 HTTP/1.1 round trips to the "
    "warm isoboxd on $ISOBOX_RUN/isoboxd.sock (POST /v1/compute-systems; POST .../start?attach=1 "
    "upgraded to a stream until the exit frame; POST .../wait condition=removed, the daemon "
    "removing it itself for --rm) and the daemon's work: the overlay root, a monitor forked "
    "by its zygote, namespaces, /bin/true, the monitor's and the service's cleanup.",
    "isobox SDK: the same 3 round trips and daemon work from this benchmark's warm Python "
    "process (no interpreter start, no imports; one Client made in the warm-up run).",
    "crun run / runc run: one runtime process (inside the `unshare -m` + sh wrapper that "
    "hides the cgroup2 mount crun refuses, the same for both), no daemon, no image "
    "lookup, no overlay: a prepared bundle on a shared root filesystem, runc's default "
    "namespaces (a new network namespace among them).",
    "podman: the podman binary (no daemon; inside a `unshare -m` wrapper with folders of "
    "the benchmark over /var/lib, /var/tmp, /run) looks up the image, mounts the overlay, "
    "starts conmon, which runs runc create/start; `podman container cleanup` and the --rm "
    "removal before it returns.",
    "docker: the docker client's API round trips to dockerd (create, attach, wait, "
    "start, --rm removal), dockerd -> containerd -> runc v2 shim -> runc, overlay2.",
    "ctr: ctr's gRPC calls to containerd (container with a snapshot, task through the runc "
    "v2 shim, start, wait, delete), a new network namespace and no network.",
]


def run(config: Config) -> Report:
    load_before = _load()
    parent = config.tmpdir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="isobox-bench-compute-", dir=parent))
    leftovers: list[str] = []
    try:
        log(f"{NAME}: preparing busybox in {folder}")
        archive, image_id = seed_archive(folder)
        bundle = bundle_from_archive(archive, folder / "bundle")
        with contextlib.ExitStack() as stack:
            peers = Peers(folder, stack)
            peers.bring_up(archive, image_id)
            stack.callback(lambda: leftovers.extend(peers.leftovers))
            env = peers.isobox.env if peers.isobox else {}
            cpu = CpuUse(peers)
            with environ(env):
                report = measure(
                    NAME, TITLE, scenarios(peers, bundle), config,
                    params={"image": f"{IMAGE} ({image_id}), bootstrapped by isobox, "
                                     "saved as a docker archive and loaded into each engine",
                            "isoboxd's busybox (bootstrapped through the CLI)":
                                peers.image_check,
                            "process": "true (/bin/true of busybox)",
                            "engine start-up, untimed (s)": {
                                k: round(v, 2) for k, v in peers.setup_s.items()}},
                    notes=NOTES,
                    extra_tools={
                        "isobox commit": ["git", "-C", REPO, "describe", "--always", "--dirty"],
                        "docker client": ["/usr/bin/docker", "--version"],
                        "ctr": ["ctr", "--version"]},
                )
            load_note = cpu.summary()
        left_cgroups = _cgroups_named(ID_PREFIX)
        leftovers += [f"cgroup left: {g}" for g in left_cgroups]
    finally:
        stuck = mounts_under(folder)
        if stuck:
            leftovers.append(f"mounts left under {folder}, not removed: {stuck[:5]}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    report.baseline_label = CLI
    report.notes.append(f"{load_note} Load average (1/5/15 min) before: {load_before}, "
                        f"after: {_load()}; {os.cpu_count()} cores.")
    report.notes += [f"LEFTOVER: {x}" for x in leftovers] or [
        "After the rounds every engine was stopped: no process, mount or cgroup of the "
        "benchmark was left."]
    for x in leftovers:
        log(f"{NAME}: LEFTOVER: {x}")
    # Last, so that `python -m bench` (which prints the last note) shows it.
    report.notes.append(f"{_goal(report, CRUN, GOAL_VS_CRUN)}; "
                        f"{_goal(report, DOCKER, GOAL_VS_DOCKER)}")
    return report
