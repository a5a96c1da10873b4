"""The API server: routing, bodies, errors, streams and the upgrade hand-off.

Two halves. The unit half serves the real router and server over a real unix socket, with
a small fake service behind them, to pin down what only the HTTP layer decides (status
codes, framing, keep-alive, disconnects, the 101 hand-off leaving the connection open for a
duplicate descriptor). The integration half (below, ``test_daemon_*``) runs a real
``isoboxd`` with the real compute service and busybox, through ``tests/daemonkit.py``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import stat
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from daemonkit import (
    Client,
    Daemon,
    alive,
    assert_nothing_left,
    children,
    leftovers,
    quote_ref,
    read_stream,
    short_run_dir,
)
from isobox.api.handlers import build_router
from isobox.api.openapi import build_document
from isobox.api.server import ApiServer, serve_in_thread
from isobox.errors import Conflict, ImageNotFound, NotFound
from isobox.spec import stream as frames
from isobox.spec.compute import ComputeSystem, ExecSpec

# --- a fake service (unit half only) --------------------------------------------------


def _info(cid: str, name: str, state: str) -> dict[str, Any]:
    return {"id": cid, "name": name, "image": "busybox", "imageId": "sha256:" + "0" * 64,
            "isolation": "process", "state": state, "pid": 0, "exitCode": None,
            "error": None, "createdAt": "2026-01-01T00:00:00Z", "startedAt": None,
            "finishedAt": None, "labels": {}, "document": {}, "rootfs": "", "scratch": ""}


class FakeImages:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.uploaded = b""

    def list(self) -> list[dict[str, Any]]:
        return []

    def inspect(self, ref: str) -> dict[str, Any]:
        self.calls.append(("inspect", ref))
        if ref == "missing:latest":
            raise ImageNotFound(f"no such image: {ref}")
        return {"ref": ref}

    def remove(self, ref: str, force: bool = False) -> dict[str, Any]:
        self.calls.append(("remove", ref, force))
        return {"untagged": [ref], "deleted": []}

    def tag(self, ref: str, new: str) -> None:
        self.calls.append(("tag", ref, new))

    def prune(self) -> dict[str, Any]:
        return {"deleted": []}

    def import_stream(self, stream: BinaryIO, tag: str | None) -> dict[str, Any]:
        self.uploaded = stream.read()
        self.calls.append(("import", tag, os.fstat(stream.fileno()).st_nlink))
        return {"id": "sha256:" + "1" * 64, "tags": [tag] if tag else [], "digest": "",
                "size": len(self.uploaded), "created": None, "layers": 1}

    def export(self, ref: str, fmt: str = "oci") -> Iterator[bytes]:
        yield b"tar-of-" + ref.encode() + b"-" + fmt.encode()

    def bootstrap(self, kind: str = "busybox") -> dict[str, Any]:
        return {"id": "sha256:" + "2" * 64, "tags": [kind], "digest": "", "size": 0,
                "created": None, "layers": 1}


class FakeService:
    """Just enough of ComputeService: one running container ``web``, one stopped ``old``."""

    def __init__(self) -> None:
        self.images = FakeImages()
        self.containers = {"web": _info("a" * 64, "web", "running"),
                           "old": _info("b" * 64, "old", "stopped")}
        self.calls: list[tuple[Any, ...]] = []
        self.put_data = b""
        self.stream_closed = threading.Event()
        self.handoff_done = threading.Event()

    def _get(self, ref: str) -> dict[str, Any]:
        for c in self.containers.values():
            if ref in (c["name"], c["id"]):
                return c
        raise NotFound(f"no such container: {ref}")

    def info(self) -> dict[str, Any]:
        return {"version": "test"}

    def create(self, doc: ComputeSystem) -> dict[str, Any]:
        if doc.name in self.containers:
            raise Conflict(f"name {doc.name} is in use")
        if doc.image == "boom":
            raise RuntimeError("a bug")
        self.calls.append(("create", doc))
        return {"id": "c" * 64, "name": doc.name or "x", "warnings": []}

    def inspect(self, ref: str) -> dict[str, Any]:
        return self._get(ref)

    def enumerate(self, **kw: Any) -> list[dict[str, Any]]:
        self.calls.append(("enumerate", kw))
        return list(self.containers.values())

    def remove(self, ref: str, *, force: bool = False) -> None:
        self.calls.append(("remove", self._get(ref)["id"], force))

    def pause(self, ref: str) -> None:
        self.calls.append(("pause", self._get(ref)["id"]))

    def kill(self, ref: str, signal: int | str = "SIGKILL") -> None:
        self.calls.append(("kill", self._get(ref)["id"], signal))

    def stop(self, ref: str, *, timeout: float = 10.0) -> None:
        self.calls.append(("stop", ref, timeout))

    def wait(self, ref: str, *, condition: str = "not-running",
             timeout: float | None = None) -> dict[str, Any]:
        return {"exitCode": 3, "signal": None, "error": None}

    def logs(self, ref: str, **kw: Any) -> Iterator[dict[str, Any]]:
        self._get(ref)
        if kw.get("follow"):
            try:  # a chatty follow stream: one entry every 50 ms, forever
                n = 0
                while True:
                    yield {"time": "t", "stream": "stdout", "line": f"{n}\n"}
                    n += 1
                    time.sleep(0.05)
            finally:
                self.stream_closed.set()
        yield {"time": "t", "stream": "stdout", "line": "one\n"}
        yield {"time": "t", "stream": "stderr", "line": "two\n"}
        if ref == "b" * 64:  # "old"
            raise Conflict("the log broke")

    def stats_stream(self, ref: str, interval: float = 1.0) -> Iterator[dict[str, Any]]:
        raise Conflict("not running")
        yield {}  # pragma: no cover  (a generator that fails on its first step)

    def events(self, **kw: Any) -> Iterator[dict[str, Any]]:
        self.calls.append(("events", kw))
        return iter([{"action": "create"}])

    def archive_get(self, ref: str, path: str) -> Iterator[bytes]:
        self._get(ref)
        if path == "/nope":
            raise NotFound(f"no such path {path}")
        yield b"A" * 100000
        yield b"B"

    def archive_put(self, ref: str, path: str, stream: BinaryIO) -> None:
        self.put_data = stream.read()

    def exec(self, ref: str, spec: ExecSpec, sock: socket.socket) -> None:
        """Like the real hand-off: a duplicate descriptor goes on speaking after we return."""
        if spec.args == ["fail-after-101"]:
            raise Conflict("the monitor refused")
        dup = sock.dup()

        def speak() -> None:
            time.sleep(0.3)  # the handler has returned and closed its descriptor by now
            with dup:
                _kind, payload = frames.read_frame(dup) or (0, b"")
                dup.sendall(frames.encode(frames.STDOUT, b"got " + payload))
                dup.sendall(frames.encode_control({"exit": {"exitCode": 0, "signal": None}}))
            self.handoff_done.set()

        threading.Thread(target=speak, daemon=True).start()


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[tuple[FakeService, Client, ApiServer]]:
    service = FakeService()
    server = ApiServer(tmp_path / "api.sock", build_router(service,  # type: ignore[arg-type]
                                                           tmp_dir=tmp_path / "spool"))
    thread = serve_in_thread(server)
    try:
        yield service, Client(tmp_path / "api.sock", timeout=10), server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


DOC = {"schemaVersion": "1.0", "image": "busybox", "name": "new"}


# --- unit: routing and errors ---------------------------------------------------------


def test_ping_info_and_unknown_routes(fake: Any) -> None:
    _, c, _ = fake
    r = c.get("/v1/_ping")
    assert (r.status, r.body) == (200, b"OK")
    assert c.get("/v1/info").json() == {"version": "test"}
    r = c.get("/v1/nothing")
    assert r.status == 404 and r.error["kind"] == "NotFound"
    r = c.request("DELETE", "/v1/info")
    assert r.status == 405 and r.headers["allow"] == "GET"
    r = c.request("PATCH", "/v1/compute-systems/web")
    assert r.status == 405 and set(r.headers["allow"].split(", ")) == {"GET", "DELETE"}


def test_create_maps_errors_at_the_edge(fake: Any, caplog: pytest.LogCaptureFixture) -> None:
    service, c, _ = fake
    r = c.post("/v1/compute-systems", json=DOC)
    assert r.status == 201 and r.json()["id"] == "c" * 64
    assert service.calls[-1][1].name == "new"

    r = c.post("/v1/compute-systems", json={**DOC, "process": {"env": ["NOEQUALS"]}})
    assert r.status == 400
    assert r.error["kind"] == "InvalidDocument" and r.error["field"] == "process.env"
    r = c.post("/v1/compute-systems", json={**DOC, "bogus": 1})
    assert r.status == 400 and r.error["field"] == "bogus"
    r = c.post("/v1/compute-systems", body=b"{not json", headers={
        "Content-Type": "application/json"})
    assert r.status == 400 and r.error["kind"] == "InvalidDocument"
    r = c.post("/v1/compute-systems", body=json.dumps(DOC).encode(),
               headers={"Content-Type": "text/plain"})
    assert r.status == 415 and r.error["kind"] == "InvalidArgument"
    r = c.post("/v1/compute-systems", json={**DOC, "name": "web"})
    assert r.status == 409 and r.error == {"kind": "Conflict", "message": "name web is in use"}
    assert len([x for x in service.calls if x[0] == "create"]) == 1

    with caplog.at_level(logging.ERROR, logger="isobox.api"):
        r = c.post("/v1/compute-systems", json={**DOC, "image": "boom"})
    assert r.status == 500 and r.error["kind"] == "InternalError" and "a bug" in r.error[
        "message"]
    assert any(rec.exc_info and "a bug" in str(rec.exc_info[1]) for rec in caplog.records)


def test_json_body_is_capped(fake: Any) -> None:
    _, c, _ = fake
    big = {**DOC, "labels": {"k": "x" * (2 << 20)}}
    r = c.post("/v1/compute-systems", json=big)
    assert r.status == 413


def test_empty_body_needs_no_content_type_and_keep_alive_survives_errors(fake: Any) -> None:
    service, c, _ = fake
    conn = c.connection()
    try:
        # No body, no Content-Type: fine. Then an error with an unread body, then more
        # requests on the same connection: the leftover body must not be read as a request.
        r = c.request("POST", "/v1/compute-systems/web/pause", conn=conn)
        assert r.status == 204
        r = c.request("POST", "/v1/compute-systems/nosuch/kill", conn=conn,
                      json={"signal": "SIGTERM"})
        assert r.status == 404
        r = c.request("POST", "/v1/nothing", conn=conn, json={"x": "y" * 1000})
        assert r.status == 404
        r = c.request("POST", "/v1/compute-systems/web/stop", conn=conn, json={"timeout": 2})
        assert r.status == 204
        sock = conn.sock
        r = c.request("GET", "/v1/_ping", conn=conn)
        assert r.body == b"OK" and conn.sock is sock  # one connection throughout
    finally:
        conn.close()
    assert ("pause", "a" * 64) in service.calls and ("stop", "web", 2.0) in service.calls
    r = c.post("/v1/compute-systems/web/kill", json={"signal": "SIGTERM", "extra": 1})
    assert r.status == 400 and r.error["field"] == "extra"


def test_query_parameters(fake: Any) -> None:
    service, c, _ = fake
    r = c.get("/v1/compute-systems", query=[("state", "running"), ("state", "paused"),
                                            ("label", "a=b"), ("label", "k"), ("name", "w")])
    assert r.status == 200 and len(r.json()) == 2
    assert service.calls[-1] == ("enumerate", {
        "states": ["running", "paused"], "isolation": None,
        "labels": {"a": "b", "k": None}, "name": "w"})
    assert c.get("/v1/compute-systems", query={"state": "dancing"}).status == 400
    r = c.request("DELETE", "/v1/compute-systems/old", query={"force": "maybe"})
    assert r.status == 400 and "force" in r.error["message"]
    assert c.request("DELETE", "/v1/compute-systems/old", query={"force": 1}).status == 204
    assert service.calls[-1] == ("remove", "b" * 64, True)
    assert c.post("/v1/compute-systems/web/wait", query={"condition": "x"}).status == 400
    assert c.post("/v1/compute-systems/web/wait").json()["exitCode"] == 3


# --- unit: bodies and streams ---------------------------------------------------------


def test_archive_get_is_chunked_and_put_takes_a_chunked_body(fake: Any) -> None:
    service, c, _ = fake
    r = c.get("/v1/compute-systems/web/archive", query={"path": "/etc"})
    assert r.status == 200 and r.headers["transfer-encoding"] == "chunked"
    assert r.body == b"A" * 100000 + b"B"
    r = c.get("/v1/compute-systems/web/archive", query={"path": "/nope"})
    assert r.status == 404  # failed before the first chunk: still a real status
    assert c.get("/v1/compute-systems/web/archive").status == 400  # path is required

    payload = os.urandom(300000)
    conn = c.connection()
    try:
        conn.putrequest("PUT", "/v1/compute-systems/web/archive?path=/tmp")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.putheader("Content-Type", "application/x-tar")
        conn.endheaders()
        for i in range(0, len(payload), 70000):
            part = payload[i:i + 70000]
            conn.send(b"%x\r\n%s\r\n" % (len(part), part))
        conn.send(b"0\r\n\r\n")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 204
    finally:
        conn.close()
    assert service.put_data == payload


def test_log_lines_and_an_error_midway(fake: Any) -> None:
    _, c, _ = fake
    with c.lines("/v1/compute-systems/web/logs") as items:
        assert [e["line"] for e in items] == ["one\n", "two\n"]
    with c.lines("/v1/compute-systems/old/logs") as items:
        got = list(items)
    assert [e.get("line") for e in got[:2]] == ["one\n", "two\n"]
    assert got[2] == {"error": {"kind": "Conflict", "message": "the log broke"}}
    assert c.get("/v1/compute-systems/nosuch/logs").status == 404
    # A stream that fails before its first item answers with the error's own status.
    r = c.get("/v1/compute-systems/web/stats", query={"stream": 1})
    assert r.status == 409 and r.error["kind"] == "Conflict"


def test_follow_stream_stops_when_the_client_goes_away(fake: Any) -> None:
    service, c, _ = fake
    with c.lines("/v1/compute-systems/web/logs", query={"follow": 1}) as items:
        first = [next(items)["line"] for _ in range(3)]
    assert first == ["0\n", "1\n", "2\n"]
    assert service.stream_closed.wait(5), "the service's iterator was never closed"


def test_events_filters(fake: Any) -> None:
    service, c, _ = fake
    with c.lines("/v1/events", query=[("filter", "type=container"), ("filter", "name=a"),
                                      ("follow", 0)]) as items:
        assert list(items) == [{"action": "create"}]
    assert service.calls[-1] == ("events", {"since": None, "until": None, "follow": False,
                                            "filters": {"type": ["container"], "name": ["a"]}})
    assert c.get("/v1/events", query={"filter": "novalue"}).status == 400


def test_images_routes_decode_references_and_spool_uploads(fake: Any, tmp_path: Path) -> None:
    service, c, _ = fake
    ref = "registry.example/library/busybox:1.36"
    r = c.get("/v1/images/" + quote_ref(ref))
    assert r.status == 200 and r.json() == {"ref": ref}
    assert c.get("/v1/images/" + quote_ref("missing:latest")).error["kind"] == "ImageNotFound"
    assert c.request("DELETE", "/v1/images/busybox:latest", query={"force": 1}).status == 200
    assert service.images.calls[-1] == ("remove", "busybox:latest", True)
    assert c.post("/v1/images/" + quote_ref(ref) + "/tag", json={"tag": "bb:x"}).status == 204
    assert service.images.calls[-1] == ("tag", ref, "bb:x")
    r = c.post("/v1/images/busybox/tag", json={"tag": "x", "also": 1})
    assert r.status == 400 and r.error["field"] == "also"
    r = c.get("/v1/images/" + quote_ref(ref) + "/export", query={"format": "docker"})
    assert r.body == b"tar-of-" + ref.encode() + b"-docker"
    assert c.get("/v1/images/x/export", query={"format": "zip"}).status == 400
    assert c.post("/v1/images/prune").json() == {"deleted": []}
    assert c.post("/v1/images/bootstrap", json={"kind": "busybox"}).status == 201

    blob = os.urandom(200000)
    r = c.post("/v1/images/import", body=blob, query={"tag": "up:1"},
               headers={"Content-Type": "application/x-tar"})
    assert r.status == 201 and r.json()["tags"] == ["up:1"]
    assert service.images.uploaded == blob
    assert service.images.calls[-1] == ("import", "up:1", 0)  # an unlinked temp file
    assert list((tmp_path / "spool").iterdir()) == []


# --- unit: the upgrade hand-off -------------------------------------------------------


def test_exec_upgrade_hands_the_connection_over(fake: Any) -> None:
    service, c, _ = fake
    status, head, sock = c.upgrade("/v1/compute-systems/web/exec", json={"args": ["cat"]})
    with sock:
        assert status == 101, head
        assert b"upgrade: isobox-stream/1" in head.lower()
        # The handler has returned and dropped its descriptor; the duplicate still talks.
        time.sleep(0.1)
        result = read_stream(sock, stdin=b"hello", close_stdin=False, timeout=10)
    assert result.stdout == b"got hello" and result.exit == {"exitCode": 0, "signal": None}
    assert service.handoff_done.wait(5)


def test_upgrade_checks_come_before_the_101(fake: Any) -> None:
    _, c, _ = fake
    for path, doc, want in (
        ("/v1/compute-systems/old/exec", {"args": ["sh"]}, 409),  # stopped
        ("/v1/compute-systems/nosuch/exec", {"args": ["sh"]}, 404),
        ("/v1/compute-systems/web/exec", {"args": []}, 400),
        ("/v1/compute-systems/old/attach", None, 409),
        ("/v1/compute-systems/web/start?attach=1", None, 409),  # already running
    ):
        status, head, sock = c.upgrade(path, json=doc)
        sock.close()
        assert status == want, (path, head)
        assert b'"error"' in head
    # Without the Upgrade header a stream call is a 400, not a hang.
    r = c.post("/v1/compute-systems/web/exec", json={"args": ["sh"]})
    assert r.status == 400 and "Upgrade" in r.error["message"]


def test_an_error_after_the_101_is_an_error_frame(fake: Any) -> None:
    _, c, _ = fake
    status, _, sock = c.upgrade("/v1/compute-systems/web/exec",
                                json={"args": ["fail-after-101"]})
    with sock:
        assert status == 101
        result = read_stream(sock, timeout=10)
    assert result.errors == [{"kind": "Conflict", "message": "the monitor refused"}]


# --- unit: the socket and the document ------------------------------------------------


def test_socket_is_0660_replaces_a_stale_one_and_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "d.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a dead daemon's socket: connecting to it is refused
    server = ApiServer(path, build_router(FakeService()))  # type: ignore[arg-type]
    thread = serve_in_thread(server)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        assert Client(path).get("/v1/_ping").body == b"OK"
        assert [p.name for p in tmp_path.iterdir()] == ["d.sock"]  # no temp name left
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert not path.exists()


def test_a_socket_path_longer_than_sun_path_works(tmp_path: Path) -> None:
    folder = tmp_path / ("x" * 60) / ("y" * 60)
    folder.mkdir(parents=True)
    path = folder / "isoboxd.sock"
    assert len(str(path)) > 108
    server = ApiServer(path, build_router(FakeService()))  # type: ignore[arg-type]
    thread = serve_in_thread(server)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        assert Client(path).get("/v1/_ping").body == b"OK"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert not path.exists()


def test_openapi_route_serves_the_document_of_its_router(fake: Any) -> None:
    _, c, server = fake
    r = c.get("/v1/openapi.json")
    assert r.status == 200
    assert r.json() == json.loads(json.dumps(build_document(server.router)))


def test_http10_and_garbage_requests(fake: Any) -> None:
    _, c, _ = fake
    out = c.raw(b"GET /v1/_ping HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"OK")
    out = c.raw(b"NONSENSE\r\n\r\n")
    assert b" 400 " in out.split(b"\r\n")[0]
    # A truncated body: the connection ends, the server stays up.
    c.raw(b"POST /v1/compute-systems HTTP/1.1\r\nContent-Length: 100\r\n"
          b"Content-Type: application/json\r\n\r\n{", wait=0.5)
    assert c.get("/v1/_ping").body == b"OK"


# --- integration: a real isoboxd, the real service, busybox ---------------------------


def e2e(f: Any) -> Any:
    """Real containers: root, overlay mounts and cgroup v1 (this host's)."""
    return pytest.mark.root(pytest.mark.overlay(pytest.mark.cgroup1(f)))


@pytest.fixture
def daemon(isobox_env: Path) -> Iterator[Daemon]:
    """A real isoboxd on the test's root and a short run folder, with busybox imported
    through the API; at the end every container is removed through the API, the daemon is
    stopped (it must exit 0) and nothing may be left of any container it made."""
    with short_run_dir() as run:
        d = Daemon.start(isobox_env, run)
        try:
            r = d.request("POST", "/v1/images/bootstrap", json={"kind": "busybox"})
            assert r.status == 201, r.text
            yield d
        finally:
            ids: list[str] = []
            try:
                with d.client.lines("/v1/events", {"follow": 0,
                                                   "filter": "action=create"}) as events:
                    ids = [e["id"] for e in events]
                for info in d.request("GET", "/v1/compute-systems").json():
                    d.request("DELETE", f"/v1/compute-systems/{info['id']}", query={"force": 1})
            finally:
                code = d.stop()
            assert code == 0, d.log()
            assert_nothing_left(isobox_env, run, ids)


def sh(script: str, **kw: Any) -> dict[str, Any]:
    return {"schemaVersion": "1.0", "image": "busybox:latest",
            "process": {"args": ["sh", "-c", script]}, **kw}


def _container_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "containers").iterdir())


@e2e
def test_daemon_create_start_wait_logs_inspect_ls_rm(daemon: Daemon, isobox_env: Path) -> None:
    d = daemon
    assert [i["tags"] for i in d.request("GET", "/v1/images").json()] == [["busybox:latest"]]
    r = d.request("POST", "/v1/compute-systems", json=sh(
        "echo out; echo err >&2; exit 3", name="api1", labels={"t": "x"}))
    assert r.status == 201, r.text
    cid = r.json()["id"]
    ls = d.request("GET", "/v1/compute-systems", query={"label": "t=x"}).json()
    assert [(c["id"], c["state"]) for c in ls] == [(cid, "created")]
    assert d.request("POST", "/v1/compute-systems/api1/start").status == 204
    r = d.request("POST", "/v1/compute-systems/api1/wait", query={"timeout": 30})
    assert r.json() == {"exitCode": 3, "signal": None, "error": None}, r.text
    info = d.request("GET", f"/v1/compute-systems/{cid[:12]}").json()
    assert info["state"] == "stopped" and info["exitCode"] == 3 and info["name"] == "api1"
    with d.client.lines("/v1/compute-systems/api1/logs") as entries:
        assert [(e["stream"], e["line"]) for e in entries] == [
            ("stdout", "out\n"), ("stderr", "err\n")]
    with d.client.lines("/v1/compute-systems/api1/logs", {"stderr": 0}) as entries:
        assert [e["line"] for e in entries] == ["out\n"]
    assert d.request("GET", "/v1/compute-systems", query={"state": "running"}).json() == []
    assert d.request("DELETE", "/v1/compute-systems/api1").status == 204
    r = d.request("GET", f"/v1/compute-systems/{cid}")
    assert r.status == 404 and r.error["kind"] == "NotFound"
    assert_nothing_left(isobox_env, d.run, [cid])


@e2e
def test_daemon_refused_creates_leave_nothing(daemon: Daemon, isobox_env: Path) -> None:
    d = daemon
    first = d.request("POST", "/v1/compute-systems", json=sh("true", name="taken"))
    assert first.status == 201
    before = _container_dirs(isobox_env)
    for doc, status, kind in (
        (sh("true", name="x1", process={"args": ["true"], "env": ["BAD"]}), 400,
         "InvalidDocument"),
        ({**sh("true"), "isolaton": "host"}, 400, "InvalidDocument"),
        (sh("true", name="x2", image="nosuch:latest"), 404, "ImageNotFound"),
        (sh("true", name="taken"), 409, "Conflict"),
    ):
        r = d.request("POST", "/v1/compute-systems", json=doc)
        assert (r.status, r.error["kind"]) == (status, kind), r.text
    r = d.request("POST", "/v1/compute-systems", json={**sh("true"), "isolaton": "host"})
    assert r.error["field"] == "isolaton"
    names = [c["name"] for c in d.request("GET", "/v1/compute-systems").json()]
    assert names == ["taken"]
    assert _container_dirs(isobox_env) == before == [first.json()["id"]]
    # A start in the wrong state is a 409 that names the state; an unknown ref a 404.
    assert d.request("POST", "/v1/compute-systems/taken/pause").status == 409
    assert d.request("POST", "/v1/compute-systems/nosuch/start").status == 404


@e2e
def test_daemon_streamed_exec_and_attached_start(daemon: Daemon) -> None:
    d = daemon
    assert d.request("POST", "/v1/compute-systems", json=sh("sleep 1000", name="ex")).status \
        == 201
    assert d.request("POST", "/v1/compute-systems/ex/start").status == 204
    status, head, sock = d.client.upgrade("/v1/compute-systems/ex/exec", json={
        "args": ["sh", "-c", "read l; echo got:$l; echo oops >&2; exit 4"], "stdin": True})
    with sock:
        assert status == 101, head
        result = read_stream(sock, stdin=b"hello\n", timeout=30)
    assert result.stdout == b"got:hello\n" and result.stderr == b"oops\n"
    assert result.exit is not None and result.exit["exitCode"] == 4
    # The leftover check of the kit sees a running container from every side.
    cid = d.request("GET", "/v1/compute-systems/ex").json()["id"]
    left = leftovers(d.root, d.run, [cid])
    for what in ("mount ", "cgroup ", "pid ", "files "):
        assert any(x.startswith(what) for x in left), (what, left)
    top = d.request("GET", "/v1/compute-systems/ex/top").json()
    assert any("sleep" in p["command"] for p in top["processes"])
    assert "cpuUsageNs" in d.request("GET", "/v1/compute-systems/ex/stats").json()
    assert d.request("POST", "/v1/compute-systems/ex/kill", json={"signal": "SIGKILL"}
                     ).status == 204
    assert d.request("POST", "/v1/compute-systems/ex/wait", query={"timeout": 30}).status == 200

    # start?attach=1: the output from the very first byte, stdin from us.
    doc = sh("read l; echo hi:$l", name="att")
    doc["process"]["stdin"] = True
    assert d.request("POST", "/v1/compute-systems", json=doc).status == 201
    status, head, sock = d.client.upgrade("/v1/compute-systems/att/start",
                                          query={"attach": 1, "stdin": 1})
    with sock:
        assert status == 101, head
        result = read_stream(sock, stdin=b"there\n", timeout=30)
    assert result.stdout == b"hi:there\n" and result.exit is not None
    assert result.exit["exitCode"] == 0
    # Exec in a stopped container: refused before the 101, as a plain 409.
    assert d.request("POST", "/v1/compute-systems/att/wait", query={"timeout": 30}).json()[
        "exitCode"] == 0
    status, head, sock = d.client.upgrade("/v1/compute-systems/att/exec", json={"args": ["true"]})
    sock.close()
    assert status == 409, head


@e2e
def test_daemon_lock_sigterm_and_kill9_leave_containers_to_their_monitors(
        daemon: Daemon, isobox_env: Path) -> None:
    d = daemon
    # A second daemon on the same run folder refuses to start.
    second = subprocess.run(d.argv, capture_output=True, text=True, timeout=60, check=False)
    assert second.returncode == 1 and "another isoboxd" in second.stderr
    assert d.client.get("/v1/_ping").body == b"OK"

    assert d.request("POST", "/v1/compute-systems", json=sh("sleep 1000", name="bg")).status \
        == 201
    assert d.request("POST", "/v1/compute-systems/bg/start").status == 204
    zygotes = children(d.pid)
    assert d.stop() == 0, d.log()
    assert not d.socket_path.exists()
    assert not [z for z in zygotes if alive(z)], "the daemon's children outlived it"

    d.launch()  # the container kept running without a daemon
    assert d.request("GET", "/v1/compute-systems/bg").json()["state"] == "running"
    d.kill9()  # a crash this time
    d.launch()  # the stale socket is replaced
    assert d.request("GET", "/v1/compute-systems/bg").json()["state"] == "running"
    r = d.request("POST", "/v1/compute-systems/bg/stop", json={"timeout": 1})
    assert r.status == 204, r.text
    assert d.request("GET", "/v1/compute-systems/bg").json()["state"] == "stopped"


@e2e
def test_daemon_archive_images_and_streams(daemon: Daemon, tmp_path: Path) -> None:
    d = daemon
    doc = sh("for i in 1 2 3; do echo tick$i; sleep 0.3; done; cat /data/hello.txt", name="cp")
    assert d.request("POST", "/v1/compute-systems", json=doc).status == 201
    # cp in (a stopped container), then run it and follow its logs to the end.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ti = tarfile.TarInfo("data/hello.txt")
        ti.size = 6
        tf.addfile(ti, io.BytesIO(b"hello\n"))
    r = d.request("PUT", "/v1/compute-systems/cp/archive", query={"path": "/"},
                  body=buf.getvalue(), headers={"Content-Type": "application/x-tar"})
    assert r.status == 204, r.text
    assert d.request("POST", "/v1/compute-systems/cp/start").status == 204
    with d.client.lines("/v1/compute-systems/cp/logs", {"follow": 1}) as entries:
        lines = [e["line"] for e in entries]  # ends by itself when the container stops
    assert lines == ["tick1\n", "tick2\n", "tick3\n", "hello\n"]
    # cp out.
    r = d.request("GET", "/v1/compute-systems/cp/archive", query={"path": "/data"})
    assert r.status == 200, r.text
    with tarfile.open(fileobj=io.BytesIO(r.body)) as tf:
        member = tf.extractfile("data/hello.txt")
        assert member is not None and member.read() == b"hello\n"
    assert d.request("GET", "/v1/compute-systems/cp/archive",
                     query={"path": "/no/such"}).status == 404

    # Images: export, import under another tag, tag, inspect by a percent-encoded ref.
    r = d.request("GET", "/v1/images/" + quote_ref("busybox:latest") + "/export")
    assert r.status == 200 and r.headers["content-type"] == "application/x-tar"
    r = d.request("POST", "/v1/images/import", body=r.body, query={"tag": "copy/bb:v1"},
                  headers={"Content-Type": "application/x-tar"})
    assert r.status == 201, r.text
    assert "copy/bb:v1" in r.json()["tags"]
    assert d.request("GET", "/v1/images/" + quote_ref("copy/bb:v1")).status == 200
    assert d.request("POST", "/v1/images/" + quote_ref("copy/bb:v1") + "/tag",
                     json={"tag": "third:x"}).status == 204
    assert d.request("GET", "/v1/images/third:x").status == 200
    assert d.request("GET", "/v1/images/" + quote_ref("nope:1")).status == 404
    assert list((d.root / "tmp").glob("upload-*")) == []

    # stats as a stream, events of this container, the document.
    assert d.request("POST", "/v1/compute-systems", json=sh("sleep 1000", name="st")).status \
        == 201
    assert d.request("POST", "/v1/compute-systems/st/start").status == 204
    with d.client.lines("/v1/compute-systems/st/stats", {"stream": 1, "interval": 0.2}) as s:
        samples = [next(s) for _ in range(3)]
    assert all(x["pids"] >= 1 for x in samples)
    with d.client.lines("/v1/events", [("follow", 0), ("filter", "container=cp")]) as ev:
        actions = [e["action"] for e in ev]
    assert actions[0] == "create" and "start" in actions and "die" in actions
    assert d.request("GET", "/v1/events", query={"filter": "bogus=1", "follow": 0}
                     ).status == 400
    assert d.request("GET", "/v1/openapi.json").json()["openapi"] == "3.1.0"
