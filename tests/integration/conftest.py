from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import GatewayProcess, SupervisorProcess


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(tmp_path / "gateway")
    yield gw
    gw.stop()


@pytest.fixture
def supervisors() -> Iterator[list[SupervisorProcess]]:
    started: list[SupervisorProcess] = []
    yield started
    for sv in started:
        sv.stop()
