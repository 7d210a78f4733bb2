"""Sandbox drivers: how the gateway makes a sandbox exist (a local process today, a Kubernetes pod
with the supervisor as an image volume next)."""
