"""A SQLite gateway is not left wedged by a hello burst whose store calls it gave up (issue 22,
defect 2: "every hello OVERLOADED for 25 s+, twice stuck with no clients left").

Hundreds of hellos at once against a gateway process on SQLite with a tiny
``grpc.store_timeout_s``: many of its store calls are given up at their deadline, and clients that
stop waiting cancel others. Before the fix those calls were cancelled mid-transaction; a cancelled
aiosqlite connection was closed while its cursor still lived (held by the CancelledError's
traceback), which left it a zombie holding SQLite's write lock until the garbage collector ran;
every other writer then waited out the busy timeout with a pooled connection, and the gateway
stayed unready with its pool exhausted after the clients were gone. Now, within seconds of the
burst: a fresh hello is accepted, ``BEGIN IMMEDIATE`` from another process's connection gets the
write lock, /readyz says 200, and SIGTERM stops the gateway (a wedged one never exited).
"""

from __future__ import annotations

import asyncio
import gc
import random
import signal
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from grpc import aio
from sqlalchemy import text

from gateway.store.db import create_engine
from openshell_wire.records import ALL_CAPABILITIES
from openshell_wire.v1 import openshell_pb2 as pb
from openshell_wire.v1 import openshell_pb2_grpc as pb_grpc
from tests.support.procs import GatewayProcess

#: The burst: hellos in all, how many at once, and how many rounds (the second finds the
#: first's given-up calls still running).
HELLOS, AT_ONCE, ROUNDS = 300, 48, 2
#: Small enough that many of the burst's store calls are given up.
STORE_TIMEOUT_S = 0.2
#: A burst client stops waiting (cancels its stream) after this long.
CLIENT_WAIT_S = 1.0
#: How long the gateway has to be usable again once the burst is over: a call given up is bounded
#: by SQLite's busy timeout (10 s), with margin for a loaded machine.
RECOVER_S = 20.0


async def _hello(address: str, sandbox_id: str, *, wait_s: float) -> str:
    """One hello; what the gateway answered ('accepted', the rejection's reason, or 'timeout')."""
    async with aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        call = pb_grpc.OpenShellStub(channel).ConnectSupervisor()
        message = pb.SupervisorMessage()
        message.hello.sandbox_id = sandbox_id
        message.hello.instance_id = uuid.uuid4().hex[:8]
        message.hello.connection_epoch = 1
        message.hello.journal_epoch = "e1"
        message.hello.capabilities.extend(ALL_CAPABILITIES)
        try:
            await call.write(message)
            first = await asyncio.wait_for(call.read(), wait_s)
        except (TimeoutError, aio.AioRpcError):
            return "timeout"
        finally:
            call.cancel()
        if first.WhichOneof("payload") == "session_accepted":
            return "accepted"
        return f"rejected: {first.session_rejected.reason}"


def _write_lock_free(path: Path) -> bool:
    outside = sqlite3.connect(path, timeout=0.5, isolation_level=None)
    try:
        outside.execute("BEGIN IMMEDIATE")
        outside.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        outside.close()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError):
        return False


async def test_a_hello_burst_with_store_calls_given_up_leaves_no_wedge(tmp_path: Path) -> None:
    gw = GatewayProcess(tmp_path, extra=["--set", f"grpc.store_timeout_s={STORE_TIMEOUT_S}"])
    gw.start()
    try:
        answers: list[str] = []
        gate = asyncio.Semaphore(AT_ONCE)

        async def one(sandbox_id: str) -> None:
            async with gate:
                answers.append(await _hello(gw.address, sandbox_id, wait_s=CLIENT_WAIT_S))

        for _ in range(ROUNDS):
            await asyncio.gather(*(one(f"sb-{i:04d}") for i in range(HELLOS)))
        given_up = sum(1 for answer in answers if answer != "accepted")
        assert given_up > 0, "the burst gave up no store call: it tests nothing"

        deadline = time.monotonic() + RECOVER_S
        while True:
            state = {
                "fresh hello": await _hello(gw.address, "sb-fresh", wait_s=5.0),
                "outside BEGIN IMMEDIATE": await asyncio.to_thread(_write_lock_free, gw.db_path),
                "/readyz 200": await asyncio.to_thread(_ready, f"http://127.0.0.1:{gw.ops_port}"),
            }
            if state == {"fresh hello": "accepted", "outside BEGIN IMMEDIATE": True, "/readyz 200": True}:
                break
            assert time.monotonic() < deadline, (
                f"{RECOVER_S:g}s after a burst ({given_up} of {len(answers)} hellos not accepted) "
                f"the gateway is still wedged: {state}"
            )
            await asyncio.sleep(1.0)

        assert gw.proc is not None
        gw.signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(gw.proc.wait, 20)
        except subprocess.TimeoutExpired:
            raise AssertionError("the gateway did not exit within 20 s of SIGTERM after the burst") from None
    finally:
        gw.stop()


async def test_write_transactions_cancelled_anywhere_leave_the_sqlite_file_unlocked(tmp_path: Path) -> None:
    """The cause itself, below the gateway: write transactions on the gateway's SQLite engine
    cancelled at random points (as a shutdown or any other caller's cancellation may still do),
    with the garbage collector off, as it may as well be for minutes in an idle gateway. The
    connections whose cleanup was interrupted are rolled back before they are closed, so no zombie
    keeps the write lock, and the pool is whole."""
    engine = create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER)"))
            await conn.execute(text("INSERT INTO t VALUES (1, 0)"))

        async def write() -> None:
            async with engine.begin() as conn:
                await conn.execute(text("UPDATE t SET n = n + 1 WHERE id = 1"))
                await conn.execute(text("SELECT n FROM t"))

        rng = random.Random(22)
        gc.disable()
        try:
            cancelled = 0
            # Three rounds: one round leaves no zombie about one time in five.
            for _ in range(3):
                tasks = []
                for _ in range(300):
                    task = asyncio.create_task(write())
                    asyncio.get_running_loop().call_later(rng.uniform(0, 0.05), task.cancel)
                    tasks.append(task)
                    await asyncio.sleep(0.001)
                outcomes = await asyncio.gather(*tasks, return_exceptions=True)
                cancelled += sum(isinstance(outcome, asyncio.CancelledError) for outcome in outcomes)
            assert cancelled > 0, "no write was cancelled: the test tests nothing"
            deadline = time.monotonic() + 10.0
            while not await asyncio.to_thread(_write_lock_free, tmp_path / "x.db"):
                assert time.monotonic() < deadline, (
                    f"after {cancelled} cancelled write transactions the SQLite file stays locked"
                )
                await asyncio.sleep(0.5)
            assert engine.pool.checkedout() == 0, engine.pool.status()  # type: ignore[attr-defined]
        finally:
            gc.enable()
    finally:
        await engine.dispose()
