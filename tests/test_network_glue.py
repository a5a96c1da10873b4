"""The compute side of networking without a daemon: how the SDK writes ``-p`` and the rate
into the document, which mode a run gets, what is refused (400 naming the field), and
what the plan's OCI config gets (namespace, binds). The same paths run for real in
tests/test_network_e2e.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from isobox.client.api import build_document, parse_publish
from isobox.compute import network_glue as glue
from isobox.compute.plan import Plan
from isobox.errors import Conflict, InvalidArgument, InvalidDocument
from isobox.spec.compute import parse_document

CID = "a" * 64


def doc(**network: Any) -> Any:
    return parse_document({"schemaVersion": "1.0", "image": "busybox", "network": network})


def test_publish_specs() -> None:
    assert parse_publish("8080:80") == {"hostIp": "", "hostPort": 8080, "containerPort": 80,
                                        "protocol": "tcp"}
    assert parse_publish("127.0.0.1:53:5353/udp") == {
        "hostIp": "127.0.0.1", "hostPort": 53, "containerPort": 5353, "protocol": "udp"}
    for bad in ("80", "a:80", "1:2/sctp", ""):
        with pytest.raises(InvalidArgument):
            parse_publish(bad)


def test_build_document_network_fields() -> None:
    d = build_document("busybox", network="mynet", ports={"80/tcp": 8080,
                                                          "53/udp": ("127.0.0.1", 53)},
                       network_rate="512k", network_aliases=["www"])
    assert d["network"] == {
        "mode": "mynet", "rate": 512 * 1024, "aliases": ["www"],
        "ports": [{"hostIp": "", "hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
                  {"hostIp": "127.0.0.1", "hostPort": 53, "containerPort": 53,
                   "protocol": "udp"}]}
    assert parse_document(d).network.rate == 512 * 1024
    assert "network" not in build_document("busybox")
    assert parse_document(build_document("busybox")).network.mode == "default"


@pytest.mark.parametrize(("network", "isolation", "field"), [
    ({"ports": [{"hostPort": 1, "containerPort": 2}]}, "host", "network.ports"),
    ({"rate": 4096}, "host", "network.rate"),
    ({"mode": "none", "ports": [{"hostPort": 1, "containerPort": 2}]}, "process",
     "network.ports"),
    ({"mode": "container:x", "rate": 4096}, "process", "network.rate"),
    ({"mode": "host", "aliases": ["a"]}, "process", "network.aliases"),
    ({"mode": "container:x", "hostname": "h"}, "process", "network.hostname"),
])
def test_refusals_name_the_field(network: dict[str, Any], isolation: str, field: str) -> None:
    with pytest.raises(InvalidDocument) as err:
        glue.check(doc(**network), isolation)
    assert err.value.field == field


def _no_container(ref: str) -> tuple[str, int, str]:
    raise AssertionError(f"resolved {ref}")


def test_decide_modes() -> None:
    assert glue.decide(doc(), "host", CID, _no_container).kind == "host"
    assert glue.decide(doc(mode="none"), "process", CID, _no_container).kind == "none"
    np = glue.decide(doc(hostname="box", aliases=["www"], rate=4096,
                         ports=[{"hostPort": 8080, "containerPort": 80}]),
                     "process", CID, _no_container)
    assert (np.kind, np.network, np.hostname, np.aliases, np.rate) == (
        "network", "default", "box", ["www", "box"], 4096)
    assert np.ports == [{"hostIp": "", "hostPort": 8080, "containerPort": 80,
                         "protocol": "tcp"}]
    joined = glue.decide(doc(mode="container:web"), "process", CID,
                         lambda ref: ("b" * 64, 4242, "process"))
    assert (joined.kind, joined.join_id, joined.netns) == ("container", "b" * 64,
                                                           "/proc/4242/ns/net")
    with pytest.raises(Conflict):
        glue.decide(doc(mode="container:web"), "process", CID,
                    lambda ref: ("b" * 64, 4242, "host"))
    with pytest.raises(InvalidDocument):
        glue.decide(doc(mode="container:me"), "process", CID, lambda ref: (CID, 1, "process"))


def _plan(tmp_path: Path) -> Plan:
    oci = {"linux": {"namespaces": [{"type": "pid"}, {"type": "network"}]},
           "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}]}
    return Plan(id=CID, name="x", isolation="process", container_dir=str(tmp_path),
                run_dir=str(tmp_path), lower=[], upper="", work="", rootfs="", oci=oci)


def test_apply_to_plan(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    glue.apply_to_plan(plan, glue.NetPlan(kind="network", network="default"))
    assert {"type": "network"} in plan.oci["linux"]["namespaces"]
    binds = {m["destination"]: m for m in plan.oci["mounts"] if m["type"] == "bind"}
    assert sorted(binds) == ["/etc/hostname", "/etc/hosts", "/etc/resolv.conf"]
    assert binds["/etc/hosts"]["source"] == str(tmp_path / "hosts")
    assert "ro" in binds["/etc/hosts"]["options"]
    glue.apply_to_plan(plan, glue.NetPlan(kind="host"))  # a later start: none of it stays
    assert all(ns["type"] != "network" for ns in plan.oci["linux"]["namespaces"])
    assert [m["destination"] for m in plan.oci["mounts"]] == ["/proc"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "hosts").write_text("x")
    glue.apply_to_plan(plan, glue.NetPlan(kind="container", join_id="b", join_pid=7),
                       join_dir=other)
    assert {"type": "network", "path": "/proc/7/ns/net"} in plan.oci["linux"]["namespaces"]
    assert [m["destination"] for m in plan.oci["mounts"]] == ["/proc", "/etc/hosts"]


def test_write_files_keeps_the_inode(tmp_path: Path) -> None:
    glue.write_files(tmp_path, hosts="a long first text\n", resolv="r\n", hostname="h\n")
    ino = (tmp_path / "hosts").stat().st_ino
    glue.write_files(tmp_path, hosts="short\n", resolv="r\n", hostname="h\n")
    assert (tmp_path / "hosts").read_text() == "short\n"
    assert (tmp_path / "hosts").stat().st_ino == ino
