#!/usr/bin/env bash
# The developer loop on a local cluster: build both images, load them into kind or k3s, install or
# upgrade the chart with helm/dev/dev-values.yaml, wait for the gateway, create one sandbox.
#
#   helm/dev/dev-loop.sh kind     # creates the kind cluster "openshell-dev" if missing
#   helm/dev/dev-loop.sh k3s      # uses the running k3s (sudo k3s ctr for the images)
#
# Needs docker, helm and kubectl (and kind or k3s). Without a cluster, use the local-process driver:
# `openshell-gateway demo`. See docs/dev-loop.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
flavour=${1:-kind}
need() { command -v "$1" >/dev/null 2>&1 || { echo "dev-loop: $1 is not installed" >&2; exit 2; }; }
need docker; need helm; need kubectl

docker build --target gateway -t openshell-gateway:dev .
docker build --target supervisor -t openshell-supervisor:dev .

case "$flavour" in
  kind)
    need kind
    kind get clusters | grep -qx openshell-dev || kind create cluster --config helm/dev/kind-config.yaml
    kubectl config use-context kind-openshell-dev
    kind load docker-image --name openshell-dev openshell-gateway:dev openshell-supervisor:dev
    ;;
  k3s)
    need k3s
    for image in openshell-gateway:dev openshell-supervisor:dev; do
      docker save "$image" | sudo k3s ctr images import -
    done
    ;;
  *) echo "dev-loop: say kind or k3s, not $flavour" >&2; exit 2 ;;
esac

helm upgrade --install openshell helm/openshell --namespace openshell --create-namespace \
  --values helm/dev/dev-values.yaml --wait --timeout 5m
kubectl -n openshell rollout status deployment/openshell-gateway --timeout=120s

kubectl -n openshell port-forward service/openshell-gateway 7080:7080 >/dev/null 2>&1 &
forward=$!
trap 'kill $forward' EXIT
sleep 2
curl -fsS -X POST http://127.0.0.1:7080/api/v1/sandboxes -H 'content-type: application/json' \
  -d '{"id": "dev-1", "command": ["sh", "-c", "for i in 1 2 3; do echo hello $i; sleep 1; done"]}'
echo
echo "sandbox dev-1 created; its logs: curl 'http://127.0.0.1:7080/api/v1/sandboxes/dev-1/logs?follow=1'"
sleep 8
curl -fsS http://127.0.0.1:7080/api/v1/sandboxes/dev-1
echo
