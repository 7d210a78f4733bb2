"""The labelled counters start at 0 for every label their owners use (gateway.metrics), so that
rate() and increase() see the first refusal, hint or record of a replica's life."""

from __future__ import annotations

from prometheus_client import generate_latest

from gateway import admission, drain, metrics, rebalance
from gateway.metrics import GatewayMetrics
from gateway.sessions import SessionRegistry
from openshell_wire.records import HealthState, LifecycleKind
from openshell_wire.v1 import openshell_pb2 as pb


def test_the_label_lists_are_their_owners_values() -> None:
    assert set(metrics.ADMISSION_REFUSALS) == {r.value for r in admission.Refusal}
    assert set(metrics.HINT_REASONS) == {
        drain.DRAIN,
        drain.SHUTDOWN,
        rebalance.REASON_REBALANCE,
        rebalance.REASON_MAX_AGE,
    }
    assert "REJECT_CODE_OVERLOADED" in metrics.REJECT_CODES
    assert set(metrics.REJECT_CODES) | {"REJECT_CODE_UNSPECIFIED"} == set(pb.RejectCode.keys())


def test_every_known_series_is_exported_at_zero_before_anything_happened() -> None:
    text = generate_latest(GatewayMetrics(SessionRegistry()).registry).decode()
    expected = [
        *(f'sessions_rejected_total{{code="{c}"}} 0.0' for c in metrics.REJECT_CODES),
        *(f'admission_refusals_total{{reason="{r}"}} 0.0' for r in metrics.ADMISSION_REFUSALS),
        *(f'reconnect_hints_total{{reason="{r}"}} 0.0' for r in metrics.HINT_REASONS),
        *(f'supervisor_lifecycle_records_total{{kind="{k.value}"}} 0.0' for k in LifecycleKind),
        *(f'supervisor_health_changes_total{{state="{s.value}"}} 0.0' for s in HealthState),
    ]
    missing = [line for line in expected if f"openshell_gateway_{line}" not in text]
    assert missing == []
