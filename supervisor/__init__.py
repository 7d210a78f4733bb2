"""The OpenShell sandbox supervisor: runs the main process, journals what it sees, and keeps a
resumable session to the gateway. It imports ``openshell_wire`` and never the gateway."""
