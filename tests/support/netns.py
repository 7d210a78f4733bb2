"""Two test hosts in network namespaces joined by a veth pair, and the nft rule sets that cut them:
a re-export of chaos/net.py, where they live now (the chaos suite's network faults use them too)."""

from chaos.net import CutDirection, NetPair, netns_unavailable

__all__ = ["CutDirection", "NetPair", "netns_unavailable"]
