"""The one-way layer rule of DESIGN.md, and the code standards (mypy --strict, ruff).

Every module of isobox belongs to a row; a module may import only from rows below its own
(and from itself). The check walks the AST of every source file, so a forbidden import
anywhere, even inside a function, fails here.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "isobox"

# Top-level module or package of isobox -> row (DESIGN.md, "Layers").
ROWS: dict[str, int] = {
    "__init__": 0,  # version only
    "_sys": 0,
    "spec": 0,
    "errors": 0,
    "paths": 0,
    "statedb": 0,
    "jobs": 1,
    "storage": 1,
    "network": 1,
    "agent": 0,  # the package's __init__ only: a docstring, no imports
    "agent.protocol": 1,
    "silo": 2,
    "agent.client": 2,
    "uvm": 3,
    "agent.guest": 3,
    "compute": 4,
    "api": 5,
    "oci": 5,
    "client": 6,
    "cli": 6,
}
# Row-0 modules are independent of each other except for the error tree.
ROW0_ALLOWED = {"errors", "__init__"}
# Imports within one row that DESIGN.md names: the CLI is built on the SDK.
SAME_ROW_ALLOWED = {("cli", "client")}
# The SDK works against a remote daemon and starts fast: of isobox it imports only these
# (never engine code, never pydantic); the CLI imports only the SDK and these, except the
# local `isobox job run` and `isobox uvm`, whose modules alone may use isobox.jobs / .uvm.
CLIENT_MAY_IMPORT = {"spec.wire", "spec.stream", "errors", "paths", "__init__"}
CLI_MAY_IMPORT = CLIENT_MAY_IMPORT | {"client"}
CLI_LOCAL_TOOLS = {"cli/jobrun.py": {"jobs"}, "cli/uvmcmd.py": {"uvm"}}


def _unit(module: str) -> str:
    """The ROWS key of a dotted module path below isobox."""
    parts = module.split(".")
    if len(parts) >= 2 and ".".join(parts[:2]) in ROWS:
        return ".".join(parts[:2])
    return parts[0]


def _module_of(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"] or ["__init__"]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    pkg = _module_of(path).split(".")
    if path.name != "__init__.py":
        pkg = pkg[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                mod = ".".join(["isobox", *base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            found.append((node.lineno, mod))
    return [(ln, m.removeprefix("isobox.")) for ln, m in found if m.startswith("isobox.")]


def _sources() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_every_module_has_a_row() -> None:
    missing = sorted({_unit(_module_of(p)) for p in _sources()} - set(ROWS))
    assert not missing, f"modules with no row in DESIGN.md's table: {missing}"


def test_imports_go_down_only() -> None:
    violations = []
    for path in _sources():
        here = _unit(_module_of(path))
        for line, target in _imports(path):
            there = _unit(target)
            if there == here:
                continue
            row0 = ROWS[here] == 0
            allowed = there in ROW0_ALLOWED if row0 else ROWS[there] < ROWS[here]
            allowed = allowed or (here, there) in SAME_ROW_ALLOWED
            if not allowed:
                violations.append(f"{path.relative_to(SRC)}:{line}: {here} imports {there}")
    assert not violations, "imports against the layer rule:\n" + "\n".join(violations)


def _third_party(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def _isobox_modules(path: Path) -> list[tuple[int, str]]:
    """Every isobox module a file imports, below ``isobox.`` (``from isobox.spec import
    stream`` is ``spec.stream``; ``from isobox import errors`` is ``errors``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                is_module = (SRC.parent / (sub.replace(".", "/") + ".py")).exists() or (
                    SRC.parent / sub.replace(".", "/")).is_dir()
                found.append((node.lineno, sub if is_module else node.module))
    out = [(ln, m.removeprefix("isobox.")) for ln, m in found if m.startswith("isobox.")]
    return out + [(ln, "__init__") for ln, m in found if m == "isobox"]


def _sdk_violations() -> list[str]:
    violations = []
    for pkg, may in (("client", CLIENT_MAY_IMPORT), ("cli", CLI_MAY_IMPORT)):
        for path in sorted((SRC / pkg).rglob("*.py")):
            rel = str(path.relative_to(SRC))
            extra = CLI_LOCAL_TOOLS.get(rel, set())
            for line, target in _isobox_modules(path):
                top = target.split(".")[0]
                if top == pkg or (top == "client" and "client" in may):
                    continue
                if target not in may and top not in extra:
                    violations.append(f"{rel}:{line}: imports isobox.{target}")
            if not extra:
                violations += [f"{rel}:{line}: imports {mod}" for line, mod in _third_party(path)
                               if mod in ("pydantic", "pydantic_core", "zstandard")]
    return violations


def test_sdk_and_cli_import_no_engine_code() -> None:
    violations = _sdk_violations()
    assert not violations, "the SDK/CLI import rule:\n" + "\n".join(violations)


def test_the_sdk_rule_can_fail() -> None:
    bad = SRC / "client" / "_sdk_rule_probe.py"
    bad.write_text("def f() -> None:\n    from isobox.spec.compute import parse_document\n"
                   "    import pydantic\n")
    try:
        found = _sdk_violations()
    finally:
        bad.unlink()
    assert "client/_sdk_rule_probe.py:2: imports isobox.spec.compute" in found
    assert "client/_sdk_rule_probe.py:3: imports pydantic" in found


def test_the_walker_catches_an_upward_import(tmp_path: Path) -> None:
    # The rule above must be able to fail: a storage module importing the CLI is caught.
    bad = SRC / "storage" / "_layer_rule_probe.py"
    bad.write_text("def f() -> None:\n    from isobox.cli import main\n")
    try:
        with pytest.raises(AssertionError, match="storage imports cli"):
            test_imports_go_down_only()
    finally:
        bad.unlink()


def _tool(name: str) -> str:
    exe = Path(sys.executable).parent / name
    found = str(exe) if exe.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: make setup installs the dev extras")
    return found


def test_mypy_strict() -> None:
    proc = subprocess.run(
        [_tool("mypy")], cwd=SRC.parent.parent, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff() -> None:
    proc = subprocess.run(
        [_tool("ruff"), "check", "src", "tests", "bench"], cwd=SRC.parent.parent,
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
