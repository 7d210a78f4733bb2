"""A real Keycloak for tests: the ``org.keycloak:keycloak-quarkus-dist`` distribution from Maven
Central (fetched once with ``mvn dependency:copy`` and unpacked under
``~/.cache/openshell/keycloak/<version>/``), run with ``kc.sh start-dev`` on 127.0.0.1 at free
ports, with the operators' realm (``docs/keycloak/openshell-realm.json``) imported at start.

Each run has a home of its own (``bin``, ``conf`` and the build output copied, the jars linked to
the cache), so its database, its import directory and its build never touch the cache or another
run. Keycloak 26 needs Java 21 or later: these machines carry a Temurin JDK beside the default
Java 17, and :func:`find_java_home` picks the newest JDK that is recent enough.

:class:`Keycloak` also drives the realm through the admin REST API (users, roles, groups, a test
client with direct grants, key providers): the realm file stays what operators import, with no
users and no password grant. Run the tests that use it under ``flock /tmp/openshell-keycloak.lock``
(one Keycloak at a time on a shared machine).
"""

from __future__ import annotations

import contextlib
import fcntl
import html
import html.parser
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from tests.support.procs import REPO, free_port

KEYCLOAK_VERSION = os.environ.get("OPENSHELL_KEYCLOAK_VERSION", "26.5.6")
REALM = "openshell"
REALM_FILE = REPO / "docs" / "keycloak" / "openshell-realm.json"
#: Keycloak 26 runs on Java 21 or later.
MIN_JAVA = 21
#: Start-up on a loaded 2-core machine took up to ~110 s (build + boot); beyond this it is stuck.
READY_TIMEOUT_S = 180.0


class KeycloakUnavailable(RuntimeError):
    """Keycloak cannot run here (no recent Java, no Maven, the download failed): a reason to skip."""


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "openshell" / "keycloak"


def _java_major(home: Path) -> int | None:
    """The feature version a JDK's ``release`` file names (``JAVA_VERSION="25.0.3"``), if any."""
    release = home / "release"
    if not (home / "bin" / "java").is_file() or not release.is_file():
        return None
    match = re.search(r'^JAVA_VERSION="(\d+)', release.read_text(errors="replace"), re.MULTILINE)
    return int(match.group(1)) if match else None


def find_java_home() -> Path:
    """A JDK of at least :data:`MIN_JAVA`: ``$OPENSHELL_KEYCLOAK_JAVA_HOME``, ``$JAVA_HOME``, then the
    newest under ``/usr/lib/jvm``."""
    candidates = [
        Path(value)
        for value in (os.environ.get("OPENSHELL_KEYCLOAK_JAVA_HOME"), os.environ.get("JAVA_HOME"))
        if value
    ]
    jvm = Path("/usr/lib/jvm")
    if jvm.is_dir():
        found = [(major, home) for home in jvm.iterdir() if (major := _java_major(home)) is not None]
        candidates += [home for _, home in sorted(found, reverse=True)]
    seen: list[str] = []
    for home in candidates:
        major = _java_major(home)
        if major is not None and major >= MIN_JAVA:
            return home
        seen.append(f"{home} ({major or 'not a JDK'})")
    raise KeycloakUnavailable(
        f"Keycloak {KEYCLOAK_VERSION} needs Java {MIN_JAVA}+; none found "
        f"(looked at: {', '.join(seen) or 'nothing'})"
    )


def keycloak_dist(version: str = KEYCLOAK_VERSION) -> Path:
    """The unpacked distribution, fetched and unpacked on first use (under a lock, so two runs never
    unpack into each other); a half-unpacked tree is never left where the next run would take it."""
    root = cache_root() / version
    dist = root / f"keycloak-{version}"
    if (dist / "bin" / "kc.sh").is_file():
        return dist
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (dist / "bin" / "kc.sh").is_file():
            return dist
        mvn = shutil.which("mvn")
        if mvn is None:
            raise KeycloakUnavailable("Maven (mvn) is not installed: cannot fetch keycloak-quarkus-dist")
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            artifact = f"org.keycloak:keycloak-quarkus-dist:{version}:tar.gz"
            fetched = subprocess.run(
                [mvn, "-q", "-B", "dependency:copy", f"-Dartifact={artifact}", f"-DoutputDirectory={tmp}"],
                capture_output=True,
                text=True,
                timeout=900,
                check=False,
            )
            archive = Path(tmp) / f"keycloak-quarkus-dist-{version}.tar.gz"
            if fetched.returncode != 0 or not archive.is_file():
                raise KeycloakUnavailable(
                    f"mvn could not fetch org.keycloak:keycloak-quarkus-dist:{version}:\n"
                    f"{(fetched.stdout + fetched.stderr)[-2000:]}"
                )
            unpack = Path(tmp) / "unpack"
            unpack.mkdir()
            subprocess.run(["tar", "-xzf", str(archive), "-C", str(unpack)], check=True, timeout=300)
            (unpack / f"keycloak-{version}").rename(dist)
    return dist


def _saved_build(dist: Path) -> Path:
    """Where a run's Quarkus build is kept for the next runs (beside the unpacked distribution)."""
    return dist.parent / "quarkus-build"


def _run_home(dist: Path, home: Path) -> None:
    """A home of the run's own: Keycloak writes its build (``lib/quarkus``), ``data`` and ``conf``
    there; the jars (``lib/lib``, 160 MB, only read) are a link to the cache. The build comes from
    an earlier run when there is one: Keycloak checks the build options it was made with and builds
    again only if they differ (about 10 s of the start)."""
    home.mkdir(parents=True)
    for name in ("bin", "conf", "providers", "themes"):
        shutil.copytree(dist / name, home / name, symlinks=True)
    (home / "lib").mkdir()
    for entry in (dist / "lib").iterdir():
        if entry.name == "lib":
            (home / "lib" / "lib").symlink_to(entry)
        elif entry.name == "quarkus" and _saved_build(dist).is_dir():
            shutil.copytree(_saved_build(dist), home / "lib" / "quarkus", symlinks=True)
        elif entry.is_dir():
            shutil.copytree(entry, home / "lib" / entry.name, symlinks=True)
        else:
            shutil.copy2(entry, home / "lib" / entry.name)
    (home / "data" / "import").mkdir(parents=True)
    shutil.copy2(REALM_FILE, home / "data" / "import" / REALM_FILE.name)


class AdminError(RuntimeError):
    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"Keycloak admin {method} {path}: HTTP {status}: {body[:500]}")
        self.status = status


@dataclass
class Keycloak:
    """A running Keycloak and its admin API (master realm's bootstrap admin)."""

    home: Path
    port: int
    management_port: int
    admin_password: str
    proc: subprocess.Popen[bytes] | None = None
    admin_user: str = "bootstrap-admin"
    _admin_token: tuple[str, float] | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def issuer(self) -> str:
        return f"{self.base_url}/realms/{REALM}"

    @property
    def token_endpoint(self) -> str:
        return f"{self.issuer}/protocol/openid-connect/token"

    @property
    def log_path(self) -> Path:
        return self.home / "keycloak.log"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- plain HTTP (sync: fixtures and tests call it between their own steps) ----------------

    @staticmethod
    def _http(
        method: str, url: str, *, form: dict[str, str] | None = None, body: object = None,
        token: str | None = None,
    ) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
        headers: dict[str, str] = {}
        data: bytes | None = None
        if form is not None:
            data = urllib.parse.urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        elif body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def admin_token(self) -> str:
        now = time.monotonic()
        if self._admin_token is not None and self._admin_token[1] > now:
            return self._admin_token[0]
        status, _, raw = self._http(
            "POST",
            f"{self.base_url}/realms/master/protocol/openid-connect/token",
            form={
                "grant_type": "password",
                "client_id": "admin-cli",
                "username": self.admin_user,
                "password": self.admin_password,
            },
        )
        if status != 200:
            raise AdminError("POST", "master token", status, raw.decode(errors="replace"))
        doc = json.loads(raw)
        # Renewed well before the admin token's own (60 s) lifetime ends.
        self._admin_token = (doc["access_token"], now + min(30.0, doc["expires_in"] / 2))
        return self._admin_token[0]

    def admin(self, method: str, path: str, body: object = None) -> Any:
        """``/admin/realms/openshell{path}``; the JSON answer, or the new object's id for a 201."""
        status, headers, raw = self._http(
            method, f"{self.base_url}/admin/realms/{REALM}{path}", body=body, token=self.admin_token()
        )
        if status >= 300:
            raise AdminError(method, path, status, raw.decode(errors="replace"))
        if status == 201:
            location = headers.get("Location") or headers.get("location") or ""
            return location.rsplit("/", 1)[-1]
        return json.loads(raw) if raw else None

    # -- the realm's people and clients -------------------------------------------------

    def create_user(self, username: str, *, roles: Sequence[str] = (), groups: Sequence[str] = ()) -> str:
        """A user with a password made up now (returned); realm ``roles`` and group paths."""
        password = secrets.token_urlsafe(18)
        user_id = self.admin(
            "POST",
            "/users",
            {
                "username": username,
                "enabled": True,
                "firstName": username.title(),
                "lastName": "Test",
                "email": f"{username}@example.test",
                "emailVerified": True,
                "credentials": [{"type": "password", "value": password, "temporary": False}],
                "groups": list(groups),
            },
        )
        if roles:
            reps = [self.admin("GET", f"/roles/{urllib.parse.quote(role)}") for role in roles]
            self.admin("POST", f"/users/{user_id}/role-mappings/realm", reps)
        return password

    def create_test_client(
        self, client_id: str, *, access_token_lifespan_s: int | None = None, mappers: bool = True
    ) -> str:
        """A confidential client with direct (password) grants for tests only, carrying the same
        audience and groups mappers as the realm's ``openshell-cli`` (none with ``mappers=False``);
        its secret is returned."""
        cli = self.client("openshell-cli") if mappers else {}
        secret = secrets.token_urlsafe(24)
        attributes: dict[str, str] = {}
        if access_token_lifespan_s is not None:
            attributes["access.token.lifespan"] = str(access_token_lifespan_s)
        self.admin(
            "POST",
            "/clients",
            {
                "clientId": client_id,
                "enabled": True,
                "publicClient": False,
                "secret": secret,
                "standardFlowEnabled": False,
                "directAccessGrantsEnabled": True,
                "serviceAccountsEnabled": False,
                "attributes": attributes,
                "protocolMappers": [
                    {k: v for k, v in mapper.items() if k != "id"}
                    for mapper in cli.get("protocolMappers", [])
                ],
            },
        )
        return secret

    def client(self, client_id: str) -> dict[str, Any]:
        found: list[dict[str, Any]] = self.admin("GET", f"/clients?clientId={urllib.parse.quote(client_id)}")
        if not found:
            raise AdminError("GET", f"/clients?clientId={client_id}", 404, "no such client")
        return found[0]

    def set_client_attributes(self, client_id: str, attributes: dict[str, str]) -> None:
        rep = self.client(client_id)
        rep["attributes"] = {**rep.get("attributes", {}), **attributes}
        self.admin("PUT", f"/clients/{rep['id']}", rep)

    def password_token(self, client_id: str, secret: str, username: str, password: str) -> dict[str, Any]:
        status, _, raw = self._http(
            "POST",
            self.token_endpoint,
            form={
                "grant_type": "password",
                "client_id": client_id,
                "client_secret": secret,
                "username": username,
                "password": password,
                "scope": "openid",
            },
        )
        if status != 200:
            raise AdminError("POST", "token (password grant)", status, raw.decode(errors="replace"))
        doc: dict[str, Any] = json.loads(raw)
        return doc

    # -- signing keys -----------------------------------------------------------------------

    def realm_id(self) -> str:
        rep: dict[str, Any] = self.admin("GET", "")
        return str(rep["id"])

    def key_providers(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.admin("GET", "/components?type=org.keycloak.keys.KeyProvider")
        return found

    def add_rsa_key(self, name: str, *, priority: int) -> str:
        """A new generated RSA (RS256) signing key provider; its component id."""
        component_id: str = self.admin(
            "POST",
            "/components",
            {
                "name": name,
                "providerId": "rsa-generated",
                "providerType": "org.keycloak.keys.KeyProvider",
                "parentId": self.realm_id(),
                "config": {
                    "priority": [str(priority)],
                    "enabled": ["true"],
                    "active": ["true"],
                    "algorithm": ["RS256"],
                    "keySize": ["2048"],
                },
            },
        )
        return component_id

    def remove_component(self, component_id: str) -> None:
        self.admin("DELETE", f"/components/{component_id}")

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        # kc.sh execs java in its own session: the whole group goes, nothing is left behind.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _ready(kc: Keycloak) -> bool:
    try:
        status, _, _ = kc._http("GET", f"http://127.0.0.1:{kc.management_port}/health/ready")
        if status != 200:
            return False
        # The realm's own document: ready means imported too.
        status, _, raw = kc._http("GET", f"{kc.issuer}/.well-known/openid-configuration")
        return status == 200 and json.loads(raw).get("issuer") == kc.issuer
    except (OSError, ValueError):  # not listening yet (URLError is an OSError), a half-written answer
        return False


def _save_build(kc: Keycloak, dist: Path) -> None:
    """Keeps the build this run made (it said "Updating the configuration") for the next runs; a
    copy under a temporary name first, so a reader never finds half of one."""
    if "Updating the configuration" not in kc.log_text():
        return
    saved = _saved_build(dist)
    tmp = saved.with_name(f"{saved.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(kc.home / "lib" / "quarkus", tmp)
    shutil.rmtree(saved, ignore_errors=True)
    try:
        tmp.rename(saved)
    except OSError:  # another run saved one meanwhile: as good as ours
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def running_keycloak(workdir: Path, *, timeout: float = READY_TIMEOUT_S) -> Iterator[Keycloak]:
    """Raises KeycloakUnavailable when it cannot run here, RuntimeError when it failed to start."""
    java_home = find_java_home()
    dist = keycloak_dist()
    home = workdir / "keycloak-home"
    _run_home(dist, home)
    kc = Keycloak(
        home=home, port=free_port(), management_port=free_port(), admin_password=secrets.token_urlsafe(18)
    )
    env = {
        **os.environ,
        "JAVA_HOME": str(java_home),
        "KC_BOOTSTRAP_ADMIN_USERNAME": kc.admin_user,
        "KC_BOOTSTRAP_ADMIN_PASSWORD": kc.admin_password,
        # Keycloak's default takes 70 % of the machine's memory; it needs ~450 MiB.
        "JAVA_OPTS_KC_HEAP": "-Xms64m -Xmx768m",
    }
    argv = [
        str(home / "bin" / "kc.sh"), "start-dev",
        "--db=dev-file",
        "--http-host=127.0.0.1", f"--http-port={kc.port}",
        # One issuer whatever Host a request carries (tokens name it; the gateway compares it).
        f"--hostname={kc.base_url}",
        "--http-management-port", str(kc.management_port),
        "--health-enabled=true",
        "--import-realm",
    ]  # fmt: skip
    with kc.log_path.open("ab") as out:
        kc.proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, cwd=home, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + timeout
        while not _ready(kc):
            if kc.proc.poll() is not None:
                raise RuntimeError(f"Keycloak exited with {kc.proc.returncode}:\n{kc.log_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"Keycloak not ready after {timeout:.0f}s:\n{kc.log_text()[-4000:]}")
            time.sleep(1.0)
        _save_build(kc, dist)
        yield kc
    finally:
        kc.stop()


# -- a person at Keycloak's pages (the device flow's verification), through its HTML forms -----


class _Forms(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, Any]] = []
        self._current: dict[str, Any] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        if tag == "form":
            self._current = {"action": attr.get("action") or "", "fields": {}, "submits": []}
            self.forms.append(self._current)
        elif tag in ("input", "button") and self._current is not None:
            kind = (attr.get("type") or ("submit" if tag == "button" else "text")).lower()
            name = attr.get("name")
            if kind == "submit":
                self._current["submits"].append(name)
            elif name:
                self._current["fields"][name] = attr.get("value") or ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._current = None


async def approve_device_login(
    verification_uri: str, user_code: str, *, username: str, password: str, base_url: str
) -> str:
    """Does what a person does with the code the CLI printed: opens the verification page, enters
    the code, signs in, grants access. Follows each page's own form action (no URL is guessed).
    Returns the last page's text (Keycloak's "you may close this window")."""
    # Keycloak marks its cookies Secure even on http; a browser treats 127.0.0.1 as a secure origin.
    jar = aiohttp.CookieJar(unsafe=True, treat_as_secure_origin=[base_url])
    # A browser asks for HTML: the verification page's POST shares its path with the device
    # authorization endpoint, and Keycloak picks the HTML handler by the Accept header.
    headers = {"Accept": "text/html"}
    async with aiohttp.ClientSession(cookie_jar=jar, headers=headers) as http:
        async with http.get(verification_uri) as resp:
            text, url = await resp.text(), resp.url
        for _ in range(8):
            parser = _Forms()
            parser.feed(text)
            if not parser.forms:
                return text
            form = parser.forms[0]
            data: dict[str, str] = dict(form["fields"])
            if "device_user_code" in data:
                data["device_user_code"] = user_code
            if "username" in data:
                data["username"] = username
                data["password"] = password
            if "accept" in form["submits"]:
                data["accept"] = "Yes"
            async with http.post(url.join(URL(html.unescape(form["action"]))), data=data) as resp:
                text, url = await resp.text(), resp.url
        raise AssertionError(f"Keycloak's pages did not end the login after 8 forms; last page at {url}")
