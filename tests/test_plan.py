"""The plan: docker's rules for command, environment, user and working directory; the OCI
config it makes (checked by silo's own conversion); host plans; the file round trip."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from isobox.compute.plan import (
    PLAN_VERSION,
    build_plan,
    command,
    merge_env,
    read_plan,
    resolve_user,
    write_plan,
)
from isobox.errors import InvalidArgument, IsoboxError, NotFound
from isobox.spec.compute import ComputeSystem, parse_document
from isobox.spec.image import ImageConfig
from isobox.storage.store import Mounts

CID = "ab" * 32
USERS_FILE = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n"
GROUPS_FILE = "root:x:0:\napp:x:1000:\nwheel:x:10:app,other\nstaff:x:50:app\n"


def image(**config: Any) -> ImageConfig:
    return ImageConfig.model_validate({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": []}, "config": config})


def doc(**fields: Any) -> ComputeSystem:
    return parse_document({"schemaVersion": "1.0", "image": "img", **fields})


@pytest.fixture
def mounts(tmp_path: Path) -> Mounts:
    layer = tmp_path / "layer"
    (layer / "etc").mkdir(parents=True)
    (layer / "etc" / "passwd").write_text(USERS_FILE)
    (layer / "etc" / "group").write_text(GROUPS_FILE)
    for d in ("upper", "work"):
        (tmp_path / d).mkdir()
    return Mounts([layer], tmp_path / "upper", tmp_path / "work")


def plan_of(d: ComputeSystem, img: ImageConfig, mounts: Mounts, tmp_path: Path,
            isolation: str = "process") -> Any:
    return build_plan(d, img, mounts, container_id=CID, name="n", isolation=isolation,
                      container_dir=tmp_path / "c", run_dir=tmp_path / "r")


def test_command_follows_docker() -> None:
    img = image(Entrypoint=["/entry"], Cmd=["a", "b"])
    assert command(doc(), img) == ["/entry", "a", "b"]
    assert command(doc(process={"args": ["x"]}), img) == ["/entry", "x"]
    assert command(doc(process={"entrypoint": ["/other"]}), img) == ["/other"]
    assert command(doc(process={"entrypoint": [], "args": ["ls"]}), img) == ["ls"]
    with pytest.raises(InvalidArgument, match="no command"):
        command(doc(process={"entrypoint": []}), image())


def test_env_overlay_keeps_order() -> None:
    assert merge_env(["A=1", "B=2"], ["B=3", "C=4"]) == ["A=1", "B=3", "C=4"]


def test_users_and_groups() -> None:
    assert resolve_user(None, USERS_FILE, GROUPS_FILE).uid == 0
    app = resolve_user("app", USERS_FILE, GROUPS_FILE)
    assert (app.uid, app.gid, app.additional_gids, app.home) == (1000, 1000, [10, 50],
                                                                  "/home/app")
    assert resolve_user("app:wheel", USERS_FILE, GROUPS_FILE).gid == 10
    n = resolve_user("4242:7", USERS_FILE, GROUPS_FILE)
    assert (n.uid, n.gid, n.additional_gids) == (4242, 7, [])
    assert resolve_user("1000", USERS_FILE, GROUPS_FILE).home == "/home/app"
    with pytest.raises(InvalidArgument, match="nobody"):
        resolve_user("nobody", USERS_FILE, GROUPS_FILE)
    with pytest.raises(InvalidArgument, match="nogroup"):
        resolve_user("app:nogroup", USERS_FILE, GROUPS_FILE)


def test_process_plan_is_a_valid_oci_config(mounts: Mounts, tmp_path: Path) -> None:
    from isobox.silo.config import from_oci
    from isobox.spec.runtime import DEFAULT_CAPABILITIES, parse_config

    img = image(Env=["PATH=/usr/bin:/bin", "A=1"], Cmd=["sh"], User="app",
                WorkingDir="/srv")
    d = doc(process={"env": ["A=2"], "tty": True, "stdin": True},
            mounts=[{"source": str(tmp_path), "destination": "/data", "readOnly": True}],
            resources={"memory": 64 << 20, "cpus": 0.5, "cpuShares": 512, "pidsLimit": 9,
                       "cpuset": "0"}, readOnly=True)
    plan = plan_of(d, img, mounts, tmp_path)
    assert (plan.tty, plan.stdin, plan.rootfs) == (True, True, str(tmp_path / "c" / "rootfs"))
    assert plan.lower == [str(mounts.lower[0])] and plan.upper == str(mounts.upper)
    oci = plan.oci
    p = oci["process"]
    assert p["args"] == ["sh"] and p["cwd"] == "/srv" and p["terminal"] is True
    assert p["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [10, 50]}
    assert {"PATH=/usr/bin:/bin", "A=2", f"HOSTNAME={CID[:12]}", "TERM=xterm",
            "HOME=/home/app"} <= set(p["env"])
    assert sorted(p["capabilities"]["bounding"]) == sorted(DEFAULT_CAPABILITIES)
    assert oci["hostname"] == CID[:12]
    assert oci["root"] == {"path": plan.rootfs, "readonly": True}
    assert {ns["type"] for ns in oci["linux"]["namespaces"]} >= {"network", "pid", "mount"}
    res = oci["linux"]["resources"]
    assert res["memory"] == {"limit": 64 << 20} and res["pids"] == {"limit": 9}
    assert res["cpu"] == {"quota": 50_000, "period": 100_000, "shares": 512, "cpus": "0"}
    assert oci["linux"]["seccomp"]["defaultAction"] == "SCMP_ACT_ERRNO"
    assert {"destination": "/data", "type": "bind", "source": str(tmp_path),
            "options": ["rbind", "rprivate", "ro"]} in oci["mounts"]
    # What the monitor does with it: silo's own parse and conversion accept it.
    silo = from_oci(parse_config(json.dumps(oci)), tmp_path)
    assert silo.process.uid == 1000 and silo.readonly_root and silo.new_namespace("network")
    assert silo.limits.memory == 64 << 20 and silo.limits.pids == 9
    assert silo.process.seccomp is not None


def test_host_network_keeps_the_hosts_namespace(mounts: Mounts, tmp_path: Path) -> None:
    plan = plan_of(doc(process={"args": ["true"]}, network={"mode": "host",
                                                             "hostname": "web"}),
                   image(), mounts, tmp_path)
    assert "network" not in {ns["type"] for ns in plan.oci["linux"]["namespaces"]}
    assert plan.oci["hostname"] == "web"


def test_symlinked_etc_is_not_followed(tmp_path: Path) -> None:
    layer = tmp_path / "evil"
    layer.mkdir()
    (layer / "etc").symlink_to("/etc")  # on the host this is the host's /etc
    for d in ("upper", "work"):
        (tmp_path / d).mkdir()
    m = Mounts([layer], tmp_path / "upper", tmp_path / "work")
    with pytest.raises(InvalidArgument, match="not in the image"):
        plan_of(doc(process={"args": ["true"], "user": "root"}), image(), m, tmp_path)


def test_host_plan(mounts: Mounts, tmp_path: Path) -> None:
    from isobox.jobs.limits import Limits, cpu_rate_from_cpus

    img = image(Env=["PATH=/usr/bin:/bin"], Cmd=["sh"], WorkingDir="/w")
    plan = plan_of(doc(process={"env": ["X=1"]}, resources={"memory": 8 << 20, "cpus": 1,
                                                             "pidsLimit": 5}),
                   img, mounts, tmp_path, isolation="host")
    h = plan.host
    env = dict(e.split("=", 1) for e in h["env"])
    assert env["ISOBOX_SANDBOX_MOUNT_POINT"] == plan.rootfs and env["X"] == "1"
    assert env["PATH"].startswith(f"{plan.rootfs}/usr/bin:{plan.rootfs}/bin:")
    assert env["PATH"].endswith(os.environ["PATH"])
    assert h["cwd"] == plan.rootfs + "/w" and h["args"] == ["sh"] and h["uid"] == 0
    assert plan.oci == {}
    assert Limits(**plan.limits) == Limits(memory=8 << 20, pids=5,
                                           cpu_rate=cpu_rate_from_cpus(1))


def test_host_plan_mounts_and_read_only(mounts: Mounts, tmp_path: Path) -> None:
    d = doc(process={"args": ["true"]}, readOnly=True,
            mounts=[{"source": "/srv/a", "destination": "/a", "readOnly": True},
                    {"source": "/srv/b", "destination": "/b"}])
    h = plan_of(d, image(), mounts, tmp_path, isolation="host").host
    assert h["readOnly"] is True
    assert h["mounts"] == [{"source": "/srv/a", "destination": "/a", "readOnly": True},
                           {"source": "/srv/b", "destination": "/b", "readOnly": False}]


def test_unsupported_isolation(mounts: Mounts, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="hyperv"):
        plan_of(doc(process={"args": ["true"]}), image(), mounts, tmp_path,
                isolation="hyperv")


def test_write_read_round_trip(mounts: Mounts, tmp_path: Path) -> None:
    plan = plan_of(doc(process={"args": ["true"]}), image(), mounts, tmp_path)
    path = tmp_path / "plan.json"
    write_plan(plan, path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert json.loads(path.read_text())["version"] == PLAN_VERSION
    assert read_plan(path) == plan
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    path.write_text(json.dumps({**json.loads(path.read_text()), "version": 99}))
    with pytest.raises(IsoboxError, match="version 99"):
        read_plan(path)
    path.write_text("{not json")
    with pytest.raises(IsoboxError, match="damaged"):
        read_plan(path)
    with pytest.raises(NotFound):
        read_plan(tmp_path / "missing.json")


def test_rewrite_only_when_changed(mounts: Mounts, tmp_path: Path) -> None:
    plan = plan_of(doc(process={"args": ["true"]}), image(), mounts, tmp_path)
    path = tmp_path / "plan.json"
    write_plan(plan, path)
    first = os.stat(path)
    write_plan(plan, path)  # the same plan: the file is left as it is
    assert os.stat(path).st_ino == first.st_ino
    plan.host = {"args": ["other"]}
    write_plan(plan, path)  # a changed one replaces it, whole and 0600
    assert read_plan(path) == plan and os.stat(path).st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith("json")) == [
        "plan.json"]


def test_the_monitor_gets_the_precompiled_default_profile(mounts: Mounts,
                                                          tmp_path: Path) -> None:
    """The zygote compiles the engine's default profile once (spawner._warm_seccomp); a
    plan's profile, as the monitor converts it, must be that very profile (same key), or
    every start would compile it again."""
    from isobox._sys import seccomp
    from isobox.silo.config import from_oci
    from isobox.spec.runtime import DEFAULT_CAPABILITIES, parse_config

    plan = plan_of(doc(process={"args": ["true"]}), image(), mounts, tmp_path)
    silo = from_oci(parse_config(json.dumps(plan.oci)), tmp_path)
    assert silo.process.seccomp is not None
    assert seccomp.profile_key(silo.process.seccomp) == seccomp.profile_key(
        seccomp.default_profile(DEFAULT_CAPABILITIES))


def test_cap_add_extends_dockers_default_set(mounts: Mounts, tmp_path: Path) -> None:
    from isobox._sys.linux import CAP_NUMBER, last_cap
    from isobox.errors import InvalidDocument
    from isobox.spec.runtime import DEFAULT_CAPABILITIES

    def caps(*add: str) -> dict[str, list[str]]:
        plan = plan_of(doc(process={"args": ["true"], "capAdd": list(add)}), image(), mounts,
                       tmp_path)
        return dict(plan.oci["process"]["capabilities"])

    default = caps()
    assert sorted(default["bounding"]) == sorted(DEFAULT_CAPABILITIES)
    net_admin = caps("net_admin")  # docker's spelling, without CAP_
    assert set(net_admin["bounding"]) == set(DEFAULT_CAPABILITIES) | {"CAP_NET_ADMIN"}
    assert net_admin["effective"] == net_admin["permitted"] == net_admin["bounding"]
    every = caps("ALL")
    assert len(every["effective"]) == last_cap() + 1 and "CAP_SYS_ADMIN" in every["effective"]
    assert all(CAP_NUMBER[c] <= last_cap() for c in every["bounding"])
    with pytest.raises(InvalidDocument) as bad:
        caps("CAP_FLY")
    assert bad.value.field == "process.capAdd"
    with pytest.raises(InvalidDocument) as bad:
        doc(process={"capAdd": ["no way"]})
    assert bad.value.field == "process.capAdd"
