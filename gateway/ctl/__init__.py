"""The operator's side of ``openshell-gateway``: the commands that talk to a gateway's HTTP API.

``gateway.cli`` builds one parser for the whole program; the API commands (``get``, ``logs``,
``signal``, ``stop``, ``commands``, ``create``, ``delete``, ``version``, ``status``, ``fleet``,
``login``, and the client half of ``config``) live here, one module per job:

- :mod:`gateway.ctl.contexts`: the client config file and its named contexts, and which API URL,
  token file and ``--insecure`` a command uses (flag > environment > file > default);
- :mod:`gateway.ctl.parser`: their argparse parsers (help with defaults and examples);
- :mod:`gateway.ctl.calls`: the HTTP requests, each failure an :class:`~gateway.ctl.calls.ApiCallError`
  with the API's own sentence and status;
- :mod:`gateway.ctl.output`: tables (aligned, ids never cut), JSON and YAML;
- :mod:`gateway.ctl.commands`: one function per command, and the one place where failures become
  exit statuses (:mod:`gateway.ctl.exits`).

The server side (``serve``, ``migrate``, ``demo``, ``config check|schema``) stays in
:mod:`gateway.cli`.
"""
