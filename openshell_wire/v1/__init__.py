"""Generated stubs of openshell.v1 (see proto/generate.py)."""
