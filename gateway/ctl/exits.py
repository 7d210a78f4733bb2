"""The exit statuses of ``openshell-gateway``, one table for the code and for docs/cli.md.

Scripts branch on them, so each means one thing whatever the command: the API's answer decides
(404 is "not found", 401/403 "not allowed", 5xx or no answer "unavailable"), never the command.
"""

from __future__ import annotations

from openshell_wire.configfile import EX_CONFIG

OK = 0
#: The API refused the request (a 4xx other than 401, 403 and 404; its sentence is printed), a
#: command the supervisor answered as failed (``signal``/``stop --wait``), or a local check failed.
REFUSED = 1
#: argparse's own: an unknown option, a missing argument, a command word without ``--``.
USAGE = 2
#: The sandbox or command does not exist, or is not one the caller may see (the API's 404).
NOT_FOUND = 3
#: The gateway cannot be reached, or answered 5xx; the database or cluster at ``serve``'s start.
UNAVAILABLE = 69
#: No usable token, or the API refused it (401) or its role (403); the message says what to run.
NOPERM = 77
#: A bad configuration: the client config file (named with the key), or the server's.
CONFIG = EX_CONFIG
#: Any command interrupted by Ctrl-C (SIGINT) before it finished: the shell's 128 + 2. Not
#: ``get --watch`` and ``logs -f``, which end with 0 on Ctrl-C: that is their end.
INTERRUPTED = 130

TABLE: tuple[tuple[int, str], ...] = (
    (OK, "done (also `get --watch` and `logs -f` ended by Ctrl-C)"),
    (REFUSED, "the API refused the request (4xx other than 401/403/404, its sentence printed), a "
     "command the supervisor answered `failed` (`--wait`), or `openshell-supervisor install` failed"),
    (USAGE, "a usage error: an unknown option or a stray word (in `create`: anything before `--` "
     "that is not one of its options), a missing argument, a bad value (said which)"),
    (NOT_FOUND, "no such sandbox or command, or not one the caller may see (the API's 404)"),
    (UNAVAILABLE, "unavailable: the API unreachable or answering 5xx, a command no supervisor "
     "answered within `--wait`'s `--timeout` (or that expired), a `logs -f` the gateway ended "
     "before its end (a shutdown: said on stderr); the database or cluster at start"),
    (NOPERM, "no usable token, or the API refused it (401) or the caller's role (403); says what to run"),
    (CONFIG, "a configuration error: the client config file (file and key named), `config check`, "
     "and any server command before it opens or binds anything"),
    (INTERRUPTED, "any command interrupted by Ctrl-C (SIGINT) before it finished, as a shell counts "
     "it (128 + 2), except `get --watch` and `logs -f` (0); an interrupted `login` keeps nothing"),
)  # fmt: skip


def for_status(status: int | None) -> int:
    """The exit status for an API answer's HTTP status (None: no answer at all)."""
    if status is None or status >= 500:
        return UNAVAILABLE
    if status in (401, 403):
        return NOPERM
    if status == 404:
        return NOT_FOUND
    return REFUSED
