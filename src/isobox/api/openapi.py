"""The OpenAPI 3.1 document of API v1, built from the router and the wire models.

Nothing here is written by hand that the code already knows: paths and methods come from
the router (so a route cannot be missing from the document), request bodies from the
pydantic models of :mod:`isobox.spec.compute` (``model_json_schema(by_alias=True)``: the
camelCase names of the wire), responses from the ``TypedDict``\\ s of :mod:`isobox.spec.wire`
(``pydantic.TypeAdapter``). ``scripts/gen_openapi.py`` writes it to ``docs/openapi.json``;
a test keeps the file equal to what this module builds, and the daemon serves it at
``GET /v1/openapi.json``.
"""

from __future__ import annotations

import functools
import json
import types
import typing
from typing import Any, cast, get_args, get_origin, is_typeddict

import typing_extensions
from pydantic import BaseModel, TypeAdapter

from isobox.spec import wire

from .server import STREAM, TEXT, Binary, JsonLines, Param, Route, Router

OPENAPI_VERSION = "3.1.0"
_REF = "#/components/schemas/{model}"


@functools.cache
def _pydantic_typeddict(td: Any) -> Any:
    """The same TypedDict as a ``typing_extensions.TypedDict``: pydantic reads only those
    on Python < 3.12, and :mod:`isobox.spec.wire` keeps to :mod:`typing` (no import cost)."""
    # include_extras keeps NotRequired[...]: with postponed annotations, Python 3.11's
    # TypedDict does not see it in __optional_keys__.
    hints = typing.get_type_hints(td, include_extras=True)
    fields = {k: _convert(t) for k, t in hints.items()}
    new = typing_extensions.TypedDict(td.__name__, fields)  # type: ignore[misc]
    new.__doc__ = td.__doc__
    new.__module__ = td.__module__
    return new


def _convert(tp: Any) -> Any:
    """``tp`` with every TypedDict inside it (lists, dicts, unions) converted."""
    if is_typeddict(tp):
        return _pydantic_typeddict(tp)
    origin, args = get_origin(tp), get_args(tp)
    if origin is None or not args or origin is typing.Literal:
        return tp
    converted = tuple(_convert(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return typing.Union[converted]  # noqa: UP007 (built from a tuple)
    return origin[converted if len(converted) > 1 else converted[0]]


class _Schemas:
    """Collects component schemas; hands out ``$ref``\\ s to them."""

    def __init__(self) -> None:
        self.components: dict[str, Any] = {}

    def _hoist(self, schema: dict[str, Any]) -> dict[str, Any]:
        for name, sub in schema.pop("$defs", {}).items():
            self.components.setdefault(name, sub)
        return schema

    def ref(self, source: Any) -> dict[str, Any]:
        """A schema for ``source``: a pydantic model or any type a TypeAdapter takes. Named
        types (models, TypedDicts) become components and are referenced."""
        if isinstance(source, type) and issubclass(source, BaseModel):
            schema = source.model_json_schema(by_alias=True, ref_template=_REF)
        else:
            schema = TypeAdapter(_convert(source)).json_schema(by_alias=True,
                                                               ref_template=_REF)
        schema = self._hoist(schema)
        name = getattr(source, "__name__", None)
        if isinstance(source, type) and name and schema.get("type") == "object":
            self.components.setdefault(name, schema)
            return {"$ref": _REF.format(model=name)}
        return schema


def _param_schema(p: Param) -> dict[str, Any]:
    item = {"type": p.type}
    return {"type": "array", "items": item} if p.repeatable else item


def _operation(route: Route, schemas: _Schemas) -> dict[str, Any]:
    doc = route.doc
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"},
         "description": "percent-encoded when it holds / or :"}
        for name in route.param_names
    ]
    for p in doc.query:
        entry: dict[str, Any] = {"name": p.name, "in": "query", "required": False,
                                 "schema": _param_schema(p)}
        if p.description:
            entry["description"] = p.description
        if p.repeatable:
            entry.update(style="form", explode=True)
        params.append(entry)
    if STREAM in doc.responses.values():
        required = set(doc.responses) == {101}
        params += [
            {"name": "Upgrade", "in": "header", "required": required,
             "schema": {"type": "string", "const": wire.STREAM_PROTOCOL}},
            {"name": "Connection", "in": "header", "required": required,
             "schema": {"type": "string", "const": "Upgrade"}},
        ]
    op: dict[str, Any] = {"operationId": route.name, "summary": doc.summary}
    if doc.tags:
        op["tags"] = list(doc.tags)
    if params:
        op["parameters"] = params
    if isinstance(doc.body, Binary):
        op["requestBody"] = {"required": True, "description": doc.body.description,
                             "content": {doc.body.content_type: {
                                 "schema": {"type": "string", "format": "binary"}}}}
    elif doc.body is not None:
        op["requestBody"] = {"required": False, "content": {
            "application/json": {"schema": schemas.ref(doc.body)}}}
    responses: dict[str, Any] = {}
    for status, what in sorted(doc.responses.items()):
        responses[str(status)] = _response(status, what, schemas)
    responses["default"] = {"description": "an error (status from the error class)",
                            "content": {"application/json": {
                                "schema": schemas.ref(wire.ErrorBody)}}}
    op["responses"] = responses
    return op


def _response(status: int, what: Any, schemas: _Schemas) -> dict[str, Any]:
    if status == 101 or what == STREAM:
        return {"description": f"Switching Protocols: frames of {wire.STREAM_PROTOCOL} "
                               "(isobox.spec.stream) both ways",
                "headers": {"Upgrade": {"schema": {"type": "string",
                                                   "const": wire.STREAM_PROTOCOL}}}}
    if what is None:
        return {"description": "done, no content"}
    if what == TEXT:
        return {"description": "plain text",
                "content": {"text/plain": {"schema": {"type": "string"}}}}
    if isinstance(what, Binary):
        return {"description": what.description or "binary",
                "content": {what.content_type: {"schema": {"type": "string",
                                                           "format": "binary"}}}}
    if isinstance(what, JsonLines):
        return {"description": "chunked JSON lines, one object per line; a stream that fails "
                               "midway ends with an ErrorBody line",
                "content": {"application/x-ndjson": {"schema": schemas.ref(what.item)}}}
    return {"description": "OK", "content": {"application/json": {"schema": schemas.ref(what)}}}


def build_document(router: Router) -> dict[str, Any]:
    schemas = _Schemas()
    paths: dict[str, dict[str, Any]] = {}
    for route in router.routes:
        paths.setdefault(route.template, {})[route.method.lower()] = _operation(route, schemas)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "isoboxd",
            "version": wire.API_VERSION,
            "description": "The isobox compute service: HTTP/1.1 with JSON bodies on the unix "
                           "socket $ISOBOX_RUN/isoboxd.sock. Errors are an ErrorBody with "
                           "the status of the error class.",
        },
        "servers": [{"url": "http://localhost", "description": "over the unix socket"}],
        "paths": {k: paths[k] for k in sorted(paths)},
        "components": {"schemas": {k: schemas.components[k]
                                   for k in sorted(schemas.components)}},
    }


class _NoService:
    """Stands in for the service while only the routes are read (document generation)."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"no service: {name} called while generating the document")


def document() -> dict[str, Any]:
    """The document of the daemon's router."""
    from .handlers import Service, build_router

    return build_document(build_router(cast(Service, _NoService())))


def render(doc: dict[str, Any]) -> str:
    """The document as checked in: stable order, two-space indents, a final newline."""
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
