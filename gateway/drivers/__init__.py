"""Sandbox drivers: how the gateway makes a sandbox exist (a local process, or a Kubernetes pod with
the supervisor as an image volume), and what the HTTP API needs of them."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from gateway.store import SandboxRow


class ProvisionError(Exception):
    """A sandbox could not be created or deleted; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Provisioner(Protocol):
    """Creates and deletes sandboxes for the HTTP API (see gateway.provisioner)."""

    async def create(
        self,
        sandbox_id: str,
        command: Sequence[str],
        *,
        image: str | None,
        env: Mapping[str, str],
        created_by: str | None = None,
        team: str | None = None,
        may_replace: Callable[[SandboxRow], bool] | None = None,
    ) -> dict[str, Any]: ...

    async def delete(self, sandbox_id: str) -> bool: ...

    async def close(self) -> None: ...
