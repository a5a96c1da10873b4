"""docs/openapi.json is what the code generates, and it describes exactly the router's routes.

The document is generated (scripts/gen_openapi.py), never edited by hand; these tests fail
when a route or a wire model changed without regenerating it, and check the document is
whole: every ``$ref`` resolves, every path parameter is declared, and the schemas are the
wire's (camelCase names, the TypedDicts' keys).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any, cast

from isobox.api.handlers import Service, build_router
from isobox.api.openapi import build_document, document, render
from isobox.spec import wire

ROOT = Path(__file__).resolve().parent.parent
CHECKED_IN = ROOT / "docs" / "openapi.json"


def _doc() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(CHECKED_IN.read_text())
    return loaded


def test_checked_in_document_is_what_the_code_generates() -> None:
    assert CHECKED_IN.read_text() == render(document()), (
        "docs/openapi.json is stale: run .venv/bin/python scripts/gen_openapi.py")


def test_gen_script_check_mode_agrees() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_openapi.py"), "--check"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_every_route_is_documented_and_nothing_else() -> None:
    router = build_router(cast(Service, object()))
    routes = {(r.method.lower(), r.template) for r in router.routes}
    documented = {(m, p) for p, ops in _doc()["paths"].items() for m in ops}
    assert routes - documented == set(), "routes missing from docs/openapi.json"
    assert documented - routes == set(), "documented operations with no route"
    ids = [op["operationId"] for ops in _doc()["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))


def test_the_contract_routes_are_all_there() -> None:
    # The table of docs/compute-service.md, section "The API".
    want = """GET /v1/_ping; GET /v1/info; POST /v1/compute-systems; GET /v1/compute-systems;
    GET /v1/compute-systems/{ref}; DELETE /v1/compute-systems/{ref};
    POST /v1/compute-systems/{ref}/start; POST /v1/compute-systems/{ref}/attach;
    POST /v1/compute-systems/{ref}/exec; POST /v1/compute-systems/{ref}/wait;
    POST /v1/compute-systems/{ref}/kill; POST /v1/compute-systems/{ref}/stop;
    POST /v1/compute-systems/{ref}/pause; POST /v1/compute-systems/{ref}/resume;
    GET /v1/compute-systems/{ref}/logs; GET /v1/compute-systems/{ref}/stats;
    GET /v1/compute-systems/{ref}/top; GET /v1/compute-systems/{ref}/archive;
    PUT /v1/compute-systems/{ref}/archive; GET /v1/events; GET /v1/images;
    GET /v1/images/{ref}; DELETE /v1/images/{ref}; POST /v1/images/import;
    GET /v1/images/{ref}/export; POST /v1/images/{ref}/tag; POST /v1/images/prune;
    POST /v1/images/bootstrap; GET /v1/openapi.json"""
    paths = _doc()["paths"]
    for item in want.split(";"):
        method, path = item.split()
        assert method.lower() in paths.get(path, {}), item


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_every_ref_resolves_and_path_parameters_are_declared() -> None:
    doc = _doc()
    schemas = doc["components"]["schemas"]
    for ref in _refs(doc):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    for path, ops in doc["paths"].items():
        names = set(re.findall(r"\{(\w+)\}", path))
        for method, op in ops.items():
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == names, (method, path)
            assert "default" in op["responses"], (method, path)


def test_schemas_are_the_wire_shapes() -> None:
    schemas = _doc()["components"]["schemas"]
    # Request models: camelCase on the wire, unknown fields refused.
    cs = schemas["ComputeSystem"]
    assert {"schemaVersion", "autoRemove", "readOnly"} <= set(cs["properties"])
    assert cs["additionalProperties"] is False and "image" in cs["required"]
    assert "pidsLimit" in schemas["ResourcesSpec"]["properties"]
    # Responses: exactly the TypedDicts' keys.
    for name in ("ComputeSystemInfo", "DaemonInfo", "StatsSample", "WaitResult", "ImageInfo",
                 "LogEntry", "Event", "ProcessEntry", "CreateResult"):
        td = getattr(wire, name)
        assert set(schemas[name]["properties"]) == set(typing.get_type_hints(td)), name
    assert schemas["ErrorDetail"]["required"] == ["kind", "message"]  # field: NotRequired


def test_build_document_follows_the_router() -> None:
    router = build_router(cast(Service, object()))
    router.add("GET", "/v1/extra/{thing}", lambda req: None,  # type: ignore[arg-type,return-value]
               router.routes[0].doc, name="extra")
    doc = build_document(router)
    assert doc["paths"]["/v1/extra/{thing}"]["get"]["operationId"] == "extra"
    assert doc != document()
