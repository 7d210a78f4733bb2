"""The gateway's tables, as SQLAlchemy Core objects on one ``MetaData``.

These definitions are what the store's queries are written against; the tables themselves are
created only by the Alembic migrations in ``migrations/versions`` (never by ``create_all``), so a
change here needs a new migration, and a unit test checks that the two still agree.

``sandboxes`` holds one row per sandbox id: the session that currently owns it (with an owner and
an epoch kept for HA fencing), liveness, the main process's exit, and its generation (a deleted
sandbox's id can be created again: the row then describes the new one, and each event carries the
generation it was stored under, so the old one's events stay readable). ``events`` holds the journal
records that supervisors send, unique on (sandbox, journal epoch, sequence) so that a replay after
a reconnect stores nothing twice. Records that arrive without sequence numbers (the upstream
PushSandboxLogs and ReportMainProcessExit paths) are numbered by the gateway under the empty
journal epoch.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.types import TypeDecorator

#: Events the gateway numbered itself carry this journal epoch.
UNSEQUENCED_EPOCH = ""

EVENT_KINDS = ("log", "lifecycle", "gap", "health")


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware datetime that always comes back aware and in UTC.

    SQLite has no timezone type: SQLAlchemy stores the wall-clock fields and returns naive values,
    so an aware non-UTC value would be silently shifted. Normalising to UTC on the way in and
    attaching UTC on the way out gives both dialects the same behaviour.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            # Naive values inside the gateway are UTC by convention; refusing them would only turn
            # a harmless slip into an outage.
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


metadata = MetaData()

sandboxes = Table(
    "sandboxes",
    metadata,
    Column("id", Text, primary_key=True),
    Column("driver", Text, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("instance_id", Text, nullable=True),
    Column("session_id", Text, nullable=True),
    Column("journal_epoch", Text, nullable=True),
    Column("connected", Boolean, nullable=False, server_default=false()),
    Column("connected_at", UTCDateTime, nullable=True),
    Column("disconnected_at", UTCDateTime, nullable=True),
    Column("last_heartbeat_at", UTCDateTime, nullable=True),
    Column("exit_code", Integer, nullable=True),
    Column("exited_at", UTCDateTime, nullable=True),
    Column("owner", Text, nullable=True),
    Column("owner_epoch", BigInteger, nullable=False, server_default=text("0")),
    Column("spec", Text, nullable=True),
    Column("driver_state", Text, nullable=True),
    # Which life of this id the row describes: 1 at the first create, one more at each create
    # after a delete (the old lives' events stay, under their own generation).
    Column("generation", BigInteger, nullable=False, server_default=text("1")),
    # Where the current run of the main process began: the journal epoch and sequence of its
    # STARTED record. A STARTED resets the exit only if it is newer than this, and an EXITED sets it
    # only if it follows this, so a replayed or late record cannot move the exit (store/events.py).
    Column("run_epoch", Text, nullable=True),
    Column("run_sequence", BigInteger, nullable=True),
    # Who created this generation of the sandbox (the caller's username, or the token's subject)
    # and the team it belongs to (the creator's first team): non-admins see and act on their own
    # and their teams' sandboxes (gateway/auth). NULL: created without authentication.
    Column("created_by", Text, nullable=True),
    Column("team", Text, nullable=True),
    # The Kubernetes pod's uid once the driver created it: a projected ServiceAccount token is bound
    # to its sandbox through the pod name and this uid (a pod re-created under the name has another).
    Column("pod_uid", Text, nullable=True),
    # The run (``replicas.run_id``) of the replica whose session claimed the sandbox with
    # ``owner_epoch``: the owner is alive only while that very run's lease is (a replica restarted
    # under the same id does not revive its predecessor's sessions). Revision 0008.
    Column("owner_run", Text, nullable=True),
    # The ``SupervisorHello.connection_epoch`` of the session that holds the claim (0: none sent):
    # a later, lower one of the same supervisor instance is a stale connection (revision 0010).
    Column("connection_epoch", BigInteger, nullable=False, server_default=text("0")),
    # The policy an upstream supervisor synced with UpdateConfig (a serialized
    # ``openshell.sandbox.v1.SandboxPolicy``; NULL: none yet), the version this gateway gave it and
    # its SHA-256: GetSandboxConfig hands it back. Reset with every new generation. Revision 0010.
    Column("policy", LargeBinary, nullable=True),
    Column("policy_version", Integer, nullable=False, server_default=text("0")),
    Column("policy_hash", Text, nullable=True),
)

events = Table(
    "events",
    metadata,
    # SQLite only aliases the rowid (and so only autoincrements) for a column typed exactly
    # INTEGER PRIMARY KEY; BIGINT there would be a plain column that stays NULL.
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column(
        "sandbox_id",
        Text,
        ForeignKey("sandboxes.id", ondelete="CASCADE", name="fk_events_sandbox_id"),
        nullable=False,
    ),
    Column("journal_epoch", Text, nullable=False),
    Column("sequence", BigInteger, nullable=False),
    Column("timestamp_ms", BigInteger, nullable=False),
    Column("kind", Text, nullable=False),
    Column("stream", Text, nullable=True),
    Column("message", Text, nullable=False),
    Column("data", Text, nullable=True),
    Column("received_at", UTCDateTime, nullable=False),
    # The sandbox's generation when the event was stored (see ``sandboxes.generation``).
    Column("generation", BigInteger, nullable=False, server_default=text("1")),
    UniqueConstraint("sandbox_id", "journal_epoch", "sequence", name="uq_events_sandbox_epoch_sequence"),
    # Tail and follow both read one sandbox's events in id order.
    Index("ix_events_sandbox_id_id", "sandbox_id", "id"),
    # The same, for one generation (the API reads the current one by default).
    Index("ix_events_sandbox_id_generation_id", "sandbox_id", "generation", "id"),
    # A sandbox's newest health events, for the fleet summary (gateway.store.fleet): the health
    # records only, so finding them never walks a sandbox's log lines.
    Index(
        "ix_events_health",
        "sandbox_id",
        "generation",
        "id",
        sqlite_where=text("kind = 'health'"),
        postgresql_where=text("kind = 'health'"),
    ),
)

#: Commands for supervisors (stop, signal, heartbeat), kept until the supervisor answers: a command
#: still ``pending`` is sent again on every new session of its sandbox.
commands = Table(
    "commands",
    metadata,
    Column("id", Text, primary_key=True),
    Column(
        "sandbox_id",
        Text,
        ForeignKey("sandboxes.id", ondelete="CASCADE", name="fk_commands_sandbox_id"),
        nullable=False,
    ),
    Column("kind", Text, nullable=False),
    Column("args", Text, nullable=False),
    Column("state", Text, nullable=False),
    Column("error", Text, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("answered_at", UTCDateTime, nullable=True),
    # After it, the command is never sent and ends ``expired``; NULL on rows stored before
    # revision 0007, which expire ``LEGACY_TTL_S`` after creation (gateway.store.commands).
    Column("expires_at", UTCDateTime, nullable=True),
    # The supervisor's answer (applied, failed) when it came after the command expired: recorded,
    # without turning the state back.
    Column("late_result", Text, nullable=True),
    # When, and by which replica, the sandbox's owning session wrote the command to its stream: a
    # POST answered by another replica waits for this (revision 0008).
    Column("delivered_at", UTCDateTime, nullable=True),
    Column("delivered_by", Text, nullable=True),
    # The client's Idempotency-Key of the POST that created it, and a digest of that POST's
    # request: a retry with the same key answers this command instead of storing another
    # (revision 0009). NULL: created without a key (never matched: NULLs are distinct).
    Column("idempotency_key", Text, nullable=True),
    Column("request_digest", Text, nullable=True),
    # Redelivery reads one sandbox's pending commands in creation order.
    Index("ix_commands_sandbox_id_state", "sandbox_id", "state"),
    # One command per key and sandbox, even for two retries racing on two replicas.
    Index("ux_commands_sandbox_id_idempotency_key", "sandbox_id", "idempotency_key", unique=True),
)

#: Keys the gateway signs sandbox tokens with, shared by every replica: a new one is made every
#: ``auth.supervisors.key_rotation_s``; a key signs until ``sign_until`` and verifies until
#: ``verify_until`` (the last token it signed has expired by then), then it is deleted.
signing_keys = Table(
    "signing_keys",
    metadata,
    Column("kid", Text, primary_key=True),
    Column("algorithm", Text, nullable=False),
    Column("private_pem", Text, nullable=False),
    Column("public_pem", Text, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("sign_until", UTCDateTime, nullable=False),
    Column("verify_until", UTCDateTime, nullable=False),
)

#: One row per gateway replica, renewed every ``ha.renew_interval_s``: a replica whose
#: ``renewed_at`` is older than ``ha.lease_s`` is dead to the others (its sessions' sandboxes show
#: disconnected). ``sessions`` and ``draining`` are what it last said of itself.
replicas = Table(
    "replicas",
    metadata,
    Column("id", Text, primary_key=True),
    Column("address", Text, nullable=False),
    Column("sessions", Integer, nullable=False, server_default=text("0")),
    Column("draining", Boolean, nullable=False, server_default=false()),
    Column("started_at", UTCDateTime, nullable=False),
    Column("renewed_at", UTCDateTime, nullable=False),
    # A random id per process (revision 0008): a restart under the same ``id`` is another run.
    Column("run_id", Text, nullable=True),
)

#: One row per cluster-wide role (the Kubernetes driver's pod watch and driver state): ``term``
#: grows at every change of ``holder``, and the holder's writes are conditional on its term, so a
#: paused ex-leader that wakes up cannot write after another took over (revision 0008).
leadership = Table(
    "leadership",
    metadata,
    Column("name", Text, primary_key=True),
    Column("holder", Text, nullable=False),
    Column("term", BigInteger, nullable=False, server_default=text("0")),
    Column("acquired_at", UTCDateTime, nullable=False),
    Column("renewed_at", UTCDateTime, nullable=False),
)
