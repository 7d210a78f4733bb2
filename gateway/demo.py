"""``openshell-gateway demo``: the main job on the embedded default, in one command.

Starts a gateway on SQLite, creates one local sandbox through the local-process driver whose
supervisor connects back, lets its main process (a small agent stand-in that writes numbered
lines to stdout and stderr) run, and prints the status as the API reports it: while it runs and
after it exits, with its exit code and last log lines. ``--keep-running`` leaves the gateway
up afterwards for ``openshell-gateway status`` from another terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

from gateway.app import Gateway
from gateway.config import GatewayConfig
from gateway.drivers.local import LocalDriver
from gateway.status import fetch_status, render

log = logging.getLogger(__name__)

DEMO_AGENT = """
import sys, time
n = int(sys.argv[1])
for i in range(1, n + 1):
    print(f"agent step {i}/{n}: thinking...", flush=True)
    if i % 5 == 0:
        print(f"agent note {i}: a line on stderr", file=sys.stderr, flush=True)
    time.sleep(0.5)
print("agent done", flush=True)
"""


async def run_demo(config: GatewayConfig, *, steps: int, keep_running: bool, out: object = None) -> int:
    gateway = Gateway(config)
    await gateway.start()
    driver = LocalDriver(config.drivers.local, gateway_address=gateway.grpc_address)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        sandbox_id = "demo"
        row = await gateway.sandboxes.ensure(
            sandbox_id, driver="local", spec={"command": ["python", "demo-agent.py", str(steps)]}
        )
        agent = config.drivers.local.work_dir / "demo-agent.py"
        agent.parent.mkdir(parents=True, exist_ok=True)
        agent.write_text(DEMO_AGENT)
        await driver.create(
            sandbox_id,
            [sys.executable, "-u", str(agent.resolve()), str(steps)],
            extra_args=["--set", "capture.echo=false"],
            # Supervisor auth is on by default: the supervisor presents a token minted for it.
            credential=await gateway.sandbox_token(sandbox_id, generation=row.generation),
        )
        print(f"gateway: grpc {gateway.grpc_address}, api {gateway.http_url}")
        print(f"sandbox {sandbox_id!r} started; its supervisor log: {driver_log(config, sandbox_id)}\n")
        exit_seen = False
        while not stop.is_set():
            status = await fetch_status(gateway.http_url, lines=3)
            print(render(status), end="\n\n", flush=True)
            exit_seen = any(sb["id"] == sandbox_id and sb["state"] == "exited" for sb in status)
            if exit_seen and not keep_running:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 2.0)
        code = await asyncio.wait_for(driver.wait(sandbox_id), 60) if exit_seen else None
        final = await fetch_status(gateway.http_url, lines=8)
        print("final status:\n" + render(final))
        if code is not None:
            print(f"\nsupervisor exited with {code} (the main process's exit code)")
        return 0 if exit_seen or keep_running else 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await driver.close()
        await gateway.stop()


def driver_log(config: GatewayConfig, sandbox_id: str) -> str:
    return str((config.drivers.local.work_dir / sandbox_id / "supervisor.log").resolve())
