"""People: who a verified token names, their role, and the one rule of what they may do.

A token's claims give the caller (:class:`Person`): a username (``auth.oidc.username_claim``, else
``sub``), teams (the groups at ``team_claim`` under ``team_prefix``, such as ``/teams/a``, never a
name bound to a role; sorted) and one role, the
highest of those the names found at ``role_claims`` map to through ``auth.oidc.roles``:

- ``viewer``: reads (sandboxes, their logs, their commands);
- ``operator``: also creates and deletes sandboxes and sends them commands;
- ``admin``: everything, on every sandbox.

Non-admins see and act only on the sandboxes they created or whose team is one of theirs
(:func:`may_see`, and :func:`scope_of` for the list, filtered in the query so that paging stays
right). Anything else is answered as if it did not exist (404). Ids share one namespace, so a
create of a taken id still says it is taken (409, nothing more about another's sandbox), and an
id re-created by someone who may not see its current sandbox is refused so: that would hand
them the earlier generations' logs and commands. A caller whose token maps to no role is refused
everything (403).

Without OIDC (``auth.oidc.issuer_url`` unset) nobody is asked for a token and every caller is
:data:`NOBODY_ADMIN`: the configuration allows that only on a loopback listener, or when
``auth.allow_unauthenticated_api`` says so.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any

from gateway.auth.oidc import OidcVerifier
from gateway.config import OidcSettings
from gateway.store.sandboxes import Owners


class Role(IntEnum):
    """Ordered: a higher role can do everything a lower one can."""

    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()


class Action(StrEnum):
    READ = "read"  # list, get, logs, list and read commands
    CREATE = "create"  # create a sandbox
    DELETE = "delete"  # delete a sandbox
    COMMAND = "command"  # send a sandbox a command


#: The least role each action needs.
REQUIRED_ROLE: dict[Action, Role] = {
    Action.READ: Role.VIEWER,
    Action.CREATE: Role.OPERATOR,
    Action.DELETE: Role.OPERATOR,
    Action.COMMAND: Role.OPERATOR,
}


@dataclass(frozen=True, slots=True)
class Person:
    """A caller of the HTTP API."""

    #: What sandboxes record as their creator; None for a caller without a token.
    username: str | None
    role: Role | None
    teams: tuple[str, ...] = ()

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    def may(self, action: Action) -> bool:
        return self.role is not None and self.role >= REQUIRED_ROLE[action]


#: Every caller when the API takes no tokens (no OIDC configured).
NOBODY_ADMIN = Person(username=None, role=Role.ADMIN)


def scope_of(person: Person) -> Owners | None:
    """What the sandbox list is filtered by (in the query); None: everything (an admin)."""
    return None if person.is_admin else Owners(created_by=person.username, teams=person.teams)


def may_see(person: Person, *, created_by: str | None, team: str | None) -> bool:
    """Whether ``person`` may see (and, role permitting, act on) a sandbox with these owners."""
    if person.is_admin:
        return True
    if person.username is not None and created_by == person.username:
        return True
    return team is not None and team in person.teams


def claim_values(claims: Mapping[str, Any], path: str) -> list[str]:
    """The string values at a dotted claim path (``resource_access.openshell.roles``): a list of
    strings, or one string; anything else there (or nothing) gives none."""
    node: object = claims
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return []
        node = node[part]
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [v for v in node if isinstance(v, str)]
    return []


def role_of(names: Iterable[str], settings: OidcSettings) -> Role | None:
    """The highest role any of ``names`` is bound to (``auth.oidc.roles``), or None."""
    found = set(names)
    bindings = settings.roles
    for role, bound in (
        (Role.ADMIN, bindings.admin),
        (Role.OPERATOR, bindings.operator),
        (Role.VIEWER, bindings.viewer),
    ):
        if found.intersection(bound):
            return role
    return None


def person_of(claims: Mapping[str, Any], settings: OidcSettings) -> Person:
    """The caller a verified token's claims name."""
    names = [name for path in settings.role_claims for name in claim_values(claims, path)]
    username = next(iter(claim_values(claims, settings.username_claim)), None)
    if not username:
        username = next(iter(claim_values(claims, "sub")), None)
    prefix = settings.team_prefix
    bound = {*settings.roles.admin, *settings.roles.operator, *settings.roles.viewer}
    # Only groups under team_prefix are teams: a role group (/openshell-operators) or a realm's
    # default group would otherwise make everybody holding it team-mates. Sorted, because the
    # first team is a sandbox's default and Keycloak promises no order.
    teams = tuple(
        sorted(
            {
                name
                for name in claim_values(claims, settings.team_claim)
                if name.startswith(prefix) and name != prefix and name not in bound
            }
        )
    )
    return Person(username=username or None, role=role_of(names, settings), teams=teams)


class PeopleAuth:
    """The HTTP API's authenticator: a bearer token in, a :class:`Person` out (or
    :class:`~gateway.auth.oidc.TokenRefused`). Owns the OIDC verifier: :meth:`close` ends it."""

    def __init__(self, settings: OidcSettings, *, verifier: OidcVerifier | None = None) -> None:
        self.settings = settings
        self.verifier = verifier if verifier is not None else OidcVerifier(settings)

    async def person(self, token: str) -> Person:
        return person_of(await self.verifier.verify(token), self.settings)

    def discovery(self) -> dict[str, Any]:
        """What ``GET /api/v1/auth`` tells clients (the CLI's device flow needs the issuer and
        its public client)."""
        s = self.settings
        return {
            "oidc": True,
            "issuer": s.issuer_url,
            "cli_client_id": s.cli_client_id,
            "audience": list(s.audience),
        }

    async def close(self) -> None:
        await self.verifier.close()
