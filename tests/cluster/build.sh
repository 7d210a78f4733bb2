#!/usr/bin/env bash
# Build the test control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler pinned by go.mod/go.sum;
# kwok pinned by kwok/go.mod/go.sum) into a cache directory keyed by the sha256 of those files, and print
# that bin directory on the last line. A second run with the same pins builds nothing.
#
#   OPENSHELL_CLUSTER_CACHE  cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/openshell/cluster)
#
# Exit status is non-zero with a one-line reason on stderr ("build.sh: ...") when Go is missing or a
# build fails; the full go output of a failed build is kept in <cache>/<hash>/build.log.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
binaries=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)

fail() {
  echo "build.sh: $*" >&2
  exit 1
}

command -v sha256sum >/dev/null 2>&1 || fail "sha256sum is missing"

# The key covers go.sum and everything compiled from this directory (the main packages, go.mod, this
# script), so editing a wrapper also rebuilds.
hash=$(cd "$here" && cat go.sum go.mod kwok/go.sum kwok/go.mod kwok/main.go build.sh cmd/*/main.go |
  sha256sum | cut -c1-16)
root=${OPENSHELL_CLUSTER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/openshell/cluster}
out="$root/$hash"
bin="$out/bin"

complete=1
for b in "${binaries[@]}"; do
  [ -x "$bin/$b" ] || complete=0
done
if [ "$complete" = 1 ] && [ -f "$out/.complete" ] && [ -f "$bin/kwok-stages.yaml" ]; then
  echo "$bin"
  exit 0
fi

command -v go >/dev/null 2>&1 || fail "Go is not installed (need go >= 1.26 on PATH to build etcd and kube-apiserver)"

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
# The version the API server reports (/version): without it, v0.0.0-master, and Helm refuses charts
# that state a kubeVersion. Taken from the pinned module, as upstream's hack/lib/version.sh does.
kube_version=$(cd "$here" && go list -m -f '{{.Version}}' k8s.io/kubernetes) || fail "cannot read the k8s.io/kubernetes pin"
kube_minor=${kube_version#v1.}
kube_minor=${kube_minor%%.*}
vpkg=k8s.io/component-base/version
kube_ldflags="-X $vpkg.gitVersion=$kube_version -X $vpkg.gitMajor=1 -X $vpkg.gitMinor=$kube_minor"
kube_ldflags+=" -X $vpkg.gitTreeState=clean -X $vpkg.buildDate=1970-01-01T00:00:00Z"
gobuild() { # dir, output, packages...
  local dir=$1 output=$2
  shift 2
  if ! (cd "$dir" && go build -trimpath -ldflags "-s -w $kube_ldflags" -o "$output" "$@") >>"$log" 2>&1; then
    reason=$(grep -m1 -E 'error|cannot|not |undefined' "$log" || head -n1 "$log")
    fail "go build failed: ${reason:-see $log} (full log: $log)"
  fi
}
: >"$log"
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
mkdir -p "$bin"
for b in "${binaries[@]}"; do
  [ -x "$tmp/$b" ] || fail "go build produced no $b (log: $log)"
  mv -f "$tmp/$b" "$bin/$b"
done
mv -f "$tmp/kwok-stages.yaml" "$bin/kwok-stages.yaml"
touch "$out/.complete"
echo "built in $(($(date +%s) - start)) s: $(cd "$bin" && du -sh -- * | tr '\t\n' '= ')" >&2
echo "$bin"
