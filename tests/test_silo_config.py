"""The pure conversion from an OCI config (pydantic models) to the silo's internal config."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import pytest

from conftest import set_paths
from isobox._sys import linux as L
from isobox.errors import InvalidDocument
from isobox.jobs.cgroup import DEFAULT_DEVICE_RULES, DeviceRule
from isobox.silo.config import DEFAULT_CAPS, from_oci, mount_flags
from isobox.spec.runtime import default_config, parse_config


def _cfg(**changes: object) -> object:
    data = json.loads(json.dumps(default_config(["sh", "-c", "true"]).model_dump(
        by_alias=True, exclude_none=True)))
    set_paths(data, changes)
    return parse_config(json.dumps(data))


def test_default_config_converts(tmp_path: Path) -> None:
    silo = from_oci(_cfg(), tmp_path)
    assert silo.root == str((tmp_path / "rootfs").resolve())
    assert {t for t, p in silo.namespaces if p is None} >= {"pid", "mount", "ipc", "uts",
                                                           "network"}
    assert silo.process.args == ["sh", "-c", "true"]
    assert silo.process.bounding == L.cap_mask(DEFAULT_CAPS)
    assert silo.process.effective == silo.process.permitted == silo.process.bounding
    assert silo.process.no_new_privileges
    assert (resource.RLIMIT_NOFILE, 1024, 1024) in silo.process.rlimits
    proc_mount = next(m for m in silo.mounts if m.destination == "/proc")
    assert proc_mount.type == "proc" and not proc_mount.is_bind
    sys_mount = next(m for m in silo.mounts if m.destination == "/sys")
    assert sys_mount.flags & L.MS_RDONLY and sys_mount.flags & L.MS_NOSUID
    assert "/proc/keys" in silo.masked_paths and "/proc/sys" in silo.readonly_paths
    assert silo.device_rules[0] == DeviceRule(False, "a", None, None, "rwm")
    assert silo.device_rules[1:] == list(DEFAULT_DEVICE_RULES)


def test_mount_options_become_flags_propagation_and_data() -> None:
    flags, prop, data = mount_flags(["rbind", "ro", "nosuid", "rslave", "mode=755", "size=1k"])
    assert flags == L.MS_BIND | L.MS_REC | L.MS_RDONLY | L.MS_NOSUID
    assert prop == L.MS_SLAVE | L.MS_REC
    assert data == "mode=755,size=1k"
    flags, _, _ = mount_flags(["ro", "rw"])  # later options win
    assert flags == 0


def test_relative_bind_sources_and_user_and_resources(tmp_path: Path) -> None:
    silo = from_oci(_cfg(
        mounts=[{"destination": "/data", "type": "bind", "source": "data",
                 "options": ["rbind", "ro"]}],
        process__user={"uid": 1000, "gid": 100, "additionalGids": [5], "umask": 18},
        linux__resources={"memory": {"limit": 64 << 20}, "pids": {"limit": 20},
                          "cpu": {"quota": 50000, "period": 100000, "shares": 512}},
        linux__cgroupsPath="/default/x",
    ), tmp_path)
    data = next(m for m in silo.mounts if m.destination == "/data")
    assert data.source == str(tmp_path / "data") and data.is_bind
    p = silo.process
    assert (p.uid, p.gid, p.additional_gids, p.umask) == (1000, 100, [5], 18)
    lim = silo.limits
    assert lim.memory == 64 << 20 and lim.pids == 20 and lim.cpu_weight == 50
    assert lim.cpu_rate is not None and lim.cpu_rate > 0
    assert silo.cgroups_path == "/default/x"


def test_seccomp_and_hooks_are_carried_over(tmp_path: Path) -> None:
    silo = from_oci(_cfg(
        linux__seccomp={"defaultAction": "SCMP_ACT_ERRNO",
                        "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}]},
        hooks={"prestart": [{"path": "/bin/true"}],
               "createContainer": [{"path": "/hook", "args": ["hook", "x"], "timeout": 5}]},
    ), tmp_path)
    assert silo.process.seccomp is not None
    assert silo.process.seccomp["defaultAction"] == "SCMP_ACT_ERRNO"
    assert silo.hooks["prestart"][0].args == ["/bin/true"]
    assert silo.hooks["create_container"][0].timeout == 5


def test_a_config_without_a_process_cannot_create(tmp_path: Path) -> None:
    cfg = _cfg()
    cfg.process = None  # type: ignore[attr-defined]
    with pytest.raises(InvalidDocument, match="process is required"):
        from_oci(cfg, tmp_path)
