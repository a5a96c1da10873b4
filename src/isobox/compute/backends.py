"""What a monitor drives: a container's first process and its execs, per isolation.

:class:`ProcessBackend` makes a silo (``isobox.silo``): ``Container.create`` brings the init
up to the exec fifo, ``start`` lets it exec the program; execs join it with ``exec_in``.
:class:`HostBackend` makes a Job (``isobox.jobs``) at create and spawns the program in the
host's namespaces at start, inside the job from its first instruction.

Both hand the process the descriptors the monitor gives them (:class:`ChildIO`): the silo
init and ``exec_in``'s intermediate take stdio from their caller, so the monitor's own 0/1/2
are pointed at them for the call (:func:`_as_stdio`; the monitor is single-threaded, so
nothing else writes there meanwhile). With a terminal the pty's master is returned: the silo
makes its pty in the container's devpts and sends the master over a console socket; a host
process gets one of the host's ptys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from isobox.compute.plan import Identity, Plan, _layer_file, merge_env, resolve_user
from isobox.errors import Conflict, InvalidArgument, NotFound
from isobox.paths import socket_name
from isobox.silo.init import receive_console

if TYPE_CHECKING:
    import subprocess

    from isobox.jobs.cgroup import Cgroup
    from isobox.jobs.job import Job
    from isobox.silo.container import Container


@dataclass
class ChildIO:
    """The child's ends of its stdio (None: /dev/null); ignored with ``tty``."""

    stdin: int | None = None
    stdout: int | None = None
    stderr: int | None = None
    tty: bool = False


class Backend(Protocol):
    pid: int

    def create(self, io: ChildIO) -> int | None: ...  # the pty master with a tty
    def start(self) -> int: ...
    def signal(self, sig: int, all_processes: bool) -> None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def cgroup(self) -> Cgroup: ...
    def pids(self) -> list[int]: ...
    def exec(self, spec: dict[str, Any], io: ChildIO) -> tuple[int, int | None]: ...
    def total_processes(self) -> int | None: ...
    def reaped(self, pid: int, status: int) -> None: ...
    def release(self) -> None: ...


def make_backend(plan: Plan) -> Backend:
    if plan.isolation == "process":
        return ProcessBackend(plan)
    if plan.isolation == "host":
        return HostBackend(plan)
    if plan.isolation == "vm":
        from isobox.compute.vm_backend import VmBackend

        return VmBackend(plan)
    raise InvalidArgument(f"the monitor cannot run isolation {plan.isolation!r}")




def _as_stdio(io: ChildIO) -> contextlib.AbstractContextManager[None]:
    """Point this process's 0/1/2 at ``io`` for the duration (restored after)."""
    from isobox.silo.init import stdio_as

    return stdio_as((io.stdin, io.stdout, io.stderr))


def _check_dir(root: str, cwd: str) -> None:
    """The working directory must be a directory inside ``root``; a missing one is made
    (as runc and docker do), never through a symlink that leaves the root."""
    real_root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(real_root, cwd.lstrip("/")))
    if path != real_root and not path.startswith(real_root + "/"):
        raise InvalidArgument(f"working directory {cwd!r} leaves the container's root")
    if os.path.isdir(path):
        return
    if os.path.lexists(path):
        raise InvalidArgument(f"working directory {cwd!r} is not a directory")
    try:
        os.makedirs(path, mode=0o755)
    except OSError as exc:
        raise InvalidArgument(f"working directory {cwd!r} cannot be made: "
                              f"{exc.strerror}") from exc


# ---- process isolation ---------------------------------------------------------------------


class ProcessBackend:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.state_root = Path(plan.run_dir) / "silo"
        self.container: Container | None = None
        self.pid = 0

    def create(self, io: ChildIO) -> int | None:
        from isobox.silo.config import from_oci
        from isobox.silo.container import Container
        from isobox.spec.runtime import parse_config

        plan = self.plan
        cfg = from_oci(parse_config(json.dumps(plan.oci), "plan.oci"),
                       Path(plan.container_dir))
        _check_dir(cfg.root, cfg.process.cwd)
        with contextlib.suppress(NotFound):  # a monitor killed -9 left its silo's state
            Container.load(self.state_root, plan.id).delete(force=True)
        listener: socket.socket | None = None
        console = Path(plan.run_dir) / "console.sock"
        try:
            with socket_name(console) as console_name:
                if io.tty:
                    console.unlink(missing_ok=True)
                    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    listener.bind(console_name)
                    listener.listen(1)
                with _as_stdio(io):
                    self.container = Container.create(
                        self.state_root, plan.id, Path(plan.container_dir), cfg,
                        console_socket=console_name if io.tty else None)
            self.pid = self.container.state.pid
            if listener is None:
                return None
            # The init connected and sent the master during create: it is queued here.
            return receive_console(listener)
        finally:
            if listener is not None:
                listener.close()
                console.unlink(missing_ok=True)

    def _c(self) -> Container:
        if self.container is None:
            raise Conflict(f"container {self.plan.id} is not created")
        return self.container

    def start(self) -> int:
        self._c().start()
        return self.pid

    def signal(self, sig: int, all_processes: bool) -> None:
        self._c().kill(sig, all_processes=all_processes)

    def pause(self) -> None:
        self._c().pause()

    def resume(self) -> None:
        self._c().resume()

    def cgroup(self) -> Cgroup:
        return self._c().cgroup

    def pids(self) -> list[int]:
        return self._c().pids()

    def total_processes(self) -> int | None:
        return None

    def reaped(self, pid: int, status: int) -> None:
        return None

    def exec(self, spec: dict[str, Any], io: ChildIO) -> tuple[int, int | None]:
        from isobox.silo.execin import exec_in

        c = self._c()
        base = c.base_process()
        proc = dataclasses.replace(
            base, args=list(spec["args"]), env=merge_env(base.env, list(spec.get("env") or [])),
            cwd=spec.get("cwd") or base.cwd, terminal=bool(spec.get("tty")))
        if spec.get("user"):
            layers = [Path(self.plan.rootfs)]
            ident = resolve_user(spec["user"], _layer_file(layers, "etc/passwd"),
                                 _layer_file(layers, "etc/group"))
            proc = dataclasses.replace(proc, uid=ident.uid, gid=ident.gid,
                                       additional_gids=ident.additional_gids)
        ours: socket.socket | None = None
        theirs: socket.socket | None = None
        if proc.terminal:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _as_stdio(io):
                pid = exec_in(c.state.pid, c.cgroup, proc, detach=True,
                              console_socket=theirs, user_ns=c.state.user_ns)
            if ours is None:
                return pid, None
            assert theirs is not None
            theirs.close()
            ours.settimeout(10)
            _, fds, _, _ = socket.recv_fds(ours, 64, 1)
            if not fds:
                raise Conflict("exec: the container sent no terminal")
            os.set_blocking(fds[0], False)
            return pid, fds[0]
        finally:
            for s in (ours, theirs):
                if s is not None:
                    s.close()

    def release(self) -> None:
        if self.container is not None:
            self.container.delete(force=True)
            self.container = None


# ---- host isolation ------------------------------------------------------------------------

# A session of its own with the pty as controlling terminal, then the program (Popen cannot
# make a controlling terminal without a preexec hook, which is unsafe with the job's thread).
_CTTY = ("import os,sys,fcntl,termios\n"
         "os.setsid(); fcntl.ioctl(0, termios.TIOCSCTTY, 0)\n"
         "os.execvp(sys.argv[1], sys.argv[1:])\n")


# A program that cannot be run still makes a run, as in process isolation: this stands in
# for it, says why on its stderr and exits 126 (not executable) or 127 (not found).
_CANNOT_RUN = "import sys; sys.stderr.write(sys.argv[1] + '\\n'); sys.exit(int(sys.argv[2]))"


def _exec_problem(argv0: str, env: list[str], cwd: str) -> tuple[int, str] | None:
    """Why ``argv0`` cannot be executed, with docker's exit code for it; None if it can."""
    if "/" in argv0:
        path = argv0 if argv0.startswith("/") else os.path.join(cwd, argv0)
        if not os.path.exists(path):
            return 127, f"executable {argv0!r} not found"
        if os.path.isdir(path) or not os.access(path, os.X_OK):
            return 126, f"{argv0!r} cannot be executed: permission denied"
        return None
    search = next((e[5:] for e in env if e.startswith("PATH=")), os.defpath)
    if shutil.which(argv0, path=search) is None:
        return 127, f"executable {argv0!r} not found in the image's or the host's PATH"
    return None


def _which(argv0: str, env: list[str], cwd: str) -> None:
    problem = _exec_problem(argv0, env, cwd)
    if problem is not None:
        raise NotFound(problem[1])


def _remount_read_only(target: str) -> None:
    """Make the mount at ``target`` read-only, keeping its nosuid/nodev/noexec."""
    from isobox._sys import linux as L

    keep = os.statvfs(target).f_flag & (L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC)
    L.mount(None, target, None, L.MS_REMOUNT | L.MS_BIND | L.MS_RDONLY | keep)


class HostBackend:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.job: Job | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        # Every Popen is kept until the monitor reaps its process: a Popen that is dropped
        # polls (waitpid) in __del__ and would take the exit status from the monitor.
        self._popens: dict[int, subprocess.Popen[bytes]] = {}
        self.io = ChildIO()
        self._slave = -1
        self.pid = 0
        self._binds: list[str] = []  # mount points of the mapped folders, in order made

    def _j(self) -> Job:
        if self.job is None:
            raise Conflict(f"container {self.plan.id} is not created")
        return self.job

    def create(self, io: ChildIO) -> int | None:
        from isobox.jobs.job import Job
        from isobox.jobs.limits import Limits

        h = self.plan.host
        _check_dir(self.plan.rootfs, h["cwd"][len(self.plan.rootfs):] or "/")
        self._mount()
        self.job = Job(self.plan.id, limits=Limits(**self.plan.limits), kill_on_close=True)
        self.io = io
        if not io.tty:
            return None
        master, self._slave = os.openpty()
        os.set_blocking(master, False)
        return master

    def _mount(self) -> None:
        """The document's mapped folders bound below the sandbox mount point (each
        destination resolved inside the root: an image's symlink cannot send a bind to a
        host path), read-only when asked; then the root itself read-only with ``readOnly``.
        The binds are undone by :meth:`release`; the root's flag goes with its mount."""
        from isobox._sys import linux as L
        from isobox.silo.rootfs import secure_join

        root = os.path.realpath(self.plan.rootfs)
        for m in self.plan.host.get("mounts") or []:
            src, dest = str(m["source"]), str(m["destination"])
            if not os.path.exists(src):
                raise NotFound(f"mount source {src!r} does not exist")
            target = secure_join(root, dest)
            try:
                if not os.path.lexists(target):
                    if os.path.isdir(src):
                        os.makedirs(target, mode=0o755)
                    else:
                        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
                        with open(target, "a"):
                            pass
            except OSError as exc:
                raise InvalidArgument(f"mount destination {dest!r} cannot be made: "
                                      f"{exc.strerror}") from exc
            if os.path.realpath(target) != target:
                raise InvalidArgument(f"mount destination {dest!r} leaves the container's "
                                      f"root")
            L.mount(src, target, None, L.MS_BIND | L.MS_REC)
            self._binds.append(target)
            L.mount(None, target, None, L.MS_PRIVATE | L.MS_REC)
            if m.get("readOnly"):
                _remount_read_only(target)
        if self.plan.host.get("readOnly"):
            _remount_read_only(root)

    def _unmount(self) -> None:
        from isobox._sys import linux as L
        from isobox.errors import SystemError_

        while self._binds:
            target = self._binds.pop()
            try:
                L.umount2(target, L.MNT_DETACH)
            except SystemError_ as exc:
                if exc.errno not in (22, 2):  # EINVAL: not mounted; ENOENT: no such path
                    raise

    def _spawn(self, argv: list[str], env: list[str], cwd: str, ident: Identity, *,
               io: ChildIO, slave: int) -> subprocess.Popen[bytes]:
        import subprocess

        if io.tty:
            argv = [sys.executable, "-I", "-S", "-c", _CTTY, *argv]
            fds: list[int | None] = [slave, slave, slave]
        else:
            fds = [io.stdin, io.stdout, io.stderr]
        std = [subprocess.DEVNULL if fd is None else fd for fd in fds]
        proc = self._j().spawn(
            argv, stdin=std[0], stdout=std[1], stderr=std[2],
            env=dict(e.split("=", 1) for e in env), cwd=cwd, user=ident.uid,
            group=ident.gid, extra_groups=ident.additional_gids,
            start_new_session=not io.tty, close_fds=True)
        self._popens[proc.pid] = proc
        return proc

    def _identity(self) -> Identity:
        h = self.plan.host
        return Identity(int(h["uid"]), int(h["gid"]), list(h.get("additionalGids") or []), "/")

    def start(self) -> int:
        h = self.plan.host
        argv = list(h["args"])
        problem = _exec_problem(argv[0], h["env"], h["cwd"])
        if problem is not None:
            argv = [sys.executable, "-I", "-S", "-c", _CANNOT_RUN,
                    f"isobox: {problem[1]}", str(problem[0])]
        try:
            self.proc = self._spawn(argv, list(h["env"]), h["cwd"],
                                    self._identity(), io=self.io, slave=self._slave)
        finally:
            if self._slave >= 0:
                os.close(self._slave)
                self._slave = -1
        self.pid = self.proc.pid
        return self.pid

    def signal(self, sig: int, all_processes: bool) -> None:
        targets = self._j().pids() if all_processes else [self.pid] if self.pid else []
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def pause(self) -> None:
        self._j().freeze()

    def resume(self) -> None:
        self._j().thaw()

    def cgroup(self) -> Cgroup:
        return self._j().cgroup

    def pids(self) -> list[int]:
        return self._j().pids()

    def total_processes(self) -> int | None:
        return self._j().accounting().total_processes

    def reaped(self, pid: int, status: int) -> None:
        proc = self._popens.pop(pid, None)
        if proc is not None:
            proc.returncode = os.waitstatus_to_exitcode(status)

    def exec(self, spec: dict[str, Any], io: ChildIO) -> tuple[int, int | None]:
        from isobox.compute.plan import _host_identity

        h = self.plan.host
        env = merge_env(list(h["env"]), list(spec.get("env") or []))
        cwd = self.plan.rootfs + spec["cwd"] if spec.get("cwd") else h["cwd"]
        ident = _host_identity(spec["user"]) if spec.get("user") else self._identity()
        _which(spec["args"][0], env, cwd)
        master, slave = (os.openpty() if io.tty else (-1, -1))
        try:
            proc = self._spawn(list(spec["args"]), env, cwd, ident, io=io, slave=slave)
        except BaseException:
            if master >= 0:
                os.close(master)
            raise
        finally:
            if slave >= 0:
                os.close(slave)
        if master >= 0:
            os.set_blocking(master, False)
        return proc.pid, (master if master >= 0 else None)

    def release(self) -> None:
        if self._slave >= 0:
            os.close(self._slave)
            self._slave = -1
        if self.job is not None:
            self.job.close()  # kill-on-close: every process of the job
            self.job = None
        self._unmount()
