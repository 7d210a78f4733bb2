"""Long blackhole cuts, one-way cuts and a partitioned gateway replica, with real processes.

A cut longer than a few retransmission timeouts leaves the supervisor's old TCP connection
ESTABLISHED on the sandbox side: the kernel retransmits into the void with an exponential backoff
(0.2 s, 0.4 s, ... 25.6 s, 51.2 s apart) and gives up only after many minutes. A supervisor whose
new channels took over the last one's subchannel (gRPC's global pool: that connection, or its
connection attempt with gRPC's own reconnect backoff) came back only with a retransmission or a
gRPC reconnect after the heal, tens of seconds later, and lost its exit when the main process ended
meanwhile; behind a Service it could stay on the partitioned replica. These tests check
the properties, with generous bounds for a loaded machine: the session is back within a few
seconds plus one backoff step of the heal, whether the main process has exited (the exit-delivery
window) or still writes (the ordinary backoff), every line arrives once, the exit code arrives.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.netns import CutDirection, NetPair, netns_unavailable
from tests.support.procs import GatewayProcess, SupervisorProcess, free_port, wait_until, writer_command

_reason = netns_unavailable()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(_reason is not None, reason=_reason or "")]

#: SupervisorProcess connects with gateway.connect_timeout_s=2 and session.reconnect_max_s=2: one
#: backoff step plus one attempt timing out is 4 s; the rest is room for a loaded CI machine. The
#: old behaviour missed it by the next retransmission (about 20 s after these tests' heals).
RESUME_BOUND_S = 2.0 + 2.0 + 5.0
#: Lines of the sandbox whose main process outlives the cut (see the cuts fixture).
_WRITER_LINES = 900


def _local_ports(ss_output: str) -> list[int]:
    """The local ports of ``ss -tnH state established`` lines (Recv-Q Send-Q Local Peer)."""
    return [int(line.split()[2].rpartition(":")[2]) for line in ss_output.splitlines() if line.strip()]


def _exit_stored(gw: GatewayProcess, sandbox_id: str) -> dict[str, object] | None:
    for event in gw.events(sandbox_id, "lifecycle"):
        if event["data"]["kind"] == "exited":
            data: dict[str, object] = event["data"]
            return data
    return None


@dataclass
class _Cut:
    """One sandbox and its gateway on a host pair of their own, cut in one direction."""

    direction: CutDirection
    net: NetPair
    gw: GatewayProcess
    sv: SupervisorProcess
    lines: int
    #: A second sandbox on the same hosts whose main process outlives the cut (direction "both").
    writer: SupervisorProcess | None = None

    @property
    def sandbox_id(self) -> str:
        return self.sv.sandbox_id


@pytest.fixture
def cuts(tmp_path: Path) -> Iterator[list[_Cut]]:
    made: list[_Cut] = []
    try:
        for direction in ("both", "to_gateway", "from_gateway"):
            net = NetPair.create()
            gw = GatewayProcess(
                tmp_path / direction / "gw",
                grpc_host=net.gateway_ip,
                netns=net.gateway_ns,
                heartbeat_interval_s=0.5,
            )
            lines = 400
            sv = SupervisorProcess(
                tmp_path / direction / "sb",
                f"long-cut-{direction.replace('_', '-')}",
                gw.address,
                # 400 lines 50 ms apart: the main process ends about 20 s into the cut.
                writer_command(lines, delay=0.05, exit_code=3),
                netns=net.sandbox_ns,
                # A window that outlasts the cut, so that what is checked is when the session comes
                # back (by the deprecated name, which every supervisor version accepts).
                settings=["session.exit_flush_timeout_s=60"],
            )
            writer = None
            if direction == "both":
                # 900 lines 50 ms apart: it still writes for about 10 s after the heal.
                writer = SupervisorProcess(
                    tmp_path / direction / "writer",
                    "long-cut-writer",
                    gw.address,
                    writer_command(_WRITER_LINES, delay=0.05),
                    netns=net.sandbox_ns,
                )
            made.append(_Cut(direction, net, gw, sv, lines, writer))
        yield made
    finally:
        for cut in made:
            cut.sv.stop()
            if cut.writer is not None:
                cut.writer.stop()
            cut.gw.stop()
            cut.net.destroy()


def test_after_a_long_cut_in_any_direction_the_session_resumes_at_once_and_the_exit_arrives(
    cuts: list[_Cut],
) -> None:
    # The three directions run side by side (one host pair each): one cut's length for all three.
    for cut in cuts:
        cut.gw.start()
    for cut in cuts:
        cut.sv.start()
        if cut.writer is not None:
            cut.writer.start()
    for cut in cuts:
        wait_until(
            lambda c=cut: len(c.gw.log_lines(c.sandbox_id)) >= 5,
            timeout=30,
            what=f"first lines ({cut.direction})",
        )
    for cut in cuts:
        cut.net.cut(cut.direction)
    # Long enough for the old connection's retransmissions to be 25 s apart, shorter than the next
    # one (about 51 s after the cut began): a session that waits for it is far outside the bound.
    time.sleep(28)
    established = {
        cut.direction: cut.net.sandbox_exec("ss", "-tnH", "state", "established", "dst", cut.net.gateway_ip)
        for cut in cuts
    }
    for cut in cuts:
        assert _exit_stored(cut.gw, cut.sandbox_id) is None, (
            f"{cut.direction}: the exit arrived during the cut"
        )
    writer = next(cut.writer for cut in cuts if cut.writer is not None)
    writer_gw = next(cut.gw for cut in cuts if cut.writer is not None)
    stored_before_heal = len(writer_gw.log_lines(writer.sandbox_id))
    assert writer.proc is not None and writer.proc.poll() is None, "the writer ended during the cut"
    healed_at = time.monotonic()
    for cut in cuts:
        cut.net.heal()

    resumed_after: dict[str, float] = {}
    writer_resumed_after: float | None = None
    pending = list(cuts)
    deadline = healed_at + 60
    while (pending or writer_resumed_after is None) and time.monotonic() < deadline:
        for cut in list(pending):
            if _exit_stored(cut.gw, cut.sandbox_id) is not None:
                resumed_after[cut.direction] = time.monotonic() - healed_at
                pending.remove(cut)
        if writer_resumed_after is None and len(writer_gw.log_lines(writer.sandbox_id)) > stored_before_heal:
            writer_resumed_after = time.monotonic() - healed_at
        time.sleep(0.1)

    problems: list[str] = []
    for cut in cuts:
        code = cut.sv.wait(timeout=30)
        log = cut.sv.log_text()
        after = resumed_after.get(cut.direction)
        exited = _exit_stored(cut.gw, cut.sandbox_id)
        if established[cut.direction].strip():
            # An attempt's connection is closed with its channel. One still ESTABLISHED after 28 s
            # of silence is one the supervisor kept, and a new channel could take it over.
            problems.append(
                f"{cut.direction}: connections to the gateway still ESTABLISHED at the heal:\n"
                f"{established[cut.direction]}"
            )
        if after is None or after > RESUME_BOUND_S:
            when = "never" if after is None else f"{after:.1f}s after the heal"
            problems.append(
                f"{cut.direction}: the exit reached the gateway {when} (bound {RESUME_BOUND_S}s); its "
                f"connections to the gateway at the heal:\n{established[cut.direction]}{log[-2000:]}"
            )
        elif code != 3 or exited is None or exited["exit_code"] != 3:
            problems.append(f"{cut.direction}: supervisor exit {code}, stored exit {exited}\n{log[-2000:]}")
        elif cut.gw.log_lines(cut.sandbox_id) != [f"line {i}" for i in range(cut.lines)]:
            problems.append(f"{cut.direction}: lines lost or doubled")
        elif "all records delivered" not in log:
            problems.append(f"{cut.direction}: the supervisor did not see everything acknowledged")
    # The sandbox still running at the heal: no exit hurries its session, the ordinary backoff
    # (capped at 2 s here) brings it back within the same bound, and nothing is lost or doubled.
    writer_log = writer.log_text()
    if writer_resumed_after is None or writer_resumed_after > RESUME_BOUND_S:
        when = "never" if writer_resumed_after is None else f"{writer_resumed_after:.1f}s after the heal"
        problems.append(f"running writer: new lines reached the gateway {when}\n{writer_log[-2000:]}")
    elif (code := writer.wait(timeout=60)) != 0:
        problems.append(f"running writer: supervisor exit {code}\n{writer_log[-2000:]}")
    elif writer_gw.log_lines(writer.sandbox_id) != [f"line {i}" for i in range(_WRITER_LINES)]:
        problems.append("running writer: lines lost or doubled")
    assert not problems, "\n\n".join(problems)


def test_the_exit_is_delivered_at_once_when_the_gateway_returns_during_a_long_backoff(tmp_path: Path) -> None:
    """The main process exits while the supervisor waits out a long reconnect backoff: the exit cuts
    the wait short, and the exit-delivery window reconnects often enough to use the gateway as soon
    as it is there."""
    gw = GatewayProcess(tmp_path / "gw")
    sv = SupervisorProcess(
        tmp_path / "sb",
        "exit-backoff",
        gw.address,  # nothing listens there yet: refused at once, then a backoff of up to 300 s
        writer_command(20, delay=0.05, exit_code=5),
        settings=["session.reconnect_initial_s=300", "session.reconnect_max_s=300"],
    )
    try:
        sv.start()
        wait_until(lambda: "retrying in" in sv.log_text(), timeout=30, what="the first reconnect backoff")
        # The main process has exited and the exit-delivery window begun (Session.deliver_exit's
        # line), while the session was still in its 300 s backoff.
        wait_until(lambda: "delivering what is left" in sv.log_text(), timeout=30, what="the exit")
        assert "session accepted" not in sv.log_text()
        assert sv.proc is not None and sv.proc.poll() is None
        gw.start()
        ready_at = time.monotonic()
        wait_until(lambda: _exit_stored(gw, "exit-backoff"), timeout=60, what="the exit at the gateway")
        delivered_after = time.monotonic() - ready_at
        assert sv.wait(timeout=30) == 5
    finally:
        sv.stop()
        gw.stop()
    log = sv.log_text()
    # One exit backoff step (session.exit_reconnect_max_s, 1 s) plus room for a loaded machine.
    assert delivered_after <= 1.0 + 5.0, (
        f"delivered {delivered_after:.1f}s after the gateway came\n{log[-3000:]}"
    )
    assert gw.log_lines("exit-backoff") == [f"line {i}" for i in range(20)]
    assert "all records delivered" in log


def test_a_partitioned_replica_is_left_for_another_within_seconds(tmp_path: Path) -> None:
    """The supervisor talks to a Service address that DNATs to gateway A. A is partitioned (its
    packets dropped) while the Service already sends new connections to B: conntrack keeps the old
    connection on A, as kube-proxy does. The supervisor must reach B within the stale bound plus a
    backoff step, not when the kernel gives up on A's connection (about 15 minutes).

    A guard more than a reproduction: the supervisor from before the local subchannel pool took
    over A's dead connection here only in some runs (the cut test above shows it every time)."""
    net = NetPair.create()
    a = GatewayProcess(
        tmp_path / "a", grpc_host=net.gateway_ip, netns=net.gateway_ns, heartbeat_interval_s=0.5
    )
    b = GatewayProcess(
        tmp_path / "b", grpc_host=net.gateway_ip, netns=net.gateway_ns, heartbeat_interval_s=0.5
    )
    service_port = free_port()
    lines = 300
    sv = SupervisorProcess(
        tmp_path / "sb",
        "partitioned",
        f"{net.gateway_ip}:{service_port}",
        writer_command(lines, delay=0.05, exit_code=0),
        netns=net.sandbox_ns,
    )
    try:
        a.start()
        b.start()
        net.service(service_port, to_port=a.grpc_port)
        sv.start()
        wait_until(lambda: len(a.log_lines("partitioned")) >= 20, timeout=30, what="first lines at A")
        # The socket's peer stays the Service address (the DNAT is in conntrack, not the socket):
        # the connection to A is the one to the Service now, known by its local port.
        to_a = _local_ports(net.sandbox_exec("ss", "-tnH", "state", "established", "dst", f":{service_port}"))
        assert len(to_a) == 1, to_a
        net.cut(port=a.grpc_port)
        net.service(service_port, to_port=b.grpc_port)
        partitioned_at = time.monotonic()
        wait_until(lambda: b.log_lines("partitioned"), timeout=60, what="lines at B")
        moved_after = time.monotonic() - partitioned_at

        # The connection to A is closed (its unacknowledged bytes keep it in FIN-WAIT), not kept
        # ESTABLISHED for minutes. Not always at once: in some runs it outlived its closed channel
        # while the kernel still held unacknowledged bytes, until about 10 s after the partition
        # (the socket's TCP_USER_TIMEOUT, which gRPC sets from keepalive_timeout_s, 10 s).
        def kept() -> str:
            return net.sandbox_exec("ss", "-tnH", "state", "established", "src", f":{to_a[0]}")

        with contextlib.suppress(AssertionError):
            wait_until(lambda: not kept().strip(), timeout=20, what="the connection to A to close")
        still = kept()
        assert sv.wait(timeout=60) == 0
    finally:
        sv.stop()
        a.stop()
        b.stop()
        net.destroy()
    log = sv.log_text()
    assert not still.strip(), f"the connection to the partitioned replica is kept:\n{still}{log[-3000:]}"
    # The stale bound (3 x 0.5 s) plus one attempt on A's dead connection (2 s) and one backoff step
    # (2 s), plus room for a loaded machine.
    assert moved_after <= 1.5 + 2.0 + 2.0 + 5.0, (
        f"reached B {moved_after:.1f}s after the partition\n{log[-3000:]}"
    )
    at_a, at_b = a.log_lines("partitioned"), b.log_lines("partitioned")
    expected = [f"line {i}" for i in range(lines)]
    # B resumes where the journal stands (A's acknowledged records are trimmed): it holds a tail
    # of the lines that reaches the end, and with what A stored before the partition, all of them.
    assert at_b == expected[len(expected) - len(at_b) :]
    assert sorted(set(at_a) | set(at_b), key=expected.index) == expected
    assert _exit_stored(b, "partitioned") is not None
