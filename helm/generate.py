#!/usr/bin/env python3
"""Generate the chart's values.schema.json and README.md from the comments in its values.yaml.

values.yaml is the single source: each value has a helm-docs style comment directly above it::

    # -- Gateway replicas (ignored while autoscaling is on).
    # More lines continue the description.
    replicas: 1

* A key with a ``# --`` comment is one value, even when its default is a map or a list (its
  contents are free-form). A key without one must be a non-empty map: a section, whose keys are
  values or sections in turn. Any other key without a comment is an error.
* ``# -- (int|null) text`` overrides the type taken from the default (names: string, int, number,
  bool, list, object, null, joined with ``|``).
* ``# @enum -- a, b, c`` on a following comment line limits the value to those strings.
* ``# @range -- MIN, MAX`` on a following comment line bounds a number (inclusive), e.g. the
  gateway's own bounds, so a bad value fails ``helm install`` instead of crash-looping the gateway.
* ``# @pattern -- REGEX`` (the rest of the line) makes a string match REGEX; ``# @notin -- a, b``
  refuses those strings: both for values the gateway refuses at start.
* ``# @items -- NAME`` types a list's items by one of the shared definitions (``DEFINITIONS``:
  ``pullSecret`` is a Secret's name or ``{name: ...}``, the two forms charts take for pull Secrets).

Every value and section whose type does not include null is ``required`` in its parent: Helm drops a
key set to null (``--set key=null``, or ``key:`` left empty in a values file) from the merged values,
so without this the templates would see it missing and render ``<nil>`` or a broken object. The
``global`` section (Helm hands it to every chart, with its parent's keys) takes unknown keys.

The schema is JSON Schema draft-07 with ``additionalProperties: false`` on the top level and every
section, so a misspelt key fails ``helm lint``/``install`` instead of being ignored.

    python helm/generate.py          # write both files
    python helm/generate.py --check  # exit 1 if either file is not what this script would write
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parent / "openshell"
VALUES = CHART / "values.yaml"
SCHEMA = CHART / "values.schema.json"
README = CHART / "README.md"

_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.-]+):(?:\s|$)")
_DOC = re.compile(r"^ *# -- ?(?:\((?P<type>[a-z|]+)\) *)?(?P<text>.*)$")
_ENUM = re.compile(r"^ *# @enum -- *(?P<values>.+)$")
_RANGE = re.compile(r"^ *# @range -- *(?P<min>-?[0-9.]+) *, *(?P<max>-?[0-9.]+) *$")
_PATTERN = re.compile(r"^ *# @pattern -- (?P<pattern>.+)$")
_NOTIN = re.compile(r"^ *# @notin -- *(?P<values>.+)$")
_ITEMS = re.compile(r"^ *# @items -- *(?P<name>[A-Za-z]+) *$")
_MORE = re.compile(r"^ *#(?: (?P<text>.*))?$")

_TYPES = {
    "string": "string",
    "int": "integer",
    "integer": "integer",
    "number": "number",
    "float": "number",
    "bool": "boolean",
    "boolean": "boolean",
    "list": "array",
    "array": "array",
    "object": "object",
    "map": "object",
    "null": "null",
}
_SHOWN = {
    "string": "string",
    "integer": "int",
    "number": "number",
    "boolean": "bool",
    "array": "list",
    "object": "object",
    "null": "null",
}


#: Shared item types (``# @items -- NAME``), written to the schema's ``definitions``.
DEFINITIONS: dict[str, dict[str, Any]] = {
    "pullSecret": {
        "description": "A pull Secret: its name, or {name: NAME} (a LocalObjectReference).",
        "oneOf": [
            {"type": "string", "minLength": 1},
            {
                "type": "object",
                "properties": {"name": {"type": "string", "minLength": 1}},
                "required": ["name"],
                "additionalProperties": False,
            },
        ],
    },
}
#: Sections that take keys this chart does not know (Helm's global values, shared with a parent).
_OPEN_SECTIONS = {("global",)}


class ValuesError(Exception):
    """values.yaml breaks a documentation rule; the message says where."""


@dataclass
class Value:
    path: tuple[str, ...]
    default: Any
    description: str
    types: list[str]
    enum: list[str] | None = None
    bounds: tuple[float, float] | None = None
    pattern: str | None = None
    notin: list[str] | None = None
    items: str | None = None


@dataclass
class _Doc:
    lines: list[str] = field(default_factory=list)
    type_override: str | None = None
    enum: list[str] | None = None
    bounds: tuple[float, float] | None = None
    pattern: str | None = None
    notin: list[str] | None = None
    items: str | None = None


def _json_type(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    raise ValuesError(f"{where}: default {value!r} has no type; write one, e.g. '# -- (int|null) ...'")


def _lookup(data: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            raise ValuesError(f"{'.'.join(path)}: not found in the parsed values")
        data = data[key]
    return data


def parse_values(text: str) -> tuple[dict[str, Any], list[Value]]:
    """The defaults and every documented value, in file order."""
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValuesError("values.yaml must be a mapping")
    values: list[Value] = []
    stack: list[tuple[int, str]] = []  # open sections: (indent, key)
    skip_below: int | None = None  # inside a documented map/list: its lines are its default
    doc: _Doc | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip(" "))
        if (
            skip_below is not None
            and stripped
            and (indent > skip_below or (indent == skip_below and stripped.startswith("-")))
        ):
            continue
        skip_below = None
        if not stripped:
            doc = None
            continue
        if stripped.startswith("#"):
            if (m := _DOC.match(line)) is not None:
                doc = _Doc(lines=[m["text"].strip()], type_override=m["type"])
            elif doc is not None and (m := _ENUM.match(line)) is not None:
                doc.enum = [v.strip() for v in m["values"].split(",") if v.strip()]
            elif doc is not None and (m := _RANGE.match(line)) is not None:
                doc.bounds = (float(m["min"]), float(m["max"]))
            elif doc is not None and (m := _PATTERN.match(line)) is not None:
                doc.pattern = m["pattern"].strip()
            elif doc is not None and (m := _NOTIN.match(line)) is not None:
                doc.notin = [v.strip() for v in m["values"].split(",") if v.strip()]
            elif doc is not None and (m := _ITEMS.match(line)) is not None:
                doc.items = m["name"]
            elif doc is not None and (m := _MORE.match(line)) is not None:
                doc.lines.append((m["text"] or "").strip())
            continue
        m = _KEY.match(line)
        if m is None:
            raise ValuesError(f"values.yaml:{number}: expected 'key: value', got {stripped!r}")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = (*[key for _, key in stack], m["key"])
        where = f"values.yaml:{number} ({'.'.join(path)})"
        default = _lookup(data, path)
        if doc is not None:
            if doc.type_override:
                names = doc.type_override.split("|")
                unknown = [n for n in names if n not in _TYPES]
                if unknown:
                    raise ValuesError(f"{where}: unknown type {'|'.join(unknown)}")
                types = [_TYPES[n] for n in names]
            else:
                types = [_json_type(default, where)]
            if doc.enum is not None and default not in doc.enum:
                raise ValuesError(f"{where}: default {default!r} is not one of {doc.enum}")
            if doc.bounds is not None and not (
                isinstance(default, int | float) and doc.bounds[0] <= default <= doc.bounds[1]
            ):
                raise ValuesError(f"{where}: default {default!r} is outside {doc.bounds}")
            if doc.pattern is not None and not (
                isinstance(default, str) and re.search(doc.pattern, default) is not None
            ):
                raise ValuesError(f"{where}: default {default!r} does not match {doc.pattern!r}")
            if doc.notin is not None and default in doc.notin:
                raise ValuesError(f"{where}: default {default!r} is one of the refused {doc.notin}")
            if doc.items is not None and (doc.items not in DEFINITIONS or types != ["array"]):
                known = sorted(DEFINITIONS)
                raise ValuesError(f"{where}: @items {doc.items} needs a list and one of {known}")
            description = " ".join(part for part in doc.lines if part)
            if not description:
                raise ValuesError(f"{where}: empty '# --' description")
            values.append(
                Value(
                    path, default, description, types, doc.enum, doc.bounds, doc.pattern, doc.notin, doc.items
                )
            )
            skip_below = indent
        elif isinstance(default, dict) and default:
            stack.append((indent, m["key"]))
        else:
            raise ValuesError(f"{where}: no '# --' comment directly above it")
        doc = None
    _check_complete(data, {v.path for v in values}, ())
    return data, values


def _check_complete(data: dict[str, Any], documented: set[tuple[str, ...]], prefix: tuple[str, ...]) -> None:
    for key, value in data.items():
        path = (*prefix, key)
        if path in documented:
            continue
        if isinstance(value, dict) and value:
            _check_complete(value, documented, path)
        else:
            raise ValuesError(f"{'.'.join(path)}: not documented (the parser did not see its line)")


def _leaf_schema(value: Value) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": value.types[0] if len(value.types) == 1 else value.types,
        "description": value.description,
        "default": value.default,
    }
    if value.enum is not None:
        schema["enum"] = value.enum
    if value.bounds is not None:
        low, high = value.bounds
        schema["minimum"] = int(low) if low.is_integer() else low
        schema["maximum"] = int(high) if high.is_integer() else high
    if value.pattern is not None:
        schema["pattern"] = value.pattern
    if value.notin is not None:
        schema["not"] = {"enum": value.notin}
    if value.items is not None:
        schema["items"] = {"$ref": f"#/definitions/{value.items}"}
    elif value.types == ["array"] and value.default:
        item_types = {_json_type(item, ".".join(value.path)) for item in value.default}
        if len(item_types) == 1:
            schema["items"] = {"type": item_types.pop()}
    return schema


def build_schema(values: list[Value]) -> dict[str, Any]:
    root: dict[str, Any] = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "Values of the openshell chart",
        "description": "Generated by helm/generate.py from the comments in values.yaml; do not edit.",
        "type": "object",
        "additionalProperties": False,
        "properties": {},
    }
    for value in values:
        node = root
        for depth, key in enumerate(value.path[:-1], start=1):
            _require(node, key)  # a section: its values' defaults live in it
            node = node["properties"].setdefault(
                key,
                {
                    "type": "object",
                    "additionalProperties": value.path[:depth] in _OPEN_SECTIONS,
                    "properties": {},
                },
            )
        node["properties"][value.path[-1]] = _leaf_schema(value)
        if "null" not in value.types:
            _require(node, value.path[-1])
    used = {v.items for v in values if v.items is not None}
    if used:
        root["definitions"] = {name: DEFINITIONS[name] for name in sorted(used)}
    return root


def _require(node: dict[str, Any], key: str) -> None:
    required: list[str] = node.setdefault("required", [])
    if key not in required:
        required.append(key)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")


def _default_cell(value: Value) -> str:
    shown = json.dumps(value.default, separators=(",", ":"), ensure_ascii=False)
    return f"`{_cell(shown)}`"


def _type_cell(value: Value) -> str:
    shown = " or ".join(_SHOWN[t] for t in value.types)
    if value.enum is not None:
        shown += ": one of " + ", ".join(f"`{v}`" for v in value.enum)
    if value.bounds is not None:
        low, high = (int(b) if b.is_integer() else b for b in value.bounds)
        shown += f", {low} to {high}"
    if value.pattern is not None:
        shown += f", matching `{value.pattern}`"
    if value.notin is not None:
        shown += ", not " + ", ".join(f"`{v}`" for v in value.notin)
    return shown


_README_HEAD = """\
# openshell Helm chart

<!-- Generated by helm/generate.py from the comments in values.yaml. Do not edit by hand:
     change values.yaml and run `python helm/generate.py`. -->

The OpenShell gateway (the control plane every sandbox supervisor keeps a gRPC session to) and the
namespaced RBAC it needs to run sandboxes as Kubernetes pods. The chart does not template sandbox
pods: it renders the `drivers.kubernetes` section of the gateway's config file from the `sandboxes`
values, and the gateway builds every pod from it (`gateway/drivers/podspec.py`).

```sh
helm install openshell oci://ghcr.io/openshell/charts/openshell --version {version} \\
  --namespace openshell --create-namespace
helm test openshell -n openshell
```

* Example values files for common setups are in `ci/`, shipped in the package (HA with PostgreSQL,
  Gateway API, Ingress, OpenShift, Kata Containers, gVisor, clusters without ImageVolume, a private
  registry, an air-gapped mirror); each is linted, rendered and checked in CI.
* A mirror of every image the chart deploys is one setting, `global.imageRegistry` (with
  `global.imagePullSecrets`); changes by version are in `CHANGELOG.md`.
* Install, upgrade and publishing notes: `docs/helm.md`; the gateway's permissions: `docs/rbac.md`;
  every key of the gateway config: `docs/configuration.md`.
* Metrics: the ServiceMonitor scrapes the gateway's `/metrics` on the ops port (7090)
  (`openshell_gateway_*`: sessions, refusals, event batches and their store latency, process);
  the PrometheusRule alerts on them and on `up`.
* OIDC for the HTTP API: `auth.oidc` (without it the API listens on the pod's loopback only);
  `gateway.extraConfig`, `gateway.extraEnv` and `gateway.extraEnvFrom` set any further gateway
  settings.

## Values

| key | type | default | description |
|---|---|---|---|
"""


def build_readme(values: list[Value], chart_version: str) -> str:
    rows = [
        f"| `{'.'.join(v.path)}` | {_type_cell(v)} | {_default_cell(v)} | {_cell(v.description)} |"
        for v in values
    ]
    return _README_HEAD.format(version=chart_version) + "\n".join(rows) + "\n"


def render() -> tuple[str, str]:
    """(values.schema.json, README.md) as this script writes them."""
    _, values = parse_values(VALUES.read_text(encoding="utf-8"))
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    schema = json.dumps(build_schema(values), indent=2, ensure_ascii=False) + "\n"
    return schema, build_readme(values, str(chart["version"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a generated file is stale")
    args = parser.parse_args(argv)
    try:
        schema, readme = render()
    except ValuesError as exc:
        print(f"helm/generate.py: {exc}", file=sys.stderr)
        return 2
    stale = []
    for path, text in ((SCHEMA, schema), (README, readme)):
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        if args.check:
            stale.append(path.relative_to(CHART.parent.parent))
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(CHART.parent.parent)}")
    if stale:
        print(
            "stale: " + ", ".join(map(str, stale)) + " (run: python helm/generate.py)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
