"""Process and storage faults: gateways and supervisors killed, replicas restarted, the database restarted
or failed over, the journal's disk full, the reconnect storm."""

from __future__ import annotations
