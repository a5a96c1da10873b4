"""The ``isobox`` command, run as a user runs it: a subprocess, exit codes, stdout, stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from imagekit import d, f, oci_layout, tar_bytes

pytestmark = pytest.mark.root


def isobox(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "isobox.cli.main", *args],
        capture_output=True, text=True, check=False, env=os.environ.copy(),
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_version_loads_no_engine_code() -> None:
    code = (
        "import sys; from isobox.cli.main import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith('isobox.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0].startswith("isobox, version ")
    assert out[1] == "['isobox.cli', 'isobox.cli.main', 'isobox.errors']"


def test_import_list_inspect_save_rmi(tmp_path: Path) -> None:
    oci_layout(tmp_path / "img", [tar_bytes([d("etc"), f("etc/hello", "hi\n")])])
    out = isobox("import", str(tmp_path / "img"), "cli/test:1").stdout
    assert out.startswith("Imported cli/test:1 sha256:")
    listed = json.loads(isobox("images", "--format", "json").stdout)
    assert [i["tags"] for i in listed] == [["cli/test:1"]]
    table = isobox("images").stdout.splitlines()
    assert table[0].split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "SIZE"]
    assert table[1].split()[:2] == ["cli/test", "1"]
    inspected = json.loads(isobox("image", "inspect", "cli/test:1").stdout)[0]
    assert inspected["config"]["rootfs"]["diff_ids"] == [inspected["layers"][0]["diff_id"]]
    assert Path(inspected["layer_dirs"][0], "etc", "hello").read_text() == "hi\n"
    isobox("save", "cli/test:1", "-o", str(tmp_path / "out.tar"), "--format", "docker")
    assert (tmp_path / "out.tar").stat().st_size > 0
    assert isobox("rmi", "cli/test:1").stdout.splitlines()[0] == "Untagged: cli/test:1"
    assert json.loads(isobox("images", "--format", "json").stdout) == []


def test_errors_are_one_line_with_exit_codes(tmp_path: Path) -> None:
    missing = isobox("image", "inspect", "nope:1", check=False)
    assert missing.returncode == 1
    assert missing.stderr == "isobox: no such image: nope:1\n"
    bad = isobox("import", str(tmp_path), "Not A Name", check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("isobox: invalid image reference")
    nothing = isobox("import", str(tmp_path / "absent"), check=False)
    assert nothing.returncode == 2 and "no such file or directory" in nothing.stderr
