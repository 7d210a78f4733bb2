"""Helpers shared by the integration and end-to-end tests: real processes, real ports, real files."""
