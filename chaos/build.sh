#!/usr/bin/env bash
# Build the scale simulator (chaos/sim, Go) into a cache directory keyed by the sha256 of its sources,
# this script and the .proto files it speaks, and print the binary's path on the last line. A second
# run with the same inputs builds nothing (0.01 s); a cold build takes ~45 s (plugins ~16 s, sim ~25 s).
#
#   OPENSHELL_CHAOS_CACHE  cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/openshell/chaos-sim)
#   PYTHON                 the Python whose grpc_tools runs protoc (default: the repository's .venv)
#
# The Go stubs are generated here, into the build's temporary copy, never committed: the .proto files
# stay the one source of the protocol. Exit status is non-zero with a one-line reason on stderr
# ("build.sh: ...") when Go is missing or the build fails; the full output is kept in <cache>/<hash>/build.log.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)

fail() {
  echo "build.sh: $*" >&2
  exit 1
}

command -v sha256sum >/dev/null 2>&1 || fail "sha256sum is missing"
protos=(openshell/v1/openshell.proto openshell/v1/sandbox.proto)
hash=$(
  cd "$repo"
  cat chaos/build.sh chaos/sim/go.mod chaos/sim/go.sum chaos/sim/*.go "${protos[@]/#/proto/}" | sha256sum | cut -c1-16
)
root=${OPENSHELL_CHAOS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/openshell/chaos-sim}
out="$root/$hash"
if [ -x "$out/sim" ] && [ -f "$out/.complete" ]; then
  echo "$out/sim"
  exit 0
fi

command -v go >/dev/null 2>&1 || fail "Go is not installed (need go >= 1.26 on PATH to build the simulator)"
python=${PYTHON:-$repo/.venv/bin/python}
[ -x "$python" ] || python=$(command -v python3) || fail "no Python to run grpc_tools.protoc"
"$python" -c "import grpc_tools" 2>/dev/null || fail "$python lacks grpcio-tools (pip install -e '.[dev]')"

# Only here: the Go settings this build needs. go.sum pins every module, so the checksum DB is not
# needed (it may be unreachable); the local toolchain must do (go.mod says go 1.26.0).
export GOTOOLCHAIN=local GOFLAGS=-mod=mod GONOSUMDB="*" GOSUMDB=off CGO_ENABLED=0
goversion=$(go env GOVERSION 2>/dev/null) || fail "'go env' failed; is Go installed correctly?"
case "$goversion" in
  go1.2[6-9]* | go1.[3-9]* | go[2-9]*) ;;
  *) fail "Go $goversion is too old: chaos/sim/go.mod needs go 1.26 or newer" ;;
esac

mkdir -p "$out"
log="$out/build.log"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r "$here/sim" "$work/sim"
(
  set -x
  cd "$work/sim"
  # The protoc plugins, pinned by the tool lines of go.mod.
  go build -o "$work/plugins/" tool
  include=$("$python" -c "import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), '_proto'))")
  # No go_package in the .proto files: map both (two proto packages) into one Go package.
  m="Mopenshell/v1/openshell.proto=openshell.test/chaos/sim/pb;pb,Mopenshell/v1/sandbox.proto=openshell.test/chaos/sim/pb;pb"
  PATH="$work/plugins:$PATH" "$python" -m grpc_tools.protoc -I"$repo/proto" -I"$include" \
    --go_out=. --go-grpc_out=. \
    --go_opt=module=openshell.test/chaos/sim,"$m" --go-grpc_opt=module=openshell.test/chaos/sim,"$m" \
    "${protos[@]}"
  go vet ./
  go build -trimpath -ldflags "-s -w" -o "$out/sim.new" .
  mv "$out/sim.new" "$out/sim"
) >"$log" 2>&1 || fail "the simulator did not build (see $log): $(tail -n 3 "$log" | tr '\n' ' ')"
touch "$out/.complete"
echo "$out/sim"
