#!/usr/bin/env bash
# imagestream quick start: one command, as root, on a Debian 12 machine.
#
#   sudo bash scripts/quickstart.sh          # install what is missing, build, start a node, walk
#   sudo bash scripts/quickstart.sh run [IMAGE]  # run IMAGE (default
#                                            # imagestream.local/demo/app:prod) in the demo pod
#   sudo bash scripts/quickstart.sh stop     # stop that node and remove its scratch dir
#
# It brings up a real, self-contained node in a scratch dir
# (${IMAGESTREAM_QUICKSTART_DIR:-/tmp/imagestream-quickstart}):
#   - a docker-registry on a free loopback port with demo images pushed by skopeo,
#   - containerd 2.2 (its CRI plugin, overlayfs snapshotter, Debian's runc) with its sockets,
#     state and root in the dir, and its containers' cgroups under a parent of their own,
#   - `imagestream serve` in front of it, with embedded defaults except the scratch paths and a
#     free mirror port, and containerd pulling from the registry through imagestream's layer
#     cache (a hosts.toml written by `imagestream mirror hosts-toml`),
# then walks an image stream through set -> move -> rollback, running the image each time
# through imagestream's CRI socket, and leaves the node running.
#
# The CRI calls are made with crictl (cri-tools, Kubernetes' own CRI command line), as an operator
# on a node would: with $QS/crictl.yaml, which points it at imagestream's CRI socket. Debian 12
# packages neither cri-tools nor containerd 2 (its containerd is 1.6): the script uses the crictl
# and the containerd 2.2 that `scripts/test-tools.sh` caches
# (${IMAGESTREAM_TEST_TOOLS:-/var/cache/imagestream-test/bin}/crictl and containerd2/, a dir
# holding containerd, its runc shim and ctr), else a crictl on PATH, and builds what is missing
# with `scripts/test-tools.sh crictl containerd2`, which needs Go (1.24+) (a few minutes).
#
# Running the script again first stops the node of the previous run.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
QS=${IMAGESTREAM_QUICKSTART_DIR:-/tmp/imagestream-quickstart}
QS=${QS%/}
# Marks a dir as ours: `stop` removes only a dir that carries it.
MARKER="$QS/.imagestream-quickstart"

# Paths of the node (short: unix socket paths are limited to 108 bytes).
CTD_DIR="$QS/containerd"
CTD_SOCK="$QS/containerd.sock"
CRI_SOCK="$QS/imagestream.sock"
ADMIN_SOCK="$QS/admin.sock"
STATE_DIR="$QS/imagestream"
PAUSE_IMAGE_NAME="pause:quickstart"
POD_NAMESPACE="demo"
# The cgroup parent of the demo pods (cgroupfs: a path in every hierarchy), one per scratch dir;
# `stop` removes it.
if [[ $QS == /tmp/imagestream-quickstart ]]; then
  CGROUP_PARENT=/imagestream-quickstart
else
  CGROUP_PARENT=/imagestream-quickstart-$(printf '%s' "$QS" | cksum | cut -d' ' -f1)
fi
# The test tools' bin dir (as scripts/test-tools.sh sets it): crictl, containerd2/.
TOOLS=${IMAGESTREAM_TEST_TOOLS:-${IMAGESTREAM_TEST_CACHE:-/var/cache/imagestream-test}/bin}
# crictl's config files: imagestream's CRI socket, and containerd's (to compare).
CRICTL_CONFIG="$QS/crictl.yaml"
CRICTL_CONTAINERD_CONFIG="$QS/crictl-containerd.yaml"
# Pod configs crictl reads: the demo pod (namespace demo), and one of namespace other.
POD_CONFIG="$QS/pods/demo.json"
OTHER_POD_CONFIG="$QS/pods/other.json"

# protobuf-compiler, libprotobuf-dev: protoc and its well-known types, for building imagestream.
# (No containerd: Debian's is 1.6; containerd 2 comes from scripts/test-tools.sh. Its runc will do.)
APT_PACKAGES=(runc docker-registry skopeo umoci busybox-static protobuf-compiler libprotobuf-dev iproute2 curl)

# ------------------------------------------------------------------------------------------------
# Output helpers
# ------------------------------------------------------------------------------------------------

# Bold headings on a terminal only.
if [[ -t 1 ]]; then BOLD=$'\033[1m' PLAIN=$'\033[0m'; else BOLD="" PLAIN=""; fi
heading() { printf '\n%s=== %s ===%s\n' "$BOLD" "$*" "$PLAIN"; }
say() { printf -- '--> %s\n' "$*"; }
# Prints a command, then runs it.
show() {
  printf '$ %s\n' "$*"
  "$@"
}
die() {
  printf 'quickstart: error: %s\n' "$*" >&2
  exit 1
}

# ------------------------------------------------------------------------------------------------
# Stopping a node (also used before starting one)
# ------------------------------------------------------------------------------------------------

# Live pids whose command line mentions the scratch dir, plus all their descendants (containers
# are children of their containerd shim and do not mention the dir themselves). Never this
# script or its ancestors (whose command lines may well mention the dir).
node_pids() {
  local pid ppid state rest f
  local -A keep=() parent=() spare=()
  # This shell and its ancestors.
  pid=$BASHPID
  while [[ -n $pid && $pid != 0 ]]; do
    spare[$pid]=1
    read -r rest 2>/dev/null <"/proc/$pid/stat" || break
    rest=${rest##*) }
    read -r _ pid _ <<<"$rest"
  done
  spare[$$]=1
  # Parent of every live process.
  for f in /proc/[0-9]*/stat; do
    pid=${f#/proc/}
    pid=${pid%/stat}
    read -r rest 2>/dev/null <"$f" || continue
    # "pid (comm) state ppid ...": comm may contain spaces and parentheses.
    rest=${rest##*) }
    read -r state ppid _ <<<"$rest"
    [[ $state == Z || $state == X ]] && continue
    parent[$pid]=$ppid
  done
  # Processes naming the dir (one grep over all command lines).
  while read -r f; do
    pid=${f#/proc/}
    pid=${pid%/cmdline}
    [[ -n ${parent[$pid]:-} && -z ${spare[$pid]:-} ]] && keep[$pid]=1
  done < <(grep -lF "$QS/" /proc/[0-9]*/cmdline 2>/dev/null)
  # Close over children.
  local changed=1
  while ((changed)); do
    changed=0
    for pid in "${!parent[@]}"; do
      if [[ -z ${keep[$pid]:-} && -z ${spare[$pid]:-} && -n ${keep[${parent[$pid]}]:-} ]]; then
        keep[$pid]=1
        changed=1
      fi
    done
  done
  if ((${#keep[@]})); then printf '%s\n' "${!keep[@]}"; fi
  return 0
}

# Unix socket paths that process $1 has open (containerd shims listen in /run/containerd/s/).
socket_paths_of() {
  local pid=$1 inodes
  inodes=$(for fd in /proc/"$pid"/fd/*; do readlink "$fd" 2>/dev/null; done |
    sed -n 's/^socket:\[\([0-9]*\)\]$/\1/p' | sort -u)
  [[ -z $inodes ]] && return 0
  awk 'NR == FNR { want[$1] = 1; next } FNR > 1 && ($7 in want) && $8 ~ /^\// { print $8 }' \
    <(printf '%s\n' "$inodes") /proc/net/unix | sort -u
}

# Mount points at or under the scratch dir, deepest first.
node_mounts() {
  awk -v dir="$QS" '{ m = $5; gsub(/\\040/, " ", m) } m == dir || index(m, dir "/") == 1 { print m }' \
    /proc/self/mountinfo | awk '{ print gsub("/", "/") "\t" $0 }' | sort -rn | cut -f2- | uniq
}

# The demo pods' cgroup dirs ($CGROUP_PARENT in every cgroup hierarchy), deepest first.
node_cgroups() {
  local m
  while read -r m; do
    [[ -d $m$CGROUP_PARENT ]] && find "$m$CGROUP_PARENT" -depth -type d
  done < <(awk '{ for (i = 7; i < NF; i++) if ($i == "-") break }
    $(i + 1) == "cgroup" || $(i + 1) == "cgroup2" { print $5 }' /proc/self/mountinfo)
  return 0
}

stop_node() {
  if [[ -e $QS && ! -e $MARKER ]]; then
    die "$QS exists but was not made by this script (no $MARKER); refusing to touch it"
  fi
  [[ -e $QS ]] || { say "no quickstart node at $QS"; return 0; }
  heading "Stopping the quickstart node in $QS"

  # imagestream first (SIGTERM: it drains and removes its sockets), then containerd.
  local name pid
  for name in imagestream containerd registry; do
    pid=$(cat "$QS/$name.pid" 2>/dev/null || true)
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
      say "stopping $name (pid $pid)"
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done

  # Whatever is left that belongs to the node: containerd shims and their containers.
  local pids shim_sockets=()
  for _ in 1 2 3; do
    mapfile -t pids < <(node_pids)
    ((${#pids[@]})) || break
    for pid in "${pids[@]}"; do
      if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q containerd-shim; then
        mapfile -t -O "${#shim_sockets[@]}" shim_sockets < <(socket_paths_of "$pid")
      fi
    done
    say "killing ${#pids[@]} leftover process(es): ${pids[*]}"
    kill -KILL "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 50); do
      local alive=0
      for pid in "${pids[@]}"; do
        [[ -d /proc/$pid ]] && ! grep -qE '^State:\s+[ZX]' "/proc/$pid/status" 2>/dev/null && alive=1
      done
      ((alive)) || break
      sleep 0.1
    done
  done
  local sock
  for sock in "${shim_sockets[@]}"; do
    [[ $sock == /run/containerd/s/* ]] && rm -f "$sock"
  done

  # Mounts under the dir (sandbox /dev/shm, container rootfs overlays), deepest first.
  local m
  for _ in 1 2 3 4 5; do
    mapfile -t mounts < <(node_mounts)
    ((${#mounts[@]})) || break
    for m in "${mounts[@]}"; do umount -l "$m" 2>/dev/null || true; done
  done
  if [[ -n $(node_mounts) ]]; then
    die "still mounted under $QS: $(node_mounts | tr '\n' ' ')"
  fi

  # The pods' cgroups: containerd removes a container's when it removes the container, not when
  # it is killed like this. (rmdir: a cgroup dir is empty once its processes are gone.)
  local cg cgroups
  for _ in $(seq 20); do
    mapfile -t cgroups < <(node_cgroups)
    ((${#cgroups[@]})) || break
    for cg in "${cgroups[@]}"; do rmdir "$cg" 2>/dev/null || true; done
    [[ -z $(node_cgroups) ]] || sleep 0.1
  done
  if [[ -n $(node_cgroups) ]]; then
    say "warning: cgroups left behind: $(node_cgroups | tr '\n' ' ')"
  fi

  rm -rf --one-file-system "$QS"
  say "stopped; $QS removed"
}

# ------------------------------------------------------------------------------------------------
# Dependencies and build
# ------------------------------------------------------------------------------------------------

install_deps() {
  heading "Checking dependencies"
  local p missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    say "installing with apt: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y "${APT_PACKAGES[@]}"
  else
    say "all Debian packages present: ${APT_PACKAGES[*]}"
  fi
  command -v cargo >/dev/null ||
    die "cargo not found: install a Rust toolchain >= 1.85 with rustup (https://rustup.rs); Debian's cargo is too old"
}

build() {
  heading "Building imagestream (release)"
  local locked=()
  [[ -f $REPO/Cargo.lock ]] && locked=(--locked)
  (cd "$REPO" && show cargo build --release "${locked[@]}")
  BIN="${CARGO_TARGET_DIR:-$REPO/target}/release/imagestream"
  [[ -x $BIN ]] || die "build did not produce $BIN"
}

# containerd2_in DIR: whether DIR holds a containerd 2.x and its runc shim.
containerd2_in() {
  [[ -x $1/containerd && -x $1/containerd-shim-runc-v2 ]] &&
    [[ $("$1/containerd" --version 2>/dev/null) =~ \ v2\. ]]
}

containerd2_version() { "$CTD2_DIR/containerd" --version | awk '{ print $NF }'; }

# Sets CRICTL and CTD2_DIR: the crictl and the containerd 2 dir (containerd, its shim, ctr) that
# scripts/test-tools.sh caches in $TOOLS (crictl: else one on PATH); builds what is missing with
# that script (Go).
find_tools() {
  heading "Finding crictl and containerd 2"
  local missing=() dir what
  CRICTL="" CTD2_DIR=""
  if [[ -x $TOOLS/crictl ]]; then
    CRICTL=$TOOLS/crictl
  elif type -P crictl >/dev/null; then # (not the crictl function below)
    CRICTL=$(type -P crictl)
  else
    missing+=(crictl)
  fi
  if containerd2_in "$TOOLS/containerd2"; then CTD2_DIR=$TOOLS/containerd2; else missing+=("containerd 2"); fi
  if ((${#missing[@]})); then
    what=${missing[0]}${missing[1]:+ and ${missing[1]}}
    # sudo's secure_path often leaves out Go's default install dir.
    if ! command -v go >/dev/null && [[ -x /usr/local/go/bin/go ]]; then PATH=$PATH:/usr/local/go/bin; fi
    command -v go >/dev/null ||
      die "$what not found in $TOOLS, and Go is not installed to build it: install Go >= 1.24 (https://go.dev/dl) and run again"
    say "building $what with scripts/test-tools.sh ($(go version)): a few minutes"
    # It builds just the tools named and prints its bin dir.
    dir=$(bash "$REPO/scripts/test-tools.sh" crictl containerd2) || die "scripts/test-tools.sh failed (above)"
    [[ -n $CRICTL || ! -x $dir/crictl ]] || CRICTL=$dir/crictl
    [[ -n $CTD2_DIR ]] || ! containerd2_in "$dir/containerd2" || CTD2_DIR=$dir/containerd2
    [[ -n $CRICTL ]] || die "scripts/test-tools.sh did not produce $dir/crictl"
    [[ -n $CTD2_DIR ]] || die "scripts/test-tools.sh did not produce containerd 2 in $dir/containerd2"
  fi
  say "crictl: $CRICTL"
  say "containerd 2: $CTD2_DIR (containerd $(containerd2_version))"
}

# ------------------------------------------------------------------------------------------------
# The node: registry, images, containerd, imagestream
# ------------------------------------------------------------------------------------------------

port_free() { [[ -z $(ss -Htln "sport = :$1") ]]; }

start_registry() {
  heading "Starting a local registry"
  local port=5000
  while ! port_free "$port"; do
    port=$((port + 1))
    ((port < 5100)) || die "no free port in 127.0.0.1:5000-5099"
  done
  REG="127.0.0.1:$port"
  mkdir -p "$QS/registry/data"
  cat >"$QS/registry/config.yml" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $QS/registry/data
  delete:
    enabled: true
http:
  addr: $REG
  secret: imagestream-quickstart
EOF
  docker-registry serve "$QS/registry/config.yml" >"$QS/registry.log" 2>&1 </dev/null &
  echo $! >"$QS/registry.pid"
  for _ in $(seq 150); do
    curl -fsS "http://$REG/v2/" >/dev/null 2>&1 && { say "registry at $REG"; return 0; }
    kill -0 "$(cat "$QS/registry.pid")" 2>/dev/null || break
    sleep 0.1
  done
  tail -n 20 "$QS/registry.log" >&2
  die "docker-registry did not come up on $REG"
}

# A busybox OCI layout (umoci), the base of every demo image.
build_base_image() {
  local base="$QS/images/base" bundle="$QS/images/base-bundle"
  umoci init --layout "$base"
  umoci new --image "$base:base"
  umoci unpack --rootless --image "$base:base" "$bundle" >/dev/null
  mkdir -p "$bundle/rootfs/bin"
  cp /bin/busybox "$bundle/rootfs/bin/busybox"
  local applet
  for applet in sh sleep cat echo ls; do ln -s busybox "$bundle/rootfs/bin/$applet"; done
  umoci repack --image "$base:base" "$bundle"
  rm -rf "$bundle"
}

# push_image NAME:TAG VERSION ENTRYPOINT... : base + /version + labels, pushed to the registry.
push_image() {
  local name_tag=$1 version=$2
  shift 2
  local work="$QS/images/$version" args=()
  rm -rf "$work"
  cp -a "$QS/images/base" "$work"
  printf '%s\n' "$version" >"$QS/images/version-file"
  umoci insert --image "$work:base" "$QS/images/version-file" /version
  local part
  for part in "$@"; do args+=("--config.entrypoint=$part"); done
  umoci config --image "$work:base" --tag img \
    --config.label="org.opencontainers.image.version=$version" \
    --config.label="imagestream.quickstart/version=$version" "${args[@]}"
  skopeo --insecure-policy copy --quiet --dest-tls-verify=false \
    --digestfile "$work.digest" "oci:$work:img" "docker://$REG/$name_tag"
  say "pushed $REG/$name_tag ($(cat "$work.digest"))"
}

push_images() {
  heading "Building and pushing demo images"
  build_base_image
  push_image demo/app:v1 v1 /bin/sleep infinity
  push_image demo/app:v2 v2 /bin/sleep infinity
  push_image "$PAUSE_IMAGE_NAME" pause /bin/sleep infinity
}

start_containerd() {
  heading "Starting containerd 2"
  local sub
  for sub in root state certs.d cni/net.d opt runc; do mkdir -p "$CTD_DIR/$sub"; done
  # Config version 3 (containerd 2.x): the CRI plugin with the overlayfs snapshotter, without
  # AppArmor, CDI or NRI, oom_score_adj kept within bounds (no CAP_SYS_RESOURCE needed); Debian's
  # runc with its state in the dir too, and every socket in the dir. (Host-network pods only:
  # no CNI plugin is configured.)
  cat >"$CTD_DIR/config.toml" <<EOF
version = 3
root = "$CTD_DIR/root"
state = "$CTD_DIR/state"
disabled_plugins = [
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.erofs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
  "io.containerd.nri.v1.nri",
]

[grpc]
  address = "$CTD_SOCK"
[ttrpc]
  address = "$CTD_SOCK.ttrpc"
[debug]
  address = "$CTD_DIR/debug.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "$CTD_DIR/opt"

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "$REG/$PAUSE_IMAGE_NAME"
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "$CTD_DIR/certs.d"

[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_cdi = false
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        Root = "$CTD_DIR/runc"
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "$CTD_DIR/cni/net.d"
EOF
  # Its own dir first on PATH: containerd starts the containerd-shim-runc-v2 it finds there
  # (Debian's containerd 1.6 shim, if installed, is on PATH too).
  PATH="$CTD2_DIR:$PATH" "$CTD2_DIR/containerd" --config "$CTD_DIR/config.toml" \
    >"$QS/containerd.log" 2>&1 </dev/null &
  echo $! >"$QS/containerd.pid"
  write_crictl_config "$CRICTL_CONTAINERD_CONFIG" "$CTD_SOCK"
  for _ in $(seq 300); do
    if [[ -S $CTD_SOCK ]] && crictl_containerd version >/dev/null 2>&1; then
      say "containerd $(containerd2_version) at $CTD_SOCK (sandbox image $REG/$PAUSE_IMAGE_NAME)"
      return 0
    fi
    kill -0 "$(cat "$QS/containerd.pid")" 2>/dev/null || break
    sleep 0.1
  done
  tail -n 30 "$QS/containerd.log" >&2
  die "containerd did not come up"
}

start_imagestream() {
  heading "Starting imagestream"
  # An empty config file: embedded defaults (a host /etc/imagestream/config.toml is not read);
  # the flags put every path in the scratch dir.
  printf '# quickstart: embedded defaults; paths are given as flags\n' >"$QS/config.toml"
  local mport=5050
  while ! port_free "$mport"; do
    mport=$((mport + 1))
    ((mport < 5150)) || die "no free port in 127.0.0.1:5050-5149 for the mirror"
  done
  MIRROR="127.0.0.1:$mport"
  IMAGESTREAM_CMD=("$BIN" serve --config "$QS/config.toml"
    --mirror-listen "$MIRROR"
    --state-dir "$STATE_DIR"
    --cri-socket "$CRI_SOCK"
    --admin-socket "$ADMIN_SOCK"
    --runtime-endpoint "unix://$CTD_SOCK"
    --insecure-registry "$REG")
  printf '$ %s\n' "${IMAGESTREAM_CMD[*]}"
  "${IMAGESTREAM_CMD[@]}" >"$QS/imagestream.log" 2>&1 </dev/null &
  echo $! >"$QS/imagestream.pid"
  export IMAGESTREAM_ADMIN_SOCKET="$ADMIN_SOCK"
  write_crictl_config "$CRICTL_CONFIG" "$CRI_SOCK"
  for _ in $(seq 300); do
    if "$BIN" stream ls >/dev/null 2>&1 && crictl version >/dev/null 2>&1; then
      say "imagestream: CRI socket $CRI_SOCK, admin socket $ADMIN_SOCK, mirror http://$MIRROR"
      say "containerd pulls $REG through the mirror:"
      show "$BIN" mirror hosts-toml --registry "$REG" --dir "$CTD_DIR/certs.d" --mirror "http://$MIRROR"
      return 0
    fi
    kill -0 "$(cat "$QS/imagestream.pid")" 2>/dev/null || break
    sleep 0.1
  done
  tail -n 30 "$QS/imagestream.log" >&2
  die "imagestream did not come up"
}

# ------------------------------------------------------------------------------------------------
# crictl
# ------------------------------------------------------------------------------------------------

# write_crictl_config FILE SOCKET: a crictl config for the CRI socket SOCKET (runtime and image
# endpoint), used as `crictl --config FILE` or `CRI_CONFIG_FILE=FILE crictl`.
write_crictl_config() {
  cat >"$1" <<EOF
runtime-endpoint: unix://$2
image-endpoint: unix://$2
timeout: 60
debug: false
pull-image-on-create: false
disable-pull-on-run: false
EOF
}

# run_crictl CONFIG ARGS...: crictl with that config.
run_crictl() {
  local config=$1
  shift
  "$CRICTL" --config "$config" "$@"
}

# crictl ARGS...: through imagestream's CRI socket. crictl_containerd ARGS...: containerd direct.
crictl() { run_crictl "$CRICTL_CONFIG" "$@"; }
crictl_containerd() { run_crictl "$CRICTL_CONTAINERD_CONFIG" "$@"; }

# show_crictl ARGS...: prints the command, then runs it through imagestream's CRI socket.
show_crictl() {
  printf '$ crictl %s\n' "$*"
  crictl "$@"
}

# refused_crictl ARGS...: prints the command and runs it, expecting it to fail; shows crictl's
# error message (without its log decoration) and exit code.
refused_crictl() {
  local out rc=0
  printf '$ crictl %s\n' "$*"
  out=$(crictl "$@" 2>&1) || rc=$?
  if ((rc == 0)); then
    printf '%s\n' "$out"
    die "crictl $* succeeded; it should have been refused"
  fi
  sed -n 's/.*level=fatal msg="\(.*\)"$/\1/p' <<<"$out" | sed 's/\\"/"/g; s/^/    /'
  say "(crictl exit code $rc)"
}

# write_pod_config FILE NAMESPACE: the config of the demo pod in NAMESPACE, with the node's network
# (namespace_options.network 2 = NODE: no CNI needed), its cgroups (and its containers') under
# $CGROUP_PARENT, as the kubelet's cgroupfs driver would put them under /kubepods. (Without a
# cgroup_parent, crictl warns, and containerd puts them in /k8s.io/<id>.)
write_pod_config() {
  mkdir -p "$QS/pods/logs"
  cat >"$1" <<EOF
{
  "metadata": { "name": "quickstart", "uid": "quickstart-$2", "namespace": "$2", "attempt": 0 },
  "log_directory": "$QS/pods/logs",
  "linux": {
    "cgroup_parent": "$CGROUP_PARENT",
    "security_context": { "namespace_options": { "network": 2, "pid": 0, "ipc": 0 } }
  }
}
EOF
}

# Node facts that `run` needs after the script that started the node has exited.
save_node_env() {
  printf 'BIN=%q\nREG=%q\nCRICTL=%q\nPOD_ID=%q\n' "$BIN" "$REG" "$CRICTL" "$POD_ID" >"$QS/node.env"
}

start_pod() {
  write_pod_config "$POD_CONFIG" "$POD_NAMESPACE"
  write_pod_config "$OTHER_POD_CONFIG" other
  say "the demo pod: namespace $POD_NAMESPACE, host network ($POD_CONFIG)"
  printf '$ crictl runp %s\n' "$POD_CONFIG"
  POD_ID=$(crictl runp "$POD_CONFIG") || die "crictl runp failed"
  echo "$POD_ID"
  save_node_env
}

# run_app IMAGE: what the kubelet does for a container of IMAGE in the demo pod, with crictl
# through imagestream's CRI socket: inspecti (ImageStatus), pull if not present, create, start;
# then `cat /version` in it (exec). The previous demo container is removed first.
run_app() {
  local image=$1 image_id old attempt container config
  old=$(cat "$QS/container.id" 2>/dev/null || true)
  if [[ -n $old ]]; then
    crictl stop --timeout 0 "$old" >/dev/null 2>&1 || true
    crictl rm "$old" >/dev/null 2>&1 || true
    rm -f "$QS/container.id"
  fi
  if image_id=$(crictl inspecti -o go-template --template '{{.status.id}}' "$image" 2>/dev/null); then
    say "crictl inspecti $image: present, id $image_id"
  else
    say "crictl inspecti $image: not present, so pull it for the demo pod:"
    show_crictl pull --pod-config "$POD_CONFIG" "$image" || die "crictl pull $image failed"
  fi
  # Container names must be unique in the pod: count attempts across runs.
  attempt=$(($(cat "$QS/attempt" 2>/dev/null || echo 0) + 1))
  echo "$attempt" >"$QS/attempt"
  config="$QS/pods/app-$attempt.json"
  cat >"$config" <<EOF
{
  "metadata": { "name": "app", "attempt": $attempt },
  "image": { "image": "$image" },
  "labels": { "io.kubernetes.pod.name": "quickstart", "io.kubernetes.pod.namespace": "$POD_NAMESPACE" },
  "log_path": "app-$attempt.log",
  "linux": {}
}
EOF
  printf '$ crictl create --no-pull %s %s %s\n' "${POD_ID:0:13}" "$config" "$POD_CONFIG"
  container=$(crictl create --no-pull "$POD_ID" "$config" "$POD_CONFIG") || die "crictl create failed"
  echo "$container" >"$QS/container.id"
  container=${container:0:13}
  echo "$container"
  printf '$ crictl start %s\n' "$container"
  crictl start "$container" >/dev/null || die "crictl start failed"
  say "container $container runs $(crictl inspect -o go-template --template '{{.status.image.image}}' "$container")"
  printf '$ crictl exec %s cat /version   =>  %s%s%s\n' "$container" "$BOLD" \
    "$(crictl exec "$container" cat /version)" "$PLAIN"
}

# ------------------------------------------------------------------------------------------------
# The walk-through
# ------------------------------------------------------------------------------------------------

walk() {
  local is="$BIN"
  local ref="imagestream.local/demo/app:prod"

  heading "1. Create the stream demo/app (short names allowed in namespace demo)"
  show "$is" stream create demo/app --lookup-local

  heading "2. Point demo/app:prod at $REG/demo/app:v1"
  show "$is" tag set demo/app:prod "$REG/demo/app:v1"
  show "$is" resolve "$ref"

  heading "3. A pod in namespace demo runs $ref"
  say "crictl here is $CRICTL with CRI_CONFIG_FILE=$CRICTL_CONFIG (imagestream's CRI socket)"
  start_pod
  run_app "$ref"

  heading "4. Move demo/app:prod to $REG/demo/app:v2; new containers run v2"
  show "$is" tag set demo/app:prod "$REG/demo/app:v2"
  show "$is" resolve "$ref"
  run_app "$ref"

  heading "5. Roll demo/app:prod back; new containers run v1 again"
  show "$is" tag rollback demo/app:prod
  run_app "$ref"

  heading "6. The short name app:prod, for pods of namespace demo only"
  show "$is" resolve app:prod --namespace demo
  run_app "app:prod"
  say "for a pod of namespace other, app:prod names the stream other/app, which does not exist:"
  refused_crictl pull --pod-config "$OTHER_POD_CONFIG" app:prod
  show "$is" resolve app:prod --namespace other || say "(exit code $?)"
  say "and demo/app is for pods of namespace demo only (imagestream stream access widens that):"
  refused_crictl pull --pod-config "$OTHER_POD_CONFIG" "$ref"

  heading "7. History of demo/app:prod (newest first)"
  show "$is" tag history demo/app:prod

  heading "8. The stream"
  show "$is" stream get demo/app
  echo
  show "$is" stream ls

  heading "9. What containerd holds (crictl images: ListImages, forwarded as it is)"
  show_crictl images --digests

  heading "10. The node's layer cache (containerd pulled through the mirror; tags pin their images)"
  show "$is" cache ls
  show "$is" cache verify
  say "mirror metrics (http://$MIRROR/metrics):"
  curl -fsS "http://$MIRROR/metrics" | grep -E '^imagestream_(cache|upstream)' | sed 's/^/    /' || true
}

summary() {
  local container
  container=$(cut -c1-13 "$QS/container.id" 2>/dev/null || true)
  heading "The node is running"
  cat <<EOF
Scratch dir:     $QS   (logs: $QS/{imagestream,containerd,registry}.log)
Registry:        http://$REG   (demo/app:v1, demo/app:v2, $PAUSE_IMAGE_NAME)
containerd:      unix://$CTD_SOCK   ($(containerd2_version) from $CTD2_DIR)
imagestream:     CRI unix://$CRI_SOCK, admin $ADMIN_SOCK, mirror http://$MIRROR (/metrics)
                 ${IMAGESTREAM_CMD[*]}

Use it:
  export IMAGESTREAM_ADMIN_SOCKET=$ADMIN_SOCK
  $BIN stream ls
  $BIN tag set demo/app:prod $REG/demo/app:v2
  $BIN tag history demo/app:prod
  $BIN cache ls

  # crictl through imagestream's CRI socket ($CRICTL_CONFIG names it):
  export CRI_CONFIG_FILE=$CRICTL_CONFIG
  $CRICTL pods
  $CRICTL ps
  $CRICTL exec $container cat /version
  $CRICTL pull --pod-config $POD_CONFIG imagestream.local/demo/app:prod
  $CRICTL images --digests
  # the same containerd, without imagestream:
  $CRICTL --runtime-endpoint unix://$CTD_SOCK --image-endpoint unix://$CTD_SOCK images --digests

  # Run a new container of the tag in the demo pod (namespace demo), with crictl as above:
  bash $REPO/scripts/quickstart.sh run                       # imagestream.local/demo/app:prod
  bash $REPO/scripts/quickstart.sh run app:prod              # the short name

Stop it (kills imagestream, containerd, its shims and containers, unmounts, removes $QS
and the pods' cgroups, $CGROUP_PARENT):
  bash $REPO/scripts/quickstart.sh stop
EOF
}

on_exit() {
  if (($1)); then echo "quickstart: failed (exit $1); logs: $QS/{imagestream,containerd,registry}.log" >&2; fi
}

main() {
  [[ $(id -u) == 0 ]] || die "run as root (containerd and runc need it): sudo bash $0 ${1:-}"
  [[ -n $QS && $QS == /* && $QS != / ]] || die "IMAGESTREAM_QUICKSTART_DIR must be an absolute path other than /"
  case "${1:-start}" in
    stop)
      stop_node
      ;;
    run)
      [[ -f $QS/node.env ]] || die "no quickstart node at $QS: start one with $0"
      # shellcheck source=/dev/null
      source "$QS/node.env"
      run_app "${2:-imagestream.local/demo/app:prod}"
      ;;
    start)
      trap 'on_exit $?' EXIT
      install_deps
      find_tools
      build
      stop_node # a node of an earlier run
      mkdir -p "$QS"
      touch "$MARKER"
      start_registry
      push_images
      start_containerd
      start_imagestream
      walk
      summary
      ;;
    *)
      echo "usage: $0 [start | run [IMAGE] | stop]" >&2
      exit 2
      ;;
  esac
}

main "$@"
