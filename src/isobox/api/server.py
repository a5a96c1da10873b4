"""The HTTP/1.1 server of isoboxd: a unix socket, a router, bodies, errors and streams.

Built on the standard library's :mod:`http.server` (a ``ThreadingHTTPServer`` bound to an
``AF_UNIX`` socket, one daemon thread per connection, keep-alive), not on an async
framework: every call it makes into the engine (SQLite, the spawner, the monitors' sockets)
is blocking anyway, and a thread per connection is what that code wants. It also adds no
dependency to the daemon.

What lives here and nowhere else:

- the mapping of errors to HTTP (the edge of DESIGN.md): an :class:`IsoboxError` becomes its
  ``http_status`` and an ``ErrorBody``; anything else is a 500 ``InternalError``, logged with
  its traceback;
- request bodies: ``Content-Length`` or chunked, JSON capped at :data:`MAX_JSON_BODY`, a
  body the handler did not read is drained or the connection closed (so keep-alive never
  reads a leftover body as the next request);
- responses: JSON, plain text, chunked JSON lines (one object per line, one chunk each,
  stopped when the client goes away), chunked bytes (tar), and the ``101`` upgrade that
  hands the raw connection to the service (which hands it on to a container's monitor).
"""

from __future__ import annotations

import contextlib
import email.message
import http.server
import io
import json
import logging
import math
import os
import queue
import re
import select
import socket
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from pydantic import BaseModel

from isobox.errors import InvalidArgument, InvalidDocument, IsoboxError
from isobox.paths import socket_name
from isobox.spec.compute import parse_model
from isobox.spec.stream import encode_control
from isobox.spec.wire import STREAM_PROTOCOL

log = logging.getLogger("isobox.api")

#: Largest JSON request body accepted (documents are small; tars go elsewhere).
MAX_JSON_BODY = 1 << 20
#: How much of an unread body is drained (so the client reads our answer and the connection
#: stays alive); a longer one is cut off by closing the connection.
MAX_DRAIN = 16 << 20
#: A stream whose first item comes this fast can still answer an error with its status.
FIRST_ITEM_WAIT = 0.25
#: How often an idle stream checks that its client is still there.
IDLE_CHECK = 0.5

JSON_TYPE = "application/json"
LINES_TYPE = "application/x-ndjson"
TAR_TYPE = "application/x-tar"


class HTTPError(Exception):
    """A failure of the HTTP exchange itself (no such route, wrong method, body too large).

    Engine failures are :class:`IsoboxError`\\ s; this is only for what the protocol layer
    refuses before any engine code runs. ``kind`` is the ``ErrorBody`` kind the client sees.
    """

    def __init__(
        self, status: int, message: str, *, kind: str = "InvalidArgument",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.headers = headers or {}


def error_body(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """The status and ``ErrorBody`` of an exception (the one place errors become HTTP)."""
    if isinstance(exc, HTTPError):
        return exc.status, {"error": {"kind": exc.kind, "message": str(exc)}}
    if isinstance(exc, IsoboxError):
        detail: dict[str, Any] = {"kind": type(exc).__name__, "message": str(exc)}
        if isinstance(exc, InvalidDocument) and exc.field:
            detail["field"] = exc.field
        return exc.http_status, {"error": detail}
    return 500, {"error": {"kind": "InternalError",
                           "message": f"internal error: {type(exc).__name__}: {exc}"}}


def _log_failure(exc: BaseException, what: str) -> None:
    if isinstance(exc, IsoboxError | HTTPError):
        log.info("%s: %s: %s", what, type(exc).__name__, exc)
    else:
        log.error("%s: internal error", what, exc_info=exc)


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


# --- request bodies -------------------------------------------------------------------


class Body(io.RawIOBase):
    """The request body as a stream: ``Content-Length`` bytes, or a chunked body decoded.

    Reading past the body is impossible (it would eat the next request of a keep-alive
    connection); a connection that ends inside the body is an error, not a short body.
    """

    def __init__(self, rfile: io.BufferedIOBase, length: int | None, chunked: bool) -> None:
        super().__init__()
        self._rfile = rfile
        self._chunked = chunked
        self._left = 0 if chunked else (length or 0)  # of the body, or of the current chunk
        self._done = not chunked and not length
        self.received = 0

    @property
    def done(self) -> bool:
        return self._done

    def readable(self) -> bool:
        return True

    def _read_line(self) -> bytes:
        line = self._rfile.readline(1026)
        if not line.endswith(b"\n"):
            raise HTTPError(400, "malformed chunked body")
        return line

    def _next_chunk(self) -> None:
        size_line = self._read_line().split(b";", 1)[0].strip()
        try:
            size = int(size_line, 16)
        except ValueError:
            raise HTTPError(400, f"malformed chunk size {size_line[:20]!r}") from None
        if size < 0:
            raise HTTPError(400, "malformed chunk size")
        if size == 0:
            while self._read_line() not in (b"\r\n", b"\n"):  # trailers, ignored
                pass
            self._done = True
        self._left = size

    def readinto(self, buf: Any) -> int:
        if self._done:
            return 0
        if self._chunked and self._left == 0:
            self._next_chunk()
            if self._done:
                return 0
        view = memoryview(buf).cast("B")
        want = min(len(view), self._left)
        data = self._rfile.read1(want) if hasattr(self._rfile, "read1") else self._rfile.read(
            want)
        if not data:
            raise HTTPError(400, "connection closed inside the request body")
        n = len(data)
        view[:n] = data
        self._left -= n
        self.received += n
        if self._left == 0:
            if self._chunked:
                if self._rfile.read(2) not in (b"\r\n",):
                    raise HTTPError(400, "malformed chunked body")
            else:
                self._done = True
        return n

    def read_capped(self, limit: int) -> bytes:
        """The whole body; more than ``limit`` bytes is a 413."""
        out = bytearray()
        while not self._done:
            chunk = self.read(min(65536, limit + 1 - len(out)))
            if not chunk:
                break
            out += chunk
            if len(out) > limit:
                raise HTTPError(413, f"request body larger than {limit} bytes")
        return bytes(out)

    def drain(self, limit: int) -> bool:
        """Read and drop what is left, up to ``limit`` bytes; True when the body is done."""
        try:
            seen = 0
            while not self._done and seen <= limit:
                chunk = self.read(65536)
                if not chunk:
                    break
                seen += len(chunk)
        except (HTTPError, OSError, ValueError):
            return False
        return self._done


# --- requests -------------------------------------------------------------------------

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")
_M = TypeVar("_M", bound=BaseModel)


@dataclass
class Request:
    """One parsed request, as a handler sees it."""

    method: str
    path: str
    params: dict[str, str]
    query: dict[str, list[str]]
    headers: email.message.Message
    body: Body
    connection: socket.socket

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default

    def args(self, name: str) -> list[str]:
        return list(self.query.get(name, []))

    def flag(self, name: str, default: bool = False) -> bool:
        value = self.arg(name)
        if value is None:
            return default
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        raise InvalidArgument(f"query parameter {name}: expected 1 or 0, got {value!r}")

    def int_arg(self, name: str, default: int | None = None) -> int | None:
        value = self.arg(name)
        if value is None or value == "":
            return default
        try:
            return int(value)
        except ValueError:
            raise InvalidArgument(
                f"query parameter {name}: expected an integer, got {value!r}") from None

    def float_arg(self, name: str, default: float | None = None) -> float | None:
        value = self.arg(name)
        if value is None or value == "":
            return default
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise InvalidArgument(f"query parameter {name}: expected a number, got {value!r}")
        return number

    def raw_json(self) -> bytes:
        """The body of a JSON request (b"" when empty); a non-JSON content type is refused
        unless the body is empty (clients that send no body often send no type either)."""
        data = self.body.read_capped(MAX_JSON_BODY)
        if data:
            ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if ctype != JSON_TYPE and not ctype.endswith("+json"):
                raise HTTPError(415, f"expected Content-Type {JSON_TYPE}, got {ctype or 'none'}")
        return data

    def json(self) -> Any:
        """The JSON body parsed (None when empty)."""
        data = self.raw_json()
        if not data:
            return None
        try:
            return json.loads(data)
        except ValueError as exc:
            raise InvalidArgument(f"request body is not JSON: {exc}") from None

    def json_object(self) -> dict[str, Any]:
        value = self.json()
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise InvalidArgument("request body must be a JSON object")
        return value

    def model(self, model: type[_M], what: str) -> _M:
        """The body validated as ``model`` (an empty body is ``{}``): 400 names the field."""
        data = self.raw_json()
        return parse_model(model, data if data else {}, what)

    @property
    def wants_upgrade(self) -> bool:
        upgrade = (self.headers.get("Upgrade") or "").strip().lower()
        tokens = {t.strip().lower() for t in (self.headers.get("Connection") or "").split(",")}
        return upgrade == STREAM_PROTOCOL and "upgrade" in tokens


# --- responses ------------------------------------------------------------------------


@dataclass
class Reply:
    """A JSON answer; ``body`` None with 204 (or any status) sends no body."""

    body: Any = None
    status: int = 200


@dataclass
class TextReply:
    text: str
    status: int = 200


@dataclass
class LinesReply:
    """Chunked JSON lines, one object per line and per chunk, as the iterator yields them."""

    items: Iterable[Any]


@dataclass
class BytesReply:
    """A chunked binary body (a tar)."""

    chunks: Iterable[bytes]
    content_type: str = TAR_TYPE


@dataclass
class UpgradeReply:
    """``101 Switching Protocols``, then ``run(sock)``: the raw connection goes to the service.

    The handler must have done every check that can fail *before* returning this (after the
    101 an error can only be an error control frame). After ``run`` returns, this process
    closes only its own descriptor of the connection, never shuts it down: the container's
    monitor may hold a duplicate and go on speaking on it.
    """

    run: Callable[[socket.socket], None]


Response = Reply | TextReply | LinesReply | BytesReply | UpgradeReply


# --- routes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """A query parameter, for validation messages and the OpenAPI document."""

    name: str
    type: str = "string"  # string | boolean | integer | number
    description: str = ""
    repeatable: bool = False


@dataclass(frozen=True)
class JsonLines:
    """Response marker: chunked JSON lines of ``item``."""

    item: Any


@dataclass(frozen=True)
class Binary:
    """Request/response marker: a binary body (a tar)."""

    content_type: str = TAR_TYPE
    description: str = ""


#: Response marker: ``101 Switching Protocols`` and a stream of isobox-stream/1 frames.
STREAM = "stream"
#: Response marker: plain text.
TEXT = "text"


@dataclass(frozen=True)
class RouteDoc:
    """What the OpenAPI document says about a route.

    ``body``: a pydantic model, a TypedDict-ish type for a TypeAdapter, a :class:`Binary`, or
    None. ``responses``: status → a type (JSON schema source), ``list[...]``, a
    :class:`JsonLines`, a :class:`Binary`, :data:`STREAM`, :data:`TEXT` or None (no body).
    """

    summary: str
    query: tuple[Param, ...] = ()
    body: Any = None
    responses: dict[int, Any] = field(default_factory=lambda: {200: None})
    tags: tuple[str, ...] = ()


Handler = Callable[[Request], Response]
_SEGMENT = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")


@dataclass(frozen=True)
class Route:
    method: str
    template: str
    func: Handler
    name: str
    doc: RouteDoc

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.template.strip("/").split("/"))

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(m.group(1) for s in self.segments if (m := _SEGMENT.match(s)))

    def match(self, parts: list[str]) -> dict[str, str] | None:
        segs = self.segments
        if len(segs) != len(parts):
            return None
        params: dict[str, str] = {}
        for seg, part in zip(segs, parts, strict=True):
            m = _SEGMENT.match(seg)
            if m:
                if not part:
                    return None
                params[m.group(1)] = part
            elif seg != part:
                return None
        return params


class Router:
    """Path templates (``/v1/compute-systems/{ref}/logs``), matched segment by segment.

    Segments are percent-decoded after the path is split, so ``%2F`` inside an image
    reference stays inside its segment. A literal segment beats a parameter
    (``/v1/images/prune`` before ``/v1/images/{ref}``). A path that matches no template is a
    404; one that matches only under other methods is a 405 with ``Allow``.
    """

    def __init__(self) -> None:
        self.routes: list[Route] = []

    def add(self, method: str, template: str, func: Handler, doc: RouteDoc,
            name: str | None = None) -> Route:
        route = Route(method.upper(), template, func, name or func.__name__.rstrip("_"), doc)
        for other in self.routes:
            if other.method == route.method and other.template == template:
                raise ValueError(f"route {method} {template} defined twice")
        self.routes.append(route)
        return route

    def route(self, method: str, template: str, doc: RouteDoc) -> Callable[[Handler], Handler]:
        def register(func: Handler) -> Handler:
            self.add(method, template, func, doc)
            return func
        return register

    def match(self, method: str, raw_path: str) -> tuple[Route, dict[str, str]]:
        parts = [urllib.parse.unquote(p) for p in raw_path.strip("/").split("/")]
        found: list[tuple[int, Route, dict[str, str]]] = []
        for route in self.routes:
            params = route.match(parts)
            if params is not None:
                found.append((len(params), route, params))
        if not found:
            raise HTTPError(404, f"no route {raw_path}", kind="NotFound")
        found.sort(key=lambda t: t[0])
        for _, route, params in found:
            if route.method == method:
                return route, params
        allowed = sorted({r.method for _, r, _ in found})
        raise HTTPError(405, f"{method} is not allowed on {raw_path} (allowed: "
                        f"{', '.join(allowed)})", headers={"Allow": ", ".join(allowed)})


# --- the connection handler -----------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "isoboxd"
    sys_version = ""
    server: ApiServer

    def address_string(self) -> str:
        return "unix"

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format, *args)

    def log_error(self, format: str, *args: Any) -> None:
        log.warning("http: " + format, *args)

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    # ---

    def _dispatch(self) -> None:
        self._started = False
        url = urllib.parse.urlsplit(self.path)
        body = Body(self.rfile, None, False)  # replaced below once the headers are read
        what = f"{self.command} {url.path}"
        try:
            body = self._body()
            req = Request(
                method=self.command, path=url.path, params={},
                query=urllib.parse.parse_qs(url.query, keep_blank_values=True),
                headers=self.headers, body=body, connection=self.connection,
            )
            route, req.params = self.server.router.match(self.command, url.path)
            self._send(route.func(req), req, what)
        except Exception as exc:
            _log_failure(exc, what)
            if self._started:
                self.close_connection = True  # mid-response: the framing is lost
            else:
                # Drain first: a client still writing its body reads no answer.
                self._finish_body(body)
                self._send_error(exc)
        finally:
            self._finish_body(body)

    def _finish_body(self, body: Body) -> None:
        """What the handler left of the body is read and dropped, or the connection is
        closed: keep-alive must never parse a leftover body as the next request."""
        if not body.done and not self.close_connection and not body.drain(MAX_DRAIN):
            self.close_connection = True

    def _body(self) -> Body:
        te = (self.headers.get("Transfer-Encoding") or "").strip().lower()
        if te:
            if te != "chunked":
                self.close_connection = True
                raise HTTPError(501, f"Transfer-Encoding {te!r} is not supported")
            return Body(self.rfile, None, True)
        raw = self.headers.get("Content-Length")
        if raw is None:
            return Body(self.rfile, 0, False)
        if not raw.strip().isdigit():
            self.close_connection = True
            raise HTTPError(400, f"bad Content-Length {raw!r}")
        return Body(self.rfile, int(raw), False)

    def _head(self, status: int, headers: dict[str, str]) -> None:
        self._started = True
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()

    def _send_bytes(self, status: int, data: bytes, ctype: str,
                    extra: dict[str, str] | None = None) -> None:
        headers = dict(extra or {})
        if status not in (204, 304):
            headers.update({"Content-Type": ctype, "Content-Length": str(len(data))})
        self._head(status, headers)
        if status not in (204, 304) and data:
            self.wfile.write(data)

    def _send_error(self, exc: BaseException) -> None:
        status, body = error_body(exc)
        extra = exc.headers if isinstance(exc, HTTPError) else {}
        try:
            self._send_bytes(status, dumps(body) + b"\n", JSON_TYPE, extra)
        except OSError:
            self.close_connection = True

    def _send(self, resp: Response, req: Request, what: str) -> None:
        if isinstance(resp, Reply):
            if resp.body is None:
                self._send_bytes(resp.status if resp.status != 200 else 204, b"", JSON_TYPE)
            else:
                self._send_bytes(resp.status, dumps(resp.body) + b"\n", JSON_TYPE)
        elif isinstance(resp, TextReply):
            self._send_bytes(resp.status, resp.text.encode(), "text/plain; charset=utf-8")
        elif isinstance(resp, BytesReply):
            self._send_chunks(resp)
        elif isinstance(resp, LinesReply):
            self._send_lines(resp, what)
        else:
            self._upgrade(resp, req, what)

    # --- chunked bodies

    def _chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))

    def _end_chunks(self) -> None:
        self.wfile.write(b"0\r\n\r\n")

    def _send_chunks(self, resp: BytesReply) -> None:
        it = iter(resp.chunks)
        try:
            # The first chunk comes before the headers, so an early failure (no such
            # path) still answers with its own status.
            first = next(it, b"")
            self._head(200, {"Content-Type": resp.content_type,
                             "Transfer-Encoding": "chunked"})
            self._chunk(first)
            for chunk in it:
                self._chunk(chunk)
            self._end_chunks()
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def _client_gone(self) -> bool:
        """The peer closed its end (checked while a stream is idle, without reading)."""
        poller = select.poll()
        poller.register(self.connection, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        return bool(poller.poll(0))

    def _send_lines(self, resp: LinesReply, what: str) -> None:
        """Chunked JSON lines. A producer thread runs the service's iterator (it may block
        for minutes on ``follow``); this thread writes and watches the client, so a client
        that goes away ends the stream even while the iterator has nothing to say."""
        events: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=64)
        cancelled = threading.Event()

        def put(event: tuple[str, Any]) -> None:
            while not cancelled.is_set():
                try:
                    events.put(event, timeout=IDLE_CHECK)
                    return
                except queue.Full:
                    continue

        def produce() -> None:
            it = iter(resp.items)
            try:
                for item in it:
                    if cancelled.is_set():
                        break
                    put(("item", item))
                put(("end", None))
            except Exception as exc:
                put(("error", exc))
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    with contextlib.suppress(Exception):
                        close()

        threading.Thread(target=produce, name=f"stream {what}", daemon=True).start()
        try:
            self._pump_lines(events, what)
        finally:
            cancelled.set()

    def _pump_lines(self, events: queue.Queue[tuple[str, Any]], what: str) -> None:
        started = False
        while True:
            try:
                kind, value = events.get(timeout=IDLE_CHECK if started else FIRST_ITEM_WAIT)
            except queue.Empty:
                if not started:
                    self._head(200, {"Content-Type": LINES_TYPE,
                                     "Transfer-Encoding": "chunked"})
                    started = True
                elif self._client_gone():
                    log.debug("%s: client went away", what)
                    self.close_connection = True
                    return
                continue
            if kind == "error" and not started:
                raise value  # nothing sent yet: the normal error answer
            if not started:
                self._head(200, {"Content-Type": LINES_TYPE, "Transfer-Encoding": "chunked"})
                started = True
            try:
                if kind == "item":
                    self._chunk(dumps(value) + b"\n")
                    continue
                if kind == "error":
                    # Mid-stream: the last line is the ErrorBody, then a clean end.
                    _log_failure(value, what)
                    self._chunk(dumps(error_body(value)[1]) + b"\n")
                self._end_chunks()
                return
            except OSError:
                log.debug("%s: client went away", what)
                self.close_connection = True
                return

    # --- upgrade

    def _upgrade(self, resp: UpgradeReply, req: Request, what: str) -> None:
        if not req.body.done and not req.body.drain(MAX_DRAIN):
            raise HTTPError(413, "request body too large for a stream request")
        self.close_connection = True
        self._head(101, {"Upgrade": STREAM_PROTOCOL, "Connection": "Upgrade"})
        sock = self.connection
        try:
            resp.run(sock)
        except Exception as exc:
            _log_failure(exc, what + " (after 101)")
            with contextlib.suppress(OSError):
                sock.sendall(encode_control(error_body(exc)[1]))
        finally:
            release_connection(sock)


def release_connection(sock: socket.socket) -> None:
    """Close this process's descriptor of ``sock`` without shutting the connection down: a
    monitor that received a duplicate goes on using it."""
    if sock.fileno() == -1:
        return
    fd = sock.detach()
    with contextlib.suppress(OSError):
        os.close(fd)


# --- the server -----------------------------------------------------------------------


class ApiServer(http.server.ThreadingHTTPServer):
    """A threading HTTP server on a unix socket, created atomically with its mode.

    The socket is bound under a temporary name, given its mode, then renamed over
    ``path``: a client never sees a socket with the wrong mode, and a stale socket of a
    dead daemon is replaced in one step (the caller holds the daemon lock, so it is
    stale).
    """

    address_family = socket.AF_UNIX
    daemon_threads = True
    allow_reuse_address = False
    request_queue_size = 64

    def __init__(self, path: Path, router: Router, mode: int = 0o660) -> None:
        self.socket_path = Path(path)
        self.router = router
        self.mode = mode
        self._inode: int | None = None
        super().__init__(str(path), _Handler)  # type: ignore[arg-type]

    def server_bind(self) -> None:
        tmp = self.socket_path.with_name(f".{self.socket_path.name}.{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        with socket_name(tmp) as name:
            self.socket.bind(name)
        try:
            os.chmod(tmp, self.mode)
            os.rename(tmp, self.socket_path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self._inode = self.socket_path.stat().st_ino
        self.server_address = str(self.socket_path)  # type: ignore[assignment]
        self.server_name = "isoboxd"
        self.server_port = 0

    def server_close(self) -> None:
        super().server_close()
        with contextlib.suppress(OSError):
            if self.socket_path.stat().st_ino == self._inode:
                self.socket_path.unlink()

    def shutdown_request(self, request: Any) -> None:
        if request.fileno() == -1:  # handed over after a 101: not ours to shut down
            return
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("unhandled error on a connection")




def serve_in_thread(server: ApiServer) -> threading.Thread:
    """Run ``server`` in a thread (tests, and the daemon's main loop)."""
    thread = threading.Thread(target=server.serve_forever, name="isoboxd-http", daemon=True)
    thread.start()
    return thread


def iter_file(fh: BinaryIO, size: int = 1 << 16) -> Iterator[bytes]:
    """A file's bytes in chunks (for :class:`BytesReply`)."""
    while chunk := fh.read(size):
        yield chunk
