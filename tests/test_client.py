"""The SDK (isobox.client).

Unit tests run the transport against a tiny HTTP server on a unix socket in this process
(what a daemon sends, byte for byte: errors, chunked JSON lines, a 101 followed at once by
frames). Their integration twins, against a real ``isoboxd``, are at the end of this file.
"""

from __future__ import annotations

import json
import os
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, ClassVar

import pytest

from isobox.client import Client, ContainerError, DaemonUnavailable
from isobox.client.api import build_document, parse_size
from isobox.client.stream import StreamEnded, pump
from isobox.errors import (
    ImageNotFound,
    InvalidDocument,
    InvalidReference,
    IsoboxError,
    NotFound,
)
from isobox.spec import stream as frames
from isobox.spec.compute import parse_document

# ---- a fake daemon ---------------------------------------------------------------------------

Handler = Callable[["_Req"], None]


class _Req(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    routes: ClassVar[dict[tuple[str, str], Handler]] = {}
    seen: ClassVar[list[tuple[str, str, bytes]]] = []

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _dispatch(self) -> None:
        path = self.path.split("?")[0]
        data = self.body()
        self.seen.append((self.command, self.path, data))
        self.data = data
        handler = self.routes.get((self.command, path))
        if handler is None:
            self.send_json(404, {"error": {"kind": "NotFound", "message": f"no route {path}"}})
        else:
            handler(self)

    do_GET = do_POST = do_DELETE = do_PUT = _dispatch

    def send_json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def upgrade(self, payload: bytes) -> None:
        """101 and the first frames in one write, as a fast daemon does."""
        head = (b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                b"Upgrade: isobox-stream/1\r\n\r\n")
        self.wfile.write(head + payload)
        self.wfile.flush()
        self.close_connection = True


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[tuple[Client, dict[tuple[str, str], Handler],
                                           list[tuple[str, str, bytes]]]]:
    sock = tmp_path / "d.sock"
    routes: ClassVar[dict[tuple[str, str], Handler]] = {}
    seen: ClassVar[list[tuple[str, str, bytes]]] = []
    handler = type("H", (_Req,), {"routes": routes, "seen": seen})
    server = _Server(str(sock), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield Client(sock), routes, seen
    finally:
        server.shutdown()
        server.server_close()


INFO = {"id": "a" * 64, "name": "c1", "image": "busybox", "imageId": "sha256:" + "b" * 64,
        "isolation": "process", "state": "created", "pid": 0, "exitCode": None, "error": None,
        "createdAt": "2026-01-01T00:00:00Z", "startedAt": None, "finishedAt": None,
        "labels": {}, "document": {}, "rootfs": "", "scratch": ""}


def _container_routes(routes: dict[tuple[str, str], Handler], stream: bytes) -> None:
    routes[("POST", "/v1/compute-systems")] = lambda r: r.send_json(
        201, {"id": INFO["id"], "name": "c1", "warnings": []})
    routes[("GET", f"/v1/compute-systems/{INFO['id']}")] = lambda r: r.send_json(200, INFO)
    routes[("POST", f"/v1/compute-systems/{INFO['id']}/start")] = lambda r: r.upgrade(stream)
    routes[("POST", f"/v1/compute-systems/{INFO['id']}/wait")] = lambda r: r.send_json(
        200, {"exitCode": 0, "signal": None, "error": None})


def _exit(code: int) -> bytes:
    return frames.encode_control({"exit": {"exitCode": code, "signal": None}})


# ---- unit tests ------------------------------------------------------------------------------


def test_errors_come_back_as_the_class_the_daemon_names(fake: Any) -> None:
    client, routes, _ = fake
    routes[("GET", "/v1/images/nope%3A1")] = lambda r: r.send_json(
        404, {"error": {"kind": "ImageNotFound", "message": "no such image: nope:1"}})
    with pytest.raises(ImageNotFound, match=r"^no such image: nope:1$"):
        client.images.get("nope:1")
    routes[("POST", "/v1/compute-systems")] = lambda r: r.send_json(400, {"error": {
        "kind": "InvalidDocument", "message": "compute system: process.env[0]: bad",
        "field": "process.env[0]"}})
    with pytest.raises(InvalidDocument) as info:
        client.containers.create("busybox", environment=["X=1"])
    assert info.value.field == "process.env[0]" and info.value.exit_code == 2
    routes[("GET", "/v1/info")] = lambda r: r.send_json(
        500, {"error": {"kind": "NoSuchClassAnywhere", "message": "boom"}})
    with pytest.raises(IsoboxError, match=r"^boom$") as err:
        client.info()
    assert type(err.value) is IsoboxError


def test_references_are_one_path_segment_and_queries_repeat(fake: Any) -> None:
    client, routes, seen = fake
    routes[("DELETE", "/v1/images/reg.io%2Fa%2Fb%3A1")] = lambda r: r.send_json(
        200, {"untagged": ["reg.io/a/b:1"], "deleted": []})
    assert client.images.remove("reg.io/a/b:1", force=True)["untagged"] == ["reg.io/a/b:1"]
    assert seen[-1][1] == "/v1/images/reg.io%2Fa%2Fb%3A1?force=1"
    routes[("GET", "/v1/compute-systems")] = lambda r: r.send_json(200, [INFO])
    cts = client.containers.list(all=True, filters={"label": ["a=1", "b"], "isolation": "host"})
    assert [c.name for c in cts] == ["c1"]
    assert seen[-1][1] == "/v1/compute-systems?label=a%3D1&label=b&isolation=host"
    # Without all=True a created container is not listed (ps shows running ones).
    assert client.containers.list() == []


def test_chunked_json_lines_arrive_as_they_are_sent(fake: Any) -> None:
    client, routes, _ = fake
    release = threading.Event()

    def logs(r: _Req) -> None:
        r.send_response(200)
        r.send_header("Transfer-Encoding", "chunked")
        r.end_headers()
        for i, gate in ((0, None), (1, release)):
            if gate is not None:
                assert gate.wait(10)
            line = json.dumps({"time": "t", "stream": "stdout", "line": f"l{i}\n"}).encode()
            r.wfile.write(b"%x\r\n%s\n\r\n" % (len(line) + 1, line))
            r.wfile.flush()
        r.wfile.write(b"0\r\n\r\n")

    routes[("GET", f"/v1/compute-systems/{INFO['id']}")] = lambda r: r.send_json(200, INFO)
    routes[("GET", f"/v1/compute-systems/{INFO['id']}/logs")] = logs
    entries = client.containers.get(INFO["id"]).logs(stream=True, follow=True)
    first = next(entries)  # must not wait for the end of the stream
    assert first["line"] == "l0\n"
    release.set()
    assert [e["line"] for e in entries] == ["l1\n"]
    assert client.containers.get(INFO["id"]).logs(tail=5) == b"l0\nl1\n"


def test_run_reads_frames_sent_with_the_101(fake: Any) -> None:
    client, routes, seen = fake
    _container_routes(routes, frames.encode(frames.STDOUT, b"hi\n")
                      + frames.encode(frames.STDERR, b"warn\n") + _exit(0))
    assert client.containers.run("busybox", ["echo", "hi"], isolation="host") == b"hi\n"
    calls = [(m, p) for m, p, _ in seen]
    base = f"/v1/compute-systems/{INFO['id']}"
    assert calls[-2:] == [("POST", f"{base}/start?attach=1"),
                          ("POST", f"{base}/wait?condition=not-running")]
    create_doc = json.loads(seen[0][2])
    assert create_doc["process"]["args"] == ["echo", "hi"]
    assert create_doc["isolation"] == "host"


def test_run_raises_container_error_with_stderr(fake: Any) -> None:
    client, routes, _ = fake
    _container_routes(routes, frames.encode(frames.STDERR, b"oops\n") + _exit(7))
    with pytest.raises(ContainerError) as info:
        client.containers.run("busybox", "sh -c 'exit 7'")
    assert info.value.exit_status == 7 and info.value.stderr == b"oops\n"
    assert info.value.command == ["sh", "-c", "exit 7"]


def test_a_stream_that_ends_without_exit_is_an_error(fake: Any) -> None:
    client, routes, _ = fake
    _container_routes(routes, frames.encode(frames.STDOUT, b"partial"))
    routes[("DELETE", f"/v1/compute-systems/{INFO['id']}")] = lambda r: r.send_json(204, None)
    with pytest.raises(StreamEnded):
        client.containers.run("busybox", ["true"])


def test_an_error_frame_is_raised_as_its_class(fake: Any) -> None:
    client, routes, _ = fake
    _container_routes(routes, frames.encode_control(
        {"error": {"kind": "NotFound", "message": "gone"}}))
    routes[("DELETE", f"/v1/compute-systems/{INFO['id']}")] = lambda r: r.send_json(204, None)
    with pytest.raises(NotFound, match="gone"):
        client.containers.run("busybox", ["true"])


def test_pump_sends_stdin_and_returns_the_exit_code(fake: Any) -> None:
    client, routes, _ = fake

    def echo(r: _Req) -> None:
        r.upgrade(b"")
        reader = frames.FrameReader()
        got = b""
        while True:
            data = r.connection.recv(65536)
            assert data, "client closed before closeStdin"
            for kind, payload in reader.feed(data):
                if kind == frames.STDIN:
                    got += payload
                    r.connection.sendall(frames.encode(frames.STDOUT, payload))
                elif frames.decode_control(payload).get("closeStdin"):
                    r.connection.sendall(frames.encode(frames.STDERR, b"%d" % len(got))
                                         + _exit(3))
                    return

    routes[("GET", f"/v1/compute-systems/{INFO['id']}")] = lambda r: r.send_json(200, INFO)
    routes[("POST", f"/v1/compute-systems/{INFO['id']}/exec")] = echo
    raw = client.containers.get(INFO["id"]).exec_stream(["cat"], stdin=True)
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    data = os.urandom(300_000)  # more than a pipe holds: stdin and output interleave

    def feed() -> None:
        os.write(in_w, data)
        os.close(in_w)

    collected: list[bytes] = []

    def drain() -> None:
        while chunk := os.read(out_r, 65536):
            collected.append(chunk)

    threads = [threading.Thread(target=feed), threading.Thread(target=drain)]
    for t in threads:
        t.start()
    code = pump(raw, stdin=in_r, stdout=out_w, stderr=err_w)
    os.close(out_w)
    os.close(err_w)
    for t in threads:
        t.join(10)
    assert code == 3
    assert b"".join(collected) == data
    assert os.read(err_r, 100) == str(len(data)).encode()
    for fd in (in_r, out_r, err_r):
        os.close(fd)


def test_no_daemon_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DaemonUnavailable, match="cannot connect to isoboxd"):
        Client(tmp_path / "absent.sock").ping()


def test_the_document_the_sdk_builds_is_valid(tmp_path: Path) -> None:
    doc = build_document(
        "busybox", "sh -c 'echo $X'", name="web-1", isolation="host", entrypoint=[],
        environment={"X": "1"}, working_dir="/tmp", user="1000:1000", tty=True,
        stdin_open=True, hostname="box", network_mode="none",
        mounts=[f"{tmp_path}:/data:ro"], volumes={str(tmp_path): {"bind": "/v", "mode": "rw"}},
        labels=["team=a", "x"], mem_limit="64m", cpus=0.5, cpu_shares=512, pids_limit=20,
        read_only=True, auto_remove=True,
    )
    parsed = parse_document(doc)
    assert parsed.process.args == ["sh", "-c", "echo $X"] and parsed.process.entrypoint == []
    assert parsed.mounts[0].read_only and not parsed.mounts[1].read_only
    assert parsed.resources.memory == 64 << 20 and parsed.resources.pids_limit == 20
    assert parsed.labels == {"team": "a", "x": ""} and parsed.auto_remove and parsed.read_only
    assert parse_size("1g") == 1 << 30 and parse_size("512k") == 512 << 10
    assert parse_size(4096) == 4096 and parse_size("10MiB") == 10 << 20


def test_client_imports_no_pydantic_and_no_engine_code() -> None:
    import subprocess
    import sys

    code = ("import sys, isobox.client, isobox.client.stream, isobox.client.daemon\n"
            "print(sorted(m for m in sys.modules if m.startswith(('isobox', 'pydantic'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    loaded = set(eval(out))  # noqa: S307 - our own subprocess's repr of a list
    allowed = {"isobox", "isobox.errors", "isobox.paths", "isobox.spec", "isobox.spec.wire",
               "isobox.spec.stream"}
    assert {m for m in loaded if not m.startswith("isobox.client")} <= allowed, loaded


# ---- the HTTP client itself, against a scripted raw socket ----------------------------------


class _Scripted:
    """A unix socket server that reads one request (head and, if asked, its body) and
    answers it with ``reply(request_bytes, conn)``."""

    def __init__(self, path: Path, reply: Callable[[bytes, Any], None],
                 read_body: bool = True) -> None:
        import socket as sk

        self.path = path
        self.requests: list[bytes] = []
        self.srv = sk.socket(sk.AF_UNIX, sk.SOCK_STREAM)
        self.srv.bind(str(path))
        self.srv.listen(8)
        self.reply = reply
        self.read_body = read_body
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                if self.read_body:
                    data += _read_request_body(conn, data)
                self.requests.append(data)
                self.reply(data, conn)

    def close(self) -> None:
        self.srv.close()


def _read_request_body(conn: Any, data: bytes) -> bytes:
    """The rest of the request body (past what came with the head), as sent."""
    head, _, first = data.partition(b"\r\n\r\n")
    headers = head.decode().lower()
    rest = first
    if "content-length:" in headers:
        n = int(headers.split("content-length:")[1].split("\r\n")[0])
        while len(rest) < n:
            rest += conn.recv(65536)
    elif "transfer-encoding: chunked" in headers:
        while not rest.endswith(b"0\r\n\r\n"):
            rest += conn.recv(65536)
    return rest[len(first):]


@pytest.fixture
def scripted(tmp_path: Path) -> Iterator[Callable[..., tuple[Client, _Scripted]]]:
    servers: list[_Scripted] = []

    def make(reply: Callable[[bytes, Any], None], **kw: Any) -> tuple[Client, _Scripted]:
        srv = _Scripted(tmp_path / f"s{len(servers)}.sock", reply, **kw)
        servers.append(srv)
        return Client(srv.path, timeout=10), srv

    yield make
    for srv in servers:
        srv.close()


def _send(*parts: bytes, hold: float = 0.0) -> Callable[[bytes, Any], None]:
    """Send each part in its own write (so reads see them apart), then keep the connection
    open ``hold`` seconds (keep-alive: the body must end without the close)."""
    def reply(_req: bytes, conn: Any) -> None:
        for part in parts:
            conn.sendall(part)
            time.sleep(0.01)
        time.sleep(hold)
    return reply


def test_chunked_answers_are_decoded_across_reads(scripted: Any) -> None:
    body = json.dumps([{"id": "x" * 40, "state": "running"}] * 50).encode()
    cut = [body[:7], body[7:2000], body[2000:]]
    chunks = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(c), c) for c in cut)
    client, _ = scripted(_send(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks[:5],
        chunks[5:1000], chunks[1000:], b"0\r\nX-Trailer: 1\r\n\r\n", hold=5))
    t0 = time.monotonic()
    assert client.api.request("GET", "/x").json() == json.loads(body)
    assert time.monotonic() - t0 < 2, "waited for the close of a keep-alive connection"


def test_lines_split_across_chunks_and_length_and_close_delimited_bodies(scripted: Any) -> None:
    client, _ = scripted(_send(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\n{\"a\r\n", b"6\r\n\": 1}\n\r\n9\r\n{\"a\": 2}\n\r\n0\r\n\r\n", hold=5))
    assert list(client.api.request("GET", "/l").lines()) == [{"a": 1}, {"a": 2}]
    client, _ = scripted(_send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel", b"lo",
                               hold=5))
    assert client.api.request("GET", "/n").read() == b"hello"
    client, _ = scripted(_send(b"HTTP/1.1 200 OK\r\n\r\n", b"up to ", b"the close"))
    assert b"".join(client.api.request("GET", "/c").chunks()) == b"up to the close"
    client, _ = scripted(_send(b"HTTP/1.1 100 Continue\r\n\r\n",
                               b"HTTP/1.1 204 No Content\r\n\r\n", hold=5))
    assert client.api.request("POST", "/s", json_body={}).read() == b""


def test_a_connection_lost_mid_answer_is_daemon_unavailable(scripted: Any) -> None:
    client, _ = scripted(_send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort"))
    with pytest.raises(DaemonUnavailable, match="closed inside the answer"):
        client.api.request("GET", "/x").read()
    client, _ = scripted(_send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                               b"10\r\nonly"))
    with pytest.raises(DaemonUnavailable):
        client.api.request("GET", "/x").read()
    client, _ = scripted(_send())
    with pytest.raises(DaemonUnavailable, match="closed before the answer"):
        client.ping()
    client, _ = scripted(_send(b"SMTP hello\r\n\r\n"))
    with pytest.raises(IsoboxError, match="malformed status line"):
        client.ping()


def test_request_bodies_by_length_and_in_chunks(scripted: Any, tmp_path: Path) -> None:
    ok = b"HTTP/1.1 204 No Content\r\n\r\n"
    client, srv = scripted(_send(ok))
    data = os.urandom(3 << 20)
    (tmp_path / "blob").write_bytes(data)
    with open(tmp_path / "blob", "rb") as fh:
        client.api.request("PUT", "/a", body=fh, length=len(data)).close()
    head, _, body = srv.requests[-1].partition(b"\r\n\r\n")
    assert b"Content-Length: %d" % len(data) in head and body == data
    with open(tmp_path / "blob", "rb") as fh:
        client.api.request("PUT", "/b", body=fh).close()  # length unknown: chunked
    head, _, raw = srv.requests[-1].partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    decoded, pos = b"", 0
    while True:
        end = raw.index(b"\r\n", pos)
        size = int(raw[pos:end], 16)
        if size == 0:
            break
        decoded += raw[end + 2:end + 2 + size]
        pos = end + 4 + size
    assert decoded == data


def test_an_answer_before_the_upload_ends_is_heard(scripted: Any, tmp_path: Path) -> None:
    """A daemon that refuses an import before reading it (bad tag) answers and closes: the
    client stops sending and raises the daemon's error, not "went away"."""
    err = json.dumps({"error": {"kind": "InvalidReference", "message": "bad tag"}}).encode()
    client, _ = scripted(_send(b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n%s"
                               % (len(err), err)), read_body=False)
    (tmp_path / "big").write_bytes(b"\0" * (16 << 20))
    with open(tmp_path / "big", "rb") as fh, pytest.raises(InvalidReference, match="bad tag"):
        client.api.request("POST", "/images/import", body=fh, length=16 << 20)


def test_queries_and_refs_are_encoded_as_urllib_does() -> None:
    from urllib.parse import quote, urlencode

    from isobox.client._transport import Query, _query, quote_ref

    for ref in ("busybox:latest", "reg.io/a/b:1", "sp ace+plus&amp=é~_.-", "%41"):
        assert quote_ref(ref) == quote(ref, safe="")
    query: Query = {"label": ["a=1", "b c", "ü/x"], "force": True, "skip": False, "none": None,
             "tail": 5, "t": 0.5, "since": "2026-01-01T00:00:00+01:00"}
    pairs = [("label", "a=1"), ("label", "b c"), ("label", "ü/x"), ("force", "1"),
             ("tail", "5"), ("t", "0.5"), ("since", "2026-01-01T00:00:00+01:00")]
    assert _query(query) == "?" + urlencode(pairs)
    assert _query({}) == _query({"a": None}) == ""


def test_what_the_transport_writes_down_matches_the_spec_and_paths(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from isobox.client import _transport
    from isobox.client.api import SOCKET_NAME, default_socket, default_socket_path
    from isobox.paths import run_dir
    from isobox.spec import wire

    assert (_transport.API_VERSION, _transport.STREAM_PROTOCOL) == (
        wire.API_VERSION, wire.STREAM_PROTOCOL)
    monkeypatch.delenv("ISOBOX_RUN", raising=False)
    assert default_socket_path() == str(run_dir() / SOCKET_NAME) == str(default_socket())
    monkeypatch.setenv("ISOBOX_RUN", "/tmp/elsewhere")
    assert default_socket_path() == str(run_dir() / SOCKET_NAME) == "/tmp/elsewhere/isoboxd.sock"
    assert Client().socket_path == run_dir() / SOCKET_NAME


def test_autostart_is_tried_once_at_the_first_request(tmp_path: Path) -> None:
    """No probe at construction; a failed first connect calls the hook, then connects again;
    after a connect has worked, a lost daemon is an error, not a restart."""
    from isobox.client._transport import Transport

    sock = tmp_path / "late.sock"
    calls: list[int] = []
    servers: list[_Scripted] = []

    def start() -> None:
        calls.append(1)
        servers.append(_Scripted(sock, _send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK")))

    t = Transport(sock, 10, on_unavailable=start)
    assert calls == []
    assert t.request("GET", "/_ping").read() == b"OK"
    assert t.request("GET", "/_ping").read() == b"OK"
    assert calls == [1]
    servers[0].close()
    sock.unlink()
    with pytest.raises(DaemonUnavailable, match="cannot connect"):
        t.request("GET", "/_ping")
    assert calls == [1]


def test_cli_verbs_load_only_what_they_use(tmp_path: Path) -> None:
    """ps loads no stream code; neither loads http.client, pathlib, tarfile or the
    daemon-starting machinery when the daemon answers (here: a fake that lists nothing)."""
    import subprocess
    import sys

    srv = _Scripted(tmp_path / "isoboxd.sock", _send(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n[]"))
    try:
        code = ("import sys; from isobox.cli.main import main\n"
                "try:\n    main(['ps'])\nexcept SystemExit:\n    pass\n"
                "print(sorted(sys.modules))")
        env = dict(os.environ, ISOBOX_RUN=str(tmp_path))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, env=env).stdout.splitlines()
    finally:
        srv.close()
    assert out[0].startswith("CONTAINER ID")
    loaded = set(eval(out[-1]))  # noqa: S307 - our own subprocess's repr of a list
    heavy = {"http.client", "email.parser", "ssl", "pathlib", "tarfile", "tempfile",
             "subprocess", "isobox.client.daemon", "isobox.client.stream", "isobox.spec.wire",
             "isobox.spec.stream", "isobox.cli.containers", "termios"}
    assert not loaded & heavy, loaded & heavy


def _wait_for(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# ---- integration: a real isoboxd ------------------------------------------------------------


@pytest.fixture
def daemon(isobox_env: Path, tmp_path: Path) -> Iterator[Client]:
    """A real isoboxd on this test's root, with busybox imported; on the way out, nothing
    of any container may be left (mounts, cgroups, processes, files)."""
    from daemonkit import Daemon, assert_nothing_left
    from isobox.storage.bootstrap import bootstrap_busybox
    from isobox.storage.store import ImageStore

    store = ImageStore()
    bootstrap_busybox(store)
    store.close()
    run = Path(os.environ["ISOBOX_RUN"])
    d = Daemon.start(isobox_env, run)
    client = Client()
    try:
        yield client
        ids = [ct.id for ct in client.containers.list(all=True)]
        for ct in client.containers.list(all=True):
            ct.remove(force=True)
    finally:
        d.stop()
    assert_nothing_left(isobox_env, run, ids)


@pytest.mark.root
@pytest.mark.overlay
def test_sdk_run_returns_stdout_and_raises_on_failure(daemon: Client) -> None:
    c = daemon
    assert c.ping()
    assert c.containers.run("busybox", ["echo", "hi"], isolation="process",
                            auto_remove=True) == b"hi\n"
    assert c.containers.run("busybox", "sh -c 'echo out; echo err >&2'", isolation="host",
                            stderr=True, remove=True) == b"out\nerr\n"
    with pytest.raises(ContainerError) as info:
        c.containers.run("busybox", ["sh", "-c", "echo bad >&2; exit 7"], auto_remove=True)
    assert info.value.exit_status == 7 and info.value.stderr == b"bad\n"
    assert c.containers.list(all=True) == []  # auto_remove / remove left nothing
    with pytest.raises(ImageNotFound):
        c.containers.run("nosuch/image:1", ["true"])
    with pytest.raises(InvalidDocument) as bad:
        c.containers.create("busybox", ["true"], environment=["NOEQUALS"])
    assert bad.value.field == "process.env"


@pytest.mark.root
@pytest.mark.overlay
def test_sdk_detached_container_lifecycle(daemon: Client, tmp_path: Path) -> None:
    c = daemon
    ct = c.containers.run(
        "busybox", ["sh", "-c", "echo started; echo warn >&2; while :; do sleep 1; done"],
        detach=True, name="sdk-life", labels={"team": "a"}, environment={"X": "42"},
        mem_limit="64m", pids_limit=50,
    )
    assert ct.name == "sdk-life"
    ct.reload()
    assert ct.status == "running" and ct.attrs["pid"] > 0
    assert [x.id for x in c.containers.list(filters={"label": "team=a"})] == [ct.id]
    assert c.containers.list(filters={"label": "team=b"}) == []
    assert c.containers.get("sdk-life").id == ct.id == c.containers.get(ct.id[:12]).id
    assert ct.exec_run(["sh", "-c", "echo $X"], environment={"X": "7"}) == (0, b"7\n")
    code, (out, err) = ct.exec_run("sh -c 'echo o; echo e >&2; exit 3'", demux=True)
    assert (code, out, err) == (3, b"o\n", b"e\n")
    _wait_for(lambda: b"started\n" in ct.logs(stderr=False))  # type: ignore[operator]
    assert ct.logs(stdout=False) == b"warn\n"
    entries = list(ct.logs(stream=True))  # type: ignore[arg-type]
    assert {e["stream"] for e in entries} == {"stdout", "stderr"}
    top = ct.top()["processes"]
    assert any(p["command"].startswith("sh -c") for p in top)
    stats = ct.stats()
    assert isinstance(stats, dict) and stats["memoryLimit"] == 64 << 20
    # Files in and out (tar over the archive route).
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("note.txt")
        info.size = 6
        tar.addfile(info, io.BytesIO(b"hello\n"))
    ct.put_archive("/tmp", buf.getvalue())
    assert ct.exec_run(["cat", "/tmp/note.txt"]).output == b"hello\n"
    with tarfile.open(fileobj=io.BytesIO(b"".join(ct.get_archive("/tmp/note.txt")))) as tar:
        member = tar.extractfile("note.txt")
        assert member is not None and member.read() == b"hello\n"
    ct.pause()
    ct.reload()
    assert ct.status == "paused"
    ct.unpause()
    ct.kill("SIGKILL")
    assert ct.wait()["exitCode"] == 137
    ct.reload()
    assert ct.status == "stopped"
    # A stopped container starts again under another isolation, on the same scratch layer.
    ct.start(isolation="host")
    ct.reload()
    assert ct.status == "running" and ct.attrs["isolation"] == "host"
    assert ct.exec_run(["sh", "-c", "echo $X"]) == (0, b"42\n")
    ct.stop(timeout=1)
    ct.remove()
    with pytest.raises(NotFound):
        c.containers.get("sdk-life")


@pytest.mark.root
@pytest.mark.overlay
def test_sdk_images_and_events(daemon: Client, tmp_path: Path) -> None:
    from imagekit import d, f, oci_layout, tar_bytes

    c = daemon
    before = time.time()
    oci_layout(tmp_path / "img", [tar_bytes([d("etc"), f("etc/hello", "hi\n")])])
    img = c.images.import_file(tmp_path / "img", "sdk/test:1")
    assert img.tags == ["sdk/test:1"]
    assert {i.id for i in c.images.list()} == {img.id, c.images.get("busybox").id}
    c.images.save("sdk/test:1", tmp_path / "out.tar", "docker")
    back = c.images.import_file(tmp_path / "out.tar", "sdk/back:1")
    assert back.id == img.id
    c.images.tag("sdk/back:1", "sdk/third:1")
    assert c.images.remove("sdk/back:1") == {"untagged": ["sdk/back:1"], "deleted": []}
    with pytest.raises(ImageNotFound):
        c.images.save("sdk/absent:1", tmp_path / "absent.tar")
    assert not (tmp_path / "absent.tar").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".absent")] == []
    bb = c.images.bootstrap("busybox", "sdk/bb:1")
    assert bb.tags == ["busybox:latest", "sdk/bb:1"]
    assert c.containers.run("busybox", ["true"], auto_remove=True) == b""
    events = list(c.events(since=str(before), follow=False, filters={"type": "container"}))
    actions = [e["action"] for e in events]
    assert "create" in actions and "start" in actions and "die" in actions, actions
    assert c.info()["images"] == 3


@pytest.mark.root
def test_autostart_starts_isoboxd_once(isobox_env: Path) -> None:
    import signal

    run = Path(os.environ["ISOBOX_RUN"])
    sock = run / "isoboxd.sock"
    with pytest.raises(DaemonUnavailable):
        Client().ping()
    c = Client(autostart=True)
    try:
        assert c.ping()
        pid = int((run / "isoboxd.lock").read_text())
        Client(autostart=True)  # finds it: no second daemon
        assert int((run / "isoboxd.lock").read_text()) == pid
        assert os.getsid(pid) == pid  # detached: its own session
        assert (isobox_env / "isoboxd.log").exists()
    finally:
        if sock.exists():
            pid = int((run / "isoboxd.lock").read_text())
            os.kill(pid, signal.SIGTERM)
            _wait_for(lambda: not Path(f"/proc/{pid}").exists() or
                      Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z")
