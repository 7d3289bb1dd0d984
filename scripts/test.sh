#!/usr/bin/env bash
# Runs every test of imagestream on this machine: installs what the tests need (Debian packages,
# as root), builds the field's tools (scripts/test-tools.sh), then `cargo test` on each runtime of
# the matrix, which starts real runtimes, docker-registry, a kubelet and the daemon in temp dirs.
# Usage: sudo bash scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(containerd runc docker-registry skopeo umoci busybox-static protobuf-compiler libprotobuf-dev iproute2 util-linux procps apache2-utils etcd-server etcd-client openssl socat nghttp2-client curl containernetworking-plugins iptables
  gcc make pkg-config libc6-dev libseccomp-dev conmon)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "==> installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  apt-get install -y --no-install-recommends "${missing[@]}"
fi

# crictl, critest, h2spec, containerd 2, CRI-O (+pinns) and the kubelet, built from pinned Go
# modules and cached outside the repo (scripts/test-tools.sh).
IMAGESTREAM_TEST_TOOLS=$(bash scripts/test-tools.sh)
export IMAGESTREAM_TEST_TOOLS

# The runtime matrix (tests/common/runtime.rs): the whole suite on containerd 2 (the default),
# then the CRI-facing tests on each other runtime: the CRI transparency tests (cri_proxy), the
# critest parity, the stream story (streams, crictl_story), access, the mirror pull (cache), and
# the signature policy's refusals at pod start (signatures).
# IMAGESTREAM_TEST_RUNTIMES picks the legs (default: all three, in this order).
CRI_FACING_TESTS=(--test cri_proxy --test critest --test streams --test crictl_story --test access --test cache --test signatures)
for runtime in ${IMAGESTREAM_TEST_RUNTIMES:-containerd2 containerd16 crio}; do
  case $runtime in
    containerd2)
      echo "==> cargo test: the whole suite on containerd 2 (IMAGESTREAM_TEST_RUNTIME=containerd2)"
      IMAGESTREAM_TEST_RUNTIME=containerd2 cargo test --locked "$@"
      ;;
    containerd16 | crio)
      echo "==> cargo test: the CRI-facing tests on $runtime (IMAGESTREAM_TEST_RUNTIME=$runtime)"
      IMAGESTREAM_TEST_RUNTIME=$runtime cargo test --locked "${CRI_FACING_TESTS[@]}" "$@"
      ;;
    *)
      echo "test.sh: unknown runtime $runtime in IMAGESTREAM_TEST_RUNTIMES (containerd2, containerd16, crio)" >&2
      exit 2
      ;;
  esac
done
