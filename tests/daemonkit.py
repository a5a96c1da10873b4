"""A real ``isoboxd`` for tests: start it, talk to it, stop it, and check nothing is left.

Every daemon test uses this kit, so they all start the daemon the same way (a subprocess
of this Python with the test's ``ISOBOX_ROOT`` / ``ISOBOX_RUN``), speak plain HTTP/1.1 on
its unix socket (``http.client`` over ``AF_UNIX``, plus a raw upgrade for streams), and
check the same list of leftovers.

::

    from daemonkit import Daemon, assert_nothing_left

    with Daemon.start(root, run) as d:
        r = d.request("POST", "/v1/compute-systems", json={...})
        assert r.status == 201, r.text
    assert_nothing_left(root, run, [r.json()["id"]])
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from isobox.paths import socket_name
from isobox.spec import stream as frames

STREAM_PROTOCOL = "isobox-stream/1"


# --- the client -----------------------------------------------------------------------


class UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client`` over a unix socket (keep-alive, chunked bodies, as any client)."""

    def __init__(self, path: str | Path, timeout: float = 60.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = str(path)

    def connect(self) -> None:
        self.sock = connect_unix(self.socket_path, self.timeout)


def connect_unix(path: str | Path, timeout: float | None) -> socket.socket:
    """A connected unix socket; a path longer than sun_path goes through /proc/self/fd."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        with socket_name(Path(path)) as name:
            sock.connect(name)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> dict[str, Any]:
        """The ``error`` object of an ErrorBody."""
        err: dict[str, Any] = self.json()["error"]
        return err


def url(path: str, query: dict[str, Any] | list[tuple[str, Any]] | None = None) -> str:
    if not query:
        return path
    items = query.items() if isinstance(query, dict) else query
    return path + "?" + urllib.parse.urlencode([(k, _qv(v)) for k, v in items])


def _qv(v: Any) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    return str(v)


def quote_ref(ref: str) -> str:
    """An image or container reference as one path segment."""
    return urllib.parse.quote(ref, safe="")


class Client:
    """A tiny client of the daemon's socket, one connection per call unless ``keep``."""

    def __init__(self, socket_path: str | Path, timeout: float = 60.0) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout

    def connection(self) -> UnixHTTPConnection:
        return UnixHTTPConnection(self.socket_path, self.timeout)

    def request(
        self, method: str, path: str, *, json: Any = None, body: bytes | None = None,
        query: dict[str, Any] | list[tuple[str, Any]] | None = None,
        headers: dict[str, str] | None = None, conn: UnixHTTPConnection | None = None,
    ) -> Response:
        hdrs = dict(headers or {})
        if json is not None:
            body = _json_bytes(json)
            hdrs.setdefault("Content-Type", "application/json")
        c = conn or self.connection()
        try:
            c.request(method, url(path, query), body=body, headers=hdrs)
            resp = c.getresponse()
            data = resp.read()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        finally:
            if conn is None:
                c.close()

    def get(self, path: str, **kw: Any) -> Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> Response:
        return self.request("POST", path, **kw)

    @contextlib.contextmanager
    def lines(
        self, path: str, query: dict[str, Any] | list[tuple[str, Any]] | None = None,
    ) -> Iterator[Iterator[Any]]:
        """A JSON-lines stream: yields an iterator of the objects; leaving the block closes
        the connection (the daemon must notice and stop)."""
        c = self.connection()
        try:
            c.request("GET", url(path, query))
            resp = c.getresponse()
            if resp.status != 200:
                raise AssertionError(f"GET {path}: {resp.status} {resp.read()!r}")

            def items() -> Iterator[Any]:
                while line := resp.readline():
                    yield json.loads(line)

            yield items()
        finally:
            c.close()

    def upgrade(
        self, path: str, *, json: Any = None,
        query: dict[str, Any] | list[tuple[str, Any]] | None = None,
    ) -> tuple[int, bytes, socket.socket]:
        """A stream request: POST with ``Upgrade: isobox-stream/1``. Returns the status,
        the raw response head (and body, when not 101) and the connected socket."""
        sock = connect_unix(self.socket_path, self.timeout)
        body = _json_bytes(json) if json is not None else b""
        head = (f"POST {url(path, query)} HTTP/1.1\r\nHost: localhost\r\n"
                f"Upgrade: {STREAM_PROTOCOL}\r\nConnection: Upgrade\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        sock.sendall(head.encode() + body)
        raw = b""
        while b"\r\n\r\n" not in raw:
            chunk = sock.recv(1)  # byte by byte: frames after the head stay in the socket
            if not chunk:
                break
            raw += chunk
        status = int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0
        if status != 101:
            length = 0
            for line in raw.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            while len(raw.split(b"\r\n\r\n", 1)[1]) < length:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                raw += chunk
        return status, raw, sock

    def raw(self, data: bytes, *, wait: float = 5.0) -> bytes:
        """Send bytes as they are; everything the daemon answers until it closes or is
        quiet for ``wait`` seconds."""
        with connect_unix(self.socket_path, wait) as sock:
            sock.sendall(data)
            out = b""
            with contextlib.suppress(TimeoutError, ConnectionResetError):
                while chunk := sock.recv(65536):
                    out += chunk
            return out


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj).encode()


@dataclass
class StreamResult:
    stdout: bytes
    stderr: bytes
    exit: dict[str, Any] | None
    errors: list[dict[str, Any]]
    controls: list[dict[str, Any]]


def read_stream(sock: socket.socket, *, stdin: bytes | None = None,
                close_stdin: bool = True, timeout: float = 60.0) -> StreamResult:
    """Speak a stream to its end: send ``stdin`` (then ``closeStdin``), collect output
    frames until the ``exit`` control frame or the end of the connection."""
    sock.settimeout(timeout)
    if stdin is not None:
        if stdin:
            sock.sendall(frames.encode(frames.STDIN, stdin))
        if close_stdin:
            sock.sendall(frames.encode_control({"closeStdin": True}))
    out, err = bytearray(), bytearray()
    result = StreamResult(b"", b"", None, [], [])
    while True:
        try:
            frame = frames.read_frame(sock)
        except (frames.StreamError, ConnectionResetError):
            break
        if frame is None:
            break
        kind, payload = frame
        if kind == frames.STDOUT:
            out += payload
        elif kind == frames.STDERR:
            err += payload
        elif kind == frames.CONTROL:
            obj = frames.decode_control(payload)
            result.controls.append(obj)
            if "error" in obj:
                result.errors.append(obj["error"])
            if "exit" in obj:
                result.exit = obj["exit"]
                break
    result.stdout, result.stderr = bytes(out), bytes(err)
    return result


# --- the daemon -----------------------------------------------------------------------


class Daemon:
    """One ``isoboxd`` subprocess on ``root`` / ``run``."""

    def __init__(self, root: Path, run: Path, *, log_level: str = "debug",
                 extra_args: tuple[str, ...] = ()) -> None:
        self.root = Path(root)
        self.run = Path(run)
        self.socket_path = self.run / "isoboxd.sock"
        self.log_path = self.root.parent / f"isoboxd-{os.getpid()}-{time.monotonic_ns()}.log"
        self.argv = [sys.executable, "-m", "isobox.api.daemon", "--root", str(self.root),
                     "--run", str(self.run), "--log-level", log_level, *extra_args]
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = Client(self.socket_path)

    @classmethod
    def start(cls, root: Path, run: Path, *, timeout: float = 30.0, **kw: Any) -> Daemon:
        d = cls(root, run, **kw)
        d.launch(timeout=timeout)
        return d

    def launch(self, *, timeout: float = 30.0) -> None:
        env = dict(os.environ, ISOBOX_ROOT=str(self.root), ISOBOX_RUN=str(self.run))
        self.root.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
            )
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 30.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"isoboxd exited {self.proc.returncode} before it listened:\n{self.log()}")
            if self.socket_path.exists():
                with contextlib.suppress(OSError, http.client.HTTPException):
                    if self.client.get("/v1/_ping").body == b"OK":
                        return
            time.sleep(0.05)
        raise AssertionError(f"isoboxd did not listen within {timeout}s:\n{self.log()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def request(self, method: str, path: str, **kw: Any) -> Response:
        return self.client.request(method, path, **kw)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; the exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def kill9(self) -> None:
        """SIGKILL: the daemon dies as in a crash (monitors and containers stay)."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def short_run_dir() -> Iterator[Path]:
    """A short ``ISOBOX_RUN`` under /tmp: socket paths must fit in sun_path (108 bytes), and
    ``$ISOBOX_RUN/containers/<64 hex>/monitor.sock`` under pytest's tmp_path does not."""
    run = Path(tempfile.mkdtemp(prefix="ibd", dir="/tmp"))
    try:
        yield run
    finally:
        shutil.rmtree(run, ignore_errors=True)


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (the daemon's zygote, for one)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# --- leftovers ------------------------------------------------------------------------


def _mounts_under(root: Path) -> list[str]:
    prefixes = {str(root), str(root.resolve())}
    found = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            point = line.split()[4].replace("\\040", " ")
            if any(point == p or point.startswith(p + "/") for p in prefixes):
                found.append(point)
    return found


def _cgroups_named(ids: list[str]) -> list[str]:
    found = []
    for base in Path("/sys/fs/cgroup").glob("*/isobox*"):
        if not base.is_dir():
            continue
        for dirpath, _, _ in os.walk(base):
            if any(i in Path(dirpath).name for i in ids):
                found.append(dirpath)
    return sorted(found)


def _processes_of(root: Path, run: Path, ids: list[str]) -> list[str]:
    """Processes that name a container: in their command line, their working folder, an
    open file under the container's folders, or a unix socket bound under them."""
    folders = [str(p / "containers" / i) for p in (root, run) for i in ids]
    socket_inodes: set[str] = set()
    with contextlib.suppress(OSError), open("/proc/net/unix") as fh:
        for line in fh.readlines()[1:]:
            parts = line.split()
            if len(parts) >= 8 and any(i in parts[7] for i in ids):
                socket_inodes.add(parts[6])
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
            links = [os.readlink(proc / "cwd")]
            with contextlib.suppress(OSError):
                links += [os.readlink(fd) for fd in (proc / "fd").iterdir()]
        except OSError:
            continue
        why = None
        if any(i in cmdline for i in ids):
            why = f"command line {cmdline.strip()!r}"
        elif any(link == f or link.startswith(f + "/") for link in links for f in folders):
            why = "uses the container's folder"
        elif any(link == f"socket:[{ino}]" for link in links for ino in socket_inodes):
            why = "holds the container's monitor socket"
        if why:
            found.append(f"pid {proc.name}: {why}")
    return found


def leftovers(root: Path, run: Path, ids: list[str]) -> list[str]:
    """What is still there of the containers ``ids`` (empty: nothing)."""
    ids = [i for i in ids if i]
    out = [f"mount {m}" for m in _mounts_under(Path(root))]
    out += [f"cgroup {c}" for c in _cgroups_named(ids)] if ids else []
    out += _processes_of(Path(root), Path(run), ids) if ids else []
    for i in ids:
        for base in (Path(root), Path(run)):
            folder = base / "containers" / i
            if folder.exists():
                out.append(f"files {folder}: {sorted(p.name for p in folder.iterdir())}")
    return out


def assert_nothing_left(root: Path, run: Path, ids: list[str], *, timeout: float = 15.0) -> None:
    """No mount under ``root``, no cgroup named by an id under /sys/fs/cgroup/*/isobox*, no
    monitor or container process, no files of the (removed) containers. Monitors release
    asynchronously, so this waits up to ``timeout`` seconds for the list to empty."""
    deadline = time.monotonic() + timeout
    while True:
        left = leftovers(root, run, ids)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not left, "left behind:\n" + "\n".join(left)


ISOBOX = str(Path(sys.executable).parent / "isobox")


def isobox_cli(*args: str, check: bool = True, timeout: float = 180,
               stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """The ``isobox`` CLI against the daemon of ``$ISOBOX_RUN`` (never autostarting one);
    with ``check`` a non-zero exit fails the test with the CLI's stderr."""
    env = dict(os.environ, ISOBOX_AUTOSTART="0")
    r = subprocess.run([ISOBOX, *args], capture_output=True, text=True, timeout=timeout,
                       env=env, check=False, input=stdin)
    if check:
        assert r.returncode == 0, f"isobox {' '.join(args)}: {r.returncode}\n{r.stderr}"
    return r


@contextlib.contextmanager
def busybox_daemon(root: Path, setenv: Any, *, rm_timeout: float = 180) -> Iterator[Daemon]:
    """An isoboxd on ``root`` and a short run folder (``setenv("ISOBOX_RUN", ...)``, e.g.
    monkeypatch's), busybox bootstrapped; every container removed and the daemon stopped
    afterwards."""
    with short_run_dir() as run:
        setenv("ISOBOX_RUN", str(run))
        d = Daemon.start(root, run)
        try:
            isobox_cli("image", "bootstrap", "busybox")
            yield d
        finally:
            with contextlib.suppress(Exception):
                ids = isobox_cli("ps", "-aq", check=False).stdout.split()
                if ids:
                    isobox_cli("rm", "-f", *ids, check=False, timeout=rm_timeout)
            d.stop()
