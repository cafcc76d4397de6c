#!/usr/bin/env bash
# Checks scripts/gpu-check.sh on a machine without a GPU (CI), in about 15 s once `cargo test
# --workspace` has built the test executables:
#   1. without a GPU it stops at once — exit 2 and one line saying no GPU was found and how it
#      looked: nvidia-smi absent, or an nvidia-smi (a stand-in here) that lists no device; with a
#      GPU listed but no bundle, exit 2 naming the bundle;
#   2. `--cpu` runs a few of its steps on the CPU (the shared op tests, a parity test, the default
#      job) and prints the table with them PASS, exit 0;
#   3. a failing step (tests asked for a device that does not exist) is FAIL in the table, exit 1.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-dry-run.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
export WORLDGRAD_GPU_CHECK_LOGS=$tmp/logs
fail() {
  printf 'gpu-check-dry-run: %s\n--- its output:\n%s\n' "$1" "$out" >&2
  exit 1
}
# Runs gpu-check.sh with the given environment assignments and arguments; sets out and rc.
check() {
  rc=0
  out=$(env "$@" 2>&1) || rc=$?
}

# 1. No GPU.
if command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu-check-dry-run: nvidia-smi is on PATH here: the 'nvidia-smi missing' case is not checked"
else
  check bash scripts/gpu-check.sh
  [ "$rc" -eq 2 ] || fail "without nvidia-smi: exit $rc, expected 2"
  [ "$(printf '%s\n' "$out" | wc -l)" -eq 1 ] || fail "without nvidia-smi: more than one line"
  [[ $out == "gpu-check: no GPU found: nvidia-smi is not on PATH"* ]] || fail "without nvidia-smi: not the no-GPU line"
fi
mkdir -p "$tmp/no-device" "$tmp/one-gpu"
printf '#!/bin/sh\necho "No devices were found"\nexit 6\n' >"$tmp/no-device/nvidia-smi"
printf '#!/bin/sh\necho "NVIDIA H200, 580.65.06, 143771 MiB"\n' >"$tmp/one-gpu/nvidia-smi"
chmod +x "$tmp/no-device/nvidia-smi" "$tmp/one-gpu/nvidia-smi"
check PATH="$tmp/no-device:$PATH" bash scripts/gpu-check.sh
[ "$rc" -eq 2 ] || fail "with no device listed: exit $rc, expected 2"
[ "$(printf '%s\n' "$out" | wc -l)" -eq 1 ] || fail "with no device listed: more than one line"
[ "$out" = "gpu-check: no GPU found: nvidia-smi lists no device (No devices were found)" ] ||
  fail "with no device listed: not the no-GPU line"
check PATH="$tmp/one-gpu:$PATH" bash scripts/gpu-check.sh "$tmp/no-bundle"
[ "$rc" -eq 2 ] || fail "a GPU but no bundle: exit $rc, expected 2"
[[ $out == *"no bundle at '$tmp/no-bundle'"* ]] || fail "a GPU but no bundle: the bundle is not named"
echo "gpu-check-dry-run: no GPU → exit 2 with one line (nvidia-smi missing / no device); no bundle → exit 2"

# 2. The table on the CPU.
check bash scripts/gpu-check.sh --cpu --only shared-ops,cosmos_parity,default-job
[ "$rc" -eq 0 ] || fail "--cpu: exit $rc, expected 0"
table=$(printf '%s\n' "$out" | sed -n '/^step  *status/,$p')
for step in shared-ops cosmos_parity default-job; do
  printf '%s\n' "$table" | grep -qE "^$step +PASS +[0-9.]+  [^ ]" || fail "--cpu: no PASS row with a figure for $step"
done
printf '%s\n' "$table" | grep -qE '^default-job .*before→after: [0-9.]+→[0-9.]+' || fail "--cpu: no before→after figures"
[ "$(printf '%s\n' "$table" | tail -n 1)" = "== 3 passed, 0 failed, 0 skipped" ] || fail "--cpu: wrong totals"
printf '%s\n' "$table"

# 3. A failing step.
check bash scripts/gpu-check.sh --cpu --device no-such-device --only cosmos_parity
[ "$rc" -eq 1 ] || fail "a failing step: exit $rc, expected 1"
printf '%s\n' "$out" | grep -qE '^cosmos_parity +FAIL .*0 passed, [1-9][0-9]* failed' || fail "a failing step: no FAIL row"
echo "gpu-check-dry-run: a failing step → FAIL row, exit 1"
