"""Creating and deleting sandboxes through the configured driver, and following what it sees.

The HTTP API's ``POST /api/v1/sandboxes`` and ``DELETE /api/v1/sandboxes/{id}`` land here. A
sandbox is registered in the store first (the insert decides between two creates of one id, and
the supervisor's hello then finds the row), then created by the driver; if anything goes wrong
there, the registration this call made is taken back and the caller gets the reason.

An id can be created again once its sandbox is gone: once the watch has seen its pod deleted
(``driver_state`` ``Deleted``), or when its create failed and the create itself took its
registration back (``Failed`` with ``released``). The row then becomes the new sandbox's, as the
next generation; the old one's events stay readable under theirs. A delete that is still under way
(the pod terminating, its supervisor perhaps still delivering) keeps the id taken: until then a
create answers 409. So does a create that got no pod within ``CREATE_DEADLINE_S`` (marked
``Failed`` by the watch when it lists the pods, or still ``Creating``): it may still be running,
on this replica or another, and freeing the id would let a second create build the same pod; a
DELETE frees it once the driver finds no pod (a ``Creating`` row only past the deadline, so a
create still in flight keeps its id). With several replicas the deadline is stamped and judged on
the database's clock (:meth:`LeadershipStore.now`): the create, the leader's list and the DELETE
may run on three replicas, and a clock ahead on one of them must not judge another's create old.
Every write on behalf of one create is conditional on its generation, so a slow create cannot
write over a later one's row.

What the driver or registry said about a failure goes into ``driver_state``, which the API shows,
with anything that looks like a credential (URL userinfo, tokens, passwords) masked.

For the Kubernetes driver a background task follows the sandbox pods: it lists them (recording
each pod's phase and reason in its sandbox's ``driver_state``, and marking sandboxes whose pods
are gone as ``Deleted``), then watches from that list's resourceVersion. After an error it waits
(with backoff) and resumes the watch from the resourceVersion of the last event it *recorded* (an
event whose write failed is delivered again); a 410 Gone (that version is too old) lists again.
:meth:`close` cancels it.

With several replicas (``election`` set, as the gateway does) the follower runs only on the leader
(:mod:`gateway.leader`): one pod watch in the cluster, and its writes are conditional on the
leader's term, so a paused ex-leader that wakes up writes nothing. A new leader starts with a full
list, so what changed while no one (or a dying leader) watched is recorded: the list is the state,
not a replay of events. Creates and deletes are per request and run on any replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from gateway.config import KubernetesDriverSettings, SupervisorAuthSettings
from gateway.drivers import ProvisionError
from gateway.drivers.kubernetes import KubernetesDriver, KubernetesDriverError, PodState
from gateway.drivers.podspec import PodSpecError, SandboxRequest, pod_name
from gateway.drivers.registry import RegistryError
from gateway.leader import Election, LeaderElector
from gateway.store import SandboxRow, SandboxStore, StoreError
from gateway.store.db import utcnow
from gateway.store.leadership import LeaderTerm, NotLeader

log = logging.getLogger(__name__)

DRIVER = "kubernetes"
#: A sandbox still "Creating" without a pod this long after its registration has failed.
CREATE_DEADLINE_S = 120.0


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _gone(row: SandboxRow) -> bool:
    """Whether the sandbox that has this id now is gone, so the id may be created again: its pod
    was seen deleted, or its create failed and took its registration back (not a create that is
    only late: it may still make its pod; nor a Failed pod, which still exists)."""
    if row.driver != DRIVER:
        return False
    state = row.driver_state or {}
    phase = state.get("phase")
    return phase == "Deleted" or (phase == "Failed" and state.get("released") is True)


def _never_got_pod(state: Mapping[str, Any], *, now: datetime) -> bool:
    """Whether a sandbox's create never got its pod: marked ``Failed`` by the deadline, or still
    ``Creating`` past it (then it is no longer in flight: a create has its pod within moments)."""
    if "pod" in state:
        return False
    phase = state.get("phase")
    if phase == "Failed":
        return True
    since = _parse_time(state.get("at"))
    return phase == "Creating" and since is not None and (now - since).total_seconds() > CREATE_DEADLINE_S


# What may carry a credential in a driver's or registry's error text: the userinfo of a URL, an
# Authorization header's value, and key=value or "key": "value" pairs of secret-sounding keys.
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]*@")
_AUTH_VALUE = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+")
_SECRET_PAIR = re.compile(
    r"""(?i)((?:token|password|passwd|secret|credential|api[_-]?key|auth)[a-z_]*["']?\s*[=:]\s*["']?)[^\s"'&,;]+"""
)


def redact(text: str) -> str:
    """``text`` with whatever looks like a credential replaced by ``***``."""
    text = _URL_USERINFO.sub(r"\1***@", text)
    text = _AUTH_VALUE.sub(r"\1 ***", text)
    return _SECRET_PAIR.sub(r"\1***", text)


def _termed(doc: dict[str, Any], leader: LeaderTerm | None) -> dict[str, Any]:
    """``doc`` with the term of the leader recording it (``leader_term``), when there is one: which
    leader wrote a row is visible in the API, and a stale write would show an older term."""
    return doc if leader is None else {**doc, "leader_term": leader.term}


def _status(exc: KubernetesDriverError) -> int:
    """The HTTP status for a driver failure: the caller's fault (4xx) or the upstream's (502)."""
    if exc.status == 409:
        return 409
    if exc.status in (400, 422):
        return 400
    return 502


@dataclass
class KubernetesProvisioner:
    settings: KubernetesDriverSettings
    sandboxes: SandboxStore
    driver: KubernetesDriver | None = None
    #: The projected token's audience and expiry in the pods (unset: the defaults).
    auth: SupervisorAuthSettings | None = None
    #: Set: the pod watch runs only while this replica leads (gateway/leader.py). None: always
    #: (one gateway alone, e.g. the unit tests).
    election: Election | None = None
    _watcher: asyncio.Task[None] | None = field(default=None, init=False)
    _elector: LeaderElector | None = field(default=None, init=False)

    async def start(self) -> None:
        if self.driver is None:
            self.driver = KubernetesDriver(self.settings, auth=self.auth)
        # A client config that cannot be loaded is a configuration error: raised, the gateway does
        # not start. An API that does not answer yet is not: it is logged and retried.
        self.driver.client  # noqa: B018 - builds the client from the kubeconfig or in-cluster credentials
        try:
            await self.driver.check_access()
        except KubernetesDriverError as exc:
            # Not fatal: the API may come back; creates answer with the reason meanwhile.
            log.error("kubernetes driver cannot reach its namespace: %s", exc)
        else:
            # Image volume or init container, from the cluster's answers; logged. Unanswered (the
            # API down): decided at the first creation instead. Never a reason not to start.
            try:
                await self.driver.choose_injection()
            except Exception as exc:
                log.warning("cannot choose the supervisor's injection now (%r); the first creation will", exc)
        if self.settings.supervisor.gateway_ca_file is not None:
            # Supervisors verify the gateway against this CA: published now and on every change.
            self.driver.start_gateway_ca_publisher()
        if self.election is None:
            self._watcher = asyncio.create_task(self._follow(None), name="kubernetes-pod-watch")
        else:
            # The elector owns the watch's task: started when this replica leads, cancelled when
            # it stops leading.
            self._elector = LeaderElector(
                self.driver.client,
                namespace=self.election.namespace(self.settings.namespace),
                identity=self.election.identity,
                settings=self.election.settings,
                store=self.election.store,
                lead=self._follow,
            )
            self._elector.start()

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
    ) -> dict[str, Any]:
        assert self.driver is not None, "start() first"
        request = SandboxRequest(sandbox_id=sandbox_id, command=list(command), image=image, env=dict(env))
        spec = {"image": image or self.settings.pod.default_image, "command": list(command)}
        generation = await self.sandboxes.create(
            sandbox_id,
            driver=DRIVER,
            spec=spec,
            # On the clock CREATE_DEADLINE_S is judged with, whichever replica judges it.
            driver_state={"phase": "Creating", "at": (await self._now()).isoformat()},
            replaces=_gone,
            may_replace=may_replace,
            created_by=created_by,
            team=team,
        )
        if generation is None:
            raise ProvisionError(409, await self._taken(sandbox_id))
        try:
            created = await self.driver.create(request)
        except BaseException as exc:
            # This call registered the id: take it back whatever went wrong, cancellation included,
            # so the id is free again and no row claims a pod that does not exist.
            await asyncio.shield(self._forget(sandbox_id, generation, exc))
            if isinstance(exc, PodSpecError):
                raise ProvisionError(400, str(exc)) from None
            if isinstance(exc, KubernetesDriverError):
                raise ProvisionError(_status(exc), redact(str(exc))) from None
            if isinstance(exc, RegistryError):
                status = 400 if exc.caller_fault else 503 if exc.busy else 502
                raise ProvisionError(status, redact(str(exc))) from None
            if isinstance(exc, Exception):
                log.exception("sandbox %s: the Kubernetes driver failed unexpectedly", sandbox_id)
                raise ProvisionError(502, redact(f"the Kubernetes driver failed: {exc!r}")) from None
            raise
        spec = {**spec, "image": created.image or spec["image"], "command": list(created.command)}
        if created.command_from_image:
            spec["command_from_image"] = created.command_from_image
        # The pod's uid binds its projected token to this generation (gateway/auth/supervisors.py).
        await self.sandboxes.set_spec(
            sandbox_id, spec, generation=generation, pod_uid=created.pod_uid or None
        )
        answer: dict[str, Any] = {
            "id": sandbox_id,
            "generation": generation,
            "pod": created.pod_name,
            "namespace": self.settings.namespace,
            "command": list(created.command),
        }
        if created.command_from_image:
            answer["image"] = spec["image"]
            answer["command_from_image"] = created.command_from_image
        return answer

    async def _now(self) -> datetime:
        """The clock ``CREATE_DEADLINE_S`` is stamped and judged with: the database's when replicas
        share it (``election`` set), so that skew between them does not free an id whose create is
        still in flight on another; this process's alone."""
        if self.election is None:
            return utcnow()
        return await self.election.store.now()

    async def _taken(self, sandbox_id: str) -> str:
        """Why the id cannot be created now, for the 409."""
        message = f"sandbox {sandbox_id!r} exists"
        try:
            row = await self.sandboxes.get(sandbox_id)
        except StoreError:
            return message
        if row is not None and row.driver == DRIVER:
            phase = (row.driver_state or {}).get("phase")
            message += (
                f" (its pod is {phase or 'unknown'}): delete it, and create it again once its pod is gone"
            )
        return message

    async def _forget(self, sandbox_id: str, generation: int, failure: BaseException) -> None:
        # Both writes are conditional on this create's generation: nothing else's row is touched.
        try:
            if generation == 1:
                await self.sandboxes.delete(sandbox_id, generation=generation)
            else:
                # The id had an earlier sandbox whose events must stay: mark the new one failed
                # and released (no pod, so the id can be created again) instead of deleting the row.
                reason = f"the create failed: {failure}" if str(failure) else "the create was cancelled"
                await self.sandboxes.set_driver_state(
                    sandbox_id,
                    {
                        "phase": "Failed",
                        "reason": redact(reason),
                        "released": True,
                        "at": utcnow().isoformat(),
                    },
                    generation=generation,
                )
        except StoreError as exc:
            log.error("sandbox %s: could not take back its registration: %s", sandbox_id, exc)

    async def delete(self, sandbox_id: str) -> bool:
        assert self.driver is not None, "start() first"
        row = await self.sandboxes.get(sandbox_id)
        if row is not None and row.driver != DRIVER:
            raise ProvisionError(
                409, f"sandbox {sandbox_id!r} was not created by the Kubernetes driver (driver: {row.driver})"
            )
        try:
            found = await self.driver.delete(sandbox_id)
        except KubernetesDriverError as exc:
            raise ProvisionError(_status(exc), redact(str(exc))) from None
        state = (row.driver_state or {}) if row is not None else {}
        if row is not None and not found and _never_got_pod(state, now=await self._now()):
            # A create that never got its pod (marked by the deadline, or past it unmarked: the
            # watch checks the deadline only when it lists the pods, and a gateway that stopped
            # between registering and creating may have restarted before the deadline): asked to
            # delete it and finding no pod, the caller frees the id, for this generation only.
            await self.sandboxes.set_driver_state(
                sandbox_id,
                {**state, "phase": "Deleted", "at": utcnow().isoformat()},
                generation=row.generation,
            )
        return found

    async def _record(self, state: PodState, leader: LeaderTerm | None = None) -> bool:
        """Record what the watch saw of a pod on its sandbox's row, if the pod is that row's; returns
        whether it was.

        A pod's name, labels and ``openshell.io/sandbox-id`` annotation can be copied by anyone who
        may create pods in the namespace, so the row is the authority, not the pod: an event is
        recorded only for the pod whose uid the row holds (the create's), or, for a row without
        one, for a pod with the sandbox's pod name; its uid is filled in only while the row is
        ``Creating`` (the gateway stopped between making the pod and writing its uid).
        Nothing is recorded for a row that is gone (``Deleted``, or ``Failed`` and released): a pod
        appearing under its name is not one the gateway made for it, and recording it would bind
        the row to that pod and take the id again. Each write is conditional on the row's
        generation, and on ``leader``'s term when given (NotLeader when it no longer holds)."""
        row = await self.sandboxes.get(state.sandbox_id)
        if row is None or row.driver != DRIVER or _gone(row):
            return False
        if row.pod_uid is not None:
            if state.pod_uid != row.pod_uid:
                log.debug("sandbox %s: ignoring an event of pod uid %s, not its own", row.id, state.pod_uid)
                return False
            fill = None
        elif state.pod_name != pod_name(row.id):
            return False
        else:
            # Only a row still waiting for its pod takes the uid. A row of another state without
            # one (from before uids were recorded, or marked Failed by the deadline) shows the
            # pod's phase but binds no pod: its pod tokens are refused (gateway/auth/supervisors.py).
            waiting = (row.driver_state or {}).get("phase") == "Creating"
            fill = state.pod_uid if waiting and not state.deleted else None
        doc: dict[str, Any] = {"phase": state.phase, "pod": state.pod_name, "at": utcnow().isoformat()}
        if state.reason:
            doc["reason"] = state.reason
        if state.exit_code is not None:
            doc["exit_code"] = state.exit_code
        await self.sandboxes.set_driver_state(
            state.sandbox_id, _termed(doc, leader), generation=row.generation, pod_uid=fill, leader=leader
        )
        return True

    async def _catch_up(self, leader: LeaderTerm | None = None) -> str | None:
        """Record every pod as it is now, and the sandboxes whose pods are gone; returns the
        resourceVersion to watch from."""
        assert self.driver is not None
        snapshot = await self.driver.snapshot()
        present = set()
        for state in snapshot.states:
            # A pod that is not its row's (a squatter under the name) does not keep the row alive.
            if await self._record(state, leader):
                present.add(state.sandbox_id)
        now = await self._now()
        for row in await self.sandboxes.list():
            if row.driver != DRIVER or row.id in present:
                continue
            recorded = row.driver_state or {}
            phase = recorded.get("phase")
            if phase == "Creating":
                # A create in flight has its pod within moments; one this old never got it (the
                # gateway stopped between registering and creating): say so rather than wait forever.
                since = _parse_time(recorded.get("at"))
                # Not released: the create may yet make its pod, so the id stays taken (until a
                # DELETE finds no pod, or the watch sees the pod come and go).
                if since is not None and (now - since).total_seconds() > CREATE_DEADLINE_S:
                    reason = f"no pod appeared within {CREATE_DEADLINE_S:.0f} s of the create"
                    await self.sandboxes.set_driver_state(
                        row.id,
                        _termed({"phase": "Failed", "reason": reason, "at": now.isoformat()}, leader),
                        generation=row.generation,
                        leader=leader,
                    )
            elif phase != "Deleted" and not (phase == "Failed" and "pod" not in recorded):
                # A pod seen (Failed included) and now gone: deleted, and its id free again.
                await self.sandboxes.set_driver_state(
                    row.id,
                    _termed({**recorded, "phase": "Deleted", "at": now.isoformat()}, leader),
                    generation=row.generation,
                    leader=leader,
                )
        return snapshot.resource_version

    async def _follow(self, leader: LeaderTerm | None) -> None:
        """List, then watch, for as long as this task runs (the leader's work under ``leader``'s
        term). NotLeader ends it: another replica leads (the elector then stops leading)."""
        assert self.driver is not None
        failures = 0
        #: The resourceVersion of the last event recorded (None: list again).
        version: str | None = None
        while True:
            try:
                if version is None:
                    version = await self._catch_up(leader)
                async for state in self.driver.watch(version):
                    failures = 0
                    await self._record(state, leader)
                    # Only once recorded: an event whose write failed is seen again on resuming.
                    version = state.resource_version or version
            except (asyncio.CancelledError, NotLeader):
                raise
            except Exception as exc:  # the watch must outlive API and database hiccups
                failures += 1
                delay = random.uniform(0, min(30.0, 0.5 * 2**failures))
                if isinstance(exc, KubernetesDriverError) and exc.status == 410:
                    version = None  # too old to resume from: list again
                    log.info("sandbox pod watch: its resourceVersion expired (410 Gone); listing again")
                else:
                    resume = f"resuming from resourceVersion {version}" if version else "listing again"
                    log.warning("sandbox pod watch failed (%s); %s in %.1fs", exc, resume, delay)
                await asyncio.sleep(delay)

    async def step_down(self) -> None:
        """Stop leading and release the Lease at once (a drain: the next leader need not wait for
        it to expire). Idempotent."""
        if self._elector is not None:
            await self._elector.stop()
            self._elector = None

    async def close(self) -> None:
        await self.step_down()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        if self.driver is not None:
            await self.driver.close()
