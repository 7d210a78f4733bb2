"""The ``otlp_logs`` section's checks (gateway.config.OtlpLogsSettings)."""

from __future__ import annotations

import pytest

from gateway.config import OtlpLogsSettings


def test_header_names_are_lowercased() -> None:
    # gRPC refuses a metadata key with capitals (INTERNAL, invalid metadata) at every export.
    s = OtlpLogsSettings.model_validate({"headers": {"Authorization": "Bearer x", "X-Api-Key": "k"}})
    assert s.headers == {"authorization": "Bearer x", "x-api-key": "k"}


def test_header_names_gRPC_cannot_send_are_refused() -> None:
    with pytest.raises(ValueError, match=r"'x api key'.*not a gRPC metadata key"):
        OtlpLogsSettings.model_validate({"headers": {"x api key": "k"}})
    with pytest.raises(ValueError, match="'X-Key' and 'x-key' are the same"):
        OtlpLogsSettings.model_validate({"headers": {"X-Key": "a", "x-key": "b"}})
