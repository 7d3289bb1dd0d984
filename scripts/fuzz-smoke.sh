#!/usr/bin/env bash
# Fuzz smoke test: builds the cargo-fuzz targets in fuzz/ and runs each for a bounded time,
# starting from its checked-in seeds (fuzz/corpus/TARGET, never written to: new inputs go to a
# temp dir). Exits non-zero if any target crashes; libFuzzer saves the crashing input under
# fuzz/artifacts/TARGET/ (reproduce: cargo fuzz run TARGET fuzz/artifacts/TARGET/crash-…).
#
# Usage: bash scripts/fuzz-smoke.sh [TARGET...]      (default: every target)
#   FUZZ_SECONDS   seconds per target (default 20)
#   FUZZ_ARGS      extra libFuzzer arguments (e.g. "-jobs=2 -workers=2")
#   FUZZ_SANITIZER cargo-fuzz --sanitizer (default address; CI uses none: the crate forbids
#                  unsafe code, and an uninstrumented build takes about half the time)
#   FUZZ_TARGET_DIR where the instrumented build goes (default
#                  /var/cache/imagestream-test/fuzz-target, outside the repo, so that a second
#                  run, from any clone, rebuilds only imagestream itself: about 2.5 min, not 12)
#
# Works on a stable toolchain: cargo-fuzz passes nightly-only -Z flags (AddressSanitizer,
# coverage instrumentation), which RUSTC_BOOTSTRAP=1 allows. Installs cargo-fuzz if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${FUZZ_SECONDS:-20}
sanitizer=${FUZZ_SANITIZER:-address}
target_dir=${FUZZ_TARGET_DIR:-/var/cache/imagestream-test/fuzz-target}
mkdir -p "$target_dir"
export RUSTC_BOOTSTRAP=1
export PATH="$HOME/.cargo/bin:$PATH"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "==> installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

if (($#)); then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list)
fi

echo "==> cargo fuzz build (${targets[*]})"
start=$SECONDS
cargo fuzz build --sanitizer "$sanitizer" --target-dir "$target_dir"
echo "    built in $((SECONDS - start)) s"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=()
for t in "${targets[@]}"; do
  echo "==> fuzz $t for ${seconds} s"
  mkdir -p "$work/$t"
  # shellcheck disable=SC2086 # FUZZ_ARGS is a list of arguments
  if cargo fuzz run --sanitizer "$sanitizer" --target-dir "$target_dir" "$t" "$work/$t" "fuzz/corpus/$t" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    ${FUZZ_ARGS:-} >"$work/$t.log" 2>&1; then
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$t.log" | tail -1)
    echo "    ok: ${execs:-?} inputs, corpus $(find "$work/$t" -type f | wc -l) new + $(find "fuzz/corpus/$t" -type f | wc -l) seeds"
  else
    failed+=("$t")
    echo "    FAILED: $t"
    grep -E -A25 '^(thread .* panicked|==[0-9]+==ERROR|.*deadly signal|.*ERROR: libFuzzer)' "$work/$t.log" | head -60 || tail -40 "$work/$t.log"
    ls "fuzz/artifacts/$t/" 2>/dev/null || true
  fi
done

if ((${#failed[@]})); then
  echo "fuzz smoke test FAILED: ${failed[*]}"
  exit 1
fi
echo "fuzz smoke test passed: ${targets[*]}"
