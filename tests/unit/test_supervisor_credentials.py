"""The supervisor's sandbox token: reading a JWT's times without verifying it, choosing the token
to send (the credential file's or the renewed one), the renewal schedule, the renewed token's
file, and the health reason of a refused credential."""

from __future__ import annotations

import base64
import json
import os
import stat
import time
from pathlib import Path

import pytest

from openshell_wire.configfile import load_settings
from openshell_wire.records import HealthState
from supervisor.config import SupervisorConfig
from supervisor.credentials import (
    RENEWED_TOKEN_FILE,
    CredentialError,
    GatewayCredentials,
    RenewedToken,
    TokenTimes,
    jwt_times,
    newest_token,
)
from supervisor.health import HealthMonitor, HealthSettings
from supervisor.session import REFRESH_AT, REFRESH_JITTER, refresh_delay, refresh_retry_delay


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def jwt(claims: object) -> str:
    """A JWT-shaped token with these claims and no valid signature (the supervisor never checks it)."""
    header = _b64(json.dumps({"alg": "ES256", "typ": "JWT"}).encode())
    return f"{header}.{_b64(json.dumps(claims).encode())}.c2lnbmF0dXJl"


# -- reading the payload ---------------------------------------------------------------------


def test_the_times_of_a_jwt_are_read_from_its_payload() -> None:
    assert jwt_times(jwt({"sub": "sb", "iat": 1000, "exp": 2000})) == TokenTimes(2000.0, 1000.0)
    assert jwt_times(jwt({"exp": 2000.5})) == TokenTimes(2000.5, None)
    # An iat at or past exp is no lifetime to count from.
    assert jwt_times(jwt({"iat": 3000, "exp": 2000})) == TokenTimes(2000.0, None)
    # Padding-free base64url with the characters that differ from plain base64 ('-' and '_').
    tricky = jwt({"exp": 2000, "n": "\u00ff\u00fe>?"})
    assert "-" in tricky or "_" in tricky
    assert jwt_times(tricky) == TokenTimes(2000.0, None)


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("", id="empty"),
        pytest.param("an-opaque-token", id="opaque"),
        pytest.param("a.b", id="two parts"),
        pytest.param("a..c", id="empty payload"),
        pytest.param("a.!!!notbase64!!!.c", id="not base64"),
        pytest.param(f"a.{_b64(b'not json')}.c", id="not json"),
        pytest.param(f"a.{_b64(bytes([0xFF, 0xFE]))}.c", id="not utf-8"),
        pytest.param(jwt([1, 2]), id="not an object"),
        pytest.param(jwt({"sub": "sb"}), id="no exp"),
        # Upstream's gateway mints exp 0 for "never expires" (its default TTL of 0).
        pytest.param(jwt({"sub": "sb", "iat": 1000, "exp": 0}), id="exp 0"),
        pytest.param(jwt({"exp": "2000"}), id="exp a string"),
        pytest.param(jwt({"exp": True}), id="exp a bool"),
        pytest.param(jwt({"exp": None}), id="exp null"),
        pytest.param("a." + _b64(b'{"exp": NaN}') + ".c", id="exp NaN"),
        pytest.param("a." + _b64(b'{"exp": Infinity}') + ".c", id="exp infinite"),
    ],
)
def test_anything_but_a_jwt_with_exp_has_no_times(token: str) -> None:
    assert jwt_times(token) is None


# -- which token is sent -----------------------------------------------------------------------


NOW = 1_000_000.0


def test_the_newest_valid_token_is_sent() -> None:
    old = jwt({"exp": NOW + 100})
    new = jwt({"exp": NOW + 200})
    expired = jwt({"exp": NOW - 1})
    # The renewed token (second) wins when it expires later than the file's.
    assert newest_token([old, new], now=NOW) == new
    # A rotated file that is newer wins over the renewed one; a tie goes to the file.
    assert newest_token([new, old], now=NOW) == new
    same = jwt({"exp": NOW + 200, "jti": "other"})
    assert newest_token([same, new], now=NOW) == same
    # An expired renewed token is never chosen; an expired file token is sent (the refusal says so).
    assert newest_token([old, expired], now=NOW) == old
    assert newest_token([expired, jwt({"exp": NOW - 0.5})], now=NOW) == expired
    assert newest_token([expired, new], now=NOW) == new
    # An opaque file token cannot be compared: the operator's file wins; an opaque renewed one never.
    assert newest_token(["opaque", new], now=NOW) == "opaque"
    assert newest_token([old, "opaque"], now=NOW) == old
    assert newest_token([], now=NOW) is None


def _config(tmp_path: Path, *, refresh: bool = True) -> SupervisorConfig:
    return load_settings(
        SupervisorConfig,
        overrides={
            "sandbox_id": "creds",
            "gateway": {"credential_file": str(tmp_path / "token"), "credential_refresh": refresh},
            "journal": {"directory": str(tmp_path / "journal")},
        },
        use_env=False,
    )


def _credentials(config: SupervisorConfig) -> GatewayCredentials:
    return GatewayCredentials(config.gateway, renewed_path=config.journal.directory / RENEWED_TOKEN_FILE)


def test_the_renewed_token_is_stored_privately_and_survives_a_restart(tmp_path: Path) -> None:
    config = _config(tmp_path)
    minted = jwt({"exp": time.time() + 60})
    renewed = jwt({"exp": time.time() + 120})
    (tmp_path / "token").write_text(minted + "\n")
    creds = _credentials(config)
    assert creds.token() == minted
    creds.store_renewed(renewed)
    assert creds.token() == renewed
    stored = config.journal.directory / RENEWED_TOKEN_FILE
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert stored.read_text() == renewed + "\n"
    assert [p.name for p in stored.parent.iterdir()] == [RENEWED_TOKEN_FILE], "no temporary left"

    # A restarted supervisor (a new container, the same emptyDir) starts from the renewed token,
    # and still has it while the credential file is gone.
    again = _credentials(config)
    assert again.token() == renewed
    os.unlink(tmp_path / "token")
    assert _credentials(config).token() == renewed

    # A rotated file that is newer than the renewed token wins.
    newer = jwt({"exp": time.time() + 600})
    (tmp_path / "token").write_text(newer)
    assert _credentials(config).token() == newer


def test_an_expired_renewed_token_does_not_stand_in_for_a_missing_file(tmp_path: Path) -> None:
    config = _config(tmp_path)
    RenewedToken(config.journal.directory / RENEWED_TOKEN_FILE).store(jwt({"exp": time.time() - 1}))
    with pytest.raises(CredentialError, match="No such file"):
        _credentials(config).token()


def test_a_refused_token_gives_way_to_another_until_a_session_is_accepted(tmp_path: Path) -> None:
    config = _config(tmp_path)
    from_file = jwt({"exp": time.time() + 600})
    stale = jwt({"exp": time.time() + 3000})  # stored, later exp, but no longer accepted
    (tmp_path / "token").write_text(from_file)
    stored = config.journal.directory / RENEWED_TOKEN_FILE
    RenewedToken(stored).store(stale)
    creds = _credentials(config)
    assert creds.token() == stale  # the newest, until the gateway refuses it
    creds.refused(stale)
    assert creds.token() == from_file
    # Both refused: the newest again (the gateway may have refused everything for a while).
    creds.refused(from_file)
    assert creds.token() == stale
    # A rotated file is a token not refused yet: chosen at once.
    fixed = jwt({"exp": time.time() + 601})
    (tmp_path / "token").write_text(fixed)
    assert creds.token() == fixed
    # Accepted with it: the refused stored token is forgotten, in memory and on disk.
    creds.accepted(fixed)
    assert not stored.exists()
    assert creds.token() == fixed
    assert _credentials(config).token() == fixed


def test_an_accepted_session_keeps_a_stored_token_that_was_not_refused(tmp_path: Path) -> None:
    config = _config(tmp_path)
    (tmp_path / "token").write_text(jwt({"exp": time.time() + 60}))
    renewed = jwt({"exp": time.time() + 120})
    creds = _credentials(config)
    creds.store_renewed(renewed)
    creds.refused(creds.token() or "")
    creds.accepted(renewed)
    assert creds.token() == renewed
    assert (config.journal.directory / RENEWED_TOKEN_FILE).read_text().strip() == renewed


@pytest.mark.parametrize("content", ["garbage", "", "two words", jwt({"sub": "no exp"})])
def test_a_bad_renewed_token_file_is_ignored(tmp_path: Path, content: str) -> None:
    config = _config(tmp_path)
    minted = jwt({"exp": time.time() + 60})
    (tmp_path / "token").write_text(minted)
    config.journal.directory.mkdir(parents=True)
    (config.journal.directory / RENEWED_TOKEN_FILE).write_text(content)
    assert _credentials(config).token() == minted


def test_without_credential_refresh_nothing_is_renewed_or_read_back(tmp_path: Path) -> None:
    config = _config(tmp_path, refresh=False)
    minted = jwt({"exp": time.time() + 60})
    (tmp_path / "token").write_text(minted)
    config.journal.directory.mkdir(parents=True)
    (config.journal.directory / RENEWED_TOKEN_FILE).write_text(jwt({"exp": time.time() + 600}))
    creds = _credentials(config)
    assert creds.token() == minted
    assert creds.renewable(minted) is None
    # With it on, the same token is renewable until the gateway says it cannot renew it.
    on = _credentials(_config(tmp_path))
    assert on.renewable(on.token() or "") is not None
    on.not_renewable(minted)
    assert on.renewable(minted) is None


# -- the renewal schedule ----------------------------------------------------------------------


def test_a_token_is_renewed_at_about_80_percent_of_its_lifetime() -> None:
    times = TokenTimes(expires_at=NOW + 1000, issued_at=NOW)
    assert refresh_delay(times, now=NOW, seen_at=NOW) == pytest.approx(800)
    assert refresh_delay(times, now=NOW + 300, seen_at=NOW) == pytest.approx(500)
    # The jitter moves it within +/- REFRESH_JITTER of the lifetime, never further.
    low = refresh_delay(times, now=NOW, seen_at=NOW, spread=-1)
    high = refresh_delay(times, now=NOW, seen_at=NOW, spread=1)
    assert low == pytest.approx(1000 * (REFRESH_AT - REFRESH_JITTER))
    assert high == pytest.approx(1000 * (REFRESH_AT + REFRESH_JITTER))
    # Past its point (a supervisor restarted late): at once.
    assert refresh_delay(times, now=NOW + 900, seen_at=NOW) == 0
    assert refresh_delay(times, now=NOW + 2000, seen_at=NOW) == 0
    # Without iat the lifetime counts from when we first had the token.
    no_iat = TokenTimes(expires_at=NOW + 1000)
    assert refresh_delay(no_iat, now=NOW + 500, seen_at=NOW + 500) == pytest.approx(400)


def test_a_failed_renewal_is_retried_with_backoff_before_the_token_expires() -> None:
    delays = [refresh_retry_delay(n, remaining_s=10_000, initial_s=0.5, max_s=30) for n in range(1, 12)]
    assert all(0 < d <= 30 for d in delays)
    assert max(delays[-3:]) >= 15, "it backs off up to the cap"
    # Never past half the time left: the next try comes before the expiry.
    for remaining in (100.0, 10.0, 1.0):
        assert refresh_retry_delay(8, remaining_s=remaining, initial_s=0.5, max_s=30) <= remaining / 2


# -- the health reason ---------------------------------------------------------------------------


def test_a_refused_credential_is_a_health_reason_while_it_lasts(tmp_path: Path) -> None:
    problem = ["gateway refused our credential: UNAUTHENTICATED: token expired"]
    monitor = HealthMonitor(
        HealthSettings(disk_paths=[], cgroup_root=tmp_path),
        main_pid=lambda: None,
        record=lambda _payload: True,
        session_problem=lambda: problem[0],
        proc_cgroup=tmp_path / "no-cgroup",
    )
    record = monitor.check()
    assert monitor.state is HealthState.DEGRADED
    assert problem[0] in record.reasons
    problem[0] = ""
    record = monitor.check()
    assert monitor.state is HealthState.HEALTHY and not record.reasons
