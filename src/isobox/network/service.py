"""NetworkService: isobox's Host Networking Service (docs/network.md is its contract).

It knows nothing of containers beyond an id, a name and a network namespace path. The
compute service calls ``reserve`` (an address, before the namespace exists), ``attach``
(the namespace exists: veth, address, route, rules, rate) and ``release`` (idempotent).

Crash safety comes from the order of the steps: the database row of an endpoint is
committed before anything is made on the host, and everything made on the host is named
from that row (veth from the container and network ids, rules by the comment
``ep:<container id>``), so ``release`` finds and removes it whatever step a crash stopped.
A network's row likewise outlives its bridge and rules on removal; bridges and rules lost
with a reboot are made again on the network's next use.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from isobox.errors import Conflict, InvalidArgument, NotFound
from isobox.network import hosts, links, nft
from isobox.network.ipam import NETWORK_SCHEMA, EpRow, Ipam, NetRow, parse_subnet
from isobox.spec.wire import Endpoint, NetworkInfo, PortMap
from isobox.statedb import StateDB

DEFAULT_NETWORK = "isobox"
_NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}")
#: Names ``create`` refuses: network modes of the document, and the default network's (a
#: user network named so would be taken as the default, with the user's subnet/internal).
_RESERVED = {"none", "host", "default", "bridge", DEFAULT_NETWORK}


#: ``netns`` of an endpoint attached as a tap (a utility VM's): ``tap:<name>``.
TAP_PREFIX = "tap:"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _net_owner(network_id: str) -> str:
    return f"net:{network_id}"


def _ep_owner(container_id: str) -> str:
    return f"ep:{container_id}"


class NetworkService:
    """One per daemon; thread-safe (one lock: the steps are short)."""

    def __init__(self, db: StateDB | Path, run: Path) -> None:
        path = db.path if isinstance(db, StateDB) else Path(db)
        self._db = StateDB(path, [NETWORK_SCHEMA])
        self.ipam = Ipam(self._db)
        self.root = path.parent  # containers/<id>/hosts live under the state's folder
        self.run = run
        self._lock = threading.RLock()
        self._ready: set[str] = set()  # networks whose bridge and rules this process checked

    def close(self) -> None:
        self._db.close()

    # --- networks ------------------------------------------------------------------

    def create(self, name: str, *, subnet: str | None = None, internal: bool = False,
               labels: dict[str, str] | None = None) -> NetworkInfo:
        if not _NAME_RE.fullmatch(name) or name in _RESERVED:
            raise InvalidArgument(f"invalid network name {name!r}: letters, digits, '_.-', "
                                  f"not one of {sorted(_RESERVED)}")
        return self._create(name, subnet=subnet, internal=internal, labels=labels)

    def _create(self, name: str, *, subnet: str | None, internal: bool,
                labels: dict[str, str] | None) -> NetworkInfo:
        """``create`` without the name check (``default`` makes the reserved name here)."""
        if subnet is not None:
            parse_subnet(subnet)
        with self._lock:
            nid = secrets.token_hex(32)
            taken = [ipaddress.ip_network(f"{a}/{p}", strict=False)
                     for a, p in links.host_networks()]
            host = [t for t in taken if isinstance(t, ipaddress.IPv4Network)]
            gateway = str(next(parse_subnet(subnet).hosts())) if subnet else ""
            row = NetRow(nid, name, subnet or "", gateway, f"ibx-{nid[:8]}", internal,
                         dict(labels or {}), _now())
            row = self.ipam.add_network(row, host=host, auto=subnet is None)
            try:
                self._realize(row)
            except BaseException:
                self._teardown(row)
                self.ipam.delete_network(row.id)
                raise
            return self._info(row)

    def get(self, ref: str) -> NetworkInfo:
        return self._info(self.ipam.find(ref))

    def list(self) -> list[NetworkInfo]:
        return [self._info(r) for r in self.ipam.networks()]

    def remove(self, ref: str) -> None:
        with self._lock:
            row = self.ipam.find(ref)
            n = len(self.ipam.endpoints(network_id=row.id))
            if n:
                raise Conflict(f"network {row.name} has {n} endpoint(s): remove or stop its "
                               "containers first")
            self._teardown(row)
            self.ipam.delete_network(row.id)

    def default(self) -> NetworkInfo:
        with self._lock:
            try:
                return self.get(DEFAULT_NETWORK)
            except NotFound:
                pass
            try:
                return self._create(DEFAULT_NETWORK, subnet=None, internal=False,
                                    labels=None)
            except Conflict:  # made meanwhile by another process on this root
                return self.get(DEFAULT_NETWORK)

    def _realize(self, row: NetRow) -> None:
        links.ensure_bridge(row.bridge, row.gateway, row.prefix)
        nft.add(_net_owner(row.id), nft.network_rules(row.bridge, row.subnet, row.internal),
                replace=True)
        self._ready.add(row.id)

    def _ensure(self, row: NetRow) -> None:
        """The bridge and rules of ``row`` exist (they do not survive a reboot)."""
        if row.id in self._ready:
            return
        self._realize(row)

    def _teardown(self, row: NetRow) -> None:
        self._ready.discard(row.id)
        nft.remove(_net_owner(row.id))
        links.delete_link(row.bridge)

    def _info(self, row: NetRow) -> NetworkInfo:
        return NetworkInfo(
            id=row.id, name=row.name, subnet=row.subnet, gateway=row.gateway,
            bridge=row.bridge, internal=row.internal, labels=dict(row.labels),
            createdAt=row.created_at,
            endpoints={e.container_id: e.ip for e in self.ipam.endpoints(network_id=row.id)},
        )

    # --- endpoints -----------------------------------------------------------------

    def reserve(self, container_id: str, name: str, network: str, *,
                aliases: Sequence[str] = ()) -> Endpoint:
        with self._lock:
            net = self.ipam.find(self.default()["id"]) if network in ("default", "") \
                else self.ipam.find(network)
            ep = self.ipam.reserve(net, container_id, name, list(aliases))
            self._refresh_hosts(net.id, skip=container_id)
            return self._endpoint(ep, net)

    def attach(self, ep: Endpoint, netns: str, *, ports: Sequence[PortMap] = (),
               rate: int | None = None) -> Endpoint:
        cid = ep["containerId"]
        plist = [_check_port(p) for p in ports]
        if rate is not None and rate < 1:
            raise InvalidArgument(f"network rate must be positive, got {rate}")
        with self._lock:
            net = self.ipam.find(ep["networkId"])
            row = self._row(cid, net.id)
            if row.netns:
                raise Conflict(f"endpoint of {cid[:12]} on {net.name} is already attached")
            self._ensure(net)
            self.ipam.claim_ports(row, netns, plist, rate)  # recorded before anything is made
            try:
                links.attach_veth(host=row.host_veth, bridge=net.bridge, netns=netns,
                                  mac=row.mac, ip=row.ip, prefix=net.prefix,
                                  gateway=net.gateway, rate=rate)
                if plist:
                    nft.publish(_ep_owner(cid), row.ip, plist)
            except BaseException:
                if plist:
                    nft.remove(_ep_owner(cid))
                links.delete_link(row.host_veth)
                self.ipam.unclaim(row)
                raise
            return self._endpoint(self._row(cid, net.id), net)

    def attach_tap(self, ep: Endpoint, *, ports: Sequence[PortMap] = ()) -> str:
        """The endpoint as a tap on its network's bridge, for a utility VM (the guest
        configures the address itself): the same rules and published ports as a veth
        endpoint, released by :meth:`release`. Returns the tap's name."""
        cid = ep["containerId"]
        plist = [_check_port(p) for p in ports]
        with self._lock:
            net = self.ipam.find(ep["networkId"])
            row = self._row(cid, net.id)
            if row.netns:
                raise Conflict(f"endpoint of {cid[:12]} on {net.name} is already attached")
            self._ensure(net)
            tap = links.tap_name(row.host_veth)
            self.ipam.claim_ports(row, TAP_PREFIX + tap, plist, None)  # before anything
            try:
                links.attach_tap(name=tap, bridge=net.bridge)
                if plist:
                    nft.publish(_ep_owner(cid), row.ip, plist)
            except BaseException:
                if plist:
                    nft.remove(_ep_owner(cid))
                links.delete_link(tap)
                self.ipam.unclaim(row)
                raise
            return tap

    def hosts_file(self, container_id: str) -> str:
        mine = self.ipam.endpoints(container_id=container_id)
        entries = [(e.ip, _names(e)) for e in mine]
        for e in mine:
            entries += [(o.ip, _names(o)) for o in self.ipam.endpoints(network_id=e.network_id)
                        if o.container_id != container_id]
        return hosts.hosts_text(entries)

    def resolv_conf(self) -> str:
        return hosts.resolv_text()

    def release(self, container_id: str) -> None:
        with self._lock:
            eps = self.ipam.endpoints(container_id=container_id)
            if any(e.ports for e in eps):
                nft.remove(_ep_owner(container_id))
            for e in eps:
                links.delete_link(e.host_veth)
                links.delete_link(links.tap_name(e.host_veth))
                self.ipam.drop_endpoint(e)
                self._refresh_hosts(e.network_id, skip=container_id)

    def recover(self, live: set[str]) -> None:
        with self._lock:
            for cid in dict.fromkeys(e.container_id for e in self.ipam.endpoints()):
                if cid not in live:
                    self.release(cid)

    # --- helpers -------------------------------------------------------------------

    def _row(self, container_id: str, network_id: str) -> EpRow:
        for e in self.ipam.endpoints(container_id=container_id):
            if e.network_id == network_id:
                return e
        raise NotFound(f"no endpoint of container {container_id[:12]} on network "
                       f"{network_id[:12]} (reserve it first)")

    def _endpoint(self, e: EpRow, net: NetRow) -> Endpoint:
        return Endpoint(containerId=e.container_id, network=net.name, networkId=net.id,
                        ip=e.ip, prefixLen=net.prefix, gateway=net.gateway, mac=e.mac,
                        hostVeth=(e.netns[len(TAP_PREFIX):] if e.netns.startswith(TAP_PREFIX)
                                  else e.host_veth if e.netns else ""), ports=list(e.ports),
                        rate=e.rate)

    def _refresh_hosts(self, network_id: str, *, skip: str) -> None:
        """Rewrite in place the hosts files of the other members (where they exist)."""
        for e in self.ipam.endpoints(network_id=network_id):
            if e.container_id != skip:
                hosts.rewrite_in_place(self.root / "containers" / e.container_id / "hosts",
                                       self.hosts_file(e.container_id))


def _names(e: EpRow) -> list[str]:
    return [e.name, e.container_id[:12], *e.aliases]


def _check_port(p: PortMap) -> PortMap:
    proto = p.get("protocol", "tcp")
    if proto not in ("tcp", "udp"):
        raise InvalidArgument(f"port protocol must be tcp or udp, got {proto!r}")
    for key in ("hostPort", "containerPort"):
        v = p.get(key)
        if not isinstance(v, int) or not 1 <= v <= 65535:
            raise InvalidArgument(f"port {key} must be 1-65535, got {v!r}")
    host_ip = p.get("hostIp", "") or ""
    if host_ip:
        try:
            ipaddress.IPv4Address(host_ip)
        except ValueError as exc:
            raise InvalidArgument(f"port hostIp must be an IPv4 address: {host_ip!r}") from exc
    return PortMap(hostIp=host_ip, hostPort=p["hostPort"], containerPort=p["containerPort"],
                   protocol=proto)
