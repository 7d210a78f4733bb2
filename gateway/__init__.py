"""The OpenShell gateway: holds supervisor sessions, stores their events, serves the API.
It imports ``openshell_wire`` and never the supervisor."""
