"""The JSON form of a report: schema ``qprep.report/1`` (the JSON Schema document is
``report_schema.json`` beside this file), :func:`validate`, and :func:`jsonable`, which turns
records into JSON values."""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

__all__ = ["SCHEMA", "json_schema", "validate", "jsonable"]

SCHEMA = "qprep.report/1"


def json_schema() -> dict:
    """The JSON Schema (draft 2020-12) that :meth:`Report.as_dict` follows."""
    path = pathlib.Path(__file__).with_name("report_schema.json")
    return json.loads(path.read_text(encoding="utf-8"))


def validate(document: dict) -> None:
    """Check ``document`` (e.g. ``json.load`` of a written report) against
    :func:`json_schema`; raises ``ValueError`` naming the first field that does not match.

    Uses ``jsonschema`` when it is installed (it is not a dependency of qprep), else a
    small checker of the keywords the schema uses."""
    schema = json_schema()
    try:
        import jsonschema
    except ImportError:
        _check(document, schema, schema, "$")
        return
    try:
        jsonschema.validate(document, schema)
    except jsonschema.ValidationError as exc:
        where = "$" + "".join(f"[{p!r}]" for p in exc.absolute_path)
        raise ValueError(f"{where}: {exc.message}") from None


_JSON_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is(value: Any, kind: str) -> bool:
    if kind in ("integer", "number"):
        numeric = isinstance(value, int if kind == "integer" else (int, float))
        return numeric and not isinstance(value, bool)
    return isinstance(value, _JSON_TYPES[kind])


def _check(value: Any, schema: dict, root: dict, where: str) -> None:
    """The subset of JSON Schema that report_schema.json uses."""
    if "$ref" in schema:
        node: Any = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        _check(value, node, root, where)
    for sub in schema.get("allOf", []):
        _check(value, sub, root, where)
    if "oneOf" in schema:
        passed = 0
        for sub in schema["oneOf"]:
            try:
                _check(value, sub, root, where)
                passed += 1
            except ValueError:
                pass
        if passed != 1:
            raise ValueError(f"{where}: matches {passed} of the oneOf alternatives, not exactly one")
    kinds = schema.get("type")
    if kinds is not None and not any(_is(value, k) for k in ([kinds] if isinstance(kinds, str) else kinds)):
        raise ValueError(f"{where}: {value!r:.60} is not of type {kinds}")
    if "const" in schema and value != schema["const"]:
        raise ValueError(f"{where}: {value!r} is not {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        raise ValueError(f"{where}: {value!r} is not one of {schema['enum']}")
    if "minimum" in schema and _is(value, "number") and value < schema["minimum"]:
        raise ValueError(f"{where}: {value} is less than {schema['minimum']}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                raise ValueError(f"{where}: {key!r} is a required property")
        for key, item in value.items():
            sub = schema.get("properties", {}).get(key, schema.get("additionalProperties"))
            if isinstance(sub, dict):
                _check(item, sub, root, f"{where}[{key!r}]")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            _check(item, schema["items"], root, f"{where}[{i}]")


def jsonable(value: Any) -> Any:
    """``value`` as JSON values: infinite floats as ``None``, types as qualified names,
    other objects as their ``repr``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    return repr(value)
