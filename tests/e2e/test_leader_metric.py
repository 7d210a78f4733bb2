"""The leader gauge (``openshell_gateway_leader``, issue 23 point 1) of real gateway processes: two
replicas with the Kubernetes driver against the real API server the tests build (``kubeconfig``)
on one real PostgreSQL database, set up as tests/e2e/test_leader_election.py sets them up. Read
from each one's metrics listener: the Lease's holder says 1, the other 0; the holder stopped
(SIGTERM releases the Lease), the other says 1 once it took the Lease over.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from lightkube import Client
from prometheus_client.parser import text_string_to_metric_families

from gateway.drivers.kubernetes import RBAC_RULES
from gateway.leader import lease_rules
from tests.e2e.test_leader_election import LEASE, TAKEOVER_S, _gateway, _replica_id, lease
from tests.integration.conftest import database, database_url, pg_server, pg_url
from tests.integration.test_store_postgres import pg, pytestmark
from tests.support import kubeaccess
from tests.support.procs import GatewayProcess, wait_until

# The PostgreSQL fixtures (tests/integration/conftest.py: this directory is outside its reach) and skip.
__all__ = ["database", "database_url", "pg", "pg_server", "pg_url", "pytestmark"]


@pytest.fixture(scope="module")
def namespace(admin: Client) -> Iterator[str]:
    with kubeaccess.namespace(admin, "os-leader-metric") as name:
        yield name


def leader_gauge(gw: GatewayProcess) -> float | None:
    """The gateway's ``openshell_gateway_leader`` from its /metrics (None: not exported)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.ops_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "openshell_gateway_leader":
            (sample,) = family.samples
            return sample.value
    return None


def test_the_leader_gauge_says_which_replica_leads(
    admin: Client, kubeconfig: Path, namespace: str, pg_url: str, tmp_path: Path
) -> None:
    identity = kubeaccess.identity_with_rules(
        admin, kubeconfig, namespace, [*RBAC_RULES, *lease_rules(LEASE)], tmp_path / "kc", name="gateway"
    )
    a = _gateway(tmp_path / "a", namespace=namespace, identity=identity, database_url=pg_url)
    b = _gateway(tmp_path / "b", namespace=namespace, identity=identity, database_url=pg_url)
    by_id = {_replica_id(a): a, _replica_id(b): b}
    try:
        a.start()
        b.start()
        holder, _ = wait_until(
            lambda: (held := lease(admin, namespace))[0] in by_id and held, timeout=30, what="a leader"
        )
        leader = by_id[holder]
        other = b if leader is a else a
        wait_until(lambda: leader_gauge(leader) == 1.0, timeout=30, what="the holder's gauge at 1")
        assert leader_gauge(other) == 0.0, "the other campaigns: 0"

        leader.stop()  # SIGTERM: the Lease is released, the other takes it at its next try
        wait_until(
            lambda: lease(admin, namespace)[0] == _replica_id(other), timeout=TAKEOVER_S, what="the takeover"
        )
        wait_until(lambda: leader_gauge(other) == 1.0, timeout=30, what="the new holder's gauge at 1")
    finally:
        for gw in (a, b):
            gw.stop()
