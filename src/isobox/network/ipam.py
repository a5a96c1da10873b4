"""Address management: the networks and endpoints of isobox, in the state database.

The component ``network`` of ``state.db`` holds one row per network and one per endpoint.
An address is given at most once *by the database itself*: ``UNIQUE (network_id, ip)`` on
endpoints, ``UNIQUE`` names, subnets and bridges on networks. Every allocation is one
``BEGIN IMMEDIATE`` transaction that reads what is taken and inserts, so two threads or
two processes never hand out the same address, and an allocation that was committed
before a crash is still there afterwards (``recover`` then frees it if its container is
gone). Subnets for new networks come from a pool of /24s, skipping every subnet that
overlaps a route or an address of the host, or another network.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from isobox.errors import Conflict, InvalidArgument, InvalidDocument, NotFound
from isobox.spec.wire import PortMap
from isobox.statedb import Schema, StateDB

NETWORK_SCHEMA = Schema(
    "network",
    [
        """
        CREATE TABLE networks (
            id         TEXT PRIMARY KEY,
            name       TEXT NOT NULL UNIQUE,
            subnet     TEXT NOT NULL UNIQUE,
            gateway    TEXT NOT NULL,
            bridge     TEXT NOT NULL UNIQUE,
            internal   INTEGER NOT NULL,
            labels     TEXT NOT NULL,
            created_at TEXT NOT NULL,
            last_ip    INTEGER NOT NULL DEFAULT 0
        );
        CREATE TABLE endpoints (
            container_id TEXT NOT NULL,
            network_id   TEXT NOT NULL REFERENCES networks(id),
            name         TEXT NOT NULL,
            aliases      TEXT NOT NULL,
            ip           TEXT NOT NULL,
            mac          TEXT NOT NULL,
            host_veth    TEXT NOT NULL UNIQUE,
            netns        TEXT NOT NULL DEFAULT '',
            ports        TEXT NOT NULL DEFAULT '[]',
            rate         INTEGER,
            PRIMARY KEY (container_id, network_id),
            UNIQUE (network_id, ip)
        );
        """,
    ],
)

# Candidate subnets for networks made without --subnet: 172.18.0.0/24 … 172.31.255.0/24.
POOL = [ipaddress.ip_network(f"172.{b}.0.0/16") for b in range(18, 32)]


@dataclass(frozen=True)
class NetRow:
    id: str
    name: str
    subnet: str
    gateway: str
    bridge: str
    internal: bool
    labels: dict[str, str]
    created_at: str

    @property
    def prefix(self) -> int:
        return ipaddress.ip_network(self.subnet).prefixlen

    @staticmethod
    def of(r: sqlite3.Row) -> NetRow:
        return NetRow(r["id"], r["name"], r["subnet"], r["gateway"], r["bridge"],
                      bool(r["internal"]), json.loads(r["labels"]), r["created_at"])


@dataclass(frozen=True)
class EpRow:
    container_id: str
    network_id: str
    name: str
    aliases: list[str]
    ip: str
    mac: str
    host_veth: str
    netns: str  # "" until attached
    ports: list[PortMap]
    rate: int | None

    @staticmethod
    def of(r: sqlite3.Row) -> EpRow:
        return EpRow(r["container_id"], r["network_id"], r["name"], json.loads(r["aliases"]),
                     r["ip"], r["mac"], r["host_veth"], r["netns"], json.loads(r["ports"]),
                     r["rate"])


def mac_of(ip: str) -> str:
    """``02:42:`` + the address's 4 bytes, as docker does: stable, and unique per network."""
    return "02:42:" + ":".join(f"{b:02x}" for b in ipaddress.ip_address(ip).packed)


def veth_name(container_id: str, network_id: str) -> str:
    """The host side of an endpoint's veth pair: derived, so a crashed allocation is found."""
    return "ibv" + hashlib.sha256(f"{container_id}/{network_id}".encode()).hexdigest()[:10]


#: Ranges no bridge can use: its gateway and members would be unreachable (multicast,
#: reserved 240/4 and the limited broadcast, "this network" 0/8, loopback, which the
#: raw-prerouting drop of 127.0.0.0/8 not from lo would also cut off).
UNUSABLE = [ipaddress.IPv4Network(n) for n in
            ("0.0.0.0/8", "127.0.0.0/8", "224.0.0.0/4", "240.0.0.0/4")]


def parse_subnet(subnet: str) -> ipaddress.IPv4Network:
    """A subnet a network may have; bad input is an ``InvalidArgument`` naming ``subnet``
    (a 400 with ``field: subnet`` through the API)."""
    try:
        net = ipaddress.ip_network(subnet, strict=True)
    except ValueError as exc:
        raise InvalidDocument(f"invalid subnet {subnet!r}: {exc}", "subnet") from exc
    if not isinstance(net, ipaddress.IPv4Network) or net.prefixlen > 29:
        raise InvalidDocument(f"subnet {subnet!r}: an IPv4 CIDR of /29 or larger is needed",
                              "subnet")
    bad = next((u for u in UNUSABLE if net.overlaps(u)), None)
    if bad is not None:
        raise InvalidDocument(f"subnet {subnet!r} overlaps {bad}, which no host can use for "
                              "a network (multicast, reserved, broadcast, 0/8 or loopback)",
                              "subnet")
    return net


def pick_subnet(taken: Iterable[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    """The first /24 of the pool that overlaps nothing in ``taken``."""
    busy = sorted(set(taken))
    for block in POOL:
        assert isinstance(block, ipaddress.IPv4Network)
        if any(block.subnet_of(t) for t in busy):  # the whole /16 is routed elsewhere
            continue
        for cand in block.subnets(new_prefix=24):
            assert isinstance(cand, ipaddress.IPv4Network)
            if not any(cand.overlaps(t) for t in busy):
                return cand
    raise Conflict("no free subnet left in the pool 172.18.0.0-172.31.255.0/24; "
                   "give one with --subnet")


class Ipam:
    """The network component's rows in the state database."""

    def __init__(self, db: StateDB) -> None:
        self.db = db

    # --- networks ------------------------------------------------------------------

    def networks(self) -> list[NetRow]:
        return [NetRow.of(r) for r in self.db.query(
            "SELECT * FROM networks ORDER BY rowid")]

    def find(self, ref: str) -> NetRow:
        """A full id, a name, or a unique id prefix."""
        if not ref:
            raise NotFound("no such network: ''")
        rows = self.db.query("SELECT * FROM networks WHERE id = ? OR name = ?", (ref, ref))
        exact = [r for r in rows if r["id"] == ref] or rows
        if exact:
            return NetRow.of(exact[0])
        if all(c in "0123456789abcdef" for c in ref):
            rows = self.db.query("SELECT * FROM networks WHERE id >= ? AND id < ? LIMIT 2",
                                 (ref, ref + "g"))
            if len(rows) > 1:
                raise NotFound(f"network id prefix {ref!r} is ambiguous")
            if rows:
                return NetRow.of(rows[0])
        raise NotFound(f"no such network: {ref}")

    def add_network(self, row: NetRow, *, host: list[ipaddress.IPv4Network],
                    auto: bool) -> NetRow:
        """Insert ``row``; with ``auto`` its subnet is picked here, inside the transaction."""
        with self.db.transaction() as tx:
            if tx.execute("SELECT 1 FROM networks WHERE name = ?", (row.name,)).fetchone():
                raise Conflict(f"network {row.name!r} already exists")
            mine = [ipaddress.IPv4Network(r["subnet"])  # stored rows: checked when made
                    for r in tx.execute("SELECT subnet FROM networks").fetchall()]
            if auto:
                net = pick_subnet([*mine, *host])
                row = NetRow(row.id, row.name, str(net), str(next(net.hosts())), row.bridge,
                             row.internal, row.labels, row.created_at)
            else:
                net = parse_subnet(row.subnet)
                for other in mine:
                    if net.overlaps(other):
                        raise Conflict(f"subnet {net} overlaps the subnet {other} of another "
                                       "network")
                for other in host:
                    if net.overlaps(other):
                        raise Conflict(f"subnet {net} overlaps the host's route or address "
                                       f"{other}")
            try:
                tx.execute(
                    "INSERT INTO networks(id, name, subnet, gateway, bridge, internal, labels,"
                    " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (row.id, row.name, row.subnet, row.gateway, row.bridge, int(row.internal),
                     json.dumps(row.labels), row.created_at))
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"network {row.name!r} or subnet {row.subnet}: {exc}") from exc
        return row

    def delete_network(self, network_id: str) -> None:
        with self.db.transaction() as tx:
            n = tx.execute("SELECT COUNT(*) FROM endpoints WHERE network_id = ?",
                           (network_id,)).fetchone()[0]
            if n:
                raise Conflict(f"network {network_id[:12]} has {n} endpoint(s): remove or "
                               "stop its containers first")
            tx.execute("DELETE FROM networks WHERE id = ?", (network_id,))

    # --- endpoints -----------------------------------------------------------------

    def endpoints(self, *, network_id: str | None = None,
                  container_id: str | None = None) -> list[EpRow]:
        sql, args = "SELECT * FROM endpoints", []
        if network_id is not None:
            sql, args = sql + " WHERE network_id = ?", [network_id]
        elif container_id is not None:
            sql, args = sql + " WHERE container_id = ?", [container_id]
        return [EpRow.of(r) for r in self.db.query(sql + " ORDER BY rowid", args)]

    def reserve(self, net: NetRow, container_id: str, name: str,
                aliases: list[str]) -> EpRow:
        """The next free address of ``net`` after the last one given (round robin, so a
        freed address is not reused at once while stale connection state may remain)."""
        subnet = parse_subnet(net.subnet)
        first = int(subnet.network_address) + 1
        last = int(subnet.broadcast_address) - 1
        gw = int(ipaddress.ip_address(net.gateway))
        with self.db.transaction() as tx:
            if tx.execute("SELECT 1 FROM endpoints WHERE container_id = ? AND network_id = ?",
                          (container_id, net.id)).fetchone():
                raise Conflict(f"container {container_id[:12]} is already on network "
                               f"{net.name}")
            got = tx.execute("SELECT last_ip FROM networks WHERE id = ?", (net.id,)).fetchone()
            if got is None:
                raise NotFound(f"no such network: {net.name}")
            used = {int(ipaddress.ip_address(r[0])) for r in tx.execute(
                "SELECT ip FROM endpoints WHERE network_id = ?", (net.id,)).fetchall()}
            start = int(got[0]) if first <= int(got[0]) <= last else last
            ip_int = None
            for i in range(1, last - first + 2):
                cand = first + (start - first + i) % (last - first + 1)
                if cand != gw and cand not in used:
                    ip_int = cand
                    break
            if ip_int is None:
                raise Conflict(f"network {net.name} ({net.subnet}) has no free address")
            ip = str(ipaddress.ip_address(ip_int))
            row = EpRow(container_id, net.id, name, list(aliases), ip, mac_of(ip),
                        veth_name(container_id, net.id), "", [], None)
            tx.execute(
                "INSERT INTO endpoints(container_id, network_id, name, aliases, ip, mac,"
                " host_veth) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (container_id, net.id, name, json.dumps(row.aliases), ip, row.mac,
                 row.host_veth))
            tx.execute("UPDATE networks SET last_ip = ? WHERE id = ?", (ip_int, net.id))
        return row

    def claim_ports(self, ep: EpRow, netns: str, ports: list[PortMap],
                    rate: int | None) -> None:
        """Record the attachment; a host port another endpoint publishes is a Conflict, one
        given twice here (``-p P:80 -p P:81``: two DNAT rules, the second never answers) an
        InvalidArgument."""
        for i, p in enumerate(ports):
            if any(clash(p, q) for q in ports[:i]):
                raise InvalidArgument(f"host port {p['hostPort']}/{p['protocol']} is "
                                      "published twice")
        with self.db.transaction() as tx:
            for r in tx.execute("SELECT container_id, ports FROM endpoints WHERE NOT "
                                "(container_id = ? AND network_id = ?)",
                                (ep.container_id, ep.network_id)).fetchall():
                for theirs in json.loads(r["ports"]):
                    for p in ports:
                        if clash(p, theirs):
                            raise Conflict(
                                f"host port {p['hostPort']}/{p['protocol']} is already "
                                f"published by container {r['container_id'][:12]}")
            tx.execute("UPDATE endpoints SET netns = ?, ports = ?, rate = ? WHERE "
                       "container_id = ? AND network_id = ?",
                       (netns, json.dumps(ports), rate, ep.container_id, ep.network_id))

    def unclaim(self, ep: EpRow) -> None:
        with self.db.transaction() as tx:
            tx.execute("UPDATE endpoints SET netns = '', ports = '[]', rate = NULL WHERE "
                       "container_id = ? AND network_id = ?", (ep.container_id, ep.network_id))

    def drop_endpoint(self, ep: EpRow) -> None:
        with self.db.transaction() as tx:
            tx.execute("DELETE FROM endpoints WHERE container_id = ? AND network_id = ?",
                       (ep.container_id, ep.network_id))


def clash(a: PortMap, b: Mapping[str, Any]) -> bool:
    """Whether two published ports take the same host port (protocol, port, overlapping
    host address: "" and 0.0.0.0 are every address)."""
    if a["hostPort"] != b["hostPort"] or a["protocol"] != b["protocol"]:
        return False
    wild = ("", "0.0.0.0")  # noqa: S104 - "every host address", not a bind
    return a["hostIp"] in wild or b["hostIp"] in wild or a["hostIp"] == b["hostIp"]
