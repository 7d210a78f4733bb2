"""Scale and chaos tooling for the gateway: the Go scale simulator (chaos/sim, built by chaos/build.sh),
the bare grpc.aio echo baseline (chaos/echo_server.py) and the scale benchmark (chaos/scale.py).

``python -m chaos bench`` runs the benchmark; ``python -m chaos run NAME|all|ci`` runs the chaos suite
(chaos/run.py: the runner and its report; chaos/suite.py: what a scenario is; chaos/invariants.py:
what every scenario checks; chaos/scenarios/: the faults; chaos/net.py and chaos/proxy.py: the
network's namespaces, cuts, resets, loss and delay; chaos/common.py: the scenarios' shared helpers).
"""
