#!/usr/bin/env bash
# Builds the field's own tools that the tests drive imagestream with, from pinned releases on the
# Go module proxy (none of their source is committed), and caches the binaries outside the repo,
# keyed by tool and version, so a second run builds nothing:
#
#   crictl, critest   sigs.k8s.io/cri-tools     Kubernetes' CRI client and conformance suite
#   h2spec            github.com/summerwind/h2spec   the HTTP/2 conformance suite
#
# Usage: bash scripts/test-tools.sh            builds what is missing, prints the bin dir
# The tests find the tools in $IMAGESTREAM_TEST_TOOLS (default /var/cache/imagestream-test/bin).
set -euo pipefail

CRI_TOOLS_VERSION=v1.34.0
# What `crictl --version` prints (the release Makefile sets it the same way).
CRI_TOOLS_LDFLAGS="-X sigs.k8s.io/cri-tools/pkg/version.Version=${CRI_TOOLS_VERSION#v}"
H2SPEC_VERSION=v2.2.1+incompatible

cache=${IMAGESTREAM_TEST_CACHE:-/var/cache/imagestream-test}
bin=${IMAGESTREAM_TEST_TOOLS:-$cache/bin}
mkdir -p "$bin" "$cache/build"

# sudo and CI may leave Go's usual install dir off PATH.
if ! command -v go >/dev/null && [ -x /usr/local/go/bin/go ]; then
  export PATH="$PATH:/usr/local/go/bin"
fi
if ! command -v go >/dev/null; then
  echo "test-tools: Go is needed to build crictl, critest and h2spec (go.dev toolchain, 1.24+)" >&2
  exit 1
fi
export GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0

# build NAME VERSION COMMAND...: runs COMMAND (which writes $out) unless NAME-VERSION is cached,
# then links $bin/NAME to the cached binary. (VERSION carries a -N suffix when the recipe changes,
# so that an old build is not reused.)
build() {
  local name=$1 version=$2; shift 2
  local out="$cache/build/$name-$version"
  if [ ! -x "$out" ]; then
    echo "==> building $name $version" >&2
    local tmp="$out.tmp.$$"
    out=$tmp "$@"
    mv -f "$tmp" "$cache/build/$name-$version"
    out="$cache/build/$name-$version"
  fi
  ln -sfn "$out" "$bin/$name"
}

cri_tools_dir() {
  go mod download -json "sigs.k8s.io/cri-tools@$CRI_TOOLS_VERSION" |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p'
}

build_crictl() {
  GOBIN="$cache/build/gobin.$$" go install -ldflags "$CRI_TOOLS_LDFLAGS" \
    "sigs.k8s.io/cri-tools/cmd/crictl@$CRI_TOOLS_VERSION"
  mv -f "$cache/build/gobin.$$/crictl" "$out"
  rmdir "$cache/build/gobin.$$"
}

build_critest() {
  # critest is a Go test binary (ginkgo); build it in the module's own directory.
  local src
  src=$(cri_tools_dir)
  (cd "$src" && go test -c -ldflags "$CRI_TOOLS_LDFLAGS" -o "$out" ./cmd/critest)
}

build_h2spec() {
  GOBIN="$cache/build/gobin.$$" go install "github.com/summerwind/h2spec/cmd/h2spec@$H2SPEC_VERSION"
  mv -f "$cache/build/gobin.$$/h2spec" "$out"
  rmdir "$cache/build/gobin.$$"
}

build crictl "$CRI_TOOLS_VERSION-1" build_crictl
build critest "$CRI_TOOLS_VERSION-1" build_critest
build h2spec "$H2SPEC_VERSION" build_h2spec
echo "$bin"
