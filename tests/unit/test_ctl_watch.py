"""``get --watch`` over many sandboxes for a long time: what it keeps and what it prints.

The watch loop (``gateway.ctl.commands._get``) runs against an API stand-in that answers the
sandbox list from memory, so that ten thousand sandboxes changing at every read cost no
gateway; the API's own list is tested in tests/integration/test_ctl_sandboxes.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import re
import tracemalloc
from typing import Any

import pytest

from gateway.ctl.commands import _get


class ChangingApi:
    """``count`` sandboxes whose state flips at every read; after ``reads`` reads, it stops the
    watch (``Done``). ``at_read`` is called after each read (to measure between them)."""

    class Done(Exception):
        pass

    def __init__(self, *, count: int, reads: int, at_read: Any = None) -> None:
        self.count, self.reads, self.read = count, reads, 0
        self.at_read = at_read or (lambda n: None)

    async def sandboxes(self) -> list[dict[str, Any]]:
        if self.read == self.reads:
            raise ChangingApi.Done
        self.read += 1
        self.at_read(self.read)
        state = "connected" if self.read % 2 else "disconnected"
        return [
            {"id": f"sb-{i:05d}", "state": state, "exit_code": None, "generation": self.read}
            for i in range(self.count)
        ]


def _args(output: str) -> argparse.Namespace:
    return argparse.Namespace(id=None, output=output, watch=True, interval=1e-6)


def test_a_watch_keeps_no_row_it_printed() -> None:
    used: dict[int, int] = {}

    def measure(read: int) -> None:
        used[read] = tracemalloc.get_traced_memory()[0]

    api = ChangingApi(count=2000, reads=24, at_read=measure)
    tracemalloc.start()
    try:
        with (
            open(os.devnull, "w") as sink,
            contextlib.redirect_stdout(sink),
            pytest.raises(ChangingApi.Done),
        ):
            asyncio.run(_get(_args("table"), api))  # type: ignore[arg-type]
    finally:
        tracemalloc.stop()
    # 2000 rows printed at each read: kept, 16 reads more would be 32000 rows (megabytes).
    grown = used[24] - used[8]
    assert grown < 256 * 1024, f"{grown} bytes more after 16 more reads"


def test_a_watch_in_json_prints_one_sandbox_object_per_line_from_the_start() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(ChangingApi.Done):
        asyncio.run(_get(_args("json"), ChangingApi(count=3, reads=2)))  # type: ignore[arg-type]
    docs = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(d["id"], d["state"]) for d in docs] == [
        ("sb-00000", "connected"),
        ("sb-00001", "connected"),
        ("sb-00002", "connected"),
        ("sb-00000", "disconnected"),
        ("sb-00001", "disconnected"),
        ("sb-00002", "disconnected"),
    ]


def test_a_watchs_rows_are_aligned_to_the_widest_cell_so_far() -> None:
    out = io.StringIO()

    class Growing(ChangingApi):
        async def sandboxes(self) -> list[dict[str, Any]]:
            found = await super().sandboxes()
            return found[:1] if self.read == 1 else [{**sb, "id": sb["id"] + "-longer"} for sb in found]

    with contextlib.redirect_stdout(out), pytest.raises(ChangingApi.Done):
        asyncio.run(_get(_args("table"), Growing(count=2, reads=3)))  # type: ignore[arg-type]
    lines = out.getvalue().splitlines()
    state_at = [re.search(r" {3}\S", line).end() - 1 for line in lines]  # type: ignore[union-attr]
    # Never narrower than before: each row's STATE starts no earlier than the ones above it.
    assert state_at == sorted(state_at) and state_at[-1] > state_at[0], lines


def test_a_watch_that_began_with_no_sandboxes_prints_the_header_before_its_first_rows() -> None:
    out = io.StringIO()

    class Empty(ChangingApi):
        async def sandboxes(self) -> list[dict[str, Any]]:
            found = await super().sandboxes()
            return [] if self.read == 1 else found

    with contextlib.redirect_stdout(out), pytest.raises(ChangingApi.Done):
        asyncio.run(_get(_args("table"), Empty(count=1, reads=3)))  # type: ignore[arg-type]
    lines = out.getvalue().splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["no", "sandboxes"],
        ["ID", "STATE"],
        ["sb-00000", "disconnected"],
        ["sb-00000", "connected"],
    ], lines
