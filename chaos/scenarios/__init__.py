"""The chaos suite's scenarios, registered with chaos.suite.scenario when imported: network faults
(network.py: cuts, resets, one-way cuts, delay, loss, a flapping link) and process and storage faults
(processes.py: kill -9 of a gateway or a supervisor, a rolling restart, PostgreSQL restart and failover,
a full journal disk, the reconnect storm)."""

from chaos.scenarios import network, processes

__all__ = ["network", "processes"]
