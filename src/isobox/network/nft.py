"""isobox's nftables rules: two tables of its own, rules tagged with their owner.

Everything lives in ``table inet isobox`` (chains ``forward`` and ``raw_prerouting``) and
``table ip isobox_nat`` (``prerouting``, ``output``, ``postrouting``). Each rule carries the
comment ``net:<id>`` or ``ep:<container id>``; removing an owner deletes exactly its rules,
by handle. Nothing outside these two tables is ever read, flushed or rewritten.

Rules go in as JSON through ``nft -j -f -`` (one batch = one kernel transaction) and are read
back with ``nft -j list table``: the text output of nft is never parsed.

The tables are host-wide (several isobox roots, e.g. tests, may share a host), so every
read-modify-write holds a host-wide lock file, and a table is deleted only when no rule of
any owner is left in it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from isobox.errors import Conflict, SystemError_, ToolMissing
from isobox.network.ipam import clash
from isobox.spec.wire import PortMap

FILTER_FAMILY, FILTER_TABLE = "inet", "isobox"
NAT_FAMILY, NAT_TABLE = "ip", "isobox_nat"
LOCK_PATH = "/run/lock/isobox-nft.lock"

Expr = dict[str, Any]

# chain name -> (family, table, base chain definition)
CHAINS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "forward": (FILTER_FAMILY, FILTER_TABLE,
                {"type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}),
    # raw priority: before conntrack and the DNAT of prerouting
    "raw_prerouting": (FILTER_FAMILY, FILTER_TABLE,
                       {"type": "filter", "hook": "prerouting", "prio": -300,
                        "policy": "accept"}),
    "prerouting": (NAT_FAMILY, NAT_TABLE,
                   {"type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"}),
    "output": (NAT_FAMILY, NAT_TABLE,
               {"type": "nat", "hook": "output", "prio": -100, "policy": "accept"}),
    "postrouting": (NAT_FAMILY, NAT_TABLE,
                    {"type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}),
}


@dataclass(frozen=True)
class Rule:
    """One rule to add: its chain and its expressions (nft JSON)."""

    chain: str
    expr: list[Expr]


@dataclass(frozen=True)
class Listed:
    """One rule as listed from the kernel."""

    family: str
    table: str
    chain: str
    handle: int
    comment: str


# --- expression builders (nft JSON) --------------------------------------------------

def _meta(key: str, value: str, op: str = "==") -> Expr:
    return {"match": {"op": op, "left": {"meta": {"key": key}}, "right": value}}


def _ip(field: str, value: str, op: str = "==") -> Expr:
    right: Any = value
    if "/" in value:
        addr, plen = value.split("/")
        right = {"prefix": {"addr": addr, "len": int(plen)}}
    return {"match": {"op": op, "left": {"payload": {"protocol": "ip", "field": field}},
                      "right": right}}


def _dport(proto: str, port: int) -> Expr:
    return {"match": {"op": "==", "left": {"payload": {"protocol": proto, "field": "dport"}},
                      "right": port}}


_LOCAL_DST: Expr = {"match": {"op": "==", "left": {"fib": {"result": "type", "flags": ["daddr"]}},
                              "right": "local"}}
_DNATTED: Expr = {"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}}
_NOT_DNATTED: Expr = {"match": {"op": "!", "left": {"ct": {"key": "status"}}, "right": "dnat"}}
_NEW: Expr = {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "new"}}
_ACCEPT: Expr = {"accept": None}
_DROP: Expr = {"drop": None}
_MASQ: Expr = {"masquerade": None}


def network_rules(bridge: str, subnet: str, internal: bool) -> list[Rule]:
    """The rules of one network: members talk to each other; no forward to another isobox
    bridge; masquerade out (not when internal: then nothing leaves the bridge); masquerade of
    loopback and hairpin traffic that a published port sends into the bridge."""
    rules = [
        # 127.0.0.0/8 is this host's own: nothing from a wire may be sent there. Without this,
        # prerouting DNATs a LAN frame for 127.0.0.1 into a port published on 127.0.0.1 only
        # (docker's GHSA-x84c-p2g9-rqv9), and route_localnet on the bridge lets a container
        # reach the host's loopback-only services (CVE-2020-8558). The host's own 127.0.0.1
        # traffic comes in on lo; replies from a container still have the gateway as
        # destination here (un-NATed later). Identical in every network: any one suffices.
        Rule("raw_prerouting", [_meta("iifname", "lo", "!="), _ip("daddr", "127.0.0.0/8"),
                                _DROP]),
        Rule("forward", [_meta("iifname", bridge), _meta("oifname", bridge), _ACCEPT]),
        Rule("forward", [_meta("iifname", bridge), _meta("oifname", "ibx-*"),
                         _meta("oifname", bridge, "!="), _DROP]),
        # 127.0.0.1:HOSTPORT on the host → container: the reply must come back to the host.
        Rule("postrouting", [_meta("oifname", bridge), _ip("saddr", "127.0.0.0/8"), _MASQ]),
        # A member reaching another member through a published port on a host address.
        Rule("postrouting", [_meta("oifname", bridge), _ip("saddr", subnet), _DNATTED, _MASQ]),
    ]
    if internal:
        rules += [
            Rule("forward", [_meta("iifname", bridge), _meta("oifname", bridge, "!="), _DROP]),
            Rule("forward", [_meta("oifname", bridge), _meta("iifname", bridge, "!="), _DROP]),
        ]
    else:
        rules += [
            # Only published ports are open to the outside: a new connection into the bridge
            # from elsewhere (a LAN neighbour routing the subnet via this host) must have
            # been DNATed. Replies (not new) and the members' own traffic pass.
            Rule("forward", [_meta("oifname", bridge), _meta("iifname", bridge, "!="), _NEW,
                             _NOT_DNATTED, _DROP]),
            Rule("postrouting", [_ip("saddr", subnet), _meta("oifname", bridge, "!="),
                                 _MASQ]),
        ]
    return rules


def port_rules(ip: str, ports: list[PortMap]) -> list[Rule]:
    """DNAT of each published port to ``ip``: in prerouting (other hosts, other containers)
    and in output (the host itself, 127.0.0.1 included)."""
    rules: list[Rule] = []
    for p in ports:
        host_ip = p["hostIp"]
        every = host_ip in ("", "0.0.0.0")  # noqa: S104 - every host address, not a bind
        dst = _LOCAL_DST if every else _ip("daddr", host_ip)
        proto = p["protocol"]
        dnat: Expr = {"dnat": {"addr": ip, "port": p["containerPort"]}}
        l4: Expr = {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": proto}}
        for chain in ("prerouting", "output"):
            rules.append(Rule(chain, [dst, l4, _dport(proto, p["hostPort"]), dnat]))
    return rules


# --- the kernel ---------------------------------------------------------------------

def _nft(args: list[str], stdin: str | None = None) -> str:
    exe = shutil.which("nft")
    if exe is None:
        raise ToolMissing("nft (nftables) is not installed: apt-get install nftables")
    proc = subprocess.run([exe, *args], input=stdin, capture_output=True, text=True,
                          check=False, timeout=60)
    if proc.returncode != 0:
        msg = proc.stderr.strip().splitlines()
        raise SystemError_(f"nft {' '.join(args)}: {msg[-1] if msg else ''}".strip(),
                           "nftables", 22)
    return proc.stdout


def apply(commands: list[dict[str, Any]]) -> None:
    """Run one batch of nft JSON commands as one transaction."""
    if commands:
        _nft(["-j", "-f", "-"], json.dumps({"nftables": commands}))


def list_table(family: str, table: str) -> list[dict[str, Any]] | None:
    """The JSON objects of a table, or None when it does not exist."""
    exe = shutil.which("nft")
    if exe is None:
        raise ToolMissing("nft (nftables) is not installed: apt-get install nftables")
    proc = subprocess.run([exe, "-j", "list", "table", family, table], capture_output=True,
                          text=True, check=False, timeout=60)
    if proc.returncode != 0:
        if "No such file or directory" in proc.stderr:
            return None
        raise SystemError_(f"nft list table {family} {table}: {proc.stderr.strip()}",
                           "nftables", 22)
    doc: dict[str, list[dict[str, Any]]] = json.loads(proc.stdout)
    return doc.get("nftables", [])


def rules() -> list[Listed]:
    """Every rule in isobox's two tables."""
    out: list[Listed] = []
    for family, table in ((FILTER_FAMILY, FILTER_TABLE), (NAT_FAMILY, NAT_TABLE)):
        for obj in list_table(family, table) or []:
            r = obj.get("rule")
            if r is not None:
                out.append(Listed(r["family"], r["table"], r["chain"], int(r["handle"]),
                                  str(r.get("comment", ""))))
    return out


@contextmanager
def locked() -> Iterator[None]:
    """The host-wide lock on isobox's tables (shared by every isobox root on the host)."""
    os.makedirs(os.path.dirname(LOCK_PATH), exist_ok=True)
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _skeleton() -> list[dict[str, Any]]:
    cmds: list[dict[str, Any]] = [
        {"add": {"table": {"family": FILTER_FAMILY, "name": FILTER_TABLE}}},
        {"add": {"table": {"family": NAT_FAMILY, "name": NAT_TABLE}}},
    ]
    for name, (family, table, base) in CHAINS.items():
        cmds.append({"add": {"chain": {"family": family, "table": table, "name": name,
                                       **base}}})
    return cmds


def published() -> list[tuple[str, dict[str, Any]]]:
    """The host ports published by DNAT rules in the kernel, by owner: those of every
    isobox root on the host (the tables are shared), read back from ``prerouting``."""
    out: list[tuple[str, dict[str, Any]]] = []
    for obj in list_table(NAT_FAMILY, NAT_TABLE) or []:
        r = obj.get("rule")
        if r is None or r["chain"] != "prerouting" or not any("dnat" in e for e in r["expr"]):
            continue
        host_ip, proto, port = "", "", 0
        for e in r["expr"]:
            left = e.get("match", {}).get("left", {})
            pay = left.get("payload", {})
            if pay.get("field") == "dport":
                proto, port = str(pay["protocol"]), int(e["match"]["right"])
            elif pay.get("protocol") == "ip" and pay.get("field") == "daddr":
                host_ip = str(e["match"]["right"])
        if port:
            out.append((str(r.get("comment", "")),
                        {"hostIp": host_ip, "hostPort": port, "protocol": proto}))
    return out


def publish(owner: str, ip: str, ports: list[PortMap]) -> None:
    """Add the DNAT rules of ``ports`` to ``ip``, unless another owner's rule (of any
    isobox root on the host) publishes one of the host ports: a ``Conflict``. The check and
    the add hold the host-wide lock together, so two roots cannot both win."""
    with locked():
        for theirs_owner, theirs in published():
            for p in ports:
                if theirs_owner != owner and clash(p, theirs):
                    raise Conflict(f"host port {p['hostPort']}/{p['protocol']} is already "
                                   f"published on this host ({theirs_owner[:15]}, maybe by "
                                   "another isobox root)")
        _add(owner, port_rules(ip, ports))


def add(owner: str, new: list[Rule], *, replace: bool = False) -> None:
    """Add ``new`` with the comment ``owner`` (tables and chains made if missing). With
    ``replace``, the owner's present rules are deleted in the same transaction."""
    with locked():
        _add(owner, new, replace=replace)


def _add(owner: str, new: list[Rule], *, replace: bool = False) -> None:
    """``add``, the lock already held (flock: a second open of the file would wait on it)."""
    cmds = _skeleton()
    if replace:
        cmds += _deletes(owner, rules())
    for r in new:
        family, table, _ = CHAINS[r.chain]
        cmds.append({"add": {"rule": {"family": family, "table": table, "chain": r.chain,
                                      "comment": owner, "expr": r.expr}}})
    apply(cmds)


def has(owner: str) -> bool:
    return any(r.comment == owner for r in rules())


def _deletes(owner: str, present: list[Listed]) -> list[dict[str, Any]]:
    return [{"delete": {"rule": {"family": r.family, "table": r.table, "chain": r.chain,
                                 "handle": r.handle}}}
            for r in present if r.comment == owner]


def remove(owner: str) -> int:
    """Delete every rule of ``owner``; then the tables, if no rule is left in them. Returns
    how many rules were deleted (0 when there were none: idempotent)."""
    with locked():
        present = rules()
        cmds = _deletes(owner, present)
        if len(cmds) == len(present):  # nothing of anyone else left: no trace on the host
            for family, table in ((FILTER_FAMILY, FILTER_TABLE), (NAT_FAMILY, NAT_TABLE)):
                if list_table(family, table) is not None:
                    cmds.append({"delete": {"table": {"family": family, "name": table}}})
            cmds = [c for c in cmds if "table" in c["delete"]]
        apply(cmds)
        return sum(1 for r in present if r.comment == owner)
