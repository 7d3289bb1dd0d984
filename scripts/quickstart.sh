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
#   - containerd (CRI plugin, native snapshotter) with its socket, state and root in the dir,
#   - `imagestream serve` in front of it, with embedded defaults except the scratch paths and a
#     free mirror port, and containerd pulling from the registry through imagestream's layer
#     cache (a hosts.toml written by `imagestream mirror hosts-toml`),
# then walks an image stream through set -> move -> rollback, running the image each time
# through imagestream's CRI socket, and leaves the node running.
#
# Debian 12 has no crictl package (cri-tools), so CRI calls are made with a tiny client built
# from what is at hand: `protoc --encode/--decode` with the CRI proto of the k8s-cri crate (which
# cargo has just downloaded to build imagestream) and `curl --http2-prior-knowledge` over the
# unix socket (see `cri` below). The closing notes also show the crictl command, for those who
# have crictl from elsewhere.
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

APT_PACKAGES=(containerd runc docker-registry skopeo umoci busybox-static protobuf-compiler iproute2 curl)

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
    read -r rest <"/proc/$pid/stat" 2>/dev/null || break
    rest=${rest##*) }
    read -r _ pid _ <<<"$rest"
  done
  spare[$$]=1
  # Parent of every live process.
  for f in /proc/[0-9]*/stat; do
    pid=${f#/proc/}
    pid=${pid%/stat}
    read -r rest <"$f" 2>/dev/null || continue
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

  # Mounts under the dir (sandbox /dev/shm, snapshot bind mounts), deepest first.
  local m
  for _ in 1 2 3 4 5; do
    mapfile -t mounts < <(node_mounts)
    ((${#mounts[@]})) || break
    for m in "${mounts[@]}"; do umount -l "$m" 2>/dev/null || true; done
  done
  if [[ -n $(node_mounts) ]]; then
    die "still mounted under $QS: $(node_mounts | tr '\n' ' ')"
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
  # The CRI API definition, from the k8s-cri crate cargo just fetched (for the CRI client below).
  local manifest
  manifest=$(cd "$REPO" && cargo metadata --format-version 1 --locked 2>/dev/null |
    grep -o '"manifest_path":"[^"]*/k8s-cri-[0-9.]*/Cargo.toml"' | head -n1 | cut -d'"' -f4) || true
  CRI_PROTO_DIR="$(dirname "${manifest:-/nonexistent/x}")/proto"
  [[ -f $CRI_PROTO_DIR/v1.proto ]] || die "cannot find the CRI proto (k8s-cri crate) via cargo metadata"
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
  heading "Starting containerd"
  local sub
  for sub in root state certs.d cni/net.d opt runc; do mkdir -p "$CTD_DIR/$sub"; done
  # The CRI plugin without cgroups, apparmor or overlayfs; runc state in the dir too.
  cat >"$CTD_DIR/config.toml" <<EOF
version = 2
root = "$CTD_DIR/root"
state = "$CTD_DIR/state"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.overlayfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "$CTD_SOCK"

[plugins."io.containerd.internal.v1.opt"]
  path = "$CTD_DIR/opt"

[plugins."io.containerd.grpc.v1.cri"]
  disable_cgroup = true
  restrict_oom_score_adj = true
  disable_apparmor = true
  sandbox_image = "$REG/$PAUSE_IMAGE_NAME"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "$CTD_DIR/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$CTD_DIR/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$CTD_DIR/certs.d"
EOF
  containerd --config "$CTD_DIR/config.toml" >"$QS/containerd.log" 2>&1 </dev/null &
  echo $! >"$QS/containerd.pid"
  for _ in $(seq 300); do
    if [[ -S $CTD_SOCK ]] && ctr -a "$CTD_SOCK" version >/dev/null 2>&1 &&
      CRI_SOCK="$CTD_SOCK" cri_quiet RuntimeService/Version VersionRequest VersionResponse ''; then
      say "containerd at $CTD_SOCK (sandbox image $REG/$PAUSE_IMAGE_NAME)"
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
  for _ in $(seq 300); do
    if "$BIN" stream ls >/dev/null 2>&1 &&
      cri_quiet RuntimeService/Version VersionRequest VersionResponse ''; then
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
# A minimal CRI client: protoc encodes/decodes the messages, curl speaks gRPC over HTTP/2.
# ------------------------------------------------------------------------------------------------

# cri SERVICE/METHOD REQUEST_TYPE RESPONSE_TYPE TEXT_PROTO
# Calls runtime.v1.SERVICE/METHOD on $CRI_SOCK; prints the response in protobuf text format.
# On a gRPC error prints "grpc-status N: message" on stderr and returns 1.
cri() {
  local method=$1 req_type=$2 resp_type=$3 text=$4
  local tmp
  tmp=$(mktemp -d "$QS/cri.XXXXXX")
  printf '%s' "$text" |
    protoc --proto_path="$CRI_PROTO_DIR" --encode="runtime.v1.$req_type" v1.proto >"$tmp/msg"
  # A gRPC message frame: 1 byte "not compressed", 4 bytes big-endian length, the message.
  local len
  len=$(stat -c %s "$tmp/msg")
  printf '%b' "$(printf '\\x%02x' 0 $((len >> 24 & 255)) $((len >> 16 & 255)) \
    $((len >> 8 & 255)) $((len & 255)))" >"$tmp/req"
  cat "$tmp/msg" >>"$tmp/req"
  if ! curl -sS --http2-prior-knowledge --unix-socket "$CRI_SOCK" --max-time 120 \
    -H 'content-type: application/grpc' -H 'te: trailers' \
    --data-binary @"$tmp/req" -D "$tmp/headers" -o "$tmp/resp" \
    "http://localhost/runtime.v1.$method"; then
    rm -rf "$tmp"
    return 1
  fi
  # grpc-status comes in the trailers (or in the headers for an immediate error).
  local status message
  status=$(sed -n 's/^grpc-status: *\([0-9]*\).*/\1/p' "$tmp/headers" | tail -n1)
  message=$(sed -n 's/^grpc-message: *//p' "$tmp/headers" | tail -n1 | tr -d '\r')
  if [[ ${status:-0} != 0 ]]; then
    # grpc-message is percent-encoded.
    printf 'grpc-status %s: %b\n' "$status" "${message//%/\\x}" >&2
    rm -rf "$tmp"
    return 1
  fi
  tail -c +6 "$tmp/resp" | protoc --proto_path="$CRI_PROTO_DIR" --decode="runtime.v1.$resp_type" v1.proto
  rm -rf "$tmp"
}

cri_quiet() { cri "$@" >/dev/null 2>&1; }

# The value of the first `KEY: "value"` line of a text-format message on stdin.
field() { sed -n "/^ *$1: \"/ { s/^ *$1: \"\\(.*\\)\"\$/\\1/p; q; }"; }

# pod_config [NAMESPACE]: the config of the demo pod (namespace demo by default), host network
# (no CNI needed).
pod_config() {
  cat <<EOF
metadata { name: "quickstart" uid: "quickstart-uid" namespace: "${1:-$POD_NAMESPACE}" attempt: 0 }
log_directory: "$QS/pods/quickstart"
linux { security_context { namespace_options { network: NODE pid: POD ipc: POD } } }
EOF
}

# Node facts that `run` needs after the script that started the node has exited.
save_node_env() {
  printf 'BIN=%q\nREG=%q\nCRI_PROTO_DIR=%q\nPOD_ID=%q\n' "$BIN" "$REG" "$CRI_PROTO_DIR" "$POD_ID" \
    >"$QS/node.env"
}

start_pod() {
  say "CRI RunPodSandbox (namespace $POD_NAMESPACE, host network) via $CRI_SOCK"
  mkdir -p "$QS/pods/quickstart"
  POD_ID=$(cri RuntimeService/RunPodSandbox RunPodSandboxRequest RunPodSandboxResponse \
    "config { $(pod_config) }" | field pod_sandbox_id)
  [[ -n $POD_ID ]] || die "RunPodSandbox failed"
  echo "    pod_sandbox_id: $POD_ID"
  save_node_env
}

# run_app IMAGE: what the kubelet does for a container of IMAGE in the demo pod: ImageStatus,
# PullImage if not present, CreateContainer, StartContainer; then `cat /version` in it
# (ExecSync). The previous demo container is removed first. Every call goes to imagestream.
run_app() {
  local image=$1 out image_ref old attempt container
  old=$(cat "$QS/container.id" 2>/dev/null || true)
  if [[ -n $old ]]; then
    cri_quiet RuntimeService/StopContainer StopContainerRequest StopContainerResponse \
      "container_id: \"$old\" timeout: 0" || true
    cri_quiet RuntimeService/RemoveContainer RemoveContainerRequest RemoveContainerResponse \
      "container_id: \"$old\"" || true
    rm -f "$QS/container.id"
  fi
  out=$(cri ImageService/ImageStatus ImageStatusRequest ImageStatusResponse \
    "image { image: \"$image\" }")
  image_ref=$(field id <<<"$out")
  if [[ -n $image_ref ]]; then
    say "CRI ImageStatus $image: present, id $image_ref"
  else
    say "CRI ImageStatus $image: not present"
    out=$(cri ImageService/PullImage PullImageRequest PullImageResponse \
      "image { image: \"$image\" } sandbox_config { $(pod_config) }")
    image_ref=$(field image_ref <<<"$out")
    say "CRI PullImage $image (pod namespace $POD_NAMESPACE): image_ref $image_ref"
  fi
  # Container names must be unique in the pod: count attempts across runs.
  attempt=$(($(cat "$QS/attempt" 2>/dev/null || echo 0) + 1))
  echo "$attempt" >"$QS/attempt"
  out=$(cri RuntimeService/CreateContainer CreateContainerRequest CreateContainerResponse "
    pod_sandbox_id: \"$POD_ID\"
    config {
      metadata { name: \"app\" attempt: $attempt }
      image { image: \"$image\" }
      log_path: \"app-$attempt.log\"
      linux {}
    }
    sandbox_config { $(pod_config) }")
  container=$(field container_id <<<"$out")
  echo "$container" >"$QS/container.id"
  cri_quiet RuntimeService/StartContainer StartContainerRequest StartContainerResponse \
    "container_id: \"$container\"" || die "StartContainer failed"
  out=$(cri RuntimeService/ContainerStatus ContainerStatusRequest ContainerStatusResponse \
    "container_id: \"$container\"")
  say "CRI CreateContainer $image: container ${container:0:12} runs $(field image <<<"$(sed -n '/^  image {/,/}/p' <<<"$out")")"
  out=$(cri RuntimeService/ExecSync ExecSyncRequest ExecSyncResponse \
    "container_id: \"$container\" cmd: \"cat\" cmd: \"/version\" timeout: 10")
  printf '    $ cat /version   =>  %s%b%s\n' "$BOLD" "$(field stdout <<<"$out" | sed 's/\\n$//')" "$PLAIN"
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
  cri ImageService/PullImage PullImageRequest PullImageResponse \
    "image { image: \"app:prod\" } sandbox_config { $(pod_config other) }" 2>&1 | sed 's/^/    CRI PullImage: /' || true
  show "$is" resolve app:prod --namespace other || say "(exit code $?)"

  heading "7. History of demo/app:prod (newest first)"
  show "$is" tag history demo/app:prod

  heading "8. The stream"
  show "$is" stream get demo/app
  echo
  show "$is" stream ls

  heading "9. What containerd holds (namespace k8s.io)"
  ctr -a "$CTD_SOCK" -n k8s.io images ls -q | grep -v '^sha256:' | sed 's/^/    /'

  heading "10. The node's layer cache (containerd pulled through the mirror; tags pin their images)"
  show "$is" cache ls
  show "$is" cache verify
  say "mirror metrics (http://$MIRROR/metrics):"
  curl -fsS "http://$MIRROR/metrics" | grep -E '^imagestream_(cache|upstream)' | sed 's/^/    /' || true
}

summary() {
  heading "The node is running"
  cat <<EOF
Scratch dir:     $QS   (logs: $QS/{imagestream,containerd,registry}.log)
Registry:        http://$REG   (demo/app:v1, demo/app:v2, $PAUSE_IMAGE_NAME)
containerd:      unix://$CTD_SOCK
imagestream:     CRI unix://$CRI_SOCK, admin $ADMIN_SOCK, mirror http://$MIRROR (/metrics)
                 ${IMAGESTREAM_CMD[*]}

Use it:
  export IMAGESTREAM_ADMIN_SOCKET=$ADMIN_SOCK
  $BIN stream ls
  $BIN tag set demo/app:prod $REG/demo/app:v2
  $BIN tag history demo/app:prod
  $BIN cache ls
  # Run a container of the tag in the demo pod (namespace demo) through imagestream's CRI socket:
  bash $REPO/scripts/quickstart.sh run                       # imagestream.local/demo/app:prod
  bash $REPO/scripts/quickstart.sh run app:prod              # the short name
  # With crictl, if you have it (Debian 12 does not package it):
  crictl --runtime-endpoint unix://$CRI_SOCK pull imagestream.local/demo/app:prod

Stop it (kills imagestream, containerd, its shims and containers, unmounts, removes $QS):
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
