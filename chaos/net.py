"""Two hosts in network namespaces joined by a veth pair, and the nft rule sets that break the link
between them: the chaos suite's network faults (chaos/scenarios/network.py) and the cut tests'.

The gateway host and the sandbox host get addresses in 10.213.<n>.0/30: hosts of our own, in
namespaces the run creates and removes; nothing leaves the machine. Every fault is a rule set on the
sandbox host (table ``inet oscut``), so :meth:`NetPair.heal` undoes any of them:

- :meth:`NetPair.cut` drops packets (no reset, like a dead link), in both directions or only one, so
  only timeouts can notice it;
- :meth:`NetPair.reset` answers every packet either way with a TCP reset: the sandbox's own sends are
  refused at once, and the gateway's get a RST back, so both ends see the connection die as soon as
  each sends (a heartbeat at most later);
- :meth:`NetPair.loss` drops a random percentage of packets (``numgen random``), both ways or one:
  TCP retransmits, so the session stays up but slows; this kernel has no netem, so delay is
  chaos/proxy.py's.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

#: Which packets a cut drops, seen from the sandbox.
CutDirection = Literal["both", "to_gateway", "from_gateway"]


def netns_unavailable() -> str | None:
    """The reason network-namespace tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (apt install iproute2 nftables)"
    probe = f"osprobe{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _run(*argv: str, stdin: str | None = None) -> None:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")


@dataclass
class NetPair:
    gateway_ns: str
    sandbox_ns: str
    gateway_ip: str
    sandbox_ip: str

    @classmethod
    def create(cls, *, gateway_on_host: bool = False) -> NetPair:
        """With ``gateway_on_host`` the gateway side is this machine's own namespace (``gateway_ns``
        is empty): for a gateway that must also reach services on the host's 127.0.0.1."""
        tag = secrets.token_hex(3)
        subnet = int(tag, 16) % 250 + 1
        pair = cls(
            "" if gateway_on_host else f"osgw-{tag}",
            f"ossb-{tag}",
            f"10.213.{subnet}.1",
            f"10.213.{subnet}.2",
        )
        veth_g, veth_s = f"vg{tag}", f"vs{tag}"
        try:
            if pair.gateway_ns:
                _run("ip", "netns", "add", pair.gateway_ns)
            _run("ip", "netns", "add", pair.sandbox_ns)
            _run("ip", "link", "add", veth_g, "type", "veth", "peer", "name", veth_s)
            if pair.gateway_ns:
                _run("ip", "link", "set", veth_g, "netns", pair.gateway_ns)
            _run("ip", "link", "set", veth_s, "netns", pair.sandbox_ns)
            for ns, dev, ip in (
                (pair.gateway_ns, veth_g, pair.gateway_ip),
                (pair.sandbox_ns, veth_s, pair.sandbox_ip),
            ):
                where = ["-n", ns] if ns else []
                _run("ip", *where, "addr", "add", f"{ip}/30", "dev", dev)
                _run("ip", *where, "link", "set", dev, "up")
                if ns:
                    _run("ip", "-n", ns, "link", "set", "lo", "up")
        except BaseException:
            # Half made (a subnet taken by a parallel run, say): leave no namespace or link behind.
            # A veth still in this namespace (not yet moved) goes with its own deletion.
            subprocess.run(["ip", "link", "del", veth_g], capture_output=True)
            pair.destroy()
            raise
        return pair

    def cut(self, direction: CutDirection = "both", *, port: int | None = None) -> None:
        """Drop packets between the two hosts (``to_gateway``: only the sandbox's, ``from_gateway``:
        only the gateway's, ``both``); with ``port``, only those of the gateway's TCP port ``port``
        (after any DNAT: one gateway of several partitioned)."""
        to_port = f" tcp dport {port}" if port is not None else ""
        from_port = f" tcp sport {port}" if port is not None else ""
        inbound = f"ip saddr {self.gateway_ip}{from_port} drop;" if direction != "to_gateway" else ""
        outbound = f"ip daddr {self.gateway_ip}{to_port} drop;" if direction != "from_gateway" else ""
        rules = f"""
        table inet oscut {{
          chain input {{
            type filter hook input priority 0; policy accept; {inbound}
          }}
          chain output {{
            type filter hook output priority 0; policy accept; {outbound}
          }}
        }}
        """
        _run("ip", "netns", "exec", self.sandbox_ns, "nft", "-f", "-", stdin=rules)

    def reset(self, direction: CutDirection = "both") -> None:
        """Answer packets between the two hosts with a TCP reset instead of delivering them (a peer
        that lost the connection's state, a middlebox that killed it): ``to_gateway`` refuses the
        sandbox's sends (its socket sees the reset), ``from_gateway`` the gateway's (the reset goes
        back to the gateway), ``both`` both. Non-TCP packets are dropped."""
        # The resets nft makes pass both chains too: the one sent back to the gateway leaves through
        # the output hook, the one for the sandbox's own socket comes in through the input hook, and
        # a reset of a reset is never sent: without the exception both would be dropped.
        passing = "tcp flags & rst == rst accept;"
        inbound = (
            f"{passing} ip saddr {self.gateway_ip} meta l4proto tcp reject with tcp reset; "
            f"ip saddr {self.gateway_ip} drop;"
            if direction != "to_gateway"
            else passing
        )
        outbound = (
            f"{passing} ip daddr {self.gateway_ip} meta l4proto tcp reject with tcp reset; "
            f"ip daddr {self.gateway_ip} drop;"
            if direction != "from_gateway"
            else passing
        )
        self._faults(inbound=inbound, outbound=outbound)

    def loss(self, percent: int, direction: CutDirection = "both") -> None:
        """Drop ``percent`` % of the packets between the two hosts at random (each packet drawn on
        its own), in both directions or one."""
        if not 0 <= percent <= 100:
            raise ValueError(f"loss percent must be within 0..100, not {percent}")
        inbound = (
            f"ip saddr {self.gateway_ip} numgen random mod 100 < {percent} counter drop;"
            if direction != "to_gateway"
            else ""
        )
        outbound = (
            f"ip daddr {self.gateway_ip} numgen random mod 100 < {percent} counter drop;"
            if direction != "from_gateway"
            else ""
        )
        self._faults(inbound=inbound, outbound=outbound)

    def dropped_packets(self) -> int | None:
        """The packets the loss rules in place have dropped so far (their nft counters), or None
        when no fault with counters is in place: proof that the rule really dropped something."""
        listing = self.sandbox_exec("nft", "list", "table", "inet", "oscut", check=False)
        found = [int(n) for n in re.findall(r"counter packets (\d+)", listing)]
        return sum(found) if found else None

    def _faults(self, *, inbound: str, outbound: str) -> None:
        # One table for every fault: a new fault replaces the one in place (no heal needed between
        # two), and heal() removes whichever is there.
        self.sandbox_exec("nft", "delete", "table", "inet", "oscut", check=False)
        rules = f"""
        table inet oscut {{
          chain input {{
            type filter hook input priority 0; policy accept; {inbound}
          }}
          chain output {{
            type filter hook output priority 0; policy accept; {outbound}
          }}
        }}
        """
        _run("ip", "netns", "exec", self.sandbox_ns, "nft", "-f", "-", stdin=rules)

    def faulted(self) -> bool:
        """A fault (cut, reset, loss) is in place."""
        return "oscut" in self.sandbox_exec("nft", "list", "tables", check=False)

    def service(self, port: int, *, to_port: int) -> None:
        """Send the sandbox's new connections to the gateway host's ``port`` on to ``to_port``, as a
        Kubernetes Service does (kube-proxy's DNAT): calling it again points new connections
        elsewhere, while conntrack keeps each existing connection on the port it was given."""
        self.sandbox_exec("nft", "delete", "table", "ip", "osservice", check=False)
        rules = f"""
        table ip osservice {{
          chain output {{
            type nat hook output priority -100; policy accept;
            ip daddr {self.gateway_ip} tcp dport {port} dnat to {self.gateway_ip}:{to_port};
          }}
        }}
        """
        _run("ip", "netns", "exec", self.sandbox_ns, "nft", "-f", "-", stdin=rules)

    def sandbox_exec(self, *argv: str, check: bool = True) -> str:
        """Run a command in the sandbox's namespace (``ss``, ``nft``); its standard output."""
        done = subprocess.run(["ip", "netns", "exec", self.sandbox_ns, *argv], capture_output=True, text=True)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
        return done.stdout

    def heal(self, *, check: bool = True) -> None:
        """Remove the fault in place; with ``check`` off, no error when there is none (cleanup)."""
        if check or self.faulted():
            _run("ip", "netns", "exec", self.sandbox_ns, "nft", "delete", "table", "inet", "oscut")

    def destroy(self) -> None:
        # Deleting a namespace deletes its end of the veth pair, and with it the other end.
        for ns in (self.sandbox_ns, self.gateway_ns):
            if ns:
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)


#: The namespaces :meth:`NetPair.create` names, and the run's age past which an empty one is a leftover
#: (longer than any trial takes between creating its namespaces and starting a process in them).
_PAIR_NS = re.compile(r"^os(gw|sb)-[0-9a-f]{6}$")
LEFTOVER_AGE_S = 600.0


def sweep_leftovers(
    *,
    min_age_s: float = LEFTOVER_AGE_S,
    netns_dir: Path = Path("/run/netns"),
    only: Collection[str] | None = None,
) -> list[str]:
    """Remove what a run stopped hard (SIGKILL, a second signal before this version) left behind, and
    say so, one line each: a namespace of ours older than ``min_age_s`` with no process in it is
    deleted; one with processes is left alone (another run, or a test, may still use it) and named;
    a tmpfs still mounted on a journal-disk-full journal is named with the command that removes it
    (a mount cannot tell which run made it). Never raises: a sweep that fails is one more line."""
    lines: list[str] = []
    now = time.time()
    try:
        names = sorted(n for n in os.listdir(netns_dir) if _PAIR_NS.match(n) and (only is None or n in only))
    except OSError:
        names = []
    for name in names:
        try:
            age = now - (netns_dir / name).stat().st_mtime
        except OSError:
            continue
        if age < min_age_s:
            continue
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        if pids:
            lines.append(
                f"namespace {name} ({age / 60:.0f} min old) still has processes {pids[:5]}: left alone"
            )
            continue
        gone = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True)
        if gone.returncode == 0:
            lines.append(f"removed the leftover namespace {name} ({age / 60:.0f} min old, no process in it)")
        else:
            lines.append(f"cannot remove the leftover namespace {name}: {gone.stderr.strip()}")
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        mounts = []
    for entry in mounts:
        fields = entry.split()
        if len(fields) >= 3 and fields[2] == "tmpfs" and fields[1].endswith("/full-disk/journal"):
            lines.append(f"a chaos journal tmpfs is still mounted at {fields[1]} (umount {fields[1]})")
    return lines
