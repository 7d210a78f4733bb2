"""Session-wide fixtures shared by every test directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.kubecluster import kube_cluster_fixture


@pytest.fixture(scope="session")
def kubeconfig() -> Iterator[Path]:
    """A KUBECONFIG path: ``$KUBECONFIG`` if set, else a local etcd + kube-apiserver started (and built,
    on first use: minutes) for this session, else the test skips with the reason."""
    yield from kube_cluster_fixture()
