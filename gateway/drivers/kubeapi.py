"""The API server's non-resource paths (``/version``, ``/apis``), which lightkube has no call for.

They go through lightkube's own HTTP client, configured with the kubeconfig's server, credentials
and CA, so they authenticate exactly as the driver's other calls. That client is private to
lightkube: :func:`lightkube_http` says so clearly if an upgrade moves it (never an AttributeError
at every creation), and tests/unit/test_injection_rule.py fails at once when it does.
"""

from __future__ import annotations

from typing import Any

import httpx2 as httpx
from lightkube import AsyncClient


class NonResourceError(RuntimeError):
    """The path could not be read (unreachable, refused, not JSON): the message says which."""


def lightkube_http(client: AsyncClient) -> httpx.AsyncClient:
    try:
        http = client._client._client
    except AttributeError as exc:
        moved = f"lightkube's HTTP client is not where this gateway expects it: {exc}"
        raise NonResourceError(moved) from None
    return http


async def get_json(client: AsyncClient, path: str) -> Any:
    """``GET path`` on the API server, its JSON body."""
    try:
        response = await lightkube_http(client).get(path)
        response.raise_for_status()
        return response.json()
    except (httpx.HTTPError, ValueError, OSError) as exc:
        raise NonResourceError(f"cannot read the API server's {path}: {exc}") from None
