"""What both components' CLIs load and check: the file strictly, the environment's names, the model.

``config check FILE`` must refuse exactly what ``serve`` (``run``) would, and both must refuse it
the same way: exit status 78 (EX_CONFIG), one line per problem, no traceback. So both go through
:func:`load_checked`, which adds to :func:`openshell_wire.configfile.load_settings` what pydantic
cannot see:

- **the file read strictly**: a key given twice in one mapping (at any depth) is an error naming
  the key and both lines, where YAML's loader would keep the last one in silence; a key that is not
  a string (``1: x``, ``true: x``) is an error naming its line, where the model would fail with a
  TypeError. Both through PyYAML's own hook, a SafeLoader whose mapping constructor checks the
  mapping's keys before building it;
- **the environment's names**: pydantic-settings reads only the variables that name a field, so
  ``OPENSHELL_GATEWAY_GRPCC__LISTEN`` (a typo of a section) is ignored without a word. Every
  variable under the component's prefix must name a top-level setting (an unknown key inside a
  section is already the model's error), except Kubernetes' service links of a Service named
  like the component (``OPENSHELL_GATEWAY_SERVICE_HOST``, ``..._PORT_7070_TCP``).

The rest (types, ranges, URLs, listen addresses, rules across keys) is the typed model's own
validation, the one place both commands share. A message never shows a database password: the
part of a URL between ``user:`` and ``@`` is masked wherever it appears.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import yaml

from openshell_wire.configfile import (
    EX_CONFIG,
    ConfigError,
    LayeredSettings,
    SettingsT,
    load_settings,
)

#: What Kubernetes puts in every pod's environment for each Service of its namespace (service
#: links, unless enableServiceLinks: false), after the Service's name: Services named
#: openshell-gateway or openshell-gateway-external give OPENSHELL_GATEWAY_SERVICE_HOST,
#: OPENSHELL_GATEWAY_EXTERNAL_PORT_7070_TCP_ADDR, ... and OPENSHELL_GATEWAY_PORT=tcp://10.0.0.7:7070.
#: No setting has these names, and a Service of the deployment's own must not stop it from starting.
_SERVICE_LINK = re.compile(
    r"(\w+_)?(service_host|service_port(_\w+)?|port_\d+_(tcp|udp|sctp)(_(proto|port|addr))?)"
)
_SERVICE_LINK_PORT = re.compile(r"(\w+_)?port")
_SERVICE_LINK_PORT_VALUE = re.compile(r"(tcp|udp|sctp)://\S+")
_PASSWORD_IN_URL = re.compile(r"(://[^:/@\s'\"]*:)[^@\s'\"]*@")
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader refusing a key twice in one mapping and keys that are not strings. Every mapping
    (a nested one, an anchored one) is built through construct_mapping, so the check is here."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            # A merge key (<<: *defaults) brings keys that the mapping's own may override.
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                written = key_node.value if isinstance(key_node, yaml.ScalarNode) else repr(key)
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {written} is not a string (YAML reads it as {type(key).__name__} {key!r}): "
                    f"setting names are strings, quote it ('{written}') if it is meant as one",
                    key_node.start_mark,
                )
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} is given twice in one mapping (first on line {first_line[key]}): keep one",
                    key_node.start_mark,
                )
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def read_config_file(path: Path) -> dict[str, Any]:
    """The file as a mapping, read strictly (see the module docstring), or a ConfigError that says
    what is wrong and on which line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), ["file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), [f"cannot read: {exc}"]) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        if not isinstance(exc, yaml.constructor.ConstructorError):
            problem = f"not valid YAML: {problem}"
        raise ConfigError(str(path), [f"{where}{problem}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), [f"the top level must be a mapping of keys, not {type(data).__name__}"])
    return data


def unknown_environment(model: type[LayeredSettings], environ: Mapping[str, str]) -> list[str]:
    """One problem per variable under ``model``'s prefix that names no top-level setting."""
    prefix = str(model.model_config.get("env_prefix", "")).lower()
    delimiter = str(model.model_config.get("env_nested_delimiter") or "__").lower()
    known = set(model.model_fields)
    problems = []
    for name in sorted(environ):
        lowered = name.lower()
        if not prefix or not lowered.startswith(prefix):
            continue
        rest = lowered[len(prefix) :]
        section = rest.split(delimiter, 1)[0]
        if section in known or _SERVICE_LINK.fullmatch(rest):
            continue
        # A bare <NAME>_PORT only by its value: OPENSHELL_GATEWAY_GRPC_PORT=7070 is a typo to report.
        if _SERVICE_LINK_PORT.fullmatch(rest) and _SERVICE_LINK_PORT_VALUE.fullmatch(environ[name]):
            continue
        problems.append(
            f"environment {name}: {section or '(nothing)'} is no setting (settings: "
            f"{', '.join(sorted(known))}; a key inside one is {prefix.upper()}SECTION{delimiter}KEY)"
        )
    return problems


def load_checked(
    model: type[SettingsT],
    *,
    file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> SettingsT:
    """``model`` from flags (``overrides``) > environment (``os.environ``) > ``file`` > defaults,
    as :func:`load_settings` builds it, after the checks it lacks; every problem found is in the
    one ConfigError raised."""
    source = str(file) if file is not None else "flags, environment and defaults"
    if file is not None:
        read_config_file(file)
    problems = unknown_environment(model, os.environ)
    try:
        config = load_settings(model, file=file, overrides=overrides)
    except ConfigError as exc:
        raise ConfigError(source, problems + exc.problems) from None
    if problems:
        raise ConfigError(source, problems)
    return config


def mask_passwords(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``."""
    return _PASSWORD_IN_URL.sub(r"\1***@", text)


def report(program: str, exc: ConfigError) -> int:
    """Say ``exc`` on stderr, one line per problem, and give the exit status of a configuration
    error (78, EX_CONFIG)."""
    print(mask_passwords(f"{program}: {exc}"), file=sys.stderr)
    return EX_CONFIG


def check_command(
    model: type[LayeredSettings],
    file: Path,
    *,
    program: str,
    overrides: Mapping[str, Any] | None = None,
    given_when_run: Mapping[str, Any] | None = None,
) -> int:
    """``config check FILE``: ``FILE`` with the environment and ``overrides`` (as ``serve`` or
    ``run`` would read them): ``ok`` and 0, or every problem and 78.

    ``given_when_run`` holds stand-ins for required top-level settings that a deployment gives on
    the command line rather than in the file (the supervisor's sandbox_id: one file serves every
    sandbox): one that no layer sets is checked with its stand-in, and the ``ok`` says so."""
    prefix = str(model.model_config.get("env_prefix", ""))
    layers = dict(overrides or {})
    missing = []
    try:
        data = read_config_file(file)
        for key, stand_in in (given_when_run or {}).items():
            in_env = any(name.lower() == f"{prefix}{key}".lower() for name in os.environ)
            if key not in data and key not in layers and not in_env:
                layers[key] = stand_in
                missing.append(f"{key}: --{key.replace('_', '-')} or {prefix}{key.upper()}")
        load_checked(model, file=file, overrides=layers)
    except ConfigError as exc:
        return report(program, exc)
    note = f" (not set in it, so run must be given {'; '.join(missing)})" if missing else ""
    print(f"{file}: ok{note}")
    return 0
