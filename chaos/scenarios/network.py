"""Network faults between a sandbox and its gateway, in network namespaces the run creates."""

from __future__ import annotations
