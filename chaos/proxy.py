"""A delaying TCP proxy: what gives a gateway a long round trip on a kernel without netem.

Each chunk read from one side is written to the other ``delay_ms`` (plus up to ``jitter_ms``, drawn
per chunk) after it arrived, in order: a chunk never overtakes the one before it (TCP would not
reorder), so jitter only stretches gaps. Both directions are delayed alike, so the round trip grows
by twice the delay. The delay can change while connections stay open: the proxy re-reads its control
file (JSON ``{"delay_ms": .., "jitter_ms": ..}``) every 100 ms, and :class:`DelayProxy` writes it.

Run as ``python -m chaos.proxy --listen HOST:PORT --target HOST:PORT --control FILE`` (inside a
network namespace with ``ip netns exec``, to listen on one of its addresses); :class:`DelayProxy`
starts it that way and stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.procs import PYTHON, REPO, child_env, free_port, wait_until

CHUNK = 64 * 1024


@dataclass
class Delay:
    delay_ms: float = 0.0
    jitter_ms: float = 0.0

    def draw(self) -> float:
        """Seconds to hold one chunk."""
        return (self.delay_ms + random.uniform(0, self.jitter_ms)) / 1000


def _reload(control: Path, delay: Delay, seen: float) -> float:
    """Apply the control file to ``delay`` if it changed since ``seen`` (its mtime); the new mtime."""
    with contextlib.suppress(OSError, ValueError):
        mtime = control.stat().st_mtime
        if mtime != seen:
            doc = json.loads(control.read_text())
            delay.delay_ms = float(doc.get("delay_ms", 0))
            delay.jitter_ms = float(doc.get("jitter_ms", 0))
            return mtime
    return seen


async def _watch(control: Path, delay: Delay) -> None:
    """Keep ``delay`` equal to the control file's (a small local file: read on the loop)."""
    seen = 0.0
    while True:
        seen = _reload(control, delay, seen)
        await asyncio.sleep(0.1)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: Delay) -> None:
    """Copy ``reader`` to ``writer``, each chunk held until its due time and never before the previous
    chunk's; an end of stream is passed on (half-close) after the chunks before it."""
    # b"": the end of the stream (passed on in its turn); None: the read failed (a reset), which
    # is passed on at once by closing both sides.
    queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue()

    async def read() -> None:
        last_due = 0.0
        try:
            while chunk := await reader.read(CHUNK):
                last_due = max(last_due, time.monotonic() + delay.draw())
                queue.put_nowait((last_due, chunk))
        except OSError:
            queue.put_nowait((0.0, None))
            return
        queue.put_nowait((max(last_due, time.monotonic() + delay.draw()), b""))

    reading = asyncio.create_task(read(), name="proxy-read")
    try:
        while True:
            due, chunk = await queue.get()
            if chunk is None:
                raise ConnectionResetError("the other side's connection failed")
            if (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            if not chunk:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(chunk)
            await writer.drain()
    finally:
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await reading


async def _connection(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    *,
    target: tuple[str, int],
    delay: Delay,
) -> None:
    try:
        server_reader, server_writer = await asyncio.open_connection(*target)
    except OSError:
        client_writer.close()
        return
    # Both directions end together: once one side's stream fails or both half-closed, both close.
    pipes = [
        asyncio.create_task(_pipe(client_reader, server_writer, delay), name="proxy-up"),
        asyncio.create_task(_pipe(server_reader, client_writer, delay), name="proxy-down"),
    ]
    try:
        done, _ = await asyncio.wait(pipes, return_when=asyncio.FIRST_EXCEPTION)
        if any(p.exception() is not None for p in done if not p.cancelled()):
            for p in pipes:
                p.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)
    finally:
        for w in (client_writer, server_writer):
            w.close()


async def serve(*, listen: tuple[str, int], target: tuple[str, int], control: Path) -> None:
    delay = Delay()
    connections: set[asyncio.Task[None]] = set()

    def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(_connection(reader, writer, target=target, delay=delay))
        connections.add(task)
        task.add_done_callback(connections.discard)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.create_task(_watch(control, delay), name="proxy-control")
    server = await asyncio.start_server(accepted, *listen)
    print(f"proxy ready {listen[0]}:{listen[1]} -> {target[0]}:{target[1]}", flush=True)
    try:
        await stop.wait()
    finally:
        server.close()
        watcher.cancel()
        for task in list(connections):
            task.cancel()
        await asyncio.gather(watcher, *connections, return_exceptions=True)


def _address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {value!r}")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos.proxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=_address, required=True)
    parser.add_argument("--target", type=_address, required=True)
    parser.add_argument("--control", type=Path, required=True, help="JSON {delay_ms, jitter_ms}, re-read")
    args = parser.parse_args(argv)
    asyncio.run(serve(listen=args.listen, target=args.target, control=args.control))
    return 0


@dataclass
class DelayProxy:
    """The proxy as a process of its own, in ``netns`` (None: this namespace), listening on
    ``host``:``port`` and forwarding to ``target``; :meth:`set_delay` changes the delay live."""

    workdir: Path
    host: str
    target: str
    netns: str | None = None
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def control(self) -> Path:
        return self.workdir / "proxy-delay.json"

    @property
    def log_path(self) -> Path:
        return self.workdir / "proxy.log"

    def set_delay(self, delay_ms: float, *, jitter_ms: float = 0.0) -> None:
        # Written aside then renamed: the proxy never reads half a file.
        self.workdir.mkdir(parents=True, exist_ok=True)
        part = self.control.with_suffix(".part")
        part.write_text(json.dumps({"delay_ms": delay_ms, "jitter_ms": jitter_ms}))
        part.replace(self.control)

    def start(self) -> None:
        if not self.control.exists():
            self.set_delay(0)
        argv = [
            PYTHON, "-m", "chaos.proxy", "--listen", self.address, "--target", self.target,
            "--control", str(self.control),
        ]  # fmt: skip
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=child_env()
            )
        proc = self.proc
        wait_until(
            lambda: proc.poll() is not None or b"proxy ready" in self.log_path.read_bytes(),
            timeout=30,
            what=f"the delay proxy (see {self.log_path})",
        )
        if proc.poll() is not None:
            raise RuntimeError(
                f"the delay proxy exited {proc.returncode}: {self.log_path.read_text()[-2000:]}"
            )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


if __name__ == "__main__":
    sys.exit(main())
