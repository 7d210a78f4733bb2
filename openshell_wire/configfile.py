"""Layered configuration shared by both components: flags > environment > file > defaults.

Each component declares one typed model (a subclass of :class:`LayeredSettings`); this module
feeds it. The YAML file is read here with errors that name the file, line and column; values
from the environment come through pydantic-settings (``<PREFIX>SECTION__KEY``); flags arrive as
the keyword arguments of the model, which pydantic-settings ranks highest. Every validation
problem is reported at once, each with its dotted key path, as a :class:`ConfigError`.

It lives in the shared package (not in either component) because the supervisor and the
gateway must read files with exactly the same rules and errors, and they never import each
other.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
)

log = logging.getLogger(__name__)
_FILE_DATA: ContextVar[Mapping[str, Any] | None] = ContextVar("openshell_config_file", default=None)
_USE_ENV: ContextVar[bool] = ContextVar("openshell_config_use_env", default=True)


class ConfigError(Exception):
    """Invalid configuration; ``problems`` holds one readable line per problem."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        super().__init__(f"invalid configuration ({source}):\n" + "\n".join(f"  - {p}" for p in problems))


class _FileSource(PydanticBaseSettingsSource):
    """The parsed YAML file, ranked below the environment."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return (_FILE_DATA.get() or {}).get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_FILE_DATA.get() or {})


def _layer_name(source: PydanticBaseSettingsSource) -> str:
    if isinstance(source, InitSettingsSource):
        return "flags"
    if isinstance(source, EnvSettingsSource):
        return "environment"
    if isinstance(source, _FileSource):
        return "file"
    return type(source).__name__


def rename_deprecated(data: Mapping[str, Any], renames: Mapping[str, str], *, layer: str) -> dict[str, Any]:
    """``data`` (one layer's values) with each deprecated dotted key moved to its new name.

    Done per layer, before the layers are merged, so the usual order (flags > environment > file)
    decides between an old name in one layer and the new name in another. Both names with different
    values in one layer are a ConfigError. The mappings on the way are copied, never changed in
    place."""
    out = dict(data)
    for old, new in renames.items():
        *parents, old_leaf = old.split(".")
        new_leaf = new.split(".")[-1]
        node: dict[str, Any] = out
        for part in parents:
            child = node.get(part)
            if not isinstance(child, Mapping):
                break
            node[part] = node = dict(child)
        else:
            if old_leaf not in node:
                continue
            value = node.pop(old_leaf)
            if new_leaf in node and node[new_leaf] != value:
                raise ConfigError(layer, [f"{old} is the deprecated name of {new}: set {new} only"])
            node[new_leaf] = value
            log.warning("configuration (%s): %s is deprecated, use %s", layer, old, new)
    return out


class _Renamed(PydanticBaseSettingsSource):
    """One layer of a model with deprecated keys, with them renamed (:func:`rename_deprecated`)."""

    def __init__(
        self, settings_cls: type[BaseSettings], inner: PydanticBaseSettingsSource, renames: Mapping[str, str]
    ) -> None:
        super().__init__(settings_cls)
        self._inner = inner
        self._renames = renames

    def _set_current_state(self, state: dict[str, Any]) -> None:
        super()._set_current_state(state)
        self._inner._set_current_state(state)

    def _set_settings_sources_data(self, states: dict[str, dict[str, Any]]) -> None:
        super()._set_settings_sources_data(states)
        self._inner._set_settings_sources_data(states)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._inner.get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        return rename_deprecated(self._inner(), self._renames, layer=_layer_name(self._inner))


class LayeredSettings(BaseSettings):
    """Base of each component's config model: flags (init kwargs) > env > file > defaults."""

    #: Deprecated dotted key -> its new dotted key (same section). Each layer is renamed on its own
    #: before the merge: renaming after it (in a validator) would see an old name from the file and
    #: the new one from a flag as a conflict instead of letting the flag win.
    deprecated_keys: ClassVar[Mapping[str, str]] = {}

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        layers: tuple[PydanticBaseSettingsSource, ...] = (init_settings,)
        if _USE_ENV.get():
            layers += (env_settings,)
        layers += (_FileSource(settings_cls),)
        if not cls.deprecated_keys:
            return layers
        return tuple(_Renamed(settings_cls, layer, cls.deprecated_keys) for layer in layers)


def read_yaml(path: Path) -> dict[str, Any]:
    """The file as a mapping, or a ConfigError that says what is wrong and where."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), ["file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), [f"cannot read: {exc}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(str(path), [f"{where}not valid YAML: {problem}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), [f"the top level must be a mapping of keys, not {type(data).__name__}"])
    return data


def format_validation_error(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(top level)"
        shown = err.get("input")
        got = "" if err["type"] in ("missing", "extra_forbidden") else f" (got {shown!r})"
        if err["type"] == "extra_forbidden":
            problems.append(f"{path}: unknown key")
        else:
            problems.append(f"{path}: {err['msg']}{got}")
    return problems


@contextmanager
def _layers(file_data: Mapping[str, Any], use_env: bool) -> Iterator[None]:
    t1 = _FILE_DATA.set(file_data)
    t2 = _USE_ENV.set(use_env)
    try:
        yield
    finally:
        _USE_ENV.reset(t2)
        _FILE_DATA.reset(t1)


SettingsT = TypeVar("SettingsT", bound=LayeredSettings)


def load_settings(
    model: type[SettingsT],
    *,
    file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    use_env: bool = True,
) -> SettingsT:
    """Build ``model`` from flags (``overrides``) > env > ``file`` > defaults, or raise ConfigError."""
    data = read_yaml(file) if file is not None else {}
    source = str(file) if file is not None else "flags, environment and defaults"
    with _layers(data, use_env):
        try:
            return model(**dict(overrides or {}))
        except ValidationError as exc:
            raise ConfigError(source, format_validation_error(exc)) from None


def parse_set_flags(values: Sequence[str]) -> dict[str, Any]:
    """``["journal.max_bytes=1024", ...]`` as a nested mapping; values are read as YAML scalars."""
    result: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError("--set", [f"{item!r}: expected KEY=VALUE, e.g. journal.max_bytes=1048576"])
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        merge_into(result, key.strip().split("."), value)
    return result


def merge_into(target: dict[str, Any], path: Sequence[str], value: Any) -> None:
    node = target
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError("flags", [f"{'.'.join(path)}: conflicts with a value set for {part}"])
        node = child
    node[path[-1]] = value


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


#: sysexits' EX_CONFIG: both components exit with it for a configuration error.
EX_CONFIG = 78


def config_command(model: type[LayeredSettings], subcommand: str, file: Path | None) -> int:
    """``config schema`` and ``config check FILE``, the same for both components' CLIs."""
    if subcommand == "schema":
        print(json.dumps(model.model_json_schema(), indent=2))
        return 0
    assert file is not None, "config check needs a file"
    try:
        load_settings(model, file=file, use_env=False)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EX_CONFIG
    print(f"{file}: ok")
    return 0
