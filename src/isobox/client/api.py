"""The isobox SDK: containers and images of one ``isoboxd``, in docker-py's shape.

::

    from isobox.client import Client
    c = Client()
    c.containers.run("busybox", ["echo", "hi"])           # b"hi\\n"
    ct = c.containers.run("busybox", ["sleep", "60"], detach=True, isolation="host")
    ct.exec_run(["ps"]).output; ct.stop(); ct.remove()

Only the standard library, :mod:`isobox.spec.wire` / :mod:`isobox.spec.stream` (no pydantic)
and the error tree are imported, so the SDK starts fast and works against any daemon that
speaks the API. Documents are built here as plain camelCase dicts; the daemon validates them
and answers a bad field with ``InvalidDocument`` naming it.
"""

from __future__ import annotations

import builtins
import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple, cast

from isobox.client._transport import Query, Transport, quote_ref
from isobox.client.errors import ContainerError
from isobox.errors import InvalidArgument, NotFound

if TYPE_CHECKING:  # types only: the hot path builds none of them (pathlib, wire ~6 ms)
    from pathlib import Path

    from isobox.client.stream import RawStream
    from isobox.spec import wire

SCHEMA_VERSION = "1.0"
SOCKET_NAME = "isoboxd.sock"
#: :data:`isobox.paths.DEFAULT_RUN`, written here so that finding the socket does not import
#: :mod:`pathlib` (~4 ms); a test checks that both name the same socket.
_DEFAULT_RUN = "/run/isobox"
_BOOTSTRAP_NAMES = {"busybox": "busybox:latest", "debian": "debian:bookworm"}
_UNITS = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def default_socket() -> Path:
    from pathlib import Path

    return Path(default_socket_path())


def default_socket_path() -> str:
    """``$ISOBOX_RUN/isoboxd.sock`` (as :func:`isobox.paths.run_dir`), as a string."""
    return os.path.join(os.environ.get("ISOBOX_RUN") or _DEFAULT_RUN, SOCKET_NAME)


def parse_size(value: int | str) -> int:
    """Bytes from ``1048576``, ``"512k"``, ``"20m"``, ``"1g"`` (binary units, as docker)."""
    if isinstance(value, int):
        return value
    text = value.strip().lower().removesuffix("ib").removesuffix("b") or "0"
    unit = _UNITS.get(text[-1], 1) if text[-1].isalpha() else 1
    number = text[:-1] if text[-1].isalpha() else text
    try:
        return int(float(number) * unit)
    except ValueError:
        raise InvalidArgument(f"invalid size {value!r} (e.g. 512k, 20m, 1g)") from None


def _args(command: str | Sequence[str] | None) -> list[str] | None:
    if command is None:
        return None
    if isinstance(command, str):
        import shlex

        return shlex.split(command)
    return list(command)


def _env(environment: Mapping[str, str] | Sequence[str] | None) -> list[str]:
    if environment is None:
        return []
    if isinstance(environment, Mapping):
        return [f"{k}={v}" for k, v in environment.items()]
    return list(environment)


def _labels(labels: Mapping[str, str] | Sequence[str] | None) -> dict[str, str]:
    if labels is None:
        return {}
    if isinstance(labels, Mapping):
        return dict(labels)
    out: dict[str, str] = {}
    for item in labels:
        key, _, value = item.partition("=")
        out[key] = value
    return out


def parse_mount(spec: str) -> dict[str, Any]:
    """``SRC:DST[:ro|rw]`` (the CLI's ``-v``) as a mount of the document."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise InvalidArgument(f"invalid mount {spec!r}: SRC:DST[:ro]")
    mode = parts[2] if len(parts) == 3 else "rw"
    if mode not in ("ro", "rw"):
        raise InvalidArgument(f"invalid mount mode {mode!r} in {spec!r}: ro or rw")
    return {"source": os.path.abspath(parts[0]), "destination": parts[1],
            "readOnly": mode == "ro"}


def _mounts(
    mounts: Sequence[str | Mapping[str, Any]] | None,
    volumes: Mapping[str, Mapping[str, str]] | Sequence[str] | None,
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in mounts or ():
        if isinstance(m, str):
            out.append(parse_mount(m))
        else:
            d = dict(m)
            if "target" in d:  # docker-py's Mount(target=, source=, read_only=)
                d["destination"] = d.pop("target")
            if "read_only" in d:
                d["readOnly"] = bool(d.pop("read_only"))
            out.append(d)
    if isinstance(volumes, Mapping):
        for src, opts in volumes.items():
            out.append({"source": os.path.abspath(src), "destination": opts["bind"],
                        "readOnly": opts.get("mode", "rw") == "ro"})
    else:
        out += [parse_mount(v) for v in volumes or ()]
    return out


def parse_publish(spec: str) -> dict[str, Any]:
    """``[IP:]HOSTPORT:CTRPORT[/tcp|udp]`` (the CLI's ``-p``) as a port of the document."""
    body, _, proto = spec.partition("/")
    proto = proto or "tcp"
    parts = body.rsplit(":", 2)
    if proto not in ("tcp", "udp") or len(parts) < 2:
        raise InvalidArgument(f"invalid port {spec!r}: [IP:]HOSTPORT:CTRPORT[/tcp|udp]")
    host_ip = parts[0] if len(parts) == 3 else ""
    try:
        host_port, ctr_port = int(parts[-2]), int(parts[-1])
    except ValueError:
        raise InvalidArgument(f"invalid port {spec!r}: [IP:]HOSTPORT:CTRPORT[/tcp|udp]"
                              ) from None
    return {"hostIp": host_ip, "hostPort": host_port, "containerPort": ctr_port,
            "protocol": proto}


def _ports(ports: Mapping[str | int, Any] | Sequence[str] | None) -> list[dict[str, Any]]:
    """``["8080:80", "127.0.0.1:53:53/udp"]``, or docker-py's ``{"80/tcp": 8080}`` with a
    host port, an ``(ip, port)`` pair or a list of them as values."""
    if ports is None:
        return []
    if not isinstance(ports, Mapping):
        return [parse_publish(p) for p in ports]
    out: list[dict[str, Any]] = []
    for key, value in ports.items():
        ctr, _, proto = str(key).partition("/")
        for v in value if isinstance(value, list) else [value]:
            ip, port = (v[0], v[1]) if isinstance(v, tuple) else ("", v)
            out.append(parse_publish(f"{ip}:{port}:{ctr}/{proto or 'tcp'}" if ip
                                     else f"{port}:{ctr}/{proto or 'tcp'}"))
    return out


def build_document(
    image: str,
    command: str | Sequence[str] | None = None,
    *,
    name: str | None = None,
    isolation: str | None = None,
    entrypoint: str | Sequence[str] | None = None,
    environment: Mapping[str, str] | Sequence[str] | None = None,
    working_dir: str | None = None,
    user: str | None = None,
    tty: bool = False,
    stdin_open: bool = False,
    hostname: str | None = None,
    network_mode: str | None = None,
    network: str | None = None,
    ports: Mapping[str | int, Any] | Sequence[str] | None = None,
    network_rate: int | str | None = None,
    network_aliases: Sequence[str] | None = None,
    mounts: Sequence[str | Mapping[str, Any]] | None = None,
    volumes: Mapping[str, Mapping[str, str]] | Sequence[str] | None = None,
    labels: Mapping[str, str] | Sequence[str] | None = None,
    mem_limit: int | str | None = None,
    cpus: float | None = None,
    cpu_shares: int | None = None,
    pids_limit: int | None = None,
    cpuset_cpus: str | None = None,
    read_only: bool = False,
    auto_remove: bool = False,
    cap_add: Sequence[str] | None = None,
    vm_template: bool = True,
) -> dict[str, Any]:
    """The compute-system document (wire version 1.0) for these docker-py-style options.

    ``network`` (or ``network_mode``): ``none``, ``host``, ``default``, a network's name or
    ``container:<ref>``; ``ports``: see :func:`_ports`; ``network_rate``: egress bytes/s
    (``"1m"``, ``"512k"``); ``vm_template=False``: under vm isolation, boot the utility VM
    cold instead of cloning it from a template (for comparison)."""
    process: dict[str, Any] = {"env": _env(environment), "tty": tty, "stdin": stdin_open}
    if (args := _args(command)) is not None:
        process["args"] = args
    if (ep := _args(entrypoint)) is not None:
        process["entrypoint"] = ep
    if working_dir:
        process["cwd"] = working_dir
    if user:
        process["user"] = user
    if cap_add:
        process["capAdd"] = list(cap_add)
    net: dict[str, Any] = {}
    if network or network_mode:
        net["mode"] = network or network_mode
    if hostname:
        net["hostname"] = hostname
    if ports:
        net["ports"] = _ports(ports)
    if network_rate is not None:
        net["rate"] = parse_size(network_rate)
    if network_aliases:
        net["aliases"] = list(network_aliases)
    resources: dict[str, Any] = {}
    if mem_limit is not None:
        resources["memory"] = parse_size(mem_limit)
    for key, value in (("cpus", cpus), ("cpuShares", cpu_shares), ("pidsLimit", pids_limit),
                       ("cpuset", cpuset_cpus)):
        if value is not None:
            resources[key] = value
    doc: dict[str, Any] = {
        "schemaVersion": SCHEMA_VERSION,
        "image": image,
        "process": process,
        "mounts": _mounts(mounts, volumes),
        "labels": _labels(labels),
        "readOnly": read_only,
        "autoRemove": auto_remove,
    }
    if name:
        doc["name"] = name
    if isolation:
        doc["isolation"] = isolation
    if net:
        doc["network"] = net
    if resources:
        doc["resources"] = resources
    if not vm_template:
        doc["vm"] = {"template": False}
    return doc


class ExecResult(NamedTuple):
    """``exit_code`` (None while streaming) and ``output``: bytes, ``(stdout, stderr)`` with
    ``demux=True``, or an iterator of chunks with ``stream=True``."""

    exit_code: int | None
    output: Any


class Container:
    """One compute system. ``attrs`` is its ``ComputeSystemInfo`` as last fetched.

    A container made from an id alone (``containers.create``, ``run``) fetches its ``attrs``
    at their first use: ``run`` needs only the id, and a round trip fewer."""

    def __init__(self, client: Client, attrs: wire.ComputeSystemInfo | None = None, *,
                 id: str | None = None) -> None:
        if attrs is None and id is None:
            raise TypeError("Container needs attrs or an id")
        self.client = client
        self._attrs = attrs
        self._id = attrs["id"] if attrs is not None else cast(str, id)

    def __repr__(self) -> str:
        return f"<Container {self.short_id} {self.name} {self.status}>"

    @property
    def attrs(self) -> wire.ComputeSystemInfo:
        if self._attrs is None:
            self.reload()
            assert self._attrs is not None
        return self._attrs

    @attrs.setter
    def attrs(self, value: wire.ComputeSystemInfo) -> None:
        self._attrs = value
        self._id = value["id"]

    @property
    def id(self) -> str:
        return self._id

    @property
    def short_id(self) -> str:
        return self.id[:12]

    @property
    def name(self) -> str:
        return self.attrs["name"]

    @property
    def status(self) -> str:
        return self.attrs["state"]

    @property
    def image(self) -> str:
        return self.attrs["image"]

    @property
    def labels(self) -> dict[str, str]:
        return self.attrs["labels"]

    @property
    def _path(self) -> str:
        return f"/compute-systems/{quote_ref(self.id)}"

    @property
    def _api(self) -> Transport:
        return self.client.api

    def reload(self) -> None:
        self.attrs = self._api.request("GET", self._path).json()

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self, isolation: str | None = None) -> None:
        """Start it (again); a stopped container may be started under another isolation."""
        self._api.request("POST", self._path + "/start", json_body=_start_body(isolation)).close()

    def start_attached(self, *, isolation: str | None = None, stdin: bool = False) -> RawStream:
        """Start it and get its stream from the first byte (nothing is missed)."""
        return self._api.upgrade("POST", self._path + "/start", json_body=_start_body(isolation),
                                 query={"attach": True, "stdin": stdin})

    def attach_stream(self, *, stdin: bool = False, stdout: bool = True,
                      stderr: bool = True) -> RawStream:
        return self._api.upgrade("POST", self._path + "/attach",
                                 query={"stdin": stdin, "stdout": stdout, "stderr": stderr})

    def stop(self, timeout: float = 10.0) -> None:
        self._api.request("POST", self._path + "/stop", json_body={"timeout": timeout}).close()

    def kill(self, signal: str | int = "SIGKILL") -> None:
        self._api.request("POST", self._path + "/kill", json_body={"signal": signal}).close()

    def pause(self) -> None:
        self._api.request("POST", self._path + "/pause").close()

    def unpause(self) -> None:
        self._api.request("POST", self._path + "/resume").close()

    def wait(self, *, condition: str = "not-running",
             timeout: float | None = None) -> wire.WaitResult:
        query: dict[str, Any] = {"condition": condition, "timeout": timeout}
        return cast("wire.WaitResult", self._api.request(
            "POST", self._path + "/wait", query=query).json())

    def remove(self, *, force: bool = False) -> None:
        self._api.request("DELETE", self._path, query={"force": force}).close()

    # ---- looking at it ---------------------------------------------------------------------

    def logs(
        self, *, stdout: bool = True, stderr: bool = True, stream: bool = False,
        follow: bool = False, since: str | None = None, until: str | None = None,
        tail: int | None = None, timestamps: bool = False,
    ) -> bytes | Iterator[wire.LogEntry]:
        """All output as bytes, or (``stream=True``) the ``LogEntry`` records as they come."""
        query: Query = {
            "follow": follow, "since": since, "until": until, "tail": tail,
            "stdout": "1" if stdout else "0", "stderr": "1" if stderr else "0",
        }
        entries = cast("Iterator[wire.LogEntry]", self._api.request(
            "GET", self._path + "/logs", query=query).lines())
        if stream:
            return entries
        prefix = (lambda e: e["time"] + " ") if timestamps else (lambda e: "")
        return "".join(prefix(e) + e["line"] for e in entries).encode()

    def stats(self, *, stream: bool = False,
              interval: float | None = None) -> wire.StatsSample | Iterator[wire.StatsSample]:
        resp = self._api.request("GET", self._path + "/stats",
                                 query={"stream": stream, "interval": interval})
        if stream:
            return cast("Iterator[wire.StatsSample]", resp.lines())
        return cast("wire.StatsSample", resp.json())

    def top(self) -> wire.ProcessList:
        return cast("wire.ProcessList", self._api.request("GET", self._path + "/top").json())

    # ---- exec and files --------------------------------------------------------------------

    def exec_stream(
        self, cmd: str | Sequence[str], *, stdin: bool = False, tty: bool = False,
        environment: Mapping[str, str] | Sequence[str] | None = None,
        workdir: str | None = None, user: str | None = None,
    ) -> RawStream:
        spec: dict[str, Any] = {"args": _args(cmd), "env": _env(environment), "tty": tty,
                                "stdin": stdin}
        if workdir:
            spec["cwd"] = workdir
        if user:
            spec["user"] = user
        return self._api.upgrade("POST", self._path + "/exec", json_body=spec)

    def exec_run(
        self, cmd: str | Sequence[str], *, stdout: bool = True, stderr: bool = True,
        tty: bool = False, environment: Mapping[str, str] | Sequence[str] | None = None,
        workdir: str | None = None, user: str | None = None, demux: bool = False,
        stream: bool = False,
    ) -> ExecResult:
        """Run ``cmd`` in the running container: its exit code and output (docker-py's)."""
        from isobox.client import stream as streams
        from isobox.spec import stream as frames

        raw = self.exec_stream(cmd, tty=tty, environment=environment, workdir=workdir,
                               user=user)
        wanted = {frames.STDOUT} if stdout else set()
        if stderr:
            wanted.add(frames.STDERR)
        if stream:
            return ExecResult(None, (p for k, p in streams.demux(raw) if k in wanted))
        code, chunks = streams.collect(raw)
        out = b"".join(p for k, p in chunks if k == frames.STDOUT)
        err = b"".join(p for k, p in chunks if k == frames.STDERR)
        if demux:
            return ExecResult(code, (out if stdout else None, err if stderr else None))
        return ExecResult(code, b"".join(p for k, p in chunks if k in wanted))

    def get_archive(self, path: str) -> Iterator[bytes]:
        """A tar of ``path`` in the container (``isobox cp`` out), in chunks."""
        return self._api.request("GET", self._path + "/archive", query={"path": path}).chunks()

    def put_archive(self, path: str, data: bytes | BinaryIO) -> None:
        """Extract a tar into the folder ``path`` of the container (``isobox cp`` in)."""
        length = None
        if not isinstance(data, bytes):
            length = os.fstat(data.fileno()).st_size - data.tell()
        self._api.request("PUT", self._path + "/archive", query={"path": path}, body=data,
                          length=length,
                          headers={"Content-Type": "application/x-tar"}).close()


def _start_body(isolation: str | None) -> dict[str, Any]:
    return {"isolation": isolation} if isolation else {}


class ContainerCollection:
    def __init__(self, client: Client) -> None:
        self.client = client

    def create(self, image: str, command: str | Sequence[str] | None = None,
               **kwargs: Any) -> Container:
        """Create (not start) a container; options as :func:`build_document`'s."""
        doc = build_document(image, command, **kwargs)
        created = cast("wire.CreateResult", self.client.api.request(
            "POST", "/compute-systems", json_body=doc).json())
        return Container(self.client, id=created["id"])

    def run(
        self, image: str, command: str | Sequence[str] | None = None, *, detach: bool = False,
        stdout: bool = True, stderr: bool = False, remove: bool = False, **kwargs: Any,
    ) -> Any:
        """Create and start. Detached: the :class:`Container`. Otherwise wait for it and
        return its output (stdout, and stderr with ``stderr=True``) as bytes; a non-zero exit
        raises :class:`ContainerError` carrying the exit code and stderr."""
        from isobox.client import stream as streams
        from isobox.spec import stream as frames

        ct = self.create(image, command, **kwargs)
        if detach:
            try:
                ct.start()
            except BaseException:
                if kwargs.get("auto_remove") or remove:
                    ct.remove(force=True)
                raise
            return ct
        try:
            code, chunks = streams.collect(ct.start_attached())
        except BaseException:
            _quiet_remove(ct)
            raise
        # The exit frame can come before the daemon has recorded the stop: wait for it (or
        # for the removal), so the container's state is final when this returns.
        with contextlib.suppress(NotFound):
            ct.wait(condition="removed" if kwargs.get("auto_remove") else "not-running")
        if remove and not kwargs.get("auto_remove"):
            _quiet_remove(ct)
        err = b"".join(p for k, p in chunks if k == frames.STDERR)
        if code != 0:
            raise ContainerError(ct, code, _args(command), image, err)
        wanted = ({frames.STDOUT} if stdout else set()) | ({frames.STDERR} if stderr else set())
        return b"".join(p for k, p in chunks if k in wanted)

    def get(self, ref: str) -> Container:
        if not ref:  # "" would name the collection, not a container
            raise NotFound("no such container: '' (an empty name or id)")
        info = self.client.api.request("GET", f"/compute-systems/{quote_ref(ref)}").json()
        return Container(self.client, info)

    def list(self, all: bool = False,
             filters: Mapping[str, str | Sequence[str]] | None = None) -> builtins.list[Container]:
        """Running (and paused) containers; ``all=True`` every one. ``filters``: ``state``,
        ``isolation``, ``label`` (``k`` or ``k=v``, a list), ``name``."""
        query: dict[str, Any] = {}
        for key, value in (filters or {}).items():
            if key not in ("state", "isolation", "label", "name"):
                raise InvalidArgument(f"unknown filter {key!r} (state, isolation, label, name)")
            query[key] = value
        infos = cast("builtins.list[wire.ComputeSystemInfo]", self.client.api.request(
            "GET", "/compute-systems", query=query).json())
        if not all and "state" not in query:
            infos = [i for i in infos if i["state"] in ("running", "paused")]
        return [Container(self.client, i) for i in infos]


def _quiet_remove(ct: Container) -> None:
    with contextlib.suppress(NotFound):
        ct.remove(force=True)


class Image:
    """One image; ``attrs`` is its ``ImageInfo`` (from a list) or its inspect document."""

    def __init__(self, client: Client, attrs: Mapping[str, Any]) -> None:
        self.client = client
        self.attrs = dict(attrs)

    def __repr__(self) -> str:
        return f"<Image {self.short_id} {', '.join(self.tags)}>"

    @property
    def id(self) -> str:
        return str(self.attrs["id"])

    @property
    def short_id(self) -> str:
        return self.id.removeprefix("sha256:")[:12]

    @property
    def tags(self) -> builtins.list[str]:
        return [str(t) for t in self.attrs.get("tags", [])]

    def reload(self) -> None:
        self.attrs = self.client.images.get(self.id).attrs

    def tag(self, new: str) -> None:
        self.client.images.tag(self.id, new)

    def save(self, path: str | Path, fmt: str = "oci") -> None:
        self.client.images.save(self.tags[0] if self.tags else self.id, path, fmt)


class ImageCollection:
    def __init__(self, client: Client) -> None:
        self.client = client

    def list(self) -> builtins.list[Image]:
        infos = self.client.api.request("GET", "/images").json()
        return [Image(self.client, i) for i in infos]

    def get(self, ref: str) -> Image:
        """The image with its config, manifest and unpacked layer folders."""
        return Image(self.client, self.client.api.request(
            "GET", f"/images/{quote_ref(ref)}").json())

    def remove(self, ref: str, force: bool = False) -> dict[str, Any]:
        """``{"untagged": [...], "deleted": [...]}``."""
        return cast(dict[str, Any], self.client.api.request(
            "DELETE", f"/images/{quote_ref(ref)}", query={"force": force}).json())

    def tag(self, ref: str, new: str) -> None:
        self.client.api.request("POST", f"/images/{quote_ref(ref)}/tag",
                                json_body={"tag": new}).close()

    def prune(self) -> dict[str, Any]:
        return cast(dict[str, Any], self.client.api.request("POST", "/images/prune").json())

    def bootstrap(self, kind: str = "busybox", name: str | None = None) -> Image:
        """Build a base image from the daemon host's packages, named ``name`` (default
        ``busybox:latest`` / ``debian:bookworm``)."""
        default = _BOOTSTRAP_NAMES.get(kind)
        had_default = True
        if name and default and name != default:
            try:
                self.get(default)
            except NotFound:
                had_default = False
        info = self.client.api.request("POST", "/images/bootstrap",
                                       json_body={"kind": kind}).json()
        img = Image(self.client, info)
        if name and default and name != default:
            # The API builds under the default name; give it the asked one instead.
            self.tag(img.id, name)
            if not had_default:
                self.remove(default)
            img = self.get(name)
        return img

    def import_stream(self, data: BinaryIO, tag: str | None = None,
                      length: int | None = None) -> Image:
        info = self.client.api.request(
            "POST", "/images/import", query={"tag": tag}, body=data, length=length,
            headers={"Content-Type": "application/x-tar"}).json()
        return Image(self.client, info)

    def import_file(self, path: str | Path, tag: str | None = None) -> Image:
        """Import an OCI layout or archive, a docker save archive, a root filesystem tar
        (plain, gzip, zstd) or a folder (sent as a tar: an OCI layout, a docker save or a
        root filesystem). The file is read here and streamed to the daemon."""
        import tempfile
        from pathlib import Path

        p = Path(path)
        if not p.exists():
            raise InvalidArgument(f"{p}: no such file or directory")
        if p.is_dir():
            with tempfile.TemporaryFile() as tmp:
                _tar_folder(p, tmp)
                size = tmp.tell()
                tmp.seek(0)
                return self.import_stream(cast(BinaryIO, tmp), tag, size)
        with open(p, "rb") as fh:
            return self.import_stream(fh, tag, os.fstat(fh.fileno()).st_size)

    def export(self, ref: str, fmt: str = "oci") -> Iterator[bytes]:
        return self.client.api.request("GET", f"/images/{quote_ref(ref)}/export",
                                       query={"format": fmt}).chunks()

    def save(self, ref: str, path: str | Path, fmt: str = "oci") -> None:
        """Write the image as an archive at ``path``; complete or not there at all."""
        import tempfile
        from pathlib import Path

        out = Path(path).absolute()
        chunks = self.export(ref, fmt)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                for chunk in chunks:
                    fh.write(chunk)
            os.chmod(tmp, 0o644)
            os.rename(tmp, out)
        except BaseException:
            os.unlink(tmp)
            raise


def _tar_folder(folder: Path, out: BinaryIO) -> None:
    """The folder's content at the root of a tar (no ``./`` prefix)."""
    import tarfile

    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for child in sorted(folder.iterdir()):
            tar.add(child, arcname=child.name)


class Network:
    """One network; ``attrs`` is its ``NetworkInfo`` as last fetched."""

    def __init__(self, client: Client, attrs: wire.NetworkInfo) -> None:
        self.client = client
        self.attrs = attrs

    def __repr__(self) -> str:
        return f"<Network {self.short_id} {self.name} {self.attrs['subnet']}>"

    @property
    def id(self) -> str:
        return self.attrs["id"]

    @property
    def short_id(self) -> str:
        return self.id[:12]

    @property
    def name(self) -> str:
        return self.attrs["name"]

    @property
    def containers(self) -> dict[str, str]:
        """Container id -> its address on this network."""
        return dict(self.attrs["endpoints"])

    def reload(self) -> None:
        self.attrs = self.client.networks.get(self.id).attrs

    def remove(self) -> None:
        self.client.networks.remove(self.id)


class NetworkCollection:
    def __init__(self, client: Client) -> None:
        self.client = client

    def create(self, name: str, *, subnet: str | None = None, internal: bool = False,
               labels: Mapping[str, str] | None = None) -> Network:
        """A NAT network (``internal``: no route out); its subnet from a free pool when not
        given."""
        body: dict[str, Any] = {"name": name, "internal": internal,
                                "labels": dict(labels or {})}
        if subnet:
            body["subnet"] = subnet
        info = self.client.api.request("POST", "/networks", json_body=body).json()
        return Network(self.client, info)

    def get(self, ref: str) -> Network:
        """By id, id prefix or name."""
        return Network(self.client, self.client.api.request(
            "GET", f"/networks/{quote_ref(ref)}").json())

    def list(self) -> builtins.list[Network]:
        infos = self.client.api.request("GET", "/networks").json()
        return [Network(self.client, i) for i in infos]

    def remove(self, ref: str) -> None:
        """Conflict while a container is on it."""
        self.client.api.request("DELETE", f"/networks/{quote_ref(ref)}").close()


class Client:
    """A connection to ``isoboxd`` (``$ISOBOX_RUN/isoboxd.sock`` unless told otherwise).

    ``autostart=True`` starts the daemon when it is not running (see :mod:`.daemon`): when the
    first request finds no daemon on the socket, not before, so a command against a running
    daemon pays for no probe and imports none of the starting machinery.
    """

    def __init__(self, socket_path: str | os.PathLike[str] | None = None, *,
                 autostart: bool = False, timeout: float | None = None) -> None:
        self._socket = os.fspath(socket_path) if socket_path else default_socket_path()
        self.api = Transport(self._socket, timeout,
                             on_unavailable=self._start_daemon if autostart else None)
        self.containers = ContainerCollection(self)
        self.images = ImageCollection(self)
        self.networks = NetworkCollection(self)

    @property
    def socket_path(self) -> Path:
        from pathlib import Path

        return Path(self._socket)

    def _start_daemon(self) -> None:
        from isobox.client.daemon import ensure_daemon

        ensure_daemon(self.socket_path)

    @classmethod
    def from_env(cls, **kwargs: Any) -> Client:
        return cls(**kwargs)

    def ping(self) -> bool:
        resp = self.api.request("GET", "/_ping")
        try:
            return resp.read().strip() == b"OK"
        finally:
            resp.close()

    def info(self) -> wire.DaemonInfo:
        return cast("wire.DaemonInfo", self.api.request("GET", "/info").json())

    def events(
        self, *, since: str | None = None, until: str | None = None,
        filters: Mapping[str, str | Iterable[str]] | None = None, follow: bool = True,
    ) -> Iterator[wire.Event]:
        """Events as they happen (``follow``), from ``since``; ``filters`` as docker's
        (``type``, ``action``, ``id``, ``name``, ``label``)."""
        pairs: list[str] = []
        for key, value in (filters or {}).items():
            pairs += [f"{key}={value}"] if isinstance(value, str) else [
                f"{key}={v}" for v in value]
        query: Query = {"since": since, "until": until, "follow": "1" if follow else "0",
                        "filter": pairs}
        return cast("Iterator[wire.Event]", self.api.request("GET", "/events", query=query).lines())

    def close(self) -> None:
        """Nothing stays open between calls; here for ``with Client() as c``."""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
