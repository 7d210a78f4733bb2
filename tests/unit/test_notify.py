"""The notification layer's own rules (gateway/notify.py): the payload's format and bound, a
payload this gateway does not understand, the listener's connection made from the engine's URL,
the in-process notifier's hand-over on commit, and the event readers' wake-ups (a token taken
before a read; commits forwarded to the other replicas, received pokes not)."""

from __future__ import annotations

import logging
import time

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from gateway.notify import (
    CHANNEL,
    QUEUE_WARN_USAGE,
    InProcessNotifier,
    Note,
    PostgresNotifier,
    Topic,
    listen_connect_args,
)
from gateway.store.events import EventNotifier


def test_a_note_round_trips_and_stays_far_below_postgresqls_payload_limit() -> None:
    # The longest ids the gateway makes: a DNS-1123 sandbox id (63) and a uuid hex command id.
    note = Note(Topic.DELIVERED, "s" * 63, "c" * 32)
    payload = note.encode()
    assert Note.decode(payload) == note
    assert len(payload.encode()) < 200  # PostgreSQL refuses a payload of 8000 bytes or more
    assert Note.decode(Note(Topic.EVENTS, "sb").encode()) == Note(Topic.EVENTS, "sb", "")


@pytest.mark.parametrize("payload", ["", "not json", "[]", '{"t": "unknown", "s": "x"}', '{"s": "x"}'])
def test_a_payload_this_gateway_does_not_understand_is_none(payload: str) -> None:
    assert Note.decode(payload) is None


def test_the_listener_ignores_a_foreign_payload_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    engine = create_async_engine("postgresql+asyncpg://u:p@h/db")
    notifier = PostgresNotifier(engine.url, engine.dialect, replica="gw-a")
    seen: list[Note] = []
    notifier.subscribe(seen.append)
    with caplog.at_level(logging.WARNING, logger="gateway.notify"):
        notifier._received(None, 1, CHANNEL, "garbage")
        notifier._received(None, 1, CHANNEL, Note(Topic.COMMAND, "sb", "c1").encode())
    assert seen == [Note(Topic.COMMAND, "sb", "c1")]
    assert "does not understand" in caplog.text
    assert notifier.application_name == "openshell-listen gw-a"


def test_the_listening_connection_follows_the_engines_url() -> None:
    """Every host of a multi-host URL, target_session_attrs and TLS, as the pool's connections get
    them; nothing only SQLAlchemy's adapter takes."""
    engine = create_async_engine(
        "postgresql+asyncpg://u:secret@/openshell?host=db-0:5432&host=db-1:5433"
        "&target_session_attrs=read-write&ssl=require&prepared_statement_cache_size=0"
    )
    args = listen_connect_args(engine.url, engine.dialect)
    assert args["host"] == ["db-0", "db-1"] and args["port"] == [5432, 5433]
    assert args["target_session_attrs"] == "read-write" and args["ssl"] == "require"
    assert (args["user"], args["password"], args["database"]) == ("u", "secret", "openshell")
    assert "prepared_statement_cache_size" not in args


async def test_the_in_process_notifier_hands_a_committed_note_to_every_subscriber() -> None:
    notifier = InProcessNotifier()
    seen: list[Note] = []
    connected: list[bool] = []

    def broken(note: Note) -> None:
        raise RuntimeError("a subscriber's bug")

    notifier.subscribe(broken)
    notifier.subscribe(seen.append)
    notifier.on_connect(lambda: connected.append(True))
    await notifier.start()
    assert connected == [True], "a start is a (re)connection: consumers read the table"
    note = Note(Topic.COMMAND, "sb", "c1")
    notifier.committed(note)
    assert seen == [note], "one subscriber's failure does not starve the others"
    assert not notifier.live, "a writer outside this process is heard of by no one: followers poll fast"
    await notifier.stop()


async def test_a_poke_between_a_readers_read_and_its_wait_is_not_missed() -> None:
    """A follower takes a token before its read; a commit poked after the read (before the wait
    began) ends the wait at once, not at the end of the poll. A poke of another sandbox does not."""
    notifier = EventNotifier()
    token = notifier.watch("sb")
    notifier.notify("other")
    assert await _waits(notifier, "sb", since=token), "another sandbox's poke does not wake it"
    token = notifier.watch("sb")
    notifier.notify("sb")  # committed while the reader was reading
    started = time.monotonic()
    await notifier.wait_for_new("sb", 30, since=token)
    assert time.monotonic() - started < 5, "woken by the poke, not by the timeout"
    assert await _waits(notifier, "sb", since=notifier.watch("sb")), "a fresh token waits again"


async def _waits(notifier: EventNotifier, sandbox_id: str, *, since: int) -> bool:
    started = time.monotonic()
    await notifier.wait_for_new(sandbox_id, 0.2, since=since)
    return time.monotonic() - started >= 0.15


def test_a_committed_sandbox_is_forwarded_and_a_received_poke_is_not() -> None:
    """Commits here go to the other replicas (forward); a poke that came from them does not go
    back out, or every note would echo between replicas for ever."""
    notifier = EventNotifier()
    sent: list[str] = []
    notifier.forward = sent.append
    notifier.committed("sb")
    notifier.notify("from-elsewhere")
    assert sent == ["sb"]


def test_a_filling_notification_queue_is_warned_of_once(caplog: pytest.LogCaptureFixture) -> None:
    """The listener's check reads pg_notification_queue_usage(): past the mark one WARNING (a
    listener that stopped reading, a frozen replica's, pins the queue; full, every notifying
    commit fails), one INFO once it is back under half the mark, nothing in between."""
    engine = create_async_engine("postgresql+asyncpg://u:p@h/db")
    notifier = PostgresNotifier(engine.url, engine.dialect, replica="gw-a")
    with caplog.at_level(logging.INFO, logger="gateway.notify"):
        for usage in (0.0, QUEUE_WARN_USAGE, QUEUE_WARN_USAGE * 2, QUEUE_WARN_USAGE * 0.9, 0.0, 0.0):
            notifier._queue_usage(usage)
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in lines] == [logging.WARNING, logging.INFO], lines
    assert "openshell-listen" in lines[0][1] and notifier.queue_usage == 0.0
