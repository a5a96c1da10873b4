"""The guest agent (row 3): runs inside the utility VM and drives containers there.

It is the seeds' Guest Compute Service. One single-threaded ``selectors`` loop on one
channel: the virtio-serial port named ``agent`` (``/sys/class/virtio-ports/*/name``, node
``/dev/vportNpM``, opened once read-write) in a VM, or a unix socket on the host for tests
(``--socket PATH`` connects to a host that listens, as QEMU's chardev does; ``--fd N`` takes
a connected descriptor). Frames are :mod:`isobox.agent.protocol`'s.

Inside the VM a container is what it is on the host: ``isobox.silo.container.Container``
(namespaces, pivot_root, hardening) in an ``isobox.jobs`` cgroup — v2 here; the agent mounts
cgroup2 with its controllers when nothing is mounted yet. The host sends a ``SiloConfig``
as plain JSON (:func:`isobox.silo.config.from_json`) and the root as overlay parts (lower
folders top first, upper, work), which the agent mounts itself, after any disks it is told
to mount first (``"source": "serial:layer0"`` finds a virtio disk by its serial). No
pydantic, no ``isobox.spec``/``isobox.storage`` here: the guest's Python is Debian's, and
every import is paid at boot.

Requests (``{"op": ...}``; ``stream`` numbers are the host's, see the protocol):

* ``negotiate`` ``versions`` → ``version``  (first, always)
* ``hello`` ``timeNs``? ``entropy``? (base64) → ``clockSet``, ``entropyBytes``
* ``create`` ``id stream config rootfs? disks? tty stdin`` → ``pid`` (the init waits)
* ``start`` ``id`` → ``pid``;  ``pause`` / ``resume`` ``id``;  ``delete`` ``id``
* ``exec`` ``id stream process{args env cwd uid gid additionalGids tty stdin}`` → ``pid``
* ``signal`` ``id signal all? stream?``;  ``resize`` ``stream rows cols``
* ``wait`` ``stream`` → ``exitCode signal`` (answered when the process has ended)
* ``stats`` ``id`` → ``stats``;  ``top`` ``id`` → ``processes``;  ``shutdown``

Every process's exit is also a notification ``exit`` — sent after its output ended (an
empty data frame per output channel), or after :data:`DRAIN_TIMEOUT` when a background
child keeps a pipe open. Nothing blocks the loop but the silo's own short set-up calls.
When the channel ends, every container is killed and released and the agent exits.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import errno
import fcntl
import os
import selectors
import signal
import socket
import struct
import sys
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import isobox.agent.protocol as P
from isobox._sys import linux as L
from isobox.errors import Conflict, InvalidArgument, IsoboxError, NotFound
from isobox.silo.config import SiloConfig, from_json
from isobox.silo.container import Container
from isobox.silo.init import receive_console, stdio_as
from isobox.silo.procinfo import process_entry

READ_SIZE = 65536
BUSYBOX = "/bin/busybox"
#: Where ``network`` writes the container's ``hosts`` and ``resolv.conf`` (guest paths).
NET_DIR = "/run/isobox/net"
HIGH_WATER = 4 << 20  # output to the host queued beyond this: stop reading the processes
DRAIN_TIMEOUT = 1.0
CGROUP2 = "/sys/fs/cgroup"
Handler = Callable[[], None]


@dataclass
class Proc:
    """A process the host knows by its ``stream`` number: a container's init or an exec."""

    stream: int
    container: str
    main: bool
    pid: int = 0
    stdin: int | None = None  # pipe's write end, or the pty master
    outputs: dict[int, int] = field(default_factory=dict)  # fd -> channel
    master: int | None = None
    stdin_buf: bytearray = field(default_factory=bytearray)
    stdin_eof: bool = False
    status: int | None = None
    exited_at: float = 0.0
    waiters: list[int] = field(default_factory=list)
    reported: bool = False


@dataclass
class Box:
    """A container in the guest and what the agent mounted for it (undone in reverse)."""

    id: str
    cfg: SiloConfig
    container: Container | None = None
    mounts: list[str] = field(default_factory=list)
    made_dirs: list[str] = field(default_factory=list)


def exit_status(status: int) -> tuple[int, int | None]:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return 128 + sig, sig
    return os.waitstatus_to_exitcode(status), None


def find_port(name: str) -> str:
    """``/dev/vportNpM`` of the virtio-serial port called ``name``."""
    base = Path("/sys/class/virtio-ports")
    for entry in sorted(base.glob("*")):
        with contextlib.suppress(OSError):
            if (entry / "name").read_text().strip() == name:
                return f"/dev/{entry.name}"
    raise NotFound(f"no virtio-serial port named {name!r} under {base}")


def block_by_serial(serial: str) -> str:
    """``/dev/vdX`` of the virtio disk with ``serial`` (never by its order)."""
    for entry in sorted(Path("/sys/block").glob("*")):
        with contextlib.suppress(OSError):
            if (entry / "serial").read_text().strip() == serial:
                return f"/dev/{entry.name}"
    raise NotFound(f"no disk with serial {serial!r}")


def find_nic(mac: str) -> str:
    """The guest link whose address is ``mac`` (the endpoint's, given to QEMU)."""
    base = "/sys/class/net"
    for name in sorted(os.listdir(base)):
        with contextlib.suppress(OSError), open(os.path.join(base, name, "address")) as fh:
            if fh.read().strip().lower() == mac:
                return name
    raise NotFound(f"no network device with MAC {mac} in the utility VM "
                   "(virtio_net not loaded?)")


def only_nic() -> str:
    """The utility VM's one network device (not ``lo``)."""
    base = "/sys/class/net"
    nics = [n for n in sorted(os.listdir(base))
            if n != "lo" and os.path.exists(os.path.join(base, n, "device"))]
    if len(nics) != 1:
        raise NotFound(f"expected one network device in the utility VM, found {nics}")
    return nics[0]


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _run(argv: list[str]) -> None:
    import subprocess

    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    if proc.returncode != 0:
        raise IsoboxError(f"{' '.join(argv[1:])}: {proc.stderr.strip()[-300:]}")


def ensure_cgroup2() -> None:
    """cgroup v2 at /sys/fs/cgroup with its controllers enabled for children (the VM's
    init may have done it; then this changes nothing)."""
    with open("/proc/self/mounts") as fh:
        mounted = {line.split()[1]: line.split()[2] for line in fh}
    if CGROUP2 not in mounted:
        os.makedirs(CGROUP2, exist_ok=True)
        L.mount("cgroup2", CGROUP2, "cgroup2", L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC,
                "nsdelegate")
    elif mounted[CGROUP2] != "cgroup2":
        return  # a v1 machine (a test on the host): leave it alone
    have = Path(CGROUP2, "cgroup.controllers").read_text().split()
    enabled = Path(CGROUP2, "cgroup.subtree_control").read_text().split()
    want = [c for c in ("cpu", "cpuset", "io", "memory", "pids") if c in have and
            c not in enabled]
    if want:
        Path(CGROUP2, "cgroup.subtree_control").write_text(" ".join("+" + c for c in want))


def _int(req: dict[str, Any], key: str, *, default: int | None = None) -> int:
    v = req.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool):
        raise InvalidArgument(f"{req.get('op')}: {key!r} must be an integer")
    return v


def _str(req: dict[str, Any], key: str) -> str:
    v = req.get(key)
    if not isinstance(v, str) or not v:
        raise InvalidArgument(f"{req.get('op')}: {key!r} must be a non-empty string")
    return v


def _merge_env(base: list[str], extra: list[str]) -> list[str]:
    out = {e.split("=", 1)[0]: e for e in base}
    out.update({e.split("=", 1)[0]: e for e in extra})
    return list(out.values())


class Agent:
    def __init__(self, channel: int, *, state_root: Path, set_clock: bool) -> None:
        self.fd = channel
        os.set_blocking(channel, False)
        self.state_root = state_root
        self.set_clock = set_clock
        self.sel = selectors.DefaultSelector()
        self._handlers: dict[int, list[Handler | None]] = {}
        self.reader = P.FrameReader()
        self.out = bytearray()
        self.version = 0
        self.boxes: dict[str, Box] = {}
        self.procs: dict[int, Proc] = {}  # stream -> Proc
        self.by_pid: dict[int, Proc] = {}
        # Ended execs (stream -> (container, wait status)): a late ``wait`` is answered;
        # dropped when the stream number is used again or the container is deleted.
        self.finished: dict[int, tuple[str, int]] = {}
        self.outputs_paused = False
        self.closing = False  # the channel ended or shutdown was asked
        self.done = False
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    # ---- selector bookkeeping ------------------------------------------------------------

    def _set(self, fd: int, read: Handler | bool | None = False,
             write: Handler | bool | None = False) -> None:
        """Change ``fd``'s handlers; ``False`` keeps the one it has, ``None`` removes it."""
        h = self._handlers.get(fd, [None, None])
        if read is not False:
            h[0] = read if callable(read) else None
        if write is not False:
            h[1] = write if callable(write) else None
        events = (selectors.EVENT_READ if h[0] else 0) | (selectors.EVENT_WRITE if h[1]
                                                          else 0)
        registered = fd in self._handlers
        if not events:
            if registered:
                self.sel.unregister(fd)
                del self._handlers[fd]
            return
        self._handlers[fd] = h
        if registered:
            self.sel.modify(fd, events)
        else:
            self.sel.register(fd, events)

    # ---- channel -------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self.fd < 0:
            return
        self.out += data
        self._set(self.fd, write=self._flush)
        if len(self.out) > HIGH_WATER and not self.outputs_paused:
            self._pause_outputs(True)

    def _flush(self) -> None:
        while self.out:
            try:
                n = os.write(self.fd, self.out[:1 << 20])
            except BlockingIOError:
                return
            except OSError:
                self.out.clear()
                self._channel_closed()
                return
            del self.out[:n]
        self._set(self.fd, write=None)
        if self.outputs_paused:
            self._pause_outputs(False)

    def _pause_outputs(self, pause: bool) -> None:
        self.outputs_paused = pause
        for proc in self.procs.values():
            for fd in proc.outputs:
                self._set(fd, read=None if pause else self._output_reader(proc, fd))

    def _on_channel(self) -> None:
        try:
            chunk = os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._channel_closed()
            return
        self.reader.feed(chunk)
        while True:
            try:
                frame = self.reader.next()
            except P.ProtocolError as exc:
                self.send(P.notification("protocolError", message=str(exc)))
                continue
            if frame is None:
                return
            self._frame(frame)

    def _channel_closed(self) -> None:
        if self.fd >= 0:
            self._set(self.fd, read=None, write=None)
            os.close(self.fd)
            self.fd = -1
        self.closing = True

    def _frame(self, frame: P.Frame) -> None:
        if frame.kind == P.DATA:
            try:
                if not self.version:
                    raise P.ProtocolError("stream data before negotiate")
                stream, channel = P.split_key(frame.id)
                if channel != P.STDIN:
                    raise P.ProtocolError(f"stream {stream}: the host sends stdin only")
                self._stdin(stream, frame.body)
            except IsoboxError as exc:
                self.send(P.notification("protocolError", message=str(exc)))
            return
        if frame.kind != P.REQUEST:
            self.send(P.notification("protocolError", message=f"the host sent a "
                                     f"{P.KIND_NAMES[frame.kind]} frame"))
            return
        try:
            req = frame.json()
            op = req.get("op")
            if op != "negotiate" and not self.version:
                raise P.ProtocolError(f"{op!r} before negotiate")
            fn = self.OPS.get(op) if isinstance(op, str) else None
            if fn is None:
                raise InvalidArgument(f"unknown op {op!r}")
            reply = fn(self, frame.id, req)
        except Exception as exc:
            self.send(P.error_response(frame.id, exc))
            return
        if reply is not None:
            self.send(P.response(frame.id, **reply))

    # ---- ops -----------------------------------------------------------------------------

    def op_negotiate(self, _rid: int, req: dict[str, Any]) -> dict[str, Any]:
        if self.version:
            raise Conflict(f"protocol version {self.version} is negotiated already")
        self.version = P.pick_version(req.get("versions"))
        return {"version": self.version}

    def op_hello(self, _rid: int, req: dict[str, Any]) -> dict[str, Any]:
        clock_set = False
        if req.get("timeNs") is not None and self.set_clock:
            L.set_realtime_ns(_int(req, "timeNs"))
            clock_set = True
        raw = req.get("entropy")
        data = base64.b64decode(raw, validate=True) if isinstance(raw, str) else b""
        if data:
            L.add_entropy(data)
        reseeded = False
        if req.get("reseed") and data:
            # A clone of a template: its CRNG is the template's, byte for byte, until it
            # is re-keyed from the pool that now holds the host's fresh bytes.
            L.reseed_crng()
            import random

            random.seed()
            reseeded = True
        hostname = req.get("hostname")
        if isinstance(hostname, str) and hostname and self.set_clock:
            socket.sethostname(hostname)
        return {"clockSet": clock_set, "entropyBytes": len(data), "reseeded": reseeded,
                "timeNs": time.time_ns(), "kernel": os.uname().release,
                "bootId": _boot_id()}

    def op_warm(self, _rid: int, req: dict[str, Any]) -> dict[str, Any]:
        """What a template does before it is saved, so that no clone pays it: the modules
        a create and an exec import, and the seccomp programs of ``seccomp`` (profiles as
        the host sends them) compiled into the per-profile cache that forks inherit."""
        started = time.monotonic()
        import random  # noqa: F401  (hello reseeds it in a clone)

        import isobox.silo.execin
        import isobox.silo.harden  # noqa: F401
        from isobox._sys import seccomp

        compiled = 0
        for profile in req.get("seccomp") or []:
            if isinstance(profile, dict):
                seccomp.compile_cached(profile)
                compiled += 1
        return {"seconds": time.monotonic() - started, "seccompCompiled": compiled}

    def _box(self, req: dict[str, Any]) -> Box:
        cid = _str(req, "id")
        box = self.boxes.get(cid)
        if box is None:
            raise NotFound(f"container {cid} does not exist in the utility VM")
        return box

    def _container(self, req: dict[str, Any]) -> Container:
        box = self._box(req)
        if box.container is None:
            raise Conflict(f"container {box.id} is not created")
        return box.container

    def _new_stream(self, req: dict[str, Any]) -> int:
        stream = _int(req, "stream")
        if not 0 < stream < (1 << 62):
            raise InvalidArgument(f"stream {stream} out of range")
        if stream in self.procs:
            raise Conflict(f"stream {stream} is in use")
        self.finished.pop(stream, None)
        return stream

    def op_create(self, _rid: int, req: dict[str, Any]) -> dict[str, Any]:
        cid = _str(req, "id")
        if cid in self.boxes:
            raise Conflict(f"container {cid} exists already")
        stream = self._new_stream(req)
        cfg = from_json(req.get("config"))
        tty = bool(req.get("tty"))
        cfg.process.terminal = tty
        box = Box(cid, cfg)
        proc = Proc(stream, cid, main=True)
        child: list[int] = []
        t0 = time.monotonic()
        steps: dict[str, float] = {}
        try:
            for disk in req.get("disks") or []:
                self._mount_disk(box, disk)
            steps["disks"] = round(time.monotonic() - t0, 4)
            rootfs = req.get("rootfs")
            if rootfs:
                self._mount_rootfs(box, rootfs)
            steps["rootfs"] = round(time.monotonic() - t0 - sum(steps.values()), 4)
            self._check_cwd(cfg.root, cfg.process.cwd)
            self.boxes[cid] = box
            if tty:
                box.container, proc.master = self._create_tty(box)
                proc.stdin = proc.master if req.get("stdin") else None
                proc.outputs[proc.master] = P.STDOUT
            else:
                ends = self._pipes(proc, bool(req.get("stdin")), child)
                with stdio_as(ends):
                    box.container = Container.create(self.state_root, cid,
                                                     Path(cfg.root).parent, cfg)
        except BaseException:
            self._close_proc(proc)
            self._release(box)
            self.boxes.pop(cid, None)
            raise
        finally:
            for fd in child:
                os.close(fd)
        steps["container"] = round(time.monotonic() - t0 - sum(steps.values()), 4)
        proc.pid = box.container.state.pid
        self._register(proc)
        return {"pid": proc.pid, "steps": steps}

    def _mount_disk(self, box: Box, disk: Any) -> None:
        if not isinstance(disk, dict):
            raise InvalidArgument("create: each of disks must be an object")
        source, target = _str(disk, "source"), _str(disk, "target")
        if source.startswith("serial:"):
            source = block_by_serial(source[len("serial:"):])
            # In a clone this slot held another file (or none) when the template read it.
            L.flush_block_buffers(source)
        fstype = _str(disk, "fstype")
        opts = [o for o in disk.get("options") or [] if isinstance(o, str)]
        flags = (L.MS_RDONLY if "ro" in opts else 0) | (L.MS_NOATIME if "noatime" in opts else 0)
        data = ",".join(o for o in opts if o not in ("ro", "rw", "noatime")) or None
        self._mkdir(box, target)
        L.mount(source, target, fstype, flags | L.MS_NODEV | L.MS_NOSUID, data)
        box.mounts.append(target)

    def _mount_rootfs(self, box: Box, rootfs: Any) -> None:
        if not isinstance(rootfs, dict):
            raise InvalidArgument("create: rootfs must be an object")
        lower = rootfs.get("lower")
        if not isinstance(lower, list) or not lower or not all(
                isinstance(p, str) and p for p in lower):
            raise InvalidArgument("create: rootfs.lower must be a non-empty list of folders")
        upper, work = _str(rootfs, "upper"), _str(rootfs, "work")
        for p in (*lower, upper, work):
            if "," in p or ":" in p or not p.startswith("/"):
                raise InvalidArgument(f"create: rootfs folder {p!r} must be absolute, "
                                      "without ',' or ':'")
            if not os.path.isdir(p):
                os.makedirs(p, mode=0o755) if p in (upper, work) else None
            if not os.path.isdir(p):
                raise NotFound(f"create: rootfs folder {p} does not exist")
        target = box.cfg.root
        self._mkdir(box, target)
        L.mount("overlay", target, "overlay", L.MS_NODEV,
                f"lowerdir={':'.join(lower)},upperdir={upper},workdir={work}")
        box.mounts.append(target)

    @staticmethod
    def _mkdir(box: Box, path: str) -> None:
        missing = []
        p = Path(path)
        while not p.exists():
            missing.append(str(p))
            p = p.parent
        os.makedirs(path, exist_ok=True)
        box.made_dirs.extend(reversed(missing))

    @staticmethod
    def _check_cwd(root: str, cwd: str) -> None:
        real_root = os.path.realpath(root)
        path = os.path.realpath(os.path.join(real_root, cwd.lstrip("/")))
        if path != real_root and not path.startswith(real_root + "/"):
            raise InvalidArgument(f"working directory {cwd!r} leaves the container's root")
        if not os.path.isdir(path):
            os.makedirs(path, mode=0o755)

    def _pipes(self, proc: Proc, stdin: bool, child: list[int]
               ) -> tuple[int | None, int, int]:
        """Pipes for a process; its ends are appended to ``child`` (closed after the
        spawn), ours go on ``proc``."""
        ends: list[int | None] = [None]
        if stdin:
            r, w = os.pipe2(os.O_CLOEXEC)
            child.append(r)
            proc.stdin = w
            os.set_blocking(w, False)
            ends[0] = r
        for channel in (P.STDOUT, P.STDERR):
            r, w = os.pipe2(os.O_CLOEXEC)
            child.append(w)
            os.set_blocking(r, False)
            proc.outputs[r] = channel
            ends.append(w)
        return ends[0], ends[1] or 0, ends[2] or 0

    def _create_tty(self, box: Box) -> tuple[Container, int]:
        """Container.create with a console socket; the init sends the pty master there."""
        console = self.state_root / f"{box.id}.console"
        self.state_root.mkdir(parents=True, exist_ok=True, mode=0o711)
        console.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(str(console))
            listener.listen(1)
            with stdio_as((None, None, None)):
                c = Container.create(self.state_root, box.id, Path(box.cfg.root).parent,
                                     box.cfg, console_socket=str(console))
            box.container = c
            return c, receive_console(listener)
        finally:
            listener.close()
            console.unlink(missing_ok=True)

    def op_start(self, _rid: int, req: dict[str, Any]) -> dict[str, Any]:
        c = self._container(req)
        c.start()
        return {"pid": c.state.pid}

    def op_exec(self, _rid: int, req: dict[str, Any]) -> dict[str, Any]:
        from isobox.silo.execin import exec_in

        c = self._container(req)
        stream = self._new_stream(req)
        spec = req.get("process")
        if not isinstance(spec, dict):
            raise InvalidArgument("exec: process must be an object")
        args = spec.get("args")
        if not isinstance(args, list) or not args or not all(isinstance(a, str)
                                                             for a in args):
            raise InvalidArgument("exec: process.args must be a non-empty list of strings")
        base = c.base_process()
        proc_cfg = dataclasses.replace(
            base, args=list(args), env=_merge_env(base.env, list(spec.get("env") or [])),
            cwd=spec.get("cwd") or base.cwd, terminal=bool(spec.get("tty")),
            uid=_int(spec, "uid", default=base.uid), gid=_int(spec, "gid", default=base.gid),
            additional_gids=list(spec.get("additionalGids") or base.additional_gids))
        proc = Proc(stream, c.state.id, main=False)
        child: list[int] = []
        ours: socket.socket | None = None
        theirs: socket.socket | None = None
        try:
            if proc_cfg.terminal:
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                ends: tuple[int | None, int | None, int | None] = (None, None, None)
            else:
                ends = self._pipes(proc, bool(spec.get("stdin")), child)
            with stdio_as(ends):
                proc.pid = exec_in(c.state.pid, c.cgroup, proc_cfg, detach=True,
                                   console_socket=theirs, user_ns=c.state.user_ns)
            if ours is not None and theirs is not None:
                theirs.close()
                theirs = None
                ours.settimeout(10)
                _, fds, _, _ = socket.recv_fds(ours, 64, 1)
                if not fds:
                    raise Conflict("exec: the container sent no terminal")
                os.set_blocking(fds[0], False)
                proc.master = fds[0]
                proc.outputs[fds[0]] = P.STDOUT
                proc.stdin = fds[0] if spec.get("stdin") else None
        except BaseException:
            self._close_proc(proc)
            raise
        finally:
            for fd in child:
                os.close(fd)
            for s in (ours, theirs):
                if s is not None:
                    s.close()
        self._register(proc)
        return {"pid": proc.pid}

    def op_signal(self, _rid: int, req: dict[str, Any]) -> dict[str, Any]:
        sig = _int(req, "signal")
        if "stream" in req:
            proc = self._proc(req)
            if proc.status is None and proc.pid:
                os.kill(proc.pid, sig)
            return {}
        self._container(req).kill(sig, all_processes=bool(req.get("all")))
        return {}

    def _proc(self, req: dict[str, Any]) -> Proc:
        stream = _int(req, "stream")
        proc = self.procs.get(stream)
        if proc is None:
            raise NotFound(f"no process with stream {stream}")
        return proc

    def op_resize(self, _rid: int, req: dict[str, Any]) -> dict[str, Any]:
        proc = self._proc(req)
        rows, cols = _int(req, "rows"), _int(req, "cols")
        if not (0 < rows < 65536 and 0 < cols < 65536):
            raise InvalidArgument(f"resize: {rows}x{cols} out of range")
        if proc.master is None:
            raise Conflict(f"stream {proc.stream} has no terminal")
        fcntl.ioctl(proc.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        return {}

    def op_wait(self, rid: int, req: dict[str, Any]) -> dict[str, Any] | None:
        done = self.finished.get(_int(req, "stream"))
        if done is not None:
            code, sig = exit_status(done[1])
            return {"exitCode": code, "signal": sig}
        proc = self._proc(req)
        if proc.reported and proc.status is not None:
            code, sig = exit_status(proc.status)
            return {"exitCode": code, "signal": sig}
        proc.waiters.append(rid)
        return None  # answered when it has ended

    def op_pause(self, _rid: int, req: dict[str, Any]) -> dict[str, Any]:
        self._container(req).pause()
        return {}

    def op_resume(self, _rid: int, req: dict[str, Any]) -> dict[str, Any]:
        self._container(req).resume()
        return {}

    def op_stats(self, _rid: int, req: dict[str, Any]) -> dict[str, Any]:
        box = self._box(req)
        c = self._container(req)
        counters = c.cgroup.read()
        lim = box.cfg.limits
        return {"stats": {
            "read": time.time(),
            "cpuUsageNs": counters.cpu_user_ns + counters.cpu_kernel_ns,
            "cpuUserNs": counters.cpu_user_ns, "cpuKernelNs": counters.cpu_kernel_ns,
            "cpuPercent": 0.0,
            "memoryBytes": counters.memory_current, "memoryLimit": lim.memory,
            "memoryPeakBytes": counters.memory_peak or None,
            "pids": len(c.pids()), "pidsLimit": lim.pids, "totalProcesses": None,
            "ioReadBytes": counters.io_read_bytes, "ioWriteBytes": counters.io_write_bytes,
            "memoryLimitHits": counters.memory_limit_hits, "oomKills": counters.oom_kills,
            "pidsLimitHits": counters.pids_limit_hits,
        }}

    def op_top(self, _rid: int, req: dict[str, Any]) -> dict[str, Any]:
        c = self._container(req)
        entries = [process_entry(pid) for pid in sorted(c.pids())]
        return {"processes": [e for e in entries if e is not None]}

    def op_delete(self, _rid: int, req: dict[str, Any]) -> dict[str, Any]:
        box = self._box(req)
        self._release(box)
        del self.boxes[box.id]
        return {}

    def op_network(self, _rid: int, req: dict[str, Any]) -> dict[str, Any]:
        """The guest's network (before ``create``): the NIC whose MAC is ``mac`` gets
        ``ip/prefixLen``, is up, with a default route via ``gateway``; ``files`` (``hosts``,
        ``resolv.conf``) are written to :data:`NET_DIR`, which the container's config binds
        at ``/etc``. The container shares the guest's network namespace: the VM is the
        isolation boundary, and its only NIC is the endpoint's tap on the host bridge."""
        mac = _str(req, "mac").lower()
        ip, gateway = _str(req, "ip"), _str(req, "gateway")
        prefix = _int(req, "prefixLen")
        ipcmd = [BUSYBOX, "ip"]
        try:
            dev = find_nic(mac)
        except NotFound:
            # A clone: its NIC kept the template's address; it takes the endpoint's.
            dev = only_nic()
            _run([*ipcmd, "link", "set", "dev", dev, "address", mac])
        for argv in (["link", "set", "lo", "up"],
                     ["addr", "add", f"{ip}/{prefix}", "dev", dev],
                     ["link", "set", dev, "up"],
                     ["route", "add", "default", "via", gateway, "dev", dev]):
            _run([*ipcmd, *argv])
        os.makedirs(NET_DIR, mode=0o755, exist_ok=True)
        files = req.get("files") or {}
        for name in ("hosts", "resolv.conf"):
            text = files.get(name) if isinstance(files, dict) else None
            if isinstance(text, str):
                with open(os.path.join(NET_DIR, name), "w") as fh:
                    fh.write(text)
        return {"device": dev}

    def op_shutdown(self, _rid: int, _req: dict[str, Any]) -> dict[str, Any]:
        """Every container killed and released (its mounts gone, so the scratch file
        system is clean), then everything written down to the disks: once this answers,
        the host may end the VM at once instead of waiting for the guest's power-off."""
        self.release_all()
        os.sync()
        self.closing = True
        return {"synced": True}

    OPS: ClassVar[dict[str, Callable[[Agent, int, dict[str, Any]], dict[str, Any] | None]]] = {
        "negotiate": op_negotiate, "hello": op_hello, "create": op_create,
        "start": op_start, "exec": op_exec, "signal": op_signal, "resize": op_resize,
        "wait": op_wait, "pause": op_pause, "resume": op_resume, "stats": op_stats,
        "top": op_top, "delete": op_delete, "shutdown": op_shutdown,
        "network": op_network, "warm": op_warm,
    }

    # ---- processes -----------------------------------------------------------------------

    def _register(self, proc: Proc) -> None:
        self.procs[proc.stream] = proc
        self.by_pid[proc.pid] = proc
        if not self.outputs_paused:
            for fd in proc.outputs:
                self._set(fd, read=self._output_reader(proc, fd))

    def _output_reader(self, proc: Proc, fd: int) -> Handler:
        return lambda: self._on_output(proc, fd)

    def _on_output(self, proc: Proc, fd: int) -> None:
        try:
            chunk = os.read(fd, P.DATA_CHUNK)
        except BlockingIOError:
            return
        except OSError:  # EIO: the pty's last slave closed
            chunk = b""
        if chunk:
            self.send(P.data(proc.stream, proc.outputs[fd], chunk))
            return
        self._output_closed(proc, fd)

    def _output_closed(self, proc: Proc, fd: int) -> None:
        channel = proc.outputs.pop(fd)
        self._set(fd, read=None, write=None)
        if fd == proc.stdin:
            proc.stdin = None
        if fd == proc.master:
            proc.master = None
        os.close(fd)
        self.send(P.data(proc.stream, channel, b""))
        self._maybe_report(proc)

    def _stdin(self, stream: int, payload: bytes) -> None:
        proc = self.procs.get(stream)
        if proc is None or proc.stdin is None:
            return  # ended, or no stdin: dropped, as a closed pipe would
        if not payload:
            proc.stdin_eof = True
        proc.stdin_buf += payload
        self._write_stdin(proc)

    def _write_stdin(self, proc: Proc) -> None:
        fd = proc.stdin
        if fd is None:
            return
        while proc.stdin_buf:
            try:
                n = os.write(fd, proc.stdin_buf)
            except BlockingIOError:
                self._set(fd, write=lambda: self._write_stdin(proc))
                return
            except OSError:
                proc.stdin_buf.clear()
                break
            del proc.stdin_buf[:n]
        self._set(fd, write=None)
        if proc.stdin_eof:
            if fd == proc.master:
                # A terminal has no half-close: send EOF (^D) as a line discipline would.
                with contextlib.suppress(OSError):
                    os.write(fd, b"\x04")
            else:
                os.close(fd)
            proc.stdin = None

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            proc = self.by_pid.pop(pid, None)
            if proc is None:
                continue  # an orphan of a container, or a helper
            proc.status = status
            proc.exited_at = time.monotonic()
            self._maybe_report(proc)

    def _maybe_report(self, proc: Proc, *, force: bool = False) -> None:
        if proc.status is None or proc.reported:
            return
        if proc.outputs and not force:
            return  # the output first; the drain timer forces it
        for fd in list(proc.outputs):
            self._output_closed(proc, fd)
        proc.reported = True
        self._close_proc(proc)
        code, sig = exit_status(proc.status)
        self.send(P.notification("exit", container=proc.container, stream=proc.stream,
                                 pid=proc.pid, exitCode=code, signal=sig))
        for rid in proc.waiters:
            self.send(P.response(rid, exitCode=code, signal=sig))
        proc.waiters.clear()
        if not proc.main:
            self.procs.pop(proc.stream, None)  # the stream number may be reused now
            self.finished[proc.stream] = (proc.container, proc.status)

    def _close_proc(self, proc: Proc) -> None:
        fds = {*proc.outputs, *([proc.stdin] if proc.stdin is not None else []),
               *([proc.master] if proc.master is not None else [])}
        for fd in fds:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._set(fd, read=None, write=None)
            with contextlib.suppress(OSError):
                os.close(fd)
        proc.outputs.clear()
        proc.stdin = proc.master = None

    def _timers(self) -> float:
        now = time.monotonic()
        timeout = 5.0
        for proc in list(self.procs.values()):
            if proc.status is not None and not proc.reported:
                left = proc.exited_at + DRAIN_TIMEOUT - now
                if left <= 0:
                    self._maybe_report(proc, force=True)
                else:
                    timeout = min(timeout, left)
        return timeout

    # ---- release -------------------------------------------------------------------------

    def _release(self, box: Box) -> None:
        """Kill and delete the container, then unmount what was mounted for it (reverse
        order); every step is tried."""
        if box.container is not None:
            try:
                box.container.delete(force=True)
            except Exception as exc:
                print(f"agent: deleting {box.id}: {exc}", file=sys.stderr)
            box.container = None
        self._reap()
        # Its processes are gone: their exits are due now (drained or not).
        for proc in list(self.procs.values()):
            if proc.container == box.id:
                if proc.status is not None:
                    self._maybe_report(proc, force=True)
                if proc.main:
                    self.procs.pop(proc.stream, None)
                    self._close_proc(proc)
        for stream in [k for k, v in self.finished.items() if v[0] == box.id]:
            del self.finished[stream]
        while box.mounts:
            target = box.mounts.pop()
            with contextlib.suppress(IsoboxError):
                L.umount2(target, L.MNT_DETACH)
        while box.made_dirs:
            with contextlib.suppress(OSError):
                os.rmdir(box.made_dirs.pop())

    def release_all(self) -> None:
        for box in list(self.boxes.values()):
            self._release(box)
        self.boxes.clear()

    # ---- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: setattr(self, "closing", True))
        self._set(self._wake_r, read=self._on_wake)
        self._set(self.fd, read=self._on_channel)
        self.send(P.notification("ready", versions=list(P.VERSIONS), pid=os.getpid(),
                                 kernel=os.uname().release))
        try:
            while True:
                if self.closing:
                    self.release_all()
                    if not self.out or self.fd < 0:
                        break
                timeout = self._timers()
                for key, mask in self.sel.select(0.5 if self.closing else timeout):
                    handlers = self._handlers.get(key.fd)
                    if handlers and mask & selectors.EVENT_WRITE and handlers[1]:
                        handlers[1]()
                    handlers = self._handlers.get(key.fd)
                    if handlers and mask & selectors.EVENT_READ and handlers[0]:
                        handlers[0]()
                self._reap()
        finally:
            self.release_all()
            if self.fd >= 0:
                os.close(self.fd)
            self.sel.close()

    def _on_wake(self) -> None:
        with contextlib.suppress(OSError):
            while os.read(self._wake_r, 4096):
                pass


def _stdio_open() -> None:
    """0, 1 and 2 open (on /dev/null when missing): the channel must never land on one."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError as exc:
            if exc.errno != errno.EBADF:
                raise
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="isobox.agent.guest", description=__doc__.split(
        "\n")[0] if __doc__ else None)
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--port", default="agent", help="virtio-serial port name (the VM)")
    where.add_argument("--socket", help="connect to a host listening on this unix socket")
    where.add_argument("--fd", type=int, help="a connected descriptor to speak on")
    ap.add_argument("--state", default="/run/isobox/agent", help="containers' state root")
    ap.add_argument("--set-clock", action="store_true",
                    help="let hello set CLOCK_REALTIME (implied with --port)")
    args = ap.parse_args(argv)
    _stdio_open()
    for sig in range(1, signal.NSIG):  # inherited ignores would reach the containers
        with contextlib.suppress(OSError, ValueError):
            if sig != signal.SIGPIPE and signal.getsignal(sig) == signal.SIG_IGN:
                signal.signal(sig, signal.SIG_DFL)
    if os.getpid() != 1:
        L.prctl(L.PR_SET_CHILD_SUBREAPER, 1)  # the containers' inits are reaped here
    in_vm = args.socket is None and args.fd is None
    if args.fd is not None:
        fd = args.fd
        os.set_inheritable(fd, False)
    elif args.socket is not None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.connect(args.socket)
        fd = s.detach()
    else:
        ensure_cgroup2()
        fd = os.open(find_port(args.port), os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
    agent = Agent(fd, state_root=Path(args.state), set_clock=in_vm or args.set_clock)
    agent.run()
    if os.getpid() == 1:  # the VM's init: power off (exiting would panic the kernel)
        os.sync()
        L.power_off()
    return 0


if __name__ == "__main__":
    sys.exit(main())
