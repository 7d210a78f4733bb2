"""`helm test` (tests.sandbox.enabled): a sandbox made through the gateway's HTTP API connects.

Creates one sandbox (POST /api/v1/sandboxes), waits until the API shows its supervisor's session
(`connected`), then deletes it, whatever happened. It proves the path a real sandbox takes: the
gateway's driver creates the pod (its RBAC, the sandbox namespace's Pod Security admission, the
supervisor image pulled or mounted), the supervisor dials the gateway (NetworkPolicies, TLS, its
projected token) and its session is taken. Standard library only: it runs in the gateway image.

Environment: OPENSHELL_TEST_API (the API's base URL), OPENSHELL_TEST_SANDBOX_ID,
OPENSHELL_TEST_COMMAND (a JSON list), OPENSHELL_TEST_IMAGE (empty: the gateway's default image),
OPENSHELL_TEST_TIMEOUT_S, OPENSHELL_TEST_TOKEN (a bearer token, with OIDC), OPENSHELL_TEST_CA_FILE
(the gateway's CA, with TLS). Exit 0: connected; 1: not connected in time or exited first; 2: the
API refused or could not be reached.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from typing import Any


class ApiFailure(Exception):
    """The API refused a call or could not be reached; the message says which and why."""


def call(method: str, url: str, body: dict[str, Any] | None = None) -> Any:
    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    token = os.environ.get("OPENSHELL_TEST_TOKEN", "")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    ca_file = os.environ.get("OPENSHELL_TEST_CA_FILE") or None
    context = ssl.create_default_context(cafile=ca_file) if url.startswith("https:") else None
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            text = response.read().decode()
    except urllib.error.HTTPError as exc:
        raise ApiFailure(
            f"{method} {url}: HTTP {exc.code}: {exc.read().decode(errors='replace')[:500]}"
        ) from exc
    except (urllib.error.URLError, OSError) as exc:
        raise ApiFailure(f"{method} {url}: {exc}") from exc
    return json.loads(text) if text else None


def main() -> int:
    api = os.environ["OPENSHELL_TEST_API"].rstrip("/")
    sandbox_id = os.environ["OPENSHELL_TEST_SANDBOX_ID"]
    command = json.loads(os.environ.get("OPENSHELL_TEST_COMMAND", '["sleep", "60"]'))
    image = os.environ.get("OPENSHELL_TEST_IMAGE", "")
    timeout_s = float(os.environ.get("OPENSHELL_TEST_TIMEOUT_S", "180"))
    url = f"{api}/api/v1/sandboxes/{sandbox_id}"
    body: dict[str, Any] = {"id": sandbox_id, "command": command}
    if image:
        body["image"] = image
    try:
        call("POST", f"{api}/api/v1/sandboxes", body)
    except ApiFailure as exc:
        print(f"sandbox test: creating {sandbox_id} failed: {exc}", file=sys.stderr)
        return 2
    print(
        f"sandbox test: created {sandbox_id}; waiting up to {timeout_s:.0f}s for its supervisor", flush=True
    )
    try:
        deadline = time.monotonic() + timeout_s
        shown: Any = None
        while time.monotonic() < deadline:
            shown = call("GET", url)
            if shown.get("connected"):
                print(f"sandbox test: {sandbox_id} connected (session {shown.get('session_id')})", flush=True)
                return 0
            if shown.get("exit_code") is not None:
                print(f"sandbox test: {sandbox_id} exited before connecting: {shown}", file=sys.stderr)
                return 1
            time.sleep(1)
        print(f"sandbox test: {sandbox_id} not connected after {timeout_s:.0f}s: {shown}", file=sys.stderr)
        return 1
    except ApiFailure as exc:
        print(f"sandbox test: {exc}", file=sys.stderr)
        return 2
    finally:
        try:
            call("DELETE", url)
            print(f"sandbox test: deleted {sandbox_id}", flush=True)
        except ApiFailure as exc:
            print(f"sandbox test: deleting {sandbox_id} failed (delete it by hand): {exc}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
