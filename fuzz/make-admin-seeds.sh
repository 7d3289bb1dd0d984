#!/usr/bin/env bash
# Regenerates fuzz/corpus/admin_request/: one byte for the request kind (see
# fuzz_targets/admin_request.rs), then the request encoded by protoc from the text below.
set -euo pipefail
cd "$(dirname "$0")/.."
out=fuzz/corpus/admin_request
mkdir -p "$out"
n=0
seed() { # KIND MESSAGE TEXT
  n=$((n + 1))
  { printf "\\x$(printf %02x "$1")"
    printf '%s\n' "$3" | protoc -I proto --encode="imagestream.v1.$2" proto/imagestream/v1/admin.proto
  } >"$out/seed-$(printf %02d "$n")"
}
D=sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
seed 0 CreateStreamRequest 'namespace: "team-a" name: "app" lookup_local: true'
seed 0 CreateStreamRequest 'namespace: "team-a" name: "my.app-1"'
seed 0 CreateStreamRequest 'namespace: "Team" name: "../app"'
seed 1 ListStreamsRequest 'namespace: "team-a"'
seed 1 ListStreamsRequest ''
seed 2 UpdateStreamAccessRequest 'namespace: "team-a" name: "app" allow: "team-*" allow: "ci-[0-9]" deny: "team-x" remove: "old"'
seed 2 UpdateStreamAccessRequest 'namespace: "team-a" name: "app" reset: true allow: "[unclosed"'
seed 3 SetTagRequest 'namespace: "team-a" name: "app" tag: "prod" source: "registry.example.com/team/app:v1"'
seed 3 SetTagRequest "namespace: \"team-a\" name: \"app\" tag: \"v1.2_3-rc\" source: \"registry.example.com/team/app@$D\""
seed 3 SetTagRequest 'namespace: "team-b" name: "app" tag: "canary" source: "imagestream.local/team-a/app:prod" scheduled: true'
seed 3 SetTagRequest 'namespace: "team-a" name: "app" tag: "prod" source: "nginx" scheduled: true interval_secs: 300'
seed 3 SetTagRequest 'namespace: "team-a" name: "app" tag: "prod" source: "nginx" scheduled: true interval_secs: 5'
seed 3 SetTagRequest 'namespace: "team-a" name: "app" tag: "prod" source: ""'
seed 4 GetTagRequest 'namespace: "team-a" name: "app" tag: "prod"'
seed 4 RollbackTagRequest 'namespace: "team-a" name: "app" tag: "prod" to_generation: 3'
seed 4 GetTagRequest 'namespace: "team-a" name: "app" tag: ".x"'
seed 5 ResolveRequest 'reference: "app:prod" namespace: "team-a"'
seed 5 ResolveRequest 'reference: "imagestream.local/team-a/app:prod" namespace: "team-x"'
seed 5 ResolveRequest 'reference: "nginx:latest" namespace: "team-b"'
seed 5 ResolveRequest 'reference: "app:prod"'
seed 6 WatchRequest 'namespace: "team-a" name: "app"'
seed 6 WatchRequest 'name: "app"'
seed 7 RemoveCacheBlobRequest "digest: \"$D\""
seed 7 RemoveCacheBlobRequest 'digest: "sha256:../../etc/passwd"'
echo "wrote $n seeds to $out"
