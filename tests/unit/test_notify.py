"""The notification layer's own rules (gateway/notify.py): the payload's format and bound, a
payload this gateway does not understand, the listener's connection made from the engine's URL,
and the in-process notifier's hand-over on commit."""

from __future__ import annotations

import logging

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from gateway.notify import CHANNEL, InProcessNotifier, Note, PostgresNotifier, Topic, listen_connect_args


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
    assert notifier.live
    await notifier.stop()
