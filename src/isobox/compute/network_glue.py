"""The compute side of networking: which network a run gets, and the calls that give it.

:mod:`isobox.network` (row 1) knows networks, addresses, veths and rules, and nothing of
containers beyond an id and a network namespace. This module is where the compute service
decides, for one start of one container:

* the **mode** (:func:`decide`): ``none`` (loopback only), ``host`` (the host's network,
  always so under host isolation), a network (``default`` is the engine's NAT network
  ``isobox``, made on first use), or ``container:<ref>`` (the namespace of another running
  container);
* what the **plan** gets (:func:`apply_to_plan`): read-only binds of the container's
  ``hosts``, ``resolv.conf`` and ``hostname`` files from its folder, or the path of the
  namespace to join;
* the **calls**, in the order of ``docs/network.md``: :func:`reserve` (an address, before
  the namespace exists, then the files), :func:`attach` (veth, rules, rate, once the
  monitor made the namespace and before the process runs), :func:`release` (from the
  release list, kind ``endpoint``: exit, remove, failed start, crash recovery).

Refusals are checked on the document before anything is made (:func:`check`): published
ports or a rate without a network of the container's own are a 400 naming the field.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from isobox.errors import Conflict, InvalidDocument, from_oserror

if TYPE_CHECKING:
    from isobox.compute.plan import Plan
    from isobox.spec.compute import ComputeSystem
    from isobox.spec.wire import Endpoint, NetworkInfo, PortMap

#: Allocation kind of an endpoint on a container's release list.
ENDPOINT_KIND = "endpoint"
#: The name files written into a container's folder and bound read-only at ``/etc/<name>``.
FILES = ("hosts", "resolv.conf", "hostname")
#: Document modes that are no network's name.
MODES = ("none", "host", "default")
CONTAINER_PREFIX = "container:"

Kind = Literal["none", "host", "network", "container"]


class Networks(Protocol):
    """What the compute service calls on :class:`isobox.network.NetworkService`."""

    def default(self) -> NetworkInfo: ...
    def get(self, ref: str) -> NetworkInfo: ...
    def reserve(self, container_id: str, name: str, network: str, *,
                aliases: list[str] = ...) -> Endpoint: ...
    def attach(self, ep: Endpoint, netns: str, *, ports: list[PortMap] = ...,
               rate: int | None = None) -> Endpoint: ...
    def attach_tap(self, ep: Endpoint, *, ports: list[PortMap] = ...) -> str: ...
    def hosts_file(self, container_id: str) -> str: ...
    def resolv_conf(self) -> str: ...
    def release(self, container_id: str) -> None: ...
    def recover(self, live: set[str]) -> None: ...


@dataclass(frozen=True)
class NetPlan:
    """The network of one run: what :func:`decide` made of the document."""

    kind: Kind
    network: str = ""  # kind "network": the network's reference ("default": the default one)
    join_id: str = ""  # kind "container": the container whose namespace is joined
    join_pid: int = 0  # ... and its first process (the namespace is /proc/<pid>/ns/net)
    ports: list[PortMap] = field(default_factory=list)
    rate: int | None = None
    aliases: list[str] = field(default_factory=list)
    hostname: str = ""

    @property
    def netns(self) -> str:
        """The namespace a ``container:`` run joins."""
        return f"/proc/{self.join_pid}/ns/net"


def mode_of(doc: ComputeSystem, isolation: str) -> str:
    """The mode in force: host isolation always runs in the host's network."""
    return "host" if isolation == "host" else doc.network.mode


def check(doc: ComputeSystem, isolation: str) -> None:
    """Refuse what no network mode of this run can honour (400, naming the field)."""
    net = doc.network
    mode = mode_of(doc, isolation)
    own = mode not in ("none", "host") and not mode.startswith(CONTAINER_PREFIX)
    why = ("host isolation runs in the host's network" if isolation == "host" else
           f"network mode {mode!r} has no network of the container's own")
    if net.ports and not own:
        raise InvalidDocument(f"network.ports: cannot publish ports: {why}",
                              field="network.ports")
    if net.rate is not None and not own:
        raise InvalidDocument(f"network.rate: cannot limit the rate: {why}",
                              field="network.rate")
    if net.aliases and not own:
        raise InvalidDocument(f"network.aliases: names need a network: {why}",
                              field="network.aliases")
    if mode.startswith(CONTAINER_PREFIX) and net.hostname:
        raise InvalidDocument("network.hostname: a container that joins another's network "
                              "shares its host name", field="network.hostname")


def decide(doc: ComputeSystem, isolation: str, container_id: str,
           resolve: Callable[[str], tuple[str, int, str]]) -> NetPlan:
    """The network of a run of ``doc`` under ``isolation``. ``resolve(ref)`` → (id, pid of
    its first process, isolation) of a running container, for ``container:<ref>``."""
    check(doc, isolation)
    mode = mode_of(doc, isolation)
    net = doc.network
    if mode in ("none", "host"):
        return NetPlan(kind=mode)  # type: ignore[arg-type]
    if mode.startswith(CONTAINER_PREFIX):
        ref = mode[len(CONTAINER_PREFIX):]
        jid, pid, iso = resolve(ref)
        if jid == container_id:
            raise InvalidDocument("network.mode: a container cannot join its own network",
                                  field="network.mode")
        if iso != "process" or pid <= 0:
            raise Conflict(f"network mode {mode}: container {ref} has no network namespace "
                           f"of its own to join ({iso} isolation)")
        return NetPlan(kind="container", join_id=jid, join_pid=pid)
    hostname = net.hostname or container_id[:12]
    aliases = list(net.aliases)
    if net.hostname and net.hostname not in aliases:
        aliases.append(net.hostname)  # a host name of its own resolves to its address
    ports: list[PortMap] = [
        {"hostIp": p.host_ip, "hostPort": p.host_port, "containerPort": p.container_port,
         "protocol": p.protocol} for p in net.ports]
    return NetPlan(kind="network", network=mode, ports=ports, rate=net.rate, aliases=aliases,
                   hostname=hostname)


def reserve(networks: Networks, np: NetPlan, container_id: str, name: str,
            container_dir: Path) -> Endpoint | None:
    """An address for the run (the namespace does not exist yet) and the name files in the
    container's folder. The caller has put ``endpoint`` on the release list first."""
    if np.kind != "network":
        return None
    network = networks.default()["name"] if np.network == "default" else np.network
    ep = networks.reserve(container_id, name, network, aliases=list(np.aliases))
    write_files(container_dir, hosts=networks.hosts_file(container_id),
                resolv=networks.resolv_conf(), hostname=np.hostname + "\n")
    return ep


def write_files(container_dir: Path, *, hosts: str, resolv: str, hostname: str) -> None:
    """The three files, each rewritten *in place* when it exists: a running container's bind
    mount shows the inode it was given (a rename would leave it the old file)."""
    for fname, text in (("hosts", hosts), ("resolv.conf", resolv), ("hostname", hostname)):
        path = container_dir / fname
        data = text.encode()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            try:
                os.pwrite(fd, data, 0)
                os.ftruncate(fd, len(data))
            finally:
                os.close(fd)
        except OSError as exc:
            raise from_oserror("write", str(path), exc) from exc


def remove_files(container_dir: Path) -> None:
    for fname in FILES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(container_dir / fname)


def _bind(source: Path, destination: str) -> dict[str, Any]:
    return {"destination": destination, "type": "bind", "source": str(source),
            "options": ["rbind", "rprivate", "ro"]}


def apply_to_plan(plan: Plan, np: NetPlan, *, join_dir: Path | None = None) -> None:
    """The network of ``np`` in a process-isolation plan's OCI config: the namespace to
    make or join, and the name files bound at ``/etc``. Host isolation: nothing (it runs in
    the host's namespaces). ``join_dir``: the folder of the container joined."""
    if plan.isolation != "process" or not plan.oci:
        return
    linux = plan.oci.setdefault("linux", {})
    spaces: list[dict[str, Any]] = [ns for ns in linux.get("namespaces", [])
                                    if ns.get("type") != "network"]
    if np.kind != "host":
        entry: dict[str, Any] = {"type": "network"}
        if np.kind == "container":
            entry["path"] = np.netns
        spaces.append(entry)
    linux["namespaces"] = spaces
    mounts: list[dict[str, Any]] = [m for m in plan.oci.get("mounts", [])
                                    if m.get("destination") not in _ETC]
    if np.kind == "network":
        cdir = Path(plan.container_dir)
        mounts += [_bind(cdir / f, f"/etc/{f}") for f in FILES]
    elif np.kind == "container" and join_dir is not None:
        # The joined container's files: its names and resolvers, kept current in place.
        mounts += [_bind(join_dir / f, f"/etc/{f}") for f in ("hosts", "resolv.conf")
                   if (join_dir / f).is_file()]
    plan.oci["mounts"] = mounts


_ETC = frozenset(f"/etc/{f}" for f in FILES)


def attach(networks: Networks, ep: Endpoint, np: NetPlan, init_pid: int) -> Endpoint:
    """The endpoint wired into the namespace of the run's first process (it waits)."""
    return networks.attach(ep, f"/proc/{init_pid}/ns/net", ports=list(np.ports), rate=np.rate)


def attach_vm(networks: Networks, ep: Endpoint, np: NetPlan, plan: Plan) -> str:
    """The endpoint as a tap for a utility VM: QEMU gets the tap and the endpoint's MAC,
    the guest agent the address (``plan.vm["network"]``). Same rules and ports as a veth."""
    tap = networks.attach_tap(ep, ports=list(np.ports))
    plan.vm["tap"] = tap
    plan.vm["mac"] = ep["mac"]
    plan.vm["network"] = {"ip": ep["ip"], "prefixLen": ep["prefixLen"],
                          "gateway": ep["gateway"], "mac": ep["mac"]}
    return tap


def release(networks: Networks, container_id: str) -> None:
    """Idempotent: nft rules, veth, address, the other members' hosts files."""
    networks.release(container_id)


def networks_of(networks: Sequence[NetworkInfo], container_id: str) -> list[str]:
    """Names of the networks ``container_id`` has an endpoint on."""
    return [n["name"] for n in networks if container_id in n["endpoints"]]
