"""The host's end of the agent channel (row 2): :class:`AgentClient`.

Given a connected socket (the one QEMU's virtio-serial chardev connected to, or a test's
socketpair), it reads the agent's ``ready``, negotiates the protocol version, and turns
requests into calls. One reader thread owns the socket's receive side and routes frames:
responses to the call waiting for that id, stream data and ``exit`` notifications to the
process's :class:`ProcessStream`, other notifications to :meth:`AgentClient.notifications`.
Calls may come from any thread (sends are serialised under a lock).

The container's configuration travels as the plain JSON of
:func:`isobox.silo.config.to_json` (the caller converts; this row cannot import silo).
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import isobox.agent.protocol as P
from isobox.errors import IsoboxError, WaitTimeout

DEFAULT_TIMEOUT = 120.0  # utility VMs under TCG are slow; callers pass less when they can


@dataclass(frozen=True)
class ExitStatus:
    exit_code: int
    signal: int | None


@dataclass(frozen=True)
class Output:
    """One event of a process's stream: ``data`` on ``channel`` (1 stdout, 2 stderr; empty
    data = that channel ended), or the process's ``exit``."""

    channel: int
    data: bytes = b""
    exit: ExitStatus | None = None


@dataclass
class ProcessStream:
    """A process the client started (``create`` or ``exec``), known by its stream number."""

    client: AgentClient
    stream: int
    container: str
    pid: int = 0
    events: queue.Queue[Output | None] = field(default_factory=queue.Queue)
    exit: ExitStatus | None = None
    steps: dict[str, float] = field(default_factory=dict)  # the guest's create, timed

    def write(self, data: bytes) -> None:
        self.client.write_stdin(self.stream, data)

    def close_stdin(self) -> None:
        self.client.close_stdin(self.stream)

    def resize(self, rows: int, cols: int) -> None:
        self.client.resize(self.stream, rows, cols)

    def signal(self, sig: int) -> None:
        self.client.signal(self.container, sig, stream=self.stream)

    def wait(self, timeout: float | None = DEFAULT_TIMEOUT) -> ExitStatus:
        if self.exit is not None:
            return self.exit
        return self.client.wait(self.stream, timeout=timeout)

    def iter(self, timeout: float | None = DEFAULT_TIMEOUT) -> Iterator[Output]:
        """Events until the exit (included); :class:`WaitTimeout` if none comes in time."""
        while True:
            try:
                ev = self.events.get(timeout=timeout)
            except queue.Empty as exc:
                raise WaitTimeout(f"stream {self.stream}: no output or exit in "
                                  f"{timeout} s") from exc
            if ev is None:
                raise P.ProtocolError("the agent channel closed before the process ended")
            yield ev
            if ev.exit is not None:
                return

    def collect(self, timeout: float | None = DEFAULT_TIMEOUT
                ) -> tuple[bytes, bytes, ExitStatus]:
        """All of stdout and stderr, and the exit status."""
        out = {P.STDOUT: bytearray(), P.STDERR: bytearray()}
        status: ExitStatus | None = None
        for ev in self.iter(timeout):
            if ev.exit is not None:
                status = ev.exit
            else:
                out[ev.channel] += ev.data
        assert status is not None
        return bytes(out[P.STDOUT]), bytes(out[P.STDERR]), status


class _Pending:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.body: dict[str, Any] | None = None
        self.error: IsoboxError | None = None


class AgentClient:
    def __init__(self, sock: socket.socket, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.sock = sock
        self.timeout = timeout
        self.version = 0
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._streams_ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._streams: dict[int, ProcessStream] = {}
        self._ready = threading.Event()
        self.ready_info: dict[str, Any] = {}
        self.notifications: queue.Queue[dict[str, Any]] = queue.Queue()
        self.closed = False
        self.close_reason = ""
        self._reader = threading.Thread(target=self._read_loop, name="agent-client",
                                        daemon=True)
        self._reader.start()

    # ---- connection ----------------------------------------------------------------------

    def wait_ready(self, timeout: float | None = None) -> dict[str, Any]:
        """The agent's ``ready`` notification (versions, pid, kernel)."""
        if not self._ready.wait(self.timeout if timeout is None else timeout):
            raise WaitTimeout("the guest agent did not say it is ready")
        if not self.ready_info:
            raise P.ProtocolError(f"the agent channel closed before ready: "
                                  f"{self.close_reason}")
        return self.ready_info

    def negotiate(self, versions: tuple[int, ...] = P.VERSIONS) -> int:
        """Offer ``versions``; the agent picks one (:class:`VersionMismatch` if none)."""
        self.version = int(self.call("negotiate", versions=list(versions))["version"])
        return self.version

    def connect(self, timeout: float | None = None) -> int:
        """``wait_ready`` then ``negotiate``: the usual first two steps."""
        self.wait_ready(timeout)
        return self.negotiate()

    def adopt(self, version: int) -> int:
        """Speak to an agent that negotiated ``version`` already and will not say ``ready``
        again: a clone's agent, restored from a template whose builder did both steps."""
        if version not in P.VERSIONS:
            raise P.ProtocolError(f"the template's agent speaks version {version}; this "
                                  f"host speaks {list(P.VERSIONS)}")
        self.version = version
        return version

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self._reader.join(5)
        self.sock.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # ---- frames --------------------------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(data)

    def call(self, op: str, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        """One request; its response's fields, or the error it names raised."""
        rid = next(self._ids)
        pending = _Pending()
        with self._lock:
            if self.closed:
                raise P.ProtocolError(f"agent channel is closed: {self.close_reason}")
            self._pending[rid] = pending
        try:
            self.send_raw(P.request(rid, op, **fields))
            limit = self.timeout if timeout is None else timeout
            if not pending.done.wait(limit):
                raise WaitTimeout(f"agent: no answer to {op} in {limit} s")
        finally:
            with self._lock:
                self._pending.pop(rid, None)
        if pending.error is not None:
            raise pending.error
        assert pending.body is not None
        return pending.body

    def _read_loop(self) -> None:
        reader = P.FrameReader()
        reason = "closed by the agent"
        try:
            while True:
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    break
                for frame in reader.frames(chunk):
                    self._dispatch(frame)
        except (OSError, P.ProtocolError) as exc:
            reason = str(exc)
        finally:
            self._closed(reason)

    def _closed(self, reason: str) -> None:
        with self._lock:
            self.closed = True
            self.close_reason = reason
            pending = list(self._pending.values())
            streams = list(self._streams.values())
        for p in pending:
            if p.done.is_set():
                continue  # answered before the end
            p.error = P.ProtocolError(f"agent channel closed: {reason}")
            p.done.set()
        for s in streams:
            s.events.put(None)
        self._ready.set()

    def _dispatch(self, frame: P.Frame) -> None:
        if frame.kind == P.DATA:
            stream, channel = P.split_key(frame.id)
            s = self._streams.get(stream)
            if s is not None:
                s.events.put(Output(channel, frame.body))
            return
        body = frame.json()
        if frame.kind == P.RESPONSE:
            with self._lock:
                pending = self._pending.get(frame.id)
            if pending is None:
                return
            if "error" in body:
                pending.error = P.error_from_wire(body["error"])
            else:
                pending.body = body
            pending.done.set()
        elif frame.kind == P.NOTIFICATION:
            event = body.get("event")
            if event == "ready":
                self.ready_info = body
                self._ready.set()
            elif event == "exit":
                with self._lock:
                    s = self._streams.get(int(body.get("stream", 0)))
                if s is not None:
                    s.exit = ExitStatus(int(body["exitCode"]), body.get("signal"))
                    s.events.put(Output(0, exit=s.exit))
            self.notifications.put(body)
        else:
            raise P.ProtocolError(f"the agent sent a {P.KIND_NAMES[frame.kind]} frame")

    def _new_stream(self, container: str) -> ProcessStream:
        s = ProcessStream(self, next(self._streams_ids), container)
        with self._lock:
            self._streams[s.stream] = s
        return s

    # ---- operations ----------------------------------------------------------------------

    def hello(self, *, time_ns: int | None = None, entropy: bytes = b"", reseed: bool = False,
              hostname: str | None = None) -> dict[str, Any]:
        """Hand the guest the host's clock and random bytes (a cloned VM needs both);
        ``reseed`` re-keys its CRNG from them at once (a clone's is its template's);
        ``hostname`` names the VM."""
        import base64

        extra: dict[str, Any] = {"reseed": True} if reseed else {}
        if hostname:
            extra["hostname"] = hostname
        return self.call("hello", timeNs=time_ns, entropy=base64.b64encode(entropy).decode(),
                         **extra)

    def warm(self, seccomp: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Have the agent import and compile what containers need (a template, before it
        is saved)."""
        return self.call("warm", seccomp=seccomp or [], timeout=max(self.timeout, 120.0))

    def create(self, container_id: str, config: dict[str, Any], *,
               rootfs: dict[str, Any] | None = None, disks: list[dict[str, Any]] | None = None,
               tty: bool = False, stdin: bool = False) -> ProcessStream:
        """Create the container (its init waits for :meth:`start`). ``config``: a
        ``SiloConfig`` as ``to_json`` writes it; ``rootfs``: ``{"lower": [...], "upper",
        "work"}`` to overlay at ``config["root"]`` in the guest; ``disks``: mounts made
        first (``{"source": "serial:NAME"|path, "target", "fstype", "options"}``)."""
        s = self._new_stream(container_id)
        try:
            reply = self.call("create", id=container_id, stream=s.stream, config=config,
                              rootfs=rootfs, disks=disks or [], tty=tty, stdin=stdin)
        except BaseException:
            self._forget(s)
            raise
        s.pid = int(reply["pid"])
        s.steps = dict(reply.get("steps") or {})
        return s

    def start(self, container_id: str) -> int:
        return int(self.call("start", id=container_id)["pid"])

    def exec(self, container_id: str, args: list[str], *, env: list[str] | None = None,
             cwd: str | None = None, uid: int | None = None, gid: int | None = None,
             additional_gids: list[int] | None = None, tty: bool = False,
             stdin: bool = False) -> ProcessStream:
        proc: dict[str, Any] = {"args": args, "env": env or [], "tty": tty, "stdin": stdin}
        for key, value in (("cwd", cwd), ("uid", uid), ("gid", gid),
                           ("additionalGids", additional_gids)):
            if value is not None:
                proc[key] = value
        s = self._new_stream(container_id)
        try:
            s.pid = int(self.call("exec", id=container_id, stream=s.stream,
                                  process=proc)["pid"])
        except BaseException:
            self._forget(s)
            raise
        return s

    def _forget(self, s: ProcessStream) -> None:
        with self._lock:
            self._streams.pop(s.stream, None)

    def signal(self, container_id: str, sig: int, *, all_processes: bool = False,
               stream: int | None = None) -> None:
        fields: dict[str, Any] = {"id": container_id, "signal": int(sig),
                                  "all": all_processes}
        if stream is not None:
            fields["stream"] = stream
        self.call("signal", **fields)

    def resize(self, stream: int, rows: int, cols: int) -> None:
        self.call("resize", stream=stream, rows=rows, cols=cols)

    def write_stdin(self, stream: int, data: bytes) -> None:
        for i in range(0, len(data), P.DATA_CHUNK):
            self.send_raw(P.data(stream, P.STDIN, data[i:i + P.DATA_CHUNK]))

    def close_stdin(self, stream: int) -> None:
        self.send_raw(P.data(stream, P.STDIN, b""))

    def wait(self, stream: int, timeout: float | None = None) -> ExitStatus:
        reply = self.call("wait", timeout=timeout, stream=stream)
        return ExitStatus(int(reply["exitCode"]), reply.get("signal"))

    def pause(self, container_id: str) -> None:
        self.call("pause", id=container_id)

    def resume(self, container_id: str) -> None:
        self.call("resume", id=container_id)

    def stats(self, container_id: str) -> dict[str, Any]:
        stats: dict[str, Any] = self.call("stats", id=container_id)["stats"]
        return stats

    def top(self, container_id: str) -> list[dict[str, Any]]:
        procs: list[dict[str, Any]] = self.call("top", id=container_id)["processes"]
        return procs

    def delete(self, container_id: str) -> None:
        self.call("delete", id=container_id)

    def shutdown(self) -> None:
        """Every container killed and released; the agent then ends (the VM powers off)."""
        self.call("shutdown")
