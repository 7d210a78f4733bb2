"""Listen addresses (``host:port``) as both components' config validation reads them.

A listener's address is checked when the configuration is, so ``config check`` refuses what the
listener would at start, or would not notice: gRPC core reads ``999.1.1.1`` as a host name it
cannot resolve and refuses an empty host, and aiohttp binds port 99999 as 34463 (the port modulo
65536) without a word. The addresses themselves are the standard library's (:mod:`ipaddress`).
"""

from __future__ import annotations

import ipaddress
import re

# One DNS label (RFC 1123): letters, digits and inner hyphens, 1 to 63 characters.
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


def listen_address_problem(address: str, *, host_required: bool = False) -> str | None:
    """What is wrong with ``address`` as a ``host:port`` to listen on, or None.

    The host is an IPv4 address, an IPv6 address in brackets (``[::]:7070``) or a DNS name; empty
    (``:7070``) means every interface unless ``host_required`` (gRPC core refuses it). The port is
    0 (any free port) to 65535."""
    example = "e.g. 127.0.0.1:7070, 0.0.0.0:7070 or [::]:7070"
    host, sep, raw = address.rpartition(":")
    if not sep or any(c in address for c in "/?#@ \t"):
        return f"{address!r} is not host:port ({example})"
    if not raw:
        return f"{address!r} has no port ({example})"
    if not (raw.isascii() and raw.isdigit()):
        return f"{address!r}: port {raw!r} is not a number ({example})"
    port = int(raw)
    if port > 65535:
        return f"{address!r}: port {port} is out of range 0-65535"
    if not host:
        if host_required:
            return f"{address!r} has no host: name one, e.g. 0.0.0.0:{port} (every interface)"
        return None
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return f"{address!r}: {host[1:-1]!r} in brackets is not an IPv6 address"
        return None
    if ":" in host:
        return f"{address!r}: an IPv6 address goes in brackets, e.g. [{host}]:{port}"
    if all(part.isdigit() for part in host.split(".")):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return f"{address!r}: {host!r} is not an IPv4 address"
        return None
    labels = host.lower().removesuffix(".").split(".")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        return f"{address!r}: {host!r} is neither an IP address nor a host name"
    return None
