"""Bring up the engines a benchmark compares against, each with all its state in a folder.

Every engine here is started for one benchmark run and stopped after it; nothing of it may
outlive the run. So each one keeps its state, sockets and temporary files under a folder
the benchmark made (see /work/shared/notes/peers.md and the engine tests,
tests/test_interop_engines.py and tests/test_runtime_engines.py, for why each quirk is
there):

* `IsoboxDaemon`: ``isoboxd`` with ``ISOBOX_ROOT``/``ISOBOX_RUN`` in the folder; answered
  ``GET /v1/_ping`` on its socket before it counts as started.
* `Podman`: no daemon; its own storage.conf/containers.conf (runc, cgroupfs, file events,
  the open-files limit this host allows) and every command in a private mount namespace
  with folders of ours over ``/var/lib``, ``/var/tmp`` and ``/run``, which podman writes to
  whatever its config says.
* `Containerd`: ``containerd --config`` with root, state, sockets and ``opt`` in the folder,
  in a private mount namespace over ``/run`` and ``/opt`` (its shims use
  ``/run/containerd`` whatever the config says); ``ctr`` runs on the host with
  ``--fifo-dir`` in the folder.
* `Dockerd`: ``dockerd --config-file`` with data-root, exec-root, pidfile and socket in the
  folder, no iptables/bridge/forwarding, in a private mount namespace over ``/run`` and
  ``/opt``; the client is Debian's ``/usr/bin/docker`` with ``DOCKER_CONFIG`` in the folder.

Each ``stop()`` ends the engine (SIGTERM, then SIGKILL), then looks for what is left: a
process whose command line (or, for isobox, environment) names the folder, a mount under
it. What it finds it kills and returns as text, so the benchmark reports it; a clean stop
returns nothing. Failures to start raise `PeerError` with the engine's last log lines.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import textwrap
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def venv_bin(name: str) -> Path:
    """A console script of the running interpreter's venv (``isobox``, ``isoboxd``, ...)."""
    import sys

    return Path(sys.executable).parent / name


@contextlib.contextmanager
def environ(extra: Mapping[str, str]) -> Iterator[None]:
    """``extra`` in this process's environment (for an in-process SDK client), restored
    after."""
    saved = {key: os.environ.get(key) for key in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


DOCKER_CLI = "/usr/bin/docker"  # another docker client may come first in PATH
CMD_TIMEOUT = 120.0
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0


class PeerError(Exception):
    """An engine could not be brought up (the benchmark reports it "not available")."""


# ---- helpers ------------------------------------------------------------------------------


def run(argv: Sequence[str | Path], *, env: Mapping[str, str] | None = None,
        timeout: float = CMD_TIMEOUT) -> str:
    """Run a setup command; its stdout, or `PeerError` with its stderr."""
    args = [str(a) for a in argv]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PeerError(f"`{' '.join(args)}`: {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip())[-400:]
        raise PeerError(f"`{' '.join(args)}` exited {proc.returncode}: {tail}")
    return proc.stdout


def private_mounts(binds: Mapping[str, Path], argv: Sequence[str | Path]) -> list[str]:
    """``argv`` in a new mount namespace (private propagation) where each host folder named
    in ``binds`` is covered by a folder of ours: nothing the command writes there reaches the
    host, and every mount it makes disappears with the namespace."""
    script = ('while [ "$1" != -- ]; do mount --bind "$1" "$2" || exit 125; shift 2; done; '
              'shift; exec "$@"')
    pairs: list[str] = []
    for target, source in binds.items():
        source.mkdir(parents=True, exist_ok=True)
        pairs += [str(source), target]
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *pairs,
            "--", *[str(a) for a in argv]]


def mounts_under(root: Path) -> list[str]:
    prefix = str(root).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as fh:
        points = [line.split()[4] for line in fh]
    return [p for p in points if p == str(root) or p.startswith(prefix)]


def processes_mentioning(text: str, *, environ: bool = False) -> list[int]:
    """Processes (not this one) whose command line, or environment, holds ``text``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/{'environ' if environ else 'cmdline'}", "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        if text.encode() in data:
            pids.append(int(entry))
    return pids


def cpu_seconds(pids: Sequence[int]) -> dict[int, float]:
    """User + system CPU seconds each process has used so far (gone ones left out)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)"; utime is field 14
        out[pid] = (int(fields[11]) + int(fields[12])) / tick
    return out


def log_tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _end(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _kill_leftovers(what: str, pids: list[int], root: Path) -> list[str]:
    """Kill processes found left (they are ours: they name our folder) and describe them,
    with any mount left under ``root``."""
    found = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            cmd = "?"
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        found.append(f"{what} left process {pid} ({cmd.strip()[:120]}), killed")
    found += [f"{what} left mount {m}" for m in mounts_under(root)]
    return found


def _wait_ready(proc: subprocess.Popen[bytes], ready: Any, what: str, log: Path) -> float:
    """Poll ``ready()`` until it is true; the seconds it took."""
    started = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            raise PeerError(f"{what} exited {proc.returncode} while starting: {log_tail(log)}")
        if time.monotonic() - started > START_TIMEOUT:
            _end(proc)
            raise PeerError(f"{what} not answering after {START_TIMEOUT:.0f} s: "
                            f"{log_tail(log)}")
        time.sleep(0.05)
    return time.monotonic() - started


def _answers(argv: Sequence[str | Path], env: Mapping[str, str] | None = None) -> bool:
    try:
        run(argv, env=env, timeout=10)
    except PeerError:
        return False
    return True


# ---- isoboxd ------------------------------------------------------------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def ping(sock: Path) -> bool:
    """``GET /v1/_ping`` on the daemon's socket answered 200."""
    if not sock.exists():
        return False
    conn = _UnixHTTPConnection(sock)
    try:
        conn.request("GET", "/v1/_ping")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


@dataclass
class IsoboxDaemon:
    """A warm ``isoboxd`` whose store and sockets live in ``folder``."""

    folder: Path
    daemon: Path  # the isoboxd executable
    cli: Path  # the isobox executable
    proc: subprocess.Popen[bytes] | None = None
    ready_s: float = 0.0

    @property
    def root(self) -> Path:
        return self.folder / "root"

    @property
    def run_dir(self) -> Path:
        return self.folder / "run"

    @property
    def sock(self) -> Path:
        return self.run_dir / "isoboxd.sock"

    @property
    def log(self) -> Path:
        return self.folder / "isoboxd.log"

    @property
    def env(self) -> dict[str, str]:
        """What the CLI and the SDK need to find this daemon (added to the environment)."""
        return {"ISOBOX_ROOT": str(self.root), "ISOBOX_RUN": str(self.run_dir)}

    def start(self) -> None:
        for d in (self.root, self.run_dir):
            d.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as logfh:
            self.proc = subprocess.Popen([str(self.daemon)], env={**os.environ, **self.env},
                                         stdin=subprocess.DEVNULL, stdout=logfh,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.ready_s = _wait_ready(self.proc, lambda: ping(self.sock), "isoboxd", self.log)

    def isobox(self, *args: str) -> str:
        """The CLI against this daemon."""
        return run([self.cli, *args], env={**os.environ, **self.env})

    def pids(self) -> list[int]:
        """The daemon, its zygote and the monitors alive now."""
        return processes_mentioning(f"ISOBOX_RUN={self.run_dir}", environ=True)

    def stop(self) -> list[str]:
        if self.proc is not None:
            _end(self.proc)
        # Monitors outlive the daemon by design; a leftover one still has our ISOBOX_RUN in
        # the environment it inherited.
        left = processes_mentioning(f"ISOBOX_RUN={self.run_dir}", environ=True)
        return _kill_leftovers("isoboxd", left, self.folder)


# ---- podman -------------------------------------------------------------------------------


@dataclass
class Podman:
    """Podman 4.3 (runc, cgroupfs) with its storage and configuration in ``folder``."""

    folder: Path
    env: dict[str, str] = field(default_factory=dict)

    def argv(self, *args: str) -> list[str]:
        f = self.folder
        return private_mounts({"/var/lib": f / "var-lib", "/var/tmp": f / "var-tmp",
                               "/run": f / "host-run"}, ["podman", *args])

    def start(self, archive: Path) -> None:
        f = self.folder
        (f / "tmpdir").mkdir(parents=True, exist_ok=True)
        (f / "storage.conf").write_text(textwrap.dedent(f"""\
            [storage]
            driver = "overlay"
            graphroot = "{f}/graph"
            runroot = "{f}/run"
            """))
        (f / "containers.conf").write_text(textwrap.dedent(f"""\
            [containers]
            default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

            [engine]
            cgroup_manager = "cgroupfs"
            events_logger = "file"
            events_logfile_path = "{f}/events.log"
            lock_type = "file"
            runtime = "runc"
            tmp_dir = "{f}/tmp"
            image_copy_tmp_dir = "{f}/tmpdir"
            static_dir = "{f}/graph/libpod"
            volume_path = "{f}/graph/volumes"

            [network]
            network_config_dir = "{f}/networks"
            """))
        self.env = {**os.environ, "CONTAINERS_CONF": str(f / "containers.conf"),
                    "CONTAINERS_STORAGE_CONF": str(f / "storage.conf"),
                    "TMPDIR": str(f / "tmpdir")}
        run(self.argv("load", "-i", str(archive)), env=self.env)

    def pids(self) -> list[int]:
        return processes_mentioning(f"{self.folder}/")

    def stop(self) -> list[str]:
        if self.env:
            with contextlib.suppress(PeerError):
                run(self.argv("rm", "--all", "--force", "--time", "0"), env=self.env)
        return _kill_leftovers("podman", processes_mentioning(f"{self.folder}/"), self.folder)


# ---- containerd ---------------------------------------------------------------------------


@dataclass
class Containerd:
    """containerd 1.6 (CRI off) with root, state and sockets in ``folder``."""

    folder: Path
    proc: subprocess.Popen[bytes] | None = None
    ready_s: float = 0.0

    @property
    def sock(self) -> Path:
        return self.folder / "containerd.sock"

    @property
    def log(self) -> Path:
        return self.folder / "containerd.log"

    def ctr(self, *args: str | Path) -> list[str]:
        return ["ctr", "-a", str(self.sock), *[str(a) for a in args]]

    def run_argv(self, cid: str, image: str, *cmd: str) -> list[str]:
        """``ctr run --rm`` with runc (containerd's default runtime, runc v2 shim)."""
        return self.ctr("run", "--rm", "--fifo-dir", self.folder / "fifo", image, cid, *cmd)

    def start(self, archive: Path) -> None:
        f = self.folder
        f.mkdir(parents=True, exist_ok=True)
        (f / "config.toml").write_text(textwrap.dedent(f"""\
            version = 2
            root = "{f}/root"
            state = "{f}/state"
            disabled_plugins = ["io.containerd.grpc.v1.cri"]
            [grpc]
              address = "{self.sock}"
            [ttrpc]
              address = "{self.sock}.ttrpc"
            [debug]
              address = "{f}/debug.sock"
            [plugins."io.containerd.internal.v1.opt"]
              path = "{f}/opt"
            """))
        argv = private_mounts({"/run": f / "host-run", "/opt": f / "host-opt"},
                              ["containerd", "--config", f / "config.toml"])
        with open(self.log, "wb") as logfh:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logfh,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.ready_s = _wait_ready(
            self.proc, lambda: self.sock.exists() and _answers(self.ctr("version")),
            "containerd", self.log)
        run(self.ctr("images", "import", archive))

    def pids(self) -> list[int]:
        """The daemon and the shims alive now."""
        return processes_mentioning(f"{self.folder}/")

    def stop(self) -> list[str]:
        if self.proc is not None and self.proc.poll() is None:
            try:  # a failed run may have left a container
                cids = run(self.ctr("containers", "list", "-q")).split()
            except PeerError:
                cids = []
            for cid in cids:
                for args in (("tasks", "kill", "-s", "KILL", cid),
                             ("tasks", "delete", "--force", cid), ("containers", "delete", cid)):
                    with contextlib.suppress(PeerError):
                        run(self.ctr(*args))
        if self.proc is not None:
            _end(self.proc)
        return _kill_leftovers("containerd", processes_mentioning(f"{self.folder}/"),
                               self.folder)


# ---- dockerd ------------------------------------------------------------------------------


@dataclass
class Dockerd:
    """dockerd 20.10 (overlay2, runc) with all its state in ``folder``, host network untouched."""

    folder: Path
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    ready_s: float = 0.0

    @property
    def sock(self) -> Path:
        return self.folder / "docker.sock"

    @property
    def log(self) -> Path:
        return self.folder / "dockerd.log"

    def docker(self, *args: str | Path) -> list[str]:
        return [DOCKER_CLI, "-H", f"unix://{self.sock}", *[str(a) for a in args]]

    def start(self, archive: Path) -> None:
        f = self.folder
        f.mkdir(parents=True, exist_ok=True)
        if not Path(DOCKER_CLI).is_file():
            raise PeerError(f"{DOCKER_CLI} (Debian's docker.io client) is not installed")
        config = {
            "data-root": str(f / "data"), "exec-root": str(f / "exec"),
            "pidfile": str(f / "docker.pid"), "hosts": [f"unix://{self.sock}"],
            "storage-driver": "overlay2", "deprecated-key-path": str(f / "key.json"),
            "iptables": False, "ip6tables": False, "ip-forward": False, "ip-masq": False,
            "bridge": "none",
        }
        (f / "daemon.json").write_text(json.dumps(config, indent=2))
        self.env = {**os.environ, "DOCKER_CONFIG": str(f / "client")}
        argv = private_mounts({"/run": f / "host-run", "/opt": f / "host-opt"},
                              ["dockerd", "--config-file", f / "daemon.json"])
        with open(self.log, "wb") as logfh:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logfh,
                                         stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        self.ready_s = _wait_ready(
            self.proc, lambda: self.sock.exists() and _answers(self.docker("version"), self.env),
            "dockerd", self.log)
        run(self.docker("load", "-i", archive), env=self.env)

    def pids(self) -> list[int]:
        """dockerd, the containerd it supervises and the shims alive now."""
        return processes_mentioning(f"{self.folder}/")

    def stop(self) -> list[str]:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(PeerError):
                ids = run(self.docker("ps", "-aq"), env=self.env).split()
                if ids:
                    run(self.docker("rm", "--force", *ids), env=self.env)
        if self.proc is not None:
            _end(self.proc)
        # The containerd dockerd supervises runs in a session of its own and may outlive a
        # killed dockerd: end it by its pid, only if it is ours.
        with contextlib.suppress(OSError, ValueError):
            pid = int((self.folder / "exec" / "containerd" / "containerd.pid").read_text())
            if pid in processes_mentioning(str(self.folder)):
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and pid in processes_mentioning(
                        str(self.folder)):
                    time.sleep(0.05)
        return _kill_leftovers("dockerd", processes_mentioning(f"{self.folder}/"), self.folder)
