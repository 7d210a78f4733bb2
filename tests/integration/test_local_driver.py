"""The local-process driver starts real supervisors and stops them, main process included."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import psutil
import pytest

from gateway.config import LocalDriverSettings
from gateway.drivers.local import LocalDriver

STUBBORN = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('up', flush=True); time.sleep(120)"
)


async def test_delete_kills_a_main_process_that_ignores_sigterm(tmp_path: Path) -> None:
    driver = LocalDriver(LocalDriverSettings(work_dir=tmp_path), gateway_address="127.0.0.1:9")
    sandbox = await driver.create("stubborn", [sys.executable, "-c", STUBBORN])
    try:
        for _ in range(100):
            kids = psutil.Process(sandbox.process.pid).children(recursive=True)
            if kids and "main process started" in sandbox.log_path.read_text():
                break
            await asyncio.sleep(0.1)
        assert kids, sandbox.log_path.read_text()
        await driver.delete("stubborn", grace_s=1.0)
        _, alive = psutil.wait_procs(kids, timeout=10)
        assert not alive, f"left running: {alive}"
    finally:
        await driver.close()


async def test_a_sandbox_id_that_is_not_a_name_is_refused(tmp_path: Path) -> None:
    driver = LocalDriver(LocalDriverSettings(work_dir=tmp_path / "w"), gateway_address="127.0.0.1:9")
    with pytest.raises(ValueError, match="not a valid name"):
        await driver.create("../../etc", ["true"])
    assert not (tmp_path / "etc").exists()
