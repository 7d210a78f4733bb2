#!/usr/bin/env bash
# Install everything the tests need, then run them: stub freshness, ruff, mypy --strict, pytest.
# This is the README's test command, and .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# Not the chaos extra (matplotlib, ~200 MiB, for the bench's plots only): the install stays fast.
.venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'

# System tools some tests use (each skips with the reason where its tool is missing): nft and ip
# for network cuts, Prometheus and promtool for the metrics tests, strace for the write audit.
if [ "$(id -u)" = 0 ]; then
  missing=()
  command -v nft >/dev/null 2>&1 || missing+=(nftables)
  command -v ip >/dev/null 2>&1 || missing+=(iproute2)
  command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
  command -v strace >/dev/null 2>&1 || missing+=(strace)
  # The image-volume tests: the supervisor tree (python3-venv for its pip), OCI registry, a busybox
  # sandbox under bubblewrap.
  /usr/bin/python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
  command -v gcc >/dev/null 2>&1 || missing+=(gcc libc6-dev)  # the tree's static launcher, the node's pause
  command -v skopeo >/dev/null 2>&1 || missing+=(skopeo)
  command -v umoci >/dev/null 2>&1 || missing+=(umoci)
  command -v docker-registry >/dev/null 2>&1 || missing+=(docker-registry)
  command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
  [ -x /bin/busybox ] || missing+=(busybox-static)
  # The local cluster's real node (tests/support/kubenode.py) and the gateway image's root filesystem.
  command -v runc >/dev/null 2>&1 || missing+=(runc)
  command -v iptables >/dev/null 2>&1 || missing+=(iptables)
  command -v ipset >/dev/null 2>&1 || missing+=(ipset)
  command -v mmdebstrap >/dev/null 2>&1 || missing+=(mmdebstrap)
  if [ "${#missing[@]}" -gt 0 ]; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
      >/dev/null 2>&1 || echo "warning: could not install ${missing[*]}; the tests that need them will skip"
  fi
fi

# The local Kubernetes control plane (kube-apiserver, etcd, ... built from the Go module proxy;
# minutes the first time, then cached by the pins' hash). Built here rather than inside the first
# test that needs it; without Go, or if the build fails, the live Kubernetes tests skip with the reason.
# The same for the local cluster's real node (kubelet, kube-proxy, containerd, CNI plugins, kube-router).
if command -v go >/dev/null 2>&1 && [ -z "${KUBECONFIG:-}" ]; then
  echo "== Kubernetes control plane and node (tests/cluster/build.sh)"
  bash tests/cluster/build.sh >/dev/null || echo "warning: the control plane did not build; the live Kubernetes tests will skip"
  bash tests/cluster/build.sh node >/dev/null || echo "warning: the node did not build; the tests on a real node will skip"
fi
# The scale simulator (chaos/sim; ~45 s cold, then cached by its sources' hash), built here too.
if command -v go >/dev/null 2>&1; then
  echo "== scale simulator (chaos/build.sh)"
  bash chaos/build.sh >/dev/null || echo "warning: the simulator did not build; tests/integration/test_simulator.py will fail"
fi

echo "== generated stubs";  .venv/bin/python proto/generate.py --check
echo "== ruff";             .venv/bin/ruff check . && .venv/bin/ruff format --check .
echo "== mypy --strict";    .venv/bin/mypy supervisor gateway openshell_wire chaos
echo "== pytest"
set +e
.venv/bin/pytest -q -rs "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit "$rc"
