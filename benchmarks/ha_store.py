"""Could etcd replace PostgreSQL as the gateway's store? Both measured on this machine, in one run.

What docs/adr/0001-etcd-or-postgresql.md decides from, with the same client concurrency on both sides:

- **baseline**: the cheapest request each server answers (PostgreSQL ``SELECT 1``; etcd a
  linearizable range read of one key): the floor of a round trip through each client and server;
- **claims**: ownership claims per second. PostgreSQL: the gateway's statement, ``UPDATE sandboxes
  SET owner=$1, owner_epoch=owner_epoch+1 WHERE id=$2 RETURNING owner_epoch`` on the real schema
  (migrated to head). etcd: a compare-and-swap txn on a per-sandbox epoch key (compare its
  mod_revision with the one last seen, put epoch+1; on a conflict the failure branch returns the
  current value and the claim is retried), since etcd has no server-side increment;
- **renewals**: lease renewals per second. PostgreSQL: ``UPDATE replicas SET renewed_at=now(),
  sessions=$2 WHERE id=$1``. etcd: a LeaseKeepAlive on one open stream per worker;
- **failover**: time from killing the server to the next acknowledged write. etcd: a 3-member
  cluster on 127.0.0.1, its leader SIGKILLed, writes retried on the survivors. PostgreSQL: one
  server, ``pg_ctl restart -m immediate`` (a crash and its recovery); Patroni failover to a replica
  is not built here yet;
- **logs**: 100,000 lines of 80 bytes. PostgreSQL: batched INSERTs (1,000 rows a transaction) into
  the real ``events`` table. etcd: one put per line, and txns of 128 puts (etcd's default
  ``--max-txn-ops``); the storage each takes (PostgreSQL: the table with its indexes, and the WAL
  written; etcd: the database size in use), against the raw bytes.

Both servers run durable, as deployed (PostgreSQL fsync and synchronous_commit on; etcd's fsync on).
The clients are the raw drivers: asyncpg (what SQLAlchemy runs on in the gateway) and etcd's v3 gRPC
API through grpc.aio with the stubs that the ``aetcd`` package ships (maintained, and its only
dependencies, grpcio and protobuf, are the project's own; its high-level ``refresh_lease`` opens a
stream per renewal, so the stubs are used directly, as etcd's Go client does). etcd is the binary
tests/cluster/build.sh builds (the tests' pin), PostgreSQL the server tests/support/postgres.py runs.

Usage: ``python benchmarks/ha_store.py [--quick] [--concurrency N] [--seconds S] [--lines N] [--out PATH]``
(``--quick``: short windows, 10,000 lines, one failover round: under a minute). Every process it
starts is stopped at the end, also on an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import pwd
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# etcd members are started (forked) while gRPC channels are open; gRPC's fork handlers are of no use
# to a child that execs at once, and only log that they were skipped.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import asyncpg  # type: ignore[import-untyped]
import grpc
import psutil
from aetcd import rpc  # type: ignore[import-untyped]

from gateway.store.db import migrate
from tests.support.kubecluster import _die_with_parent, build, free_port, log_tail, stop_group
from tests.support.postgres import PgServer, pg_bindir, running_postgres

SANDBOXES = 1000
LINE_BYTES = 80
PG_BATCH = 1000
ETCD_TXN_OPS = 128  # etcd's default --max-txn-ops
ETCD_QUOTA_BYTES = 2 * 1024**3  # etcd's default --quota-backend-bytes
ETCD_MAX_REQUEST_BYTES = int(1.5 * 1024**2)  # etcd's default --max-request-bytes
RPC_TIMEOUT_S = 5.0
FAILOVER_TRY_TIMEOUT_S = 0.25


# --- measuring ------------------------------------------------------------------------------------


@dataclass
class Cpu:
    """CPU seconds of this process (the client) and of the server's processes over one window."""

    server_pids: list[int]
    _client: float = 0.0
    _server: float = 0.0
    _t: float = 0.0
    result: dict[str, float] = field(default_factory=dict)

    def _server_seconds(self) -> float:
        total = 0.0
        for pid in self.server_pids:
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                for p in [proc, *proc.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        t = p.cpu_times()
                        total += t.user + t.system
        return total

    def __enter__(self) -> Cpu:
        self._client = time.process_time()
        self._server = self._server_seconds()
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._t
        self.result = {
            # Cores busy on average: with 2 cores, a client near 1.0 means the Python client, not
            # the server, set the pace.
            "client_cores": round((time.process_time() - self._client) / wall, 2),
            "server_cores": round((self._server_seconds() - self._server) / wall, 2),
        }


async def rate(
    op: Callable[[int, random.Random], Awaitable[None]],
    *,
    concurrency: int,
    seconds: float,
    server_pids: list[int],
) -> dict[str, Any]:
    """``op`` run back to back by ``concurrency`` workers for ``seconds`` (after a short warm-up)."""

    async def run(window: float) -> tuple[int, float, dict[str, float]]:
        counts = [0] * concurrency
        stop = time.perf_counter() + window

        async def worker(i: int) -> None:
            rng = random.Random(i)
            while time.perf_counter() < stop:
                await op(i, rng)
                counts[i] += 1

        with Cpu(server_pids) as cpu:
            began = time.perf_counter()
            await asyncio.gather(*(worker(i) for i in range(concurrency)))
            elapsed = time.perf_counter() - began
        return sum(counts), elapsed, cpu.result

    await run(min(0.5, seconds / 4))
    ops, elapsed, cpu = await run(seconds)
    return {"ops": ops, "seconds": round(elapsed, 2), "per_s": round(ops / elapsed), **cpu}


# --- etcd -----------------------------------------------------------------------------------------


@dataclass
class EtcdMember:
    name: str
    client_port: int
    peer_port: int
    popen: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.client_port}"


class EtcdCluster:
    """``size`` etcd members on 127.0.0.1 in a temporary directory, durable (fsync on)."""

    def __init__(self, bin_dir: Path, *, size: int) -> None:
        self.etcd = bin_dir / "etcd"
        self.workdir = Path(tempfile.mkdtemp(prefix="openshell-etcd-bench-"))
        self.members = [EtcdMember(f"m{i}", free_port(), free_port()) for i in range(size)]

    def start(self) -> EtcdCluster:
        initial = ",".join(f"{m.name}=http://127.0.0.1:{m.peer_port}" for m in self.members)
        for m in self.members:
            m.log = self.workdir / f"{m.name}.log"
            with m.log.open("ab") as log:
                m.popen = subprocess.Popen(
                    [
                        str(self.etcd),
                        f"--name={m.name}",
                        f"--data-dir={self.workdir / m.name}",
                        f"--listen-client-urls=http://{m.target}",
                        f"--advertise-client-urls=http://{m.target}",
                        f"--listen-peer-urls=http://127.0.0.1:{m.peer_port}",
                        f"--initial-advertise-peer-urls=http://127.0.0.1:{m.peer_port}",
                        f"--initial-cluster={initial}",
                        "--initial-cluster-state=new",
                        "--log-level=warn",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    # A process group of its own (for stop_group), and SIGKILL if this process dies.
                    preexec_fn=_die_with_parent,  # noqa: PLW1509 - setsid and prctl only
                )
        return self

    def pids(self) -> list[int]:
        return [m.popen.pid for m in self.members if m.popen is not None and m.popen.poll() is None]

    def stop(self) -> None:
        for m in self.members:
            if m.popen is not None:
                stop_group(m.popen, 5.0)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def tail(self) -> str:
        return "\n".join(f"--- {m.name}\n{log_tail(m.log, 10)}" for m in self.members if m.log is not None)


@contextlib.contextmanager
def running_etcd(bin_dir: Path, *, size: int) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(bin_dir, size=size)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


async def etcd_ready(channel: grpc.aio.Channel, cluster: EtcdCluster, *, within_s: float = 30.0) -> None:
    """Until a linearizable write succeeds (so a leader is elected and a quorum answers)."""
    kv = rpc.KVStub(channel)
    deadline = time.monotonic() + within_s
    while True:
        try:
            await kv.Put(rpc.PutRequest(key=b"/bench/ready", value=b"1"), timeout=1.0)
            return
        except grpc.aio.AioRpcError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd not ready within {within_s:.0f}s:\n{cluster.tail()}") from None
            await asyncio.sleep(0.1)


async def etcd_status(channel: grpc.aio.Channel) -> Any:
    return await rpc.MaintenanceStub(channel).Status(rpc.StatusRequest(), timeout=RPC_TIMEOUT_S)


async def etcd_throughput(
    channel: grpc.aio.Channel, *, concurrency: int, seconds: float, pids: list[int]
) -> dict[str, Any]:
    kv, leases = rpc.KVStub(channel), rpc.LeaseStub(channel)
    out: dict[str, Any] = {}

    ping = b"/bench/ping"
    await kv.Put(rpc.PutRequest(key=ping, value=b"1"), timeout=RPC_TIMEOUT_S)

    async def baseline(_i: int, _rng: random.Random) -> None:
        await kv.Range(rpc.RangeRequest(key=ping), timeout=RPC_TIMEOUT_S)

    out["baseline"] = await rate(baseline, concurrency=concurrency, seconds=seconds, server_pids=pids)

    # The epoch keys, and what each claim last saw of its key (a replica would read it first, or
    # learn it from a failed compare: the failure branch returns the current value).
    keys = [f"/owners/sb-{n}".encode() for n in range(SANDBOXES)]
    seen: dict[bytes, tuple[int, int]] = {}
    for key in keys:
        put = await kv.Put(rpc.PutRequest(key=key, value=b"0"), timeout=RPC_TIMEOUT_S)
        seen[key] = (0, put.header.revision)
    conflicts = 0

    async def claim(i: int, rng: random.Random) -> None:
        nonlocal conflicts
        key = keys[rng.randrange(SANDBOXES)]
        owner = f"replica-{i}".encode()
        while True:
            epoch, revision = seen[key]
            response = await kv.Txn(
                rpc.TxnRequest(
                    compare=[
                        rpc.Compare(
                            key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.MOD, mod_revision=revision
                        )
                    ],
                    success=[
                        rpc.RequestOp(
                            request_put=rpc.PutRequest(key=key, value=b"%d:%s" % (epoch + 1, owner))
                        )
                    ],
                    failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=key))],
                ),
                timeout=RPC_TIMEOUT_S,
            )
            if response.succeeded:
                seen[key] = (epoch + 1, response.header.revision)
                return
            conflicts += 1
            current = response.responses[0].response_range.kvs[0]
            seen[key] = (int(current.value.split(b":")[0]), current.mod_revision)

    out["claims"] = await rate(claim, concurrency=concurrency, seconds=seconds, server_pids=pids)
    out["claims"]["conflicts_retried"] = conflicts

    # One lease per worker (a replica's), kept alive on one open stream each, as etcd's clients do.
    ids = [
        (await leases.LeaseGrant(rpc.LeaseGrantRequest(TTL=10), timeout=RPC_TIMEOUT_S)).ID
        for _ in range(concurrency)
    ]
    streams = [leases.LeaseKeepAlive() for _ in range(concurrency)]
    try:

        async def renew(i: int, _rng: random.Random) -> None:
            await streams[i].write(rpc.LeaseKeepAliveRequest(ID=ids[i]))
            reply = await streams[i].read()
            if reply is grpc.aio.EOF or reply.TTL <= 0:
                raise RuntimeError(f"etcd lease {ids[i]:x} was not renewed: {reply}")

        out["renewals"] = await rate(renew, concurrency=concurrency, seconds=seconds, server_pids=pids)
    finally:
        for stream in streams:
            stream.cancel()
    for lease_id in ids:
        await leases.LeaseRevoke(rpc.LeaseRevokeRequest(ID=lease_id), timeout=RPC_TIMEOUT_S)
    return out


async def etcd_logs(
    channel: grpc.aio.Channel,
    lines: list[bytes],
    *,
    concurrency: int,
    pids: list[int],
    single_puts: bool = True,
) -> dict[str, Any]:
    kv = rpc.KVStub(channel)
    out: dict[str, Any] = {}

    async def store(prefix: str, per_request: int) -> dict[str, Any]:
        before = await etcd_status(channel)
        shares = [list(range(i, len(lines), concurrency)) for i in range(concurrency)]

        async def worker(i: int) -> None:
            # Each worker writes one sandbox's lines, as sandboxes do; a key per line, in order.
            share = shares[i]
            for begin in range(0, len(share), per_request):
                chunk = share[begin : begin + per_request]
                puts = [
                    rpc.PutRequest(key=f"/logs/{prefix}/sb-{i}/{n:012d}".encode(), value=lines[n])
                    for n in chunk
                ]
                if per_request == 1:
                    await kv.Put(puts[0], timeout=RPC_TIMEOUT_S)
                else:
                    request = rpc.TxnRequest(success=[rpc.RequestOp(request_put=p) for p in puts])
                    assert request.ByteSize() < ETCD_MAX_REQUEST_BYTES
                    await kv.Txn(request, timeout=RPC_TIMEOUT_S)

        with Cpu(pids) as cpu:
            began = time.perf_counter()
            await asyncio.gather(*(worker(i) for i in range(concurrency)))
            elapsed = time.perf_counter() - began
        after = await etcd_status(channel)
        in_use = after.dbSizeInUse - before.dbSizeInUse
        return {
            "lines": len(lines),
            "seconds": round(elapsed, 2),
            "lines_per_s": round(len(lines) / elapsed),
            "db_size_bytes_added": after.dbSize - before.dbSize,
            "db_in_use_bytes_added": in_use,
            "bytes_per_line": round(in_use / len(lines), 1),
            **cpu.result,
        }

    out["txn_128"] = await store("txn", ETCD_TXN_OPS)
    if single_puts:
        out["put_each"] = await store("put", 1)
    per_line = max(r["bytes_per_line"] for r in out.values())
    out["lines_within_default_quota"] = int(ETCD_QUOTA_BYTES / per_line) if per_line > 0 else None
    return out


async def etcd_failover(cluster: EtcdCluster) -> dict[str, Any]:
    """SIGKILL the leader of a healthy 3-member cluster; seconds until a write is acknowledged again."""
    channels = {m.name: grpc.aio.insecure_channel(m.target) for m in cluster.members}
    try:
        await etcd_ready(channels[cluster.members[0].name], cluster)
        ids: dict[int, EtcdMember] = {}
        leader_id = 0
        for m in cluster.members:
            status = await etcd_status(channels[m.name])
            ids[status.header.member_id] = m
            leader_id = status.leader
        leader = ids[leader_id]
        survivors = [m for m in cluster.members if m is not leader]
        assert leader.popen is not None
        killed = time.perf_counter()
        os.killpg(leader.popen.pid, signal.SIGKILL)
        attempts = 0
        while True:
            for m in survivors:
                attempts += 1
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await rpc.KVStub(channels[m.name]).Put(
                        rpc.PutRequest(key=b"/bench/failover", value=b"%d" % attempts),
                        timeout=FAILOVER_TRY_TIMEOUT_S,
                    )
                    return {"seconds": round(time.perf_counter() - killed, 3), "attempts": attempts}
            if time.perf_counter() - killed > 30:
                raise RuntimeError(f"no write accepted 30 s after the leader died:\n{cluster.tail()}")
    finally:
        for channel in channels.values():
            await channel.close()


# --- PostgreSQL -----------------------------------------------------------------------------------


async def pg_prepare(server: PgServer) -> str:
    """A database migrated to the gateway's head schema, with SANDBOXES sandboxes; its DSN."""
    admin = await asyncpg.connect(host=server.host, port=server.port, user=server.user, database="postgres")
    try:
        await admin.execute("CREATE DATABASE bench")
    finally:
        await admin.close()
    await migrate(server.url("bench"))
    dsn = f"postgresql://{server.user}@{server.host}:{server.port}/bench"
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO sandboxes (id, driver, created_at) "
            f"SELECT 'sb-' || g, 'local', now() FROM generate_series(0, {SANDBOXES - 1}) g"
        )
    finally:
        await conn.close()
    return dsn


def pg_server_pids(data_directory: str) -> list[int]:
    return [int((Path(data_directory) / "postmaster.pid").read_text().split()[0])]


async def pg_throughput(dsn: str, *, concurrency: int, seconds: float, pids: list[int]) -> dict[str, Any]:
    conns = [await asyncpg.connect(dsn) for _ in range(concurrency)]
    out: dict[str, Any] = {}
    try:

        async def baseline(i: int, _rng: random.Random) -> None:
            await conns[i].fetchval("SELECT 1")

        out["baseline"] = await rate(baseline, concurrency=concurrency, seconds=seconds, server_pids=pids)

        claim_sql = (
            "UPDATE sandboxes SET owner = $1, owner_epoch = owner_epoch + 1"
            " WHERE id = $2 RETURNING owner_epoch"
        )

        async def claim(i: int, rng: random.Random) -> None:
            epoch = await conns[i].fetchval(claim_sql, f"replica-{i}", f"sb-{rng.randrange(SANDBOXES)}")
            if epoch is None:
                raise RuntimeError("a claim updated no row")

        out["claims"] = await rate(claim, concurrency=concurrency, seconds=seconds, server_pids=pids)

        await conns[0].executemany(
            "INSERT INTO replicas (id, address, started_at, renewed_at) VALUES ($1, $2, now(), now())",
            [(f"replica-{i}", f"10.0.0.{i}:7443") for i in range(concurrency)],
        )

        async def renew(i: int, rng: random.Random) -> None:
            status = await conns[i].execute(
                "UPDATE replicas SET renewed_at = now(), sessions = $2 WHERE id = $1",
                f"replica-{i}",
                rng.randrange(1000),
            )
            if status != "UPDATE 1":
                raise RuntimeError(f"a renewal did not update its row: {status}")

        out["renewals"] = await rate(renew, concurrency=concurrency, seconds=seconds, server_pids=pids)
    finally:
        for conn in conns:
            await conn.close()
    return out


async def pg_logs(dsn: str, lines: list[bytes], *, concurrency: int, pids: list[int]) -> dict[str, Any]:
    conns = [await asyncpg.connect(dsn) for _ in range(concurrency)]
    try:
        size_sql = "SELECT pg_total_relation_size('events')"
        before_size = await conns[0].fetchval(size_sql)
        before_wal = await conns[0].fetchval("SELECT pg_current_wal_lsn()")
        insert = (
            "INSERT INTO events (sandbox_id, journal_epoch, sequence, timestamp_ms, kind, stream, message, "
            "received_at) VALUES ($1, 'e1', $2, $3, 'log', 'stdout', $4, now())"
        )
        shares = [list(range(i, len(lines), concurrency)) for i in range(concurrency)]

        async def worker(i: int) -> None:
            conn, share = conns[i], shares[i]
            for begin in range(0, len(share), PG_BATCH):
                rows = [
                    (f"sb-{i}", n, 1_760_000_000_000 + n, lines[n].decode())
                    for n in share[begin : begin + PG_BATCH]
                ]
                async with conn.transaction():
                    await conn.executemany(insert, rows)

        with Cpu(pids) as cpu:
            began = time.perf_counter()
            await asyncio.gather(*(worker(i) for i in range(concurrency)))
            elapsed = time.perf_counter() - began
        await conns[0].execute("VACUUM ANALYZE events")
        added = await conns[0].fetchval(size_sql) - before_size
        wal = await conns[0].fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1)", before_wal)
        return {
            "lines": len(lines),
            "seconds": round(elapsed, 2),
            "lines_per_s": round(len(lines) / elapsed),
            "table_and_index_bytes_added": added,
            "bytes_per_line": round(added / len(lines), 1),
            "wal_bytes": int(wal),
            **cpu.result,
        }
    finally:
        for conn in conns:
            await conn.close()


async def pg_restart(dsn: str) -> dict[str, Any]:
    """``pg_ctl restart -m immediate`` (a crash, then crash recovery); seconds to the next write."""
    conn = await asyncpg.connect(dsn)
    try:
        data_directory = str(await conn.fetchval("SHOW data_directory"))
        # Some WAL to replay, as a server under traffic would have.
        await conn.execute("UPDATE sandboxes SET owner_epoch = owner_epoch + 1")
    finally:
        await conn.close()
    bindir = pg_bindir()
    assert bindir is not None
    argv = [str(bindir / "pg_ctl"), "-D", data_directory, "-m", "immediate", "-w", "-t", "60", "restart"]
    if os.geteuid() == 0:
        owner = pwd.getpwuid(os.stat(data_directory).st_uid).pw_name
        argv = ["runuser", "-u", owner, "--", *argv]
    killed = time.perf_counter()
    restart = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    attempts = 0
    try:
        while True:
            attempts += 1
            try:
                conn = await asyncpg.connect(dsn, timeout=FAILOVER_TRY_TIMEOUT_S)
                try:
                    await conn.execute("UPDATE sandboxes SET owner_epoch = owner_epoch + 1 WHERE id = 'sb-0'")
                finally:
                    await conn.close()
                seconds = time.perf_counter() - killed
                break
            except (TimeoutError, OSError, asyncpg.PostgresError):
                if time.perf_counter() - killed > 60:
                    raise RuntimeError("PostgreSQL accepted no write within 60 s of its restart") from None
                await asyncio.sleep(0.01)
    finally:
        _, err = await restart.communicate()
    if restart.returncode != 0:
        raise RuntimeError(f"pg_ctl restart failed: {err.decode(errors='replace')}")
    return {"seconds": round(seconds, 3), "attempts": attempts}


# --- the run --------------------------------------------------------------------------------------


def log_lines(n: int) -> list[bytes]:
    line = b"benchmark log line payload " * 3
    return [(b"%08d " % i + line)[:LINE_BYTES].ljust(LINE_BYTES, b".") for i in range(n)]


async def run(args: argparse.Namespace, bin_dir: Path, etcd_version: str) -> dict[str, Any]:
    concurrency, seconds = args.concurrency, args.seconds
    lines = log_lines(args.lines)
    result: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "etcd": etcd_version,
            "postgresql": "",
        },
        "settings": {
            "concurrency": concurrency,
            "seconds": seconds,
            "lines": len(lines),
            "line_bytes": LINE_BYTES,
            "sandboxes": SANDBOXES,
            "pg_batch": PG_BATCH,
            "etcd_txn_ops": ETCD_TXN_OPS,
            "durable": "PostgreSQL fsync=on synchronous_commit=on; etcd fsync on (its default)",
        },
    }
    print(f"etcd {bin_dir / 'etcd'}; concurrency {concurrency}, {seconds} s windows", file=sys.stderr)

    with running_postgres(fsync=True) as server:
        dsn = await pg_prepare(server)
        conn = await asyncpg.connect(dsn)
        try:
            result["machine"]["postgresql"] = str(await conn.fetchval("SHOW server_version"))
            pids = pg_server_pids(str(await conn.fetchval("SHOW data_directory")))
        finally:
            await conn.close()
        print("PostgreSQL: claims, renewals", file=sys.stderr)
        result["postgresql"] = await pg_throughput(dsn, concurrency=concurrency, seconds=seconds, pids=pids)
        print("PostgreSQL: logs", file=sys.stderr)
        result["postgresql"]["logs"] = await pg_logs(dsn, lines, concurrency=concurrency, pids=pids)
        print("PostgreSQL: restart", file=sys.stderr)
        result["postgresql"]["restart"] = [await pg_restart(dsn) for _ in range(args.rounds)]

    with running_etcd(bin_dir, size=1) as single:
        channel = grpc.aio.insecure_channel(single.members[0].target)
        try:
            await etcd_ready(channel, single)
            print("etcd (1 member): claims, renewals", file=sys.stderr)
            result["etcd_1"] = await etcd_throughput(
                channel, concurrency=concurrency, seconds=seconds, pids=single.pids()
            )
            print("etcd (1 member): logs", file=sys.stderr)
            result["etcd_1"]["logs"] = await etcd_logs(
                channel, lines, concurrency=concurrency, pids=single.pids()
            )
        finally:
            await channel.close()

    if not args.quick:
        with running_etcd(bin_dir, size=3) as trio:
            channel = grpc.aio.insecure_channel(trio.members[0].target)
            try:
                await etcd_ready(channel, trio)
                print("etcd (3 members): claims, renewals", file=sys.stderr)
                result["etcd_3"] = await etcd_throughput(
                    channel, concurrency=concurrency, seconds=seconds, pids=trio.pids()
                )
                print("etcd (3 members): logs in txns", file=sys.stderr)
                result["etcd_3"]["logs"] = await etcd_logs(
                    channel, lines, concurrency=concurrency, pids=trio.pids(), single_puts=False
                )
            finally:
                await channel.close()

    failovers = []
    for n in range(args.rounds):
        print(f"etcd (3 members): leader killed, round {n + 1}", file=sys.stderr)
        with running_etcd(bin_dir, size=3) as trio:
            failovers.append(await etcd_failover(trio))
    result["etcd_3_failover"] = failovers
    return result


def table(result: dict[str, Any]) -> str:
    pg, e1, e3 = result["postgresql"], result["etcd_1"], result.get("etcd_3")

    def ops(side: dict[str, Any] | None, what: str) -> str:
        if side is None:
            return "-"
        r = side[what]
        return f"{r['per_s']:,} ({r['client_cores']}/{r['server_cores']})"

    def secs(runs: list[dict[str, Any]]) -> str:
        values = sorted(r["seconds"] for r in runs)
        return f"{values[0]:.2f}" if len(values) == 1 else f"{values[0]:.2f}-{values[-1]:.2f}"

    c = result["settings"]["concurrency"]
    rows = [
        f"| per second, {c} concurrent clients (client/server cores busy) | PostgreSQL | etcd, 1 member "
        "| etcd, 3 members |",
        "|---|---|---|---|",
        f"| baseline: SELECT 1 / linearizable get | {ops(pg, 'baseline')} | {ops(e1, 'baseline')} | "
        f"{ops(e3, 'baseline')} |",
        f"| ownership claims (UPDATE ... RETURNING / CAS txn) | {ops(pg, 'claims')} | {ops(e1, 'claims')} | "
        f"{ops(e3, 'claims')} |",
        f"| lease renewals (UPDATE replicas / LeaseKeepAlive) | {ops(pg, 'renewals')} | "
        f"{ops(e1, 'renewals')} | {ops(e3, 'renewals')} |",
        "",
        "| logs: lines of 80 bytes | lines/s | bytes stored per line |",
        "|---|---|---|",
        f"| PostgreSQL, INSERT x{PG_BATCH} a transaction | {pg['logs']['lines_per_s']:,} | "
        f"{pg['logs']['bytes_per_line']} (+ WAL {pg['logs']['wal_bytes'] / pg['logs']['lines']:.0f}) |",
        f"| etcd 1 member, txn of {ETCD_TXN_OPS} puts | {e1['logs']['txn_128']['lines_per_s']:,} | "
        f"{e1['logs']['txn_128']['bytes_per_line']} |",
        f"| etcd 1 member, one put a line | {e1['logs']['put_each']['lines_per_s']:,} | "
        f"{e1['logs']['put_each']['bytes_per_line']} |",
        *(
            [
                f"| etcd 3 members, txn of {ETCD_TXN_OPS} puts | {e3['logs']['txn_128']['lines_per_s']:,} | "
                f"{e3['logs']['txn_128']['bytes_per_line']} |"
            ]
            if e3 is not None
            else []
        ),
        "",
        "| failover / recovery | seconds to the next acknowledged write |",
        "|---|---|",
        f"| etcd, 3 members, leader SIGKILLed | {secs(result['etcd_3_failover'])} |",
        f"| PostgreSQL, pg_ctl restart -m immediate (crash recovery) | {secs(pg['restart'])} |",
        "",
        f"etcd lines within the default 2 GiB quota: {e1['logs']['lines_within_default_quota']:,}",
    ]
    return "\n".join(rows)


async def interruptible(main: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """``main`` cancelled on SIGINT or SIGTERM (SIGINT even where the shell ignored it), so that the
    cancellation unwinds through every context manager: the servers started so far are stopped and
    their directories removed. (Raising from a signal handler instead can land inside grpc's or
    asyncpg's C code.) A signal during a blocking start-up step takes effect when it returns."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    return await main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short windows, 10,000 lines, one round")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=None, help="measuring window (default 5, quick 1.5)")
    parser.add_argument("--lines", type=int, default=None, help="log lines (default 100,000, quick 10,000)")
    parser.add_argument("--rounds", type=int, default=None, help="failover rounds (default 3, quick 1)")
    parser.add_argument("--out", type=Path, default=None, help="JSON result (default: print only)")
    args = parser.parse_args()
    args.seconds = args.seconds or (1.5 if args.quick else 5.0)
    args.lines = args.lines or (10_000 if args.quick else 100_000)
    args.rounds = args.rounds or (1 if args.quick else 3)
    if args.concurrency < 1 or args.seconds <= 0 or args.lines < args.concurrency or args.rounds < 1:
        parser.error("--concurrency, --seconds and --rounds must be positive, --lines at least --concurrency")
    bin_dir = build()  # the tests' etcd (tests/cluster/build.sh): cached, or built from its pin
    etcd_version = subprocess.run(
        [str(bin_dir / "etcd"), "--version"], capture_output=True, text=True, check=False
    ).stdout.split("\n")[0]
    try:
        result = asyncio.run(interruptible(run(args, bin_dir, etcd_version)))
    except asyncio.CancelledError:
        print("interrupted: every server it started is stopped", file=sys.stderr)
        sys.exit(130)
    text = table(result)
    print(text)
    if args.out is not None:
        args.out.write_text(json.dumps({**result, "table": text.splitlines()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
