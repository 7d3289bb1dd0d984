#!/usr/bin/env bash
# Builds the field's own tools that the tests drive imagestream with, from pinned releases on the
# Go module proxy (none of their source is committed), and caches the binaries outside the repo,
# keyed by tool and version, so a second run builds nothing:
#
#   crictl, critest   sigs.k8s.io/cri-tools     Kubernetes' CRI client and conformance suite
#   h2spec            github.com/summerwind/h2spec   the HTTP/2 conformance suite
#   containerd2/      github.com/containerd/containerd/v2   containerd 2.x: a directory holding
#                     containerd, containerd-shim-runc-v2 and ctr (put it first on PATH, so that
#                     containerd finds its own shim rather than Debian's 1.x one)
#   crio, pinns       github.com/cri-o/cri-o    CRI-O and its namespace pinner (cgo, libseccomp;
#                     needs gcc, make, pkg-config, libc6-dev, libseccomp-dev to build, conmon to run)
#   kubelet           k8s.io/kubernetes         the kubelet, built in a generated module
#   cosign            github.com/sigstore/cosign/v2   Sigstore's image signer and verifier
#   referrers-registry  github.com/google/go-containerregistry   its registry (pkg/registry) with
#                     the OCI 1.1 referrers API on, built in a generated module: plain HTTP,
#                     blobs and manifests kept in memory (gone when it exits)
#
# Usage: bash scripts/test-tools.sh [TOOL...]   builds what is missing (of TOOLs, default all),
#                                              prints the bin dir
# The tests find the tools in $IMAGESTREAM_TEST_TOOLS (default /var/cache/imagestream-test/bin).
# Everything but the bin dir goes to stderr.
set -euo pipefail

CRI_TOOLS_VERSION=v1.34.0
# What `crictl --version` prints (the release Makefile sets it the same way).
CRI_TOOLS_LDFLAGS="-X sigs.k8s.io/cri-tools/pkg/version.Version=${CRI_TOOLS_VERSION#v}"
H2SPEC_VERSION=v2.2.1+incompatible
# containerd 2.x, next to Debian's containerd 1.x package (which the tests use by default).
CONTAINERD_VERSION=v2.2.10
# CRI-O (module github.com/cri-o/cri-o). Its version is a constant in the source
# (internal/version.Version), so `crio --version` needs no ldflags.
CRIO_VERSION=v1.34.0
# Its build tags (the Makefile probes the system for them, hack/*_tag.sh): no btrfs, OpenPGP in
# Go rather than through libgpgme, seccomp through libseccomp (cgo), no AppArmor or SELinux.
CRIO_TAGS="containers_image_ostree_stub exclude_graphdriver_btrfs btrfs_noversion containers_image_openpgp seccomp"
# The kubelet: the k8s.io/kubernetes module; its staging modules (k8s.io/api, ...) carry the
# matching v0.x version.
KUBELET_VERSION=v1.34.4
# cosign (module github.com/sigstore/cosign/v2); `cosign version` prints what its Makefile sets
# through sigs.k8s.io/release-utils/version (build_cosign).
COSIGN_VERSION=v2.6.4
# go-containerregistry (the library cosign talks to registries with), for its registry: no
# command of the module serves it with the referrers API on (`crane registry serve` does not).
GO_CONTAINERREGISTRY_VERSION=v0.22.1

cache=${IMAGESTREAM_TEST_CACHE:-/var/cache/imagestream-test}
bin=${IMAGESTREAM_TEST_TOOLS:-$cache/bin}
mkdir -p "$bin" "$cache/build"

# sudo and CI may leave Go's usual install dir off PATH.
if ! command -v go >/dev/null && [ -x /usr/local/go/bin/go ]; then
  export PATH="$PATH:/usr/local/go/bin"
fi
if ! command -v go >/dev/null; then
  echo "test-tools: Go is needed to build the test tools (go.dev toolchain, 1.25+, for cosign)" >&2
  exit 1
fi
export GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0

# What this run leaves behind is removed on exit: builds in progress (see build) and $work,
# created on first use (work_dir), where builds copy or generate sources.
scratch=()
trap 'if ((${#scratch[@]})); then rm -rf "${scratch[@]}"; fi' EXIT
work=
work_dir() {
  if [ -z "$work" ]; then
    work=$(mktemp -d "${TMPDIR:-/tmp}/imagestream-test-tools.XXXXXX")
    scratch+=("$work")
  fi
}

# build LINK ENTRY COMMAND...: unless $cache/build/ENTRY exists, runs COMMAND, which writes $out
# (one binary, or a directory of them), and renames it to ENTRY; then links $bin/LINK to ENTRY.
# (ENTRY is NAME-VERSION, with a -N suffix when the recipe changes, so that an old build is not
# reused.) The rename makes a build atomic: an interrupted one leaves no ENTRY behind.
build() {
  local link=$1 entry=$2; shift 2
  local final="$cache/build/$entry"
  if [ ! -e "$final" ]; then
    echo "==> building $entry" >&2
    local start=$SECONDS
    out="$cache/build/$entry.tmp.$$"
    scratch+=("$out" "$out.gobin")
    rm -rf "$out"
    "$@"
    [ -e "$out" ] || { echo "test-tools: building $entry wrote nothing" >&2; exit 1; }
    # -T: never move a directory into an existing one. A concurrent run may have won the race
    # for a directory entry (a file entry is replaced atomically); its result is as good.
    if ! mv -fT "$out" "$final" 2>/dev/null; then
      [ -e "$final" ] || { echo "test-tools: cannot rename $out to $final" >&2; exit 1; }
      rm -rf "$out"
    fi
    echo "==> built $entry in $((SECONDS - start)) s" >&2
  fi
  ln -sfn "$final" "$bin/$link"
}

# mod_field MODULE@VERSION FIELD: a field (Dir, GoMod, Info) of `go mod download -json`,
# downloading the module if needed.
mod_field() {
  go mod download -json "$1" | sed -n "s/^[[:space:]]*\"$2\": \"\(.*\)\",\{0,1\}\$/\1/p"
}

# mod_time MODULE@VERSION: the module version's commit time, as the builds' date (reproducible).
mod_time() {
  local info
  info=$(mod_field "$1" Info)
  sed -n 's/.*"Time":"\([^"]*\)".*/\1/p' "$info"
}

# needs WHAT COMMAND...: fails with a hint unless COMMAND succeeds.
needs() {
  local what=$1; shift
  if ! "$@" >/dev/null 2>&1; then
    echo "test-tools: building $what needs $(printf '%s ' "$@")to succeed;" \
      "install gcc make pkg-config libc6-dev libseccomp-dev (scripts/test.sh does)" >&2
    exit 1
  fi
}

build_crictl() {
  GOBIN="$out.gobin" go install -ldflags "$CRI_TOOLS_LDFLAGS" \
    "sigs.k8s.io/cri-tools/cmd/crictl@$CRI_TOOLS_VERSION"
  mv -f "$out.gobin/crictl" "$out"
  rmdir "$out.gobin"
}

build_critest() {
  # critest is a Go test binary (ginkgo); build it in the module's own directory.
  local src
  src=$(mod_field "sigs.k8s.io/cri-tools@$CRI_TOOLS_VERSION" Dir)
  (cd "$src" && go test -c -ldflags "$CRI_TOOLS_LDFLAGS" -o "$out" ./cmd/critest)
}

build_h2spec() {
  GOBIN="$out.gobin" go install "github.com/summerwind/h2spec/cmd/h2spec@$H2SPEC_VERSION"
  mv -f "$out.gobin/h2spec" "$out"
  rmdir "$out.gobin"
}

build_containerd() {
  # As containerd's Makefile builds them (static, no cgo, stripped), in the module's own
  # (read-only) directory, writing outside it. The shim does not need gRPC.
  local src ldflags="-s -w -X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION"
  src=$(mod_field "github.com/containerd/containerd/v2@$CONTAINERD_VERSION" Dir)
  mkdir "$out"
  (
    cd "$src"
    go build -trimpath -tags urfave_cli_no_docs -ldflags "$ldflags" -o "$out/containerd" ./cmd/containerd
    go build -trimpath -tags "urfave_cli_no_docs no_grpc" -ldflags "$ldflags" \
      -o "$out/containerd-shim-runc-v2" ./cmd/containerd-shim-runc-v2
    go build -trimpath -tags urfave_cli_no_docs -ldflags "$ldflags" -o "$out/ctr" ./cmd/ctr
  )
}

build_crio() {
  needs crio gcc --version
  needs crio pkg-config --exists libseccomp
  local src date
  src=$(mod_field "github.com/cri-o/cri-o@$CRIO_VERSION" Dir)
  date=$(mod_time "github.com/cri-o/cri-o@$CRIO_VERSION")
  # As CRI-O's Makefile does (stripped), dated by the release's commit.
  (cd "$src" && CGO_ENABLED=1 go build -trimpath -tags "$CRIO_TAGS" \
    -ldflags "-s -w -X github.com/cri-o/cri-o/internal/version.buildDate=$date" -o "$out" ./cmd/crio)
}

build_pinns() {
  # C, with its own Makefile writing next to its sources: build a copy (the module cache is
  # read-only, and cp keeps that).
  needs pinns make --version
  needs pinns gcc --version
  local src
  src=$(mod_field "github.com/cri-o/cri-o@$CRIO_VERSION" Dir)
  work_dir
  mkdir "$work/pinns"
  cp -r "$src/pinns" "$work/pinns/pinns"
  chmod -R u+w "$work/pinns"
  make -C "$work/pinns/pinns" >&2
  mv "$work/pinns/bin/pinns" "$out"
}

build_kubelet() {
  # k8s.io/kubernetes cannot be `go install`ed: its go.mod replaces its staging modules
  # (k8s.io/api, ...) with directories of its own repo. Build cmd/kubelet in a generated module
  # that requires k8s.io/kubernetes and replaces the same staging modules with the versions
  # published from the same release (kubernetes v1.X.Y: k8s.io/api v0.X.Y, ...).
  local mod="k8s.io/kubernetes@$KUBELET_VERSION" src gomod date dir
  local staging_version="v0.${KUBELET_VERSION#v1.}" minor=${KUBELET_VERSION#v1.}
  minor=${minor%%.*}
  src=$(mod_field "$mod" Dir)
  gomod=$(mod_field "$mod" GoMod)
  date=$(mod_time "$mod")
  work_dir
  dir="$work/kubelet"
  mkdir "$dir"
  {
    echo "module imagestream.test/kubelet"
    echo
    # Kubernetes' go and godebug lines: the kubelet runs with the GODEBUG defaults it is built with.
    grep -E '^(go|godebug) ' "$gomod"
    echo
    echo "require k8s.io/kubernetes $KUBELET_VERSION"
    echo
    echo "replace ("
    sed -n "s#^[[:space:]]*\(k8s.io/[^ ]*\) => \./staging/src/k8s.io/[^ ]*\$#\t\1 => \1 $staging_version#p" "$gomod"
    echo ")"
  } >"$dir/go.mod"
  if ! grep -q "k8s.io/api => k8s.io/api $staging_version" "$dir/go.mod"; then
    echo "test-tools: no staging replaces found in $gomod" >&2
    exit 1
  fi
  cp "$src/cmd/kubelet/kubelet.go" "$dir/main.go"
  chmod u+w "$dir/main.go"
  # As hack/lib/version.sh sets them; `kubelet --version` prints gitVersion.
  local ldflags="-s -w"
  ldflags+=" -X k8s.io/component-base/version.gitVersion=$KUBELET_VERSION"
  ldflags+=" -X k8s.io/component-base/version.gitMajor=1"
  ldflags+=" -X k8s.io/component-base/version.gitMinor=$minor"
  ldflags+=" -X k8s.io/component-base/version.gitTreeState=clean"
  ldflags+=" -X k8s.io/component-base/version.buildDate=$date"
  (cd "$dir" && go mod tidy && go build -trimpath -ldflags "$ldflags" -o "$out" .)
}

build_cosign() {
  # As cosign's Makefile builds it (no cgo, so no PIV or PKCS#11 keys), dated by the release's
  # commit.
  local mod="github.com/sigstore/cosign/v2@$COSIGN_VERSION" date ldflags
  date=$(mod_time "$mod")
  ldflags="-buildid="
  ldflags+=" -X sigs.k8s.io/release-utils/version.gitVersion=$COSIGN_VERSION"
  ldflags+=" -X sigs.k8s.io/release-utils/version.gitTreeState=clean"
  ldflags+=" -X sigs.k8s.io/release-utils/version.buildDate=$date"
  GOBIN="$out.gobin" go install -trimpath -ldflags "$ldflags" \
    "github.com/sigstore/cosign/v2/cmd/cosign@$COSIGN_VERSION"
  mv -f "$out.gobin/cosign" "$out"
  rmdir "$out.gobin"
}

build_referrers_registry() {
  # A main of a few lines around pkg/registry, in a generated module requiring
  # go-containerregistry: `--address HOST:PORT`, plain HTTP, the referrers API on, blobs and
  # manifests in memory (the default), every request logged to stderr (the registry's default).
  local mod="github.com/google/go-containerregistry@$GO_CONTAINERREGISTRY_VERSION" gomod dir
  gomod=$(mod_field "$mod" GoMod)
  work_dir
  dir="$work/referrers-registry"
  mkdir "$dir"
  {
    echo "module imagestream.test/referrers-registry"
    echo
    grep -E '^go ' "$gomod"
    echo
    echo "require github.com/google/go-containerregistry $GO_CONTAINERREGISTRY_VERSION"
  } >"$dir/go.mod"
  cat >"$dir/main.go" <<'EOF'
package main

import (
	"flag"
	"log"
	"net/http"

	"github.com/google/go-containerregistry/pkg/registry"
)

func main() {
	address := flag.String("address", "127.0.0.1:5000", "HOST:PORT to serve plain HTTP on")
	flag.Parse()
	s := &http.Server{Addr: *address, Handler: registry.New(registry.WithReferrersSupport(true))}
	log.Printf("serving on %s", *address)
	log.Fatal(s.ListenAndServe())
}
EOF
  (cd "$dir" && go mod tidy && go build -trimpath -ldflags "-s -w" -o "$out" .)
}

ALL_TOOLS=(crictl critest h2spec containerd2 crio pinns kubelet cosign referrers-registry)
WANTED=("$@")
for w in "${WANTED[@]}"; do
  [[ " ${ALL_TOOLS[*]} " == *" $w "* ]] || {
    echo "test-tools: unknown tool $w (known: ${ALL_TOOLS[*]})" >&2
    exit 2
  }
done
# want NAME: whether NAME was asked for (no arguments: every tool).
want() {
  ((${#WANTED[@]} == 0)) && return 0
  [[ " ${WANTED[*]} " == *" $1 "* ]]
}

want crictl && build crictl "crictl-$CRI_TOOLS_VERSION-1" build_crictl
want critest && build critest "critest-$CRI_TOOLS_VERSION-1" build_critest
want h2spec && build h2spec "h2spec-$H2SPEC_VERSION" build_h2spec
want containerd2 && build containerd2 "containerd-$CONTAINERD_VERSION-1" build_containerd
want crio && build crio "crio-$CRIO_VERSION-1" build_crio
want pinns && build pinns "pinns-$CRIO_VERSION-1" build_pinns
want kubelet && build kubelet "kubelet-$KUBELET_VERSION-1" build_kubelet
want cosign && build cosign "cosign-$COSIGN_VERSION-1" build_cosign
want referrers-registry && build referrers-registry \
  "referrers-registry-$GO_CONTAINERREGISTRY_VERSION-1" build_referrers_registry
echo "$bin"
