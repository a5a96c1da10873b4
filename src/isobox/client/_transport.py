"""HTTP/1.1 to ``isoboxd`` over its unix socket, with the standard library only.

Three kinds of exchange:

* plain requests with JSON (or raw) bodies: :meth:`Transport.request` returns the
  :class:`http.client.HTTPResponse`, or raises the daemon's error as the class of
  :mod:`isobox.errors` named by the body's ``error.kind``;
* chunked JSON-line streams (logs, events, stats): :func:`json_lines`;
* upgraded raw streams (attach, exec): :meth:`Transport.upgrade` writes the request by hand
  and reads the answer's head itself, so no byte the daemon sends right after the ``101``
  can be lost in ``http.client``'s read buffer; it returns a :class:`RawStream`.

Each request uses its own connection: the daemon is local, a connect costs microseconds, and
a connection never carries the state of an earlier, half-read stream.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, cast
from urllib.parse import quote, urlencode

from isobox import errors
from isobox.client.errors import DaemonUnavailable
from isobox.spec import stream as frames
from isobox.spec.wire import API_VERSION, STREAM_PROTOCOL

Query = Mapping[str, str | int | float | bool | Sequence[str] | None]
_HEAD_LIMIT = 64 * 1024


_BY_STATUS: dict[int, type[errors.IsoboxError]] = {
    400: errors.InvalidArgument, 404: errors.NotFound, 408: errors.WaitTimeout,
    409: errors.Conflict, 507: errors.StoreFull,
}


def raise_error(status: int, body: bytes) -> None:
    """Raise what an error answer carries: the ``isobox.errors`` class its ``kind`` names."""
    try:
        detail = json.loads(body)["error"]
        kind = str(detail["kind"])
        message = str(detail["message"])
        field = detail.get("field")
    except (ValueError, KeyError, TypeError):
        text = body.decode(errors="replace").strip() or http.client.responses.get(status, "")
        raise errors.IsoboxError(f"daemon answered {status}: {text}") from None
    cls = getattr(errors, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.IsoboxError)):
        # A kind this client does not know (a newer daemon): the class of its status.
        cls = _BY_STATUS.get(status, errors.IsoboxError)
    # Some classes take structured arguments; the message the daemon sent is what counts.
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    if isinstance(exc, errors.InvalidDocument):
        exc.field = field if isinstance(field, str) else None
    raise exc


def quote_ref(ref: str) -> str:
    """A reference as one path segment (``busybox:latest``, ``a/b``)."""
    return quote(ref, safe="")


def _query(params: Query | None) -> str:
    if not params:
        return ""
    pairs: list[tuple[str, str]] = []
    for key, value in params.items():
        if value is None or value is False:
            continue
        if value is True:
            pairs.append((key, "1"))
        elif isinstance(value, str | int | float):
            pairs.append((key, str(value)))
        else:
            pairs += [(key, str(v)) for v in value]
    return "?" + urlencode(pairs) if pairs else ""


class UnixHTTPConnection(http.client.HTTPConnection):
    """An :class:`http.client.HTTPConnection` whose ``connect`` opens an ``AF_UNIX`` socket."""

    def __init__(self, path: str, timeout: float | None = None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class Response:
    """An answer and the connection it came on; closing it closes both."""

    def __init__(self, conn: UnixHTTPConnection, resp: http.client.HTTPResponse) -> None:
        self.conn = conn
        self.raw = resp
        self.status = resp.status

    def read(self, n: int = -1) -> bytes:
        return self.raw.read(None if n < 0 else n)

    def json(self) -> Any:
        try:
            data = self.raw.read()
        finally:
            self.close()
        return json.loads(data) if data else None

    def lines(self) -> Iterator[Any]:
        """The body as JSON lines (one object per line), as they arrive."""
        try:
            while line := self.raw.readline():
                if line.strip():
                    yield json.loads(line)
        finally:
            self.close()

    def chunks(self, size: int = 1 << 16) -> Iterator[bytes]:
        try:
            while chunk := self.raw.read1(size):
                yield chunk
        finally:
            self.close()

    def close(self) -> None:
        self.raw.close()
        self.conn.close()


class Transport:
    """Requests to one daemon socket; ``timeout`` applies to connect and each read."""

    def __init__(self, socket_path: str | Path, timeout: float | None = None) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout

    def _url(self, path: str, query: Query | None) -> str:
        return f"/{API_VERSION}{path}{_query(query)}"

    def _connect(self) -> UnixHTTPConnection:
        conn = UnixHTTPConnection(self.socket_path, timeout=self.timeout)
        try:
            conn.connect()
        except OSError as exc:
            raise DaemonUnavailable(
                f"cannot connect to isoboxd at {self.socket_path}: {exc.strerror or exc} "
                "(is it running? `isoboxd`, or Client(autostart=True))"
            ) from exc
        return conn

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Query | None = None,
        json_body: Any = None,
        body: bytes | BinaryIO | None = None,
        length: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """Send one request; an answer of 400 or more is raised as the daemon's error."""
        hdrs = dict(headers or {})
        data: bytes | BinaryIO | None = body
        if json_body is not None:
            data = json.dumps(json_body).encode()
            hdrs["Content-Type"] = "application/json"
        if isinstance(data, bytes):
            hdrs["Content-Length"] = str(len(data))
        elif data is not None and length is not None:
            hdrs["Content-Length"] = str(length)
        elif method in ("POST", "PUT"):
            hdrs["Content-Length"] = "0"
        conn = self._connect()
        try:
            conn.request(method, self._url(path, query), body=data, headers=hdrs,
                         encode_chunked=data is not None and "Content-Length" not in hdrs)
            resp = conn.getresponse()
        except OSError as exc:
            conn.close()
            raise DaemonUnavailable(f"isoboxd went away during {method} {path}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        out = Response(conn, resp)
        if resp.status >= 400:
            try:
                raw = resp.read()
            finally:
                out.close()
            raise_error(resp.status, raw)
        return out

    def upgrade(
        self, method: str, path: str, *, query: Query | None = None, json_body: Any = None
    ) -> RawStream:
        """A request with ``Upgrade: isobox-stream/1``; after the ``101``, a frame stream."""
        payload = json.dumps(json_body).encode() if json_body is not None else b""
        head = (
            f"{method} {self._url(path, query)} HTTP/1.1\r\n"
            "Host: localhost\r\n"
            "Connection: Upgrade\r\n"
            f"Upgrade: {STREAM_PROTOCOL}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        ).encode()
        conn = self._connect()
        sock = cast(socket.socket, conn.sock)
        conn.sock = None  # the socket is ours now
        try:
            sock.settimeout(None)
            sock.sendall(head + payload)
            status, hdrs, rest = _read_head(sock)
            if status != 101:
                raise_error(status, _read_body(sock, hdrs, rest))
                raise errors.IsoboxError(f"daemon answered {status} instead of 101")
        except OSError as exc:
            sock.close()
            raise DaemonUnavailable(f"isoboxd went away during {method} {path}: {exc}") from exc
        except BaseException:
            sock.close()
            raise
        return RawStream(sock, rest)


def _read_head(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise errors.IsoboxError("isoboxd closed the connection before answering")
        buf += chunk
        if len(buf) > _HEAD_LIMIT:
            raise errors.IsoboxError("isoboxd sent an oversized response head")
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise errors.IsoboxError(f"isoboxd sent a malformed status line: {lines[0]!r}")
    hdrs: dict[str, str] = {}
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        if sep:
            hdrs[key.strip().lower()] = value.strip()
    return int(parts[1]), hdrs, rest


def _read_body(sock: socket.socket, hdrs: dict[str, str], rest: bytes) -> bytes:
    """The body of a non-101 answer: by Content-Length, chunked, or up to the close."""
    buf = bytearray(rest)

    def fill(n: int) -> bool:
        while len(buf) < n:
            chunk = sock.recv(65536)
            if not chunk:
                return False
            buf.extend(chunk)
        return True

    if "content-length" in hdrs:
        n = int(hdrs["content-length"])
        fill(n)
        return bytes(buf[:n])
    if hdrs.get("transfer-encoding", "").lower() == "chunked":
        out = bytearray()
        pos = 0
        while True:
            while b"\r\n" not in buf[pos:]:
                if not fill(len(buf) + 1):
                    return bytes(out)
            end = buf.index(b"\r\n", pos)
            size = int(bytes(buf[pos:end]).split(b";")[0], 16)
            pos = end + 2
            if size == 0:
                return bytes(out)
            if not fill(pos + size + 2):
                return bytes(out + buf[pos:])
            out += buf[pos:pos + size]
            pos += size + 2
    while fill(len(buf) + 1):
        pass
    return bytes(buf)


class RawStream:
    """Both directions of an upgraded connection, in frames of :mod:`isobox.spec.stream`."""

    def __init__(self, sock: socket.socket, initial: bytes = b"") -> None:
        self.sock = sock
        self._reader = frames.FrameReader()
        self._ready = self._reader.feed(initial) if initial else []
        self._eof = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv_frames(self) -> list[tuple[int, bytes]] | None:
        """The frames one read brings (maybe none yet); None at the end of the stream."""
        if self._ready:
            out, self._ready = self._ready, []
            return out
        if self._eof:
            return None
        data = self.sock.recv(1 << 16)
        if not data:
            self._eof = True
            if self._reader.pending:
                raise frames.StreamError("connection closed mid-frame")
            return None
        return self._reader.feed(data)

    def has_buffered(self) -> bool:
        return bool(self._ready)

    def frames(self) -> Iterator[tuple[int, bytes]]:
        while (batch := self.recv_frames()) is not None:
            yield from batch

    def send_stdin(self, data: bytes) -> None:
        for i in range(0, len(data), frames.MAX_PAYLOAD):
            self.sock.sendall(frames.encode(frames.STDIN, data[i:i + frames.MAX_PAYLOAD]))

    def close_stdin(self) -> None:
        self.sock.sendall(frames.encode_control({"closeStdin": True}))

    def resize(self, rows: int, cols: int) -> None:
        self.sock.sendall(frames.encode_control({"resize": [rows, cols]}))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
