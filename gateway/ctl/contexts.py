"""The client config file: named contexts (an API URL, a token file, ``insecure``) and the
current one, so that the API address and the credentials are said once, not on every command.

The file is ``$OPENSHELL_CONFIG`` if set, else ``config.yaml`` in ``$XDG_CONFIG_HOME/openshell``
(``~/.config/openshell``), beside the login cache (:mod:`gateway.clientauth`)::

    current_context: prod
    contexts:
      prod:
        api: https://gateway.example.com
        token_file: prod.token   # optional; a relative path is beside this file
      dev:
        api: http://10.0.0.7:7080
        insecure: true      # tokens over plain http to a host that is not loopback

Which API a command talks to, first that applies: ``--api``; ``--context NAME``'s api;
``$OPENSHELL_API``; the api of ``$OPENSHELL_CONTEXT``'s context, else of ``current_context``;
``http://127.0.0.1:7080``. A context's ``token_file`` and ``insecure`` apply only when its api is
the one used (a token is never sent to another address than the one it was configured for), and
rank below ``--token-file``/``--insecure`` and ``$OPENSHELL_TOKEN``.

A missing file is an empty one; a file that does not parse or holds an unknown key, or a context
named that it does not hold, is a :class:`~openshell_wire.configfile.ConfigError` naming the
file and the key (exit status 78). ``config set-context``, ``use-context`` and
``delete-context`` rewrite the file (0600, atomically; one that cannot be written is the same
exit status, naming it); comments in it are not kept.

A relative ``token_file`` in the file is read beside the file (as kubeconfig's paths are), not
from the directory a command runs in; ``config set-context --token-file`` stores its FILE made
absolute from where it was typed, so what one types is what is read.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.clientauth import config_dir
from openshell_wire.configfile import ConfigError, format_validation_error, read_yaml

CONFIG_ENV = "OPENSHELL_CONFIG"
API_ENV = "OPENSHELL_API"
CONTEXT_ENV = "OPENSHELL_CONTEXT"
DEFAULT_API = "http://127.0.0.1:7080"


def check_api_url(value: str) -> str:
    """An http(s) URL with a host, without a trailing slash; ValueError saying what is wrong."""
    try:
        parsed = urllib.parse.urlsplit(value)
        port = parsed.port  # a port out of range or not a number raises here
    except ValueError as exc:
        raise ValueError(f"not a URL ({exc}): {value!r}") from None
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        hint = "" if "://" in value else " (it needs its scheme, as in http://HOST:PORT)"
        raise ValueError(f"not an http:// or https:// URL with a host: {value!r}{hint}")
    if any(c.isspace() for c in parsed.netloc) or port == 0:
        raise ValueError(f"not a host and port one can connect to: {value!r}")
    if parsed.query or parsed.fragment:
        raise ValueError(f"an API URL has no query or fragment: {value!r}")
    return value.rstrip("/")


class Context(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api: str = Field(description="The gateway's HTTP API URL.")
    token_file: Path | None = Field(None, description="A file holding the bearer token ('~' expanded).")
    insecure: bool = Field(False, description="Send tokens over plain http to a host that is not loopback.")

    @field_validator("api")
    @classmethod
    def _api(cls, value: str) -> str:
        return check_api_url(value)

    @field_validator("token_file")
    @classmethod
    def _token_file(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None


class ClientConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    current_context: str | None = None
    contexts: dict[str, Context] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _current_exists(self) -> ClientConfig:
        if self.current_context is not None and self.current_context not in self.contexts:
            raise ValueError(f"current_context {self.current_context!r} is not one of the contexts")
        return self


def config_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    given = env.get(CONFIG_ENV)
    return Path(given).expanduser() if given else config_dir(env) / "config.yaml"


def load(path: Path) -> ClientConfig:
    """The file's config (empty when there is no file); ConfigError naming the file and key."""
    if not path.exists():
        return ClientConfig()
    data = read_yaml(path)
    try:
        return ClientConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(str(path), problems(exc)) from None


def problems(exc: ValidationError) -> list[str]:
    """One line per problem, by key path (pydantic's "Value error, " prefix dropped)."""
    return [p.replace(": Value error, ", ": ", 1) for p in format_validation_error(exc)]


def save(path: Path, config: ClientConfig) -> None:
    """Write ``config`` to ``path`` atomically, readable by its owner only; ConfigError naming
    the file when it cannot be written (its directory a file, not writable, a full disk)."""
    try:
        _write(path, config)
    except OSError as exc:
        raise ConfigError(
            str(path), [f"cannot write: {exc.strerror or exc}: {exc.filename or path}"]
        ) from None


def _write(path: Path, config: ClientConfig) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    doc: dict[str, Any] = config.model_dump(mode="json", exclude_defaults=True)
    text = yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@dataclass(frozen=True, slots=True)
class Target:
    """What an API command talks to, and how."""

    api: str
    #: Where ``api`` came from, for messages: ``--api``, ``$OPENSHELL_API``, ``context NAME``, default.
    source: str
    #: The context whose api is used (its token_file and insecure apply), else None.
    context: str | None = None
    token_file: Path | None = None
    insecure: bool = False


def resolve(
    *,
    api: str | None,
    context: str | None,
    env: Mapping[str, str] | None = None,
    path: Path | None = None,
) -> Target:
    """The API (and the context's token file and ``insecure``) by the rule in the module's docstring.
    ConfigError: a bad file, an unknown context, a bad URL in a flag or the environment."""
    env = os.environ if env is None else env
    path = path or config_path(env)
    if api:
        try:
            return Target(check_api_url(api), "--api")
        except ValueError as exc:
            raise ConfigError("--api", [str(exc)]) from None
    config = load(path) if context or not env.get(API_ENV) else ClientConfig()
    if context:
        return _from_context(config, context, path=path, named_by="--context")
    if env.get(API_ENV):
        try:
            return Target(check_api_url(env[API_ENV]), f"${API_ENV}")
        except ValueError as exc:
            raise ConfigError(f"${API_ENV}", [str(exc)]) from None
    if env.get(CONTEXT_ENV):
        return _from_context(config, env[CONTEXT_ENV], path=path, named_by=f"${CONTEXT_ENV}")
    if config.current_context is not None:
        return _from_context(config, config.current_context, path=path, named_by="current_context")
    return Target(DEFAULT_API, "default")


def _from_context(config: ClientConfig, name: str, *, path: Path, named_by: str) -> Target:
    found = config.contexts.get(name)
    if found is None:
        known = ", ".join(sorted(config.contexts)) or "none"
        where = "" if path.exists() else " (the file does not exist)"
        raise ConfigError(
            str(path), [f"contexts.{name}: no such context, named by {named_by}{where}; known: {known}"]
        )
    token_file = found.token_file
    if token_file is not None and not token_file.is_absolute():
        token_file = path.parent / token_file  # as kubeconfig's paths: beside the file, not the cwd
    return Target(found.api, f"context {name}", context=name, token_file=token_file, insecure=found.insecure)
