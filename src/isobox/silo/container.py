"""A container's lifecycle, as the OCI runtime spec defines it, on disk under a state root.

::

    (nothing) ──create──▶ creating ──▶ created ──start──▶ running ──(exit)──▶ stopped
                              │                 │  ▲ pause/resume ▼          │
                              └──────────── delete (--force) ◀─── paused ◀───┘

The status is never trusted from the file alone: it is derived from the init's pid (checked
against its start time, so a reused pid is not mistaken for the container), the exec fifo
(present until ``start``) and the freezer. An illegal step raises :class:`IllegalState`.

``<root>/<id>/state.json`` is written atomically (temp file + rename) first thing in
``create`` — before anything is allocated — with the cgroup it will use, so ``delete`` can
release everything even when ``create`` was killed -9 halfway.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from isobox._sys import linux as L
from isobox.errors import Conflict, InvalidArgument, IsoboxError, NotFound
from isobox.jobs.cgroup import (
    DEFAULT_DEVICE_RULES,
    Cgroup,
    cgroup_at,
    describe,
    from_description,
)
from isobox.silo.config import Hook, Process, SiloConfig
from isobox.silo.init import spawn

STATE_VERSION = 1
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")
OCI_VERSION = "1.2.0"


class Status(StrEnum):
    CREATING = "creating"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


class IllegalState(Conflict):
    """A lifecycle step that the container's current status does not allow."""


@dataclass
class State:
    id: str
    bundle: str
    pid: int = 0
    pid_start: int = 0
    created: str = ""
    annotations: dict[str, str] = field(default_factory=dict)
    cgroup: dict[str, Any] = field(default_factory=dict)
    hooks: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # The container's process as converted at create: exec's defaults, without parsing
    # config.json again (pydantic's models cost ~200 ms to load).
    process: dict[str, Any] = field(default_factory=dict)
    started: bool = False
    version: int = STATE_VERSION


def check_id(container_id: str) -> str:
    if not _ID_RE.match(container_id):
        raise InvalidArgument(f"invalid container id {container_id!r}")
    return container_id


def _start_time(pid: int) -> int:
    """Field 22 of /proc/<pid>/stat: when the process started (ticks since boot)."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(data[data.rindex(")") + 2 :].split()[19])


def _alive(pid: int, start: int) -> bool:
    if pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat[stat.rindex(")") + 2]
    return state not in ("Z", "X") and _start_time(pid) == start


def parse_signal(text: str) -> int:
    t = text.upper()
    if t.isdigit():
        return int(t)
    name = t if t.startswith("SIG") else "SIG" + t
    try:
        return int(signal.Signals[name])
    except KeyError as exc:
        raise InvalidArgument(f"unknown signal {text!r}") from exc


class Container:
    def __init__(self, root: Path, state: State) -> None:
        self.root = root
        self.state = state
        self.dir = root / state.id

    # ---- persistence ---------------------------------------------------------------------

    @property
    def fifo(self) -> Path:
        return self.dir / "exec.fifo"

    def save(self) -> None:
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps(asdict(self.state)))
        os.replace(tmp, self.dir / "state.json")

    @classmethod
    def load(cls, root: Path, container_id: str) -> Container:
        check_id(container_id)
        path = root / container_id / "state.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise NotFound(f"container {container_id} does not exist") from exc
        except ValueError as exc:
            raise IsoboxError(f"container {container_id}: state file is damaged") from exc
        if data.get("version") != STATE_VERSION:
            raise IsoboxError(f"container {container_id}: state version {data.get('version')}")
        return cls(root, State(**data))

    @classmethod
    def all(cls, root: Path) -> list[Container]:
        out = []
        with contextlib.suppress(FileNotFoundError):
            for name in sorted(os.listdir(root)):
                with contextlib.suppress(IsoboxError):
                    out.append(cls.load(root, name))
        return out

    def base_process(self) -> Process:
        """The container's own process settings (exec starts from them)."""
        d = dict(self.state.process)
        d["rlimits"] = [tuple(r) for r in d.get("rlimits", [])]
        return Process(**d)

    @property
    def cgroup(self) -> Cgroup:
        return from_description(self.state.cgroup)

    # ---- status --------------------------------------------------------------------------

    def status(self) -> Status:
        s = self.state
        if s.pid == 0:
            return Status.CREATING
        if not _alive(s.pid, s.pid_start):
            return Status.STOPPED
        if self.fifo.exists() and not s.started:
            return Status.CREATED
        with contextlib.suppress(Exception):
            cg = self.cgroup
            frozen = _is_frozen(cg)
            if frozen:
                return Status.PAUSED
        return Status.RUNNING

    def oci_state(self) -> dict[str, Any]:
        status = self.status()
        return {
            "ociVersion": OCI_VERSION,
            "id": self.state.id,
            "status": str(status),
            "pid": self.state.pid if status not in (Status.STOPPED, Status.CREATING) else 0,
            "bundle": self.state.bundle,
            "annotations": self.state.annotations,
        }

    # ---- lifecycle -----------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        root: Path,
        container_id: str,
        bundle: Path,
        cfg: SiloConfig,
        *,
        console_socket: str | None = None,
        preserve_fds: int = 0,
        pid_file: Path | None = None,
    ) -> Container:
        check_id(container_id)
        root.mkdir(parents=True, exist_ok=True, mode=0o711)
        cdir = root / container_id
        try:
            cdir.mkdir(mode=0o711)
        except FileExistsError as exc:
            raise Conflict(f"container {container_id} exists already") from exc
        cg = cgroup_at(cfg.cgroups_path, container_id)
        state = State(
            id=container_id, bundle=str(bundle.absolute()),
            created=datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
            annotations=cfg.annotations, cgroup=describe(cg),
            hooks={k: [asdict(h) for h in v] for k, v in cfg.hooks.items()},
            process=asdict(cfg.process),
        )
        c = cls(root, state)
        c.save()  # first: whatever follows can be released by delete, even after a crash
        console = None
        try:
            if cg.exists() and cg.pids():
                raise Conflict(f"cgroup {cg.rel} is in use by other processes")
            cg.create()
            cg.set_limits(cfg.limits, os.cpu_count() or 1)
            if not cg.set_devices(cfg.device_rules or list(DEFAULT_DEVICE_RULES)):
                # Device rules not enforceable here (cgroup v2 without an eBPF program):
                # the container may not make device nodes at all.
                mknod = ~(1 << L.CAP_NUMBER["CAP_MKNOD"])
                p = cfg.process
                p.bounding, p.effective, p.permitted = (
                    p.bounding & mknod, p.effective & mknod, p.permitted & mknod)
                p.inheritable, p.ambient = p.inheritable & mknod, p.ambient & mknod
            os.mkfifo(c.fifo, 0o600)
            if cfg.new_namespace("user"):
                # The init is root of its user namespace, i.e. the mapped host ids: the
                # fifo must be theirs for it to open (as runc does).
                os.chown(c.fifo, _host_id(cfg.uid_map, 0), _host_id(cfg.gid_map, 0))
            if console_socket:
                import socket

                console = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                console.connect(console_socket)
            # If we die mid-create, the sync socket closes and stage 1 and the init exit;
            # what they left is in the cgroup recorded above, which delete releases.
            pid = spawn(cfg, join_cgroup=cg.add, exec_fifo=str(c.fifo),
                        console_socket=console, preserve_fds=preserve_fds)
            state.pid, state.pid_start = pid, _start_time(pid)
            c.save()
            c._run_hooks("prestart")
            c._run_hooks("create_runtime")
            c._run_hooks("create_container")
            if pid_file is not None:
                _atomic_write(pid_file, str(pid))
        except BaseException:
            with contextlib.suppress(Exception):
                c._destroy()
            raise
        finally:
            if console is not None:
                console.close()
        return c

    def start(self) -> None:
        status = self.status()
        if status != Status.CREATED:
            raise IllegalState(f"container {self.state.id} is {status}, not created")
        self._run_hooks("start_container")
        fd = os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            ready, _, _ = select.select([fd], [], [], 10.0)
            if not ready or not os.read(fd, 1):
                raise IsoboxError(f"container {self.state.id}: init did not start")
        finally:
            os.close(fd)
        self.fifo.unlink(missing_ok=True)
        self.state.started = True
        self.save()
        self._run_hooks("poststart", fatal=False)

    def kill(self, sig: int, *, all_processes: bool = False) -> None:
        status = self.status()
        if status in (Status.STOPPED, Status.CREATING):
            raise IllegalState(f"container {self.state.id} is {status}: nothing to signal")
        if all_processes:
            for pid in self.cgroup.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        else:
            os.kill(self.state.pid, sig)

    def delete(self, *, force: bool = False) -> None:
        status = self.status()
        if status in (Status.RUNNING, Status.PAUSED) and not force:
            raise IllegalState(
                f"container {self.state.id} is {status}: stop it first or use --force"
            )
        self._destroy()
        self._run_hooks("poststop", fatal=False)
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.dir):
                os.unlink(self.dir / name)
            os.rmdir(self.dir)

    def _destroy(self) -> None:
        """Kill what is left, release the cgroup. Idempotent."""
        cg = self.cgroup
        if cg.exists():
            with contextlib.suppress(Exception):
                cg.thaw()
            cg.kill_all()
            cg.remove()
        with contextlib.suppress(Exception):
            cg.remove_parents()  # the engine's isobox/ parent, when no container is left
        self.fifo.unlink(missing_ok=True)

    def pause(self) -> None:
        if self.status() != Status.RUNNING:
            raise IllegalState(f"container {self.state.id} is {self.status()}, not running")
        self.cgroup.freeze()

    def resume(self) -> None:
        if self.status() != Status.PAUSED:
            raise IllegalState(f"container {self.state.id} is {self.status()}, not paused")
        self.cgroup.thaw()

    def pids(self) -> list[int]:
        return self.cgroup.pids() if self.cgroup.exists() else []

    # ---- hooks ---------------------------------------------------------------------------

    def _run_hooks(self, kind: str, *, fatal: bool = True) -> None:
        for raw in self.state.hooks.get(kind, []):
            hook = Hook(**raw)
            inside = kind in ("create_container", "start_container")
            try:
                run_hook(hook, json.dumps(self.oci_state()).encode(),
                         ns_pid=self.state.pid if inside else None)
            except IsoboxError:
                if fatal:
                    raise


def run_hook(hook: Hook, state: bytes, *, ns_pid: int | None) -> None:
    """Run one OCI hook with the state on stdin; inside the container's mount namespace
    when ``ns_pid`` is given (createContainer, startContainer)."""
    preexec = None
    if ns_pid is not None:
        mnt = os.open(f"/proc/{ns_pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)

        def preexec() -> None:  # runs in the forked child only; single syscall
            L.setns(mnt, L.CLONE_NEWNS, "hook mount namespace")
    try:
        proc = subprocess.run(
            # args[0] is the hook's argv[0], as the spec says (dockerd's own binary is its
            # prestart hook and finds its job, "libnetwork-setkey", in argv[0]).
            hook.args or [hook.path], executable=hook.path, input=state,
            env=dict(e.split("=", 1) for e in hook.env if "=" in e),
            capture_output=True, timeout=hook.timeout, check=False,
            preexec_fn=preexec,
        )
    except subprocess.TimeoutExpired as exc:
        raise IsoboxError(f"hook {hook.path} timed out after {hook.timeout}s") from exc
    except OSError as exc:
        raise IsoboxError(f"hook {hook.path}: {exc}") from exc
    finally:
        if ns_pid is not None:
            os.close(mnt)
    if proc.returncode != 0:
        raise IsoboxError(
            f"hook {hook.path} exited {proc.returncode}: {proc.stderr.decode(errors='replace')}"
        )


def _is_frozen(cg: Cgroup) -> bool:
    for d in cg.dirs():
        state = Path(d, "freezer.state")
        if state.exists():
            return state.read_text().strip() == "FROZEN"
        events = Path(d, "cgroup.events")
        if events.exists():
            return "frozen 1" in events.read_text()
    return False


def _host_id(mapping: list[tuple[int, int, int]], inside: int) -> int:
    for container_id, host_id, size in mapping:
        if container_id <= inside < container_id + size:
            return host_id + inside - container_id
    return inside


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
