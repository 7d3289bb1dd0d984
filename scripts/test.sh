#!/usr/bin/env bash
# Runs every test of imagestream on this machine: installs what the tests need (Debian packages,
# as root), then `cargo test`, which starts real containerd, docker-registry and the daemon in
# temp dirs. Usage: sudo bash scripts/test.sh [extra cargo test args]
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

echo "==> cargo test"
cargo test --locked "$@"
