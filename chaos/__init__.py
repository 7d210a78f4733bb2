"""Scale and chaos tooling for the gateway: the Go scale simulator (chaos/sim, built by chaos/build.sh),
the bare grpc.aio echo baseline (chaos/echo_server.py) and the scale benchmark (chaos/scale.py).

``python -m chaos bench`` runs the benchmark; the chaos suite (``python -m chaos run NAME|all``) will
sit beside it.
"""
