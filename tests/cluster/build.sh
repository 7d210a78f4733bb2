#!/usr/bin/env bash
# Build test Kubernetes binaries into a cache directory keyed by the sha256 of their pins, and print that
# bin directory on the last line. A second run with the same pins builds nothing.
#
#   build.sh [plane]  the control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler
#                     (pinned by go.mod/go.sum) and kwok (kwok/go.mod)
#   build.sh node     a real node: kubelet and kube-proxy (go.mod), containerd and its runc shim
#                     (node/containerd), the CNI plugins bridge, host-local, loopback, portmap (node/cni),
#                     kube-router for NetworkPolicies (node/kube-router), and the pause binary compiled
#                     from the pinned Kubernetes module's build/pause/linux/pause.c (needs gcc)
#
#   OPENSHELL_CLUSTER_CACHE  cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/openshell/cluster)
#
# Exit status is non-zero with a one-line reason on stderr ("build.sh: ...") when Go is missing or a
# build fails; the full go output of a failed build is kept in <cache>/<hash>/build.log.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
target=${1:-plane}
case "$target" in
  plane) binaries=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok kwok-stages.yaml) ;;
  node)
    binaries=(kubelet kube-proxy containerd containerd-shim-runc-v2 cni/bridge cni/host-local cni/loopback
      cni/portmap kube-router pause)
    ;;
  *)
    echo "build.sh: unknown target '$target' (plane or node)" >&2
    exit 2
    ;;
esac

fail() {
  echo "build.sh: $*" >&2
  exit 1
}

command -v sha256sum >/dev/null 2>&1 || fail "sha256sum is missing"

# The key covers go.sum and everything compiled from this directory (the main packages, go.mod, this
# script), so editing a wrapper also rebuilds.
cd "$here" # the globs below are relative to it
if [ "$target" = plane ]; then
  inputs=(go.sum go.mod kwok/go.sum kwok/go.mod kwok/main.go build.sh cmd/etcd/main.go cmd/kube-apiserver/main.go
    cmd/kube-controller-manager/main.go cmd/kube-scheduler/main.go)
else
  inputs=(go.sum go.mod build.sh cmd/kubelet/main.go cmd/kube-proxy/main.go node/*/go.mod node/*/go.sum node/*/tools.go)
fi
hash=$(cd "$here" && { echo "$target"; cat "${inputs[@]}"; } | sha256sum | cut -c1-16)
root=${OPENSHELL_CLUSTER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/openshell/cluster}
out="$root/$hash"
bin="$out/bin"

complete=1
for b in "${binaries[@]}"; do
  [ -e "$bin/$b" ] || complete=0
done
if [ "$complete" = 1 ] && [ -f "$out/.complete" ]; then
  echo "$bin"
  exit 0
fi

command -v go >/dev/null 2>&1 || fail "Go is not installed (need go >= 1.26 on PATH to build the $target binaries)"
if [ "$target" = node ]; then
  command -v gcc >/dev/null 2>&1 || fail "gcc is missing (it compiles the pause binary; apt install gcc libc6-dev)"
fi

# Only here: the Go settings this build needs. The pinned versions are in go.sum, so the checksum DB is
# not needed (it may be unreachable); the local toolchain must do (go.mod says go 1.26.0).
export GOTOOLCHAIN=local
export GOFLAGS=-mod=mod
export GONOSUMDB="*" GOSUMDB=off
export CGO_ENABLED=0

goversion=$(go env GOVERSION 2>/dev/null) || fail "'go env' failed; is Go installed correctly?"
case "$goversion" in
  go1.2[6-9]* | go1.[3-9]* | go[2-9]*) ;;
  *) fail "Go $goversion is too old: go.mod needs go 1.26 or newer" ;;
esac

mkdir -p "$out"
tmp=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
log="$out/build.log"
start=$(date +%s)
echo "building ${binaries[*]} with $goversion into $bin (log: $log)" >&2
mkdir -p "$tmp/cni"
# The version the API server reports (/version): without it, v0.0.0-master, and Helm refuses charts
# that state a kubeVersion. Taken from the pinned module, as upstream's hack/lib/version.sh does.
kube_version=$(cd "$here" && go list -m -f '{{.Version}}' k8s.io/kubernetes) || fail "cannot read the k8s.io/kubernetes pin"
kube_minor=${kube_version#v1.}
kube_minor=${kube_minor%%.*}
vpkg=k8s.io/component-base/version
kube_ldflags="-X $vpkg.gitVersion=$kube_version -X $vpkg.gitMajor=1 -X $vpkg.gitMinor=$kube_minor"
kube_ldflags+=" -X $vpkg.gitTreeState=clean -X $vpkg.buildDate=1970-01-01T00:00:00Z"
gobuild() { # dir, output, packages... (Kubernetes' version stamps)
  gobuild_with "" "$kube_ldflags" "$@"
}
gobuild_with() { # tags, ldflags, dir, output, packages...
  local tags=$1 ldflags=$2 dir=$3 output=$4
  shift 4
  if ! (cd "$dir" && go build -trimpath -tags "$tags" -ldflags "-s -w $ldflags" -o "$output" "$@") >>"$log" 2>&1; then
    reason=$(grep -m1 -E 'error|cannot|not |undefined' "$log" || head -n1 "$log")
    fail "go build failed: ${reason:-see $log} (full log: $log)"
  fi
}
: >"$log"
if [ "$target" = plane ]; then
  gobuild "$here" "$tmp/" ./cmd/etcd ./cmd/kube-apiserver ./cmd/kube-controller-manager ./cmd/kube-scheduler
  gobuild "$here/kwok" "$tmp/kwok" .
  # kwok does nothing without stages; these are kwokctl's defaults ("fast" nodes and pods), from the
  # pinned kwok module itself.
  kwokdir=$(cd "$here/kwok" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok) || fail "cannot locate the kwok module"
  for f in node/fast/node-initialize node/heartbeat/node-heartbeat pod/fast/pod-ready pod/fast/pod-complete \
    pod/fast/pod-delete; do
    [ -f "$kwokdir/kustomize/stage/$f.yaml" ] || fail "kwok stage $f.yaml is missing from $kwokdir"
    printf -- '---\n'
    cat "$kwokdir/kustomize/stage/$f.yaml"
  done >"$tmp/kwok-stages.yaml"
else
  gobuild "$here" "$tmp/" ./cmd/kubelet ./cmd/kube-proxy
  # containerd's own static build leaves out the storage drivers that need cgo; overlayfs is in.
  ctd_version=$(cd "$here/node/containerd" && go list -m -f '{{.Version}}' github.com/containerd/containerd/v2) ||
    fail "cannot read the containerd pin"
  gobuild_with "no_btrfs no_devmapper no_zfs" "-X github.com/containerd/containerd/v2/version.Version=$ctd_version" \
    "$here/node/containerd" "$tmp/" \
    github.com/containerd/containerd/v2/cmd/containerd github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2
  gobuild "$here/node/cni" "$tmp/cni/" github.com/containernetworking/plugins/plugins/main/bridge \
    github.com/containernetworking/plugins/plugins/ipam/host-local \
    github.com/containernetworking/plugins/plugins/main/loopback github.com/containernetworking/plugins/plugins/meta/portmap
  gobuild_with "" "" "$here/node/kube-router" "$tmp/kube-router" github.com/cloudnativelabs/kube-router/v2/cmd/kube-router
  # The sandbox ("pause") container every pod starts with: upstream's C source from the pinned module.
  kubedir=$(cd "$here" && go list -m -f '{{.Dir}}' k8s.io/kubernetes) || fail "cannot locate the k8s.io/kubernetes module"
  if ! gcc -Os -static -DVERSION="$kube_version-openshell-test" -o "$tmp/pause" \
    "$kubedir/build/pause/linux/pause.c" >>"$log" 2>&1; then
    fail "gcc could not build the pause binary (static glibc: apt install libc6-dev); log: $log"
  fi
fi
mkdir -p "$bin"; [ "$target" = plane ] || mkdir -p "$bin/cni"
for b in "${binaries[@]}"; do
  [ -e "$tmp/$b" ] || fail "the build produced no $b (log: $log)"
  mv -f "$tmp/$b" "$bin/$b"
done
touch "$out/.complete"
echo "built in $(($(date +%s) - start)) s: $(cd "$bin" && du -sh -- * | tr '\t\n' '= ')" >&2
echo "$bin"
