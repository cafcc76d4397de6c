#!/usr/bin/env bash
# gpu-check.sh — on a machine with an NVIDIA GPU but no Rust toolchain and no network: run the
# parity and gradient tests, the LAPO bench and the default job on CUDA from the executables that
# ../shared/gpu/build-cuda.sh packed, and print one summary table (step, PASS/FAIL/SKIP, seconds,
# key figure). Every step has a timeout inside a total budget, so the whole run stays under 10
# minutes; the table prints whatever fails; the exit status is 1 when a step failed.
#
#   On the build machine:  ../shared/gpu/build-cuda.sh --bins --tests --benches   (→ .gpu/)
#   On the GPU machine, from a copy of this repository with .gpu/ beside scripts/:
#                          scripts/gpu-check.sh [BUNDLE]
#   BUNDLE (default .gpu, or $WORLDGRAD_GPU_BUNDLE): a folder holding bundle.tar.xz, or one holding
#   its unpacked contents (sampler, tests/). Used from it: sampler, and under tests/ the test
#   executables shared, cosmos_parity, cosmos_grad, cosmos_pipeline_parity, cosmos_pipeline_grad,
#   wan_vae_parity, wan_vae_grad, dit_trajectory_grad and the bench lapo (cargo names them
#   NAME-<hash>; with several builds of one, the newest file is used and the table says so).
#
# Without a GPU it stops at once: exit 2 and one line saying what it saw (nvidia-smi missing, or
# no device listed). `--cpu [TARGET_DIR]` runs the same steps on the CPU with this checkout's
# executables (default target/debug, built by `cargo test --workspace`): a check of the script
# itself (.ci/run runs a few steps so, through scripts/gpu-check-dry-run.sh).
#
# Options: --only STEP[,STEP…] (names as in the table), --device DEV (default cuda; cpu with
# --cpu; anything `--device` accepts), --budget SECONDS (total, default 540).
# Environment: WORLDGRAD_BUILD_ROOT — the checkout the tests were built in, when it cannot be read
# from the executables; RUST_TEST_THREADS — threads per test executable (libtest's default: one per
# core); WORLDGRAD_GPU_CHECK_LOGS — where the step logs go (default a new folder under /tmp).
#
# What it sets up, and prints as it does: the bundle unpacked under the logs folder; the CUDA
# libraries of python3's nvidia-* wheels (PyTorch's) on LD_LIBRARY_PATH, as .gpu/run.sh does; the
# test executables open their fixtures at the CARGO_MANIFEST_DIR baked in at build time, so that
# checkout path is made a symlink to this repository when it does not exist here, and the
# CLI tests' baked path of the sampler binary a symlink to the bundle's.
set -uo pipefail
export LC_ALL=C # a decimal point in $EPOCHREALTIME, plain ASCII sorting
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD

usage() {
  sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'
}

mode=gpu bundle=${WORLDGRAD_GPU_BUNDLE:-.gpu} bundle_given="" only="" device="" budget=540
while [ $# -gt 0 ]; do
  case $1 in
    --cpu) mode=cpu ;;
    --only) only=${2:-}; shift ;;
    --only=*) only=${1#*=} ;;
    --device) device=${2:-}; shift ;;
    --device=*) device=${1#*=} ;;
    --budget) budget=${2:-}; shift ;;
    --budget=*) budget=${1#*=} ;;
    -h | --help) usage; exit 0 ;;
    -*) echo "gpu-check: unknown option '$1' (see --help)" >&2; exit 2 ;;
    *) bundle=$1 bundle_given=1 ;;
  esac
  shift
done
case $budget in '' | *[!0-9]*) echo "gpu-check: --budget must be whole seconds, got '$budget'" >&2; exit 2 ;; esac

# ---- The steps: name, kind, executable, timeout (s), arguments -----------------------------
# Kinds: test (a libtest executable under tests/), job (the sampler binary), bench (a bench
# executable), cpu-only (listed, not run: what it measures is the host's).
STEPS=(
  "shared-ops|test|shared|90|ops:: device::"
  "cosmos_parity|test|cosmos_parity|90|"
  "cosmos_pipeline_parity|test|cosmos_pipeline_parity|120|"
  "wan_vae_parity|test|wan_vae_parity|90|"
  "cosmos_grad|test|cosmos_grad|120|"
  "cosmos_pipeline_grad|test|cosmos_pipeline_grad|120|"
  "wan_vae_grad|test|wan_vae_grad|120|"
  "dit_trajectory_grad|test|dit_trajectory_grad|120|"
  "default-job|job|sampler|150|"
  "bench-lapo|bench|lapo|120|3 64"
  "bench-trajectory|cpu-only||0|host heap peak per iteration (a counting allocator)"
  "bench-vae|cpu-only||0|host heap and RSS peaks, and PyTorch on the CPU beside it"
  "bench-cosmos_memory|cpu-only||0|host heap and RSS peaks, and PyTorch on the CPU beside it"
  "bench-env|cpu-only||0|the simulator's physics and rendering (CPU code)"
)
if [ -n "$only" ]; then
  names=" $(for s in "${STEPS[@]}"; do printf '%s ' "${s%%|*}"; done)"
  for want in ${only//,/ }; do
    case $names in *" $want "*) ;; *) echo "gpu-check: --only: no step '$want'; steps:$names" >&2; exit 2 ;; esac
  done
fi

# ---- A GPU, before anything else -----------------------------------------------------------
if [ "$mode" = gpu ]; then
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu-check: no GPU found: nvidia-smi is not on PATH (no NVIDIA driver on this machine); nothing was run (--cpu runs the steps on the CPU)" >&2
    exit 2
  fi
  if ! gpu=$(timeout 60 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1) ||
    ! printf '%s\n' "$gpu" | grep -q ', '; then
    echo "gpu-check: no GPU found: nvidia-smi lists no device ($(printf '%s' "$gpu" | head -n 1 | tr -s ' '))" >&2
    exit 2
  fi
  gpu=$(printf '%s\n' "$gpu" | head -n 1)
  device=${device:-cuda}
else
  gpu="none (--cpu)"
  device=${device:-cpu}
fi

START=${EPOCHREALTIME:-$(date +%s)}
now() { echo "${EPOCHREALTIME:-$(date +%s)}"; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

LOGS=${WORLDGRAD_GPU_CHECK_LOGS:-}
if [ -z "$LOGS" ]; then
  LOGS=$(mktemp -d "${TMPDIR:-/tmp}/worldgrad-gpu-check.XXXXXX") || exit 2
else
  mkdir -p "$LOGS" || exit 2
fi
note() { echo "gpu-check: $*"; }

# ---- The executables -----------------------------------------------------------------------
if [ "$mode" = gpu ]; then
  if [ -f "$bundle/bundle.tar.xz" ]; then
    BIN=$LOGS/bundle
    mkdir -p "$BIN" && note "unpacking $bundle/bundle.tar.xz into $BIN"
    if ! tar -C "$BIN" -xJf "$bundle/bundle.tar.xz"; then
      echo "gpu-check: could not unpack $bundle/bundle.tar.xz" >&2
      exit 2
    fi
  elif [ -x "$bundle/sampler" ] || [ -d "$bundle/tests" ]; then
    BIN=$bundle
  else
    echo "gpu-check: no bundle at '$bundle' (neither bundle.tar.xz nor unpacked executables): build one with ../shared/gpu/build-cuda.sh --bins --tests --benches and copy .gpu/ here" >&2
    exit 2
  fi
  TESTS=$BIN/tests
  # The CUDA libraries PyTorch's wheels bring (what .gpu/run.sh does).
  libs=$(python3 -c 'import glob, site
print(":".join(sorted(p for s in site.getsitepackages() for p in glob.glob(s + "/nvidia/*/lib"))))' 2>/dev/null || true)
  if [ -n "$libs" ]; then
    export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    note "LD_LIBRARY_PATH += $(echo "$libs" | tr ':' '\n' | wc -l) nvidia/*/lib folders of python3's site-packages"
  else
    note "python3 has no nvidia/*/lib wheels: using the system's CUDA libraries"
  fi
else
  BIN=${bundle_given:+$bundle}
  BIN=${BIN:-target/debug}
  TESTS=$BIN/deps
  [ -d "$BIN" ] || { echo "gpu-check: --cpu: no '$BIN' (run cargo test --workspace first)" >&2; exit 2; }
fi
BIN=$(cd "$BIN" && pwd)
TESTS=$BIN/${TESTS##*/}

# The newest NAME-<16 hex> executable in $1; prints "path count".
find_exe() {
  local list
  list=$(find "$1" -maxdepth 1 -type f -perm -u+x -regextype posix-extended -regex ".*/$2-[0-9a-f]{16}" \
    -printf '%T@ %p\n' 2>/dev/null | sort -rn)
  [ -n "$list" ] || return 1
  echo "$(echo "$list" | head -n 1 | cut -d' ' -f2-) $(echo "$list" | wc -l)"
}

# The checkout the test executables were built in: of the NUL-terminated absolute paths in the
# executable's debug info (its compile directory among them), the shortest P such that the
# executable holds "P/sampler" (its CARGO_MANIFEST_DIR). Registry and toolchain paths are skipped.
detect_build_root() {
  local exe=$1 holders
  # Every run of path characters that ends in /sampler: any "P/sampler" in the file lies in one.
  holders=$(grep -aoE '/[[:alnum:]_.+@/-]*/sampler' "$exe" | sort -u | tr '\n' ' ')
  [ -n "$holders" ] || return 0
  tr '\0' '\n' <"$exe" | grep -axE '(/[[:alnum:]_][[:alnum:]_.+@-]*)+' |
    grep -vE '^/rustc?/|/\.cargo/|/\.rustup/|/target/' | sort -u |
    awk -v holders=" $holders" '{ if (index(holders, $0 "/sampler") && (best == "" || length($0) < length(best))) best = $0 }
                                END { if (best != "") print best }'
}

# Makes the baked fixture and binary paths of the sampler tests resolve here. Sets SETUP_PROBLEM.
SETUP_PROBLEM="" SETUP_DONE=""
setup_sampler_tests() {
  [ -n "$SETUP_DONE" ] && return
  SETUP_DONE=1
  local found exe root bin_path root_re
  found=$(find_exe "$TESTS" cosmos_pipeline_parity) || found=$(find_exe "$TESTS" cosmos_parity) || return
  exe=${found% *}
  root=${WORLDGRAD_BUILD_ROOT:-$(detect_build_root "$exe")}
  if [ -z "$root" ]; then
    SETUP_PROBLEM="cannot read the build checkout from $(basename "$exe"); set WORLDGRAD_BUILD_ROOT"
    return
  fi
  if [ -d "$root/sampler/tests/fixtures" ]; then
    note "fixtures: $root/sampler/tests/fixtures (the path the tests were built with)"
  elif [ -e "$root" ] || [ -L "$root" ]; then
    SETUP_PROBLEM="the tests read fixtures under $root, which exists here without sampler/tests/fixtures"
    return
  elif mkdir -p "$(dirname "$root")" && ln -s "$REPO" "$root"; then
    note "linked $root -> $REPO (the tests' baked CARGO_MANIFEST_DIR is $root/sampler)"
  else
    SETUP_PROBLEM="could not link $root -> $REPO for the tests' fixtures"
    return
  fi
  # The CLI tests run the sampler binary at the path cargo baked in (CARGO_BIN_EXE_sampler).
  root_re=$(printf '%s' "$root" | sed 's/[][\.*^$+?(){}|]/\\&/g')
  bin_path=$(grep -aoE "$root_re/target(/[[:alnum:]_.+@-]+){1,4}/sampler" "$exe" | head -n 1)
  if [ -z "$bin_path" ] || [ -x "$bin_path" ]; then
    return
  fi
  if [ -x "$BIN/sampler" ] && { [ -L "$bin_path" ] || [ ! -e "$bin_path" ]; } &&
    mkdir -p "$(dirname "$bin_path")" && ln -sfn "$BIN/sampler" "$bin_path"; then
    note "linked $bin_path -> $BIN/sampler (the CLI tests' baked CARGO_BIN_EXE_sampler)"
  else
    note "the CLI tests' sampler binary $bin_path is missing and could not be linked: those tests will fail"
  fi
}

# ---- Running -------------------------------------------------------------------------------
ROWS=() FAILED=0 PASSED=0 SKIPPED=0
record() { # name status seconds key
  ROWS+=("$1|$2|$3|$4")
  case $2 in PASS) PASSED=$((PASSED + 1)) ;; FAIL) FAILED=$((FAILED + 1)) ;; *) SKIPPED=$((SKIPPED + 1)) ;; esac
  printf 'gpu-check: %-24s %s  %s s  %s\n' "$1" "$2" "$3" "$4"
}

# "N passed" from a libtest log; with failures, "N passed, M failed; first: NAME: its panic message".
test_summary() {
  local log=$1 passed failed first why
  passed=$(grep -aoE 'test result: [a-zA-Z]+\. [0-9]+ passed' "$log" | awk '{ s += $4 } END { print s + 0 }')
  failed=$(grep -aoE '; [0-9]+ failed' "$log" | awk '{ s += $2 } END { print s + 0 }')
  if [ "$failed" -gt 0 ]; then
    # The first name listed under the last "failures:" heading, and the line after its panic.
    first=$(awk '/^failures:$/ { f = 1; s = ""; next } f && s == "" && /^    [^ ]/ { s = $1 } END { print s }' "$log")
    why=$(grep -aA1 -E "^thread '$first'( \([0-9]+\))? panicked at" "$log" | sed -n 2p)
    echo "$passed passed, $failed failed; first: $first: $why" | cut -c1-160
  else
    echo "$passed passed"
  fi
}

# The stress test's policy error before→after, mean over its scenarios, from the log's
# "scenario ID: policy action MSE to the expert — …, generated before B, after A (…)" lines; fails
# when no scenario is reported or the mean did not rise.
job_summary() {
  awk '/^scenario [^ ]+: policy action MSE to the expert/ {
         for (i = 1; i <= NF; i++) { if ($i == "before") b = $(i + 1); if ($i == "after") a = $(i + 1) }
         sub(",", "", b); sub(",", "", a)
         sb += b; sa += a; n++
         if (a + 0 > b + 0) rose++
       }
       END {
         if (n == 0) { print "no scenario result in the output"; exit 1 }
         printf "policy action MSE, mean of %d scenarios, before→after: %.5f→%.5f (rose on %d)", n, sb / n, sa / n, rose
         if (sa <= sb) { printf " (no rise)"; exit 1 }
         printf "\n"
       }' "$1"
}

run_step() { # name kind exe timeout args
  local name=$1 kind=$2 exe_name=$3 limit=$4 args=$5 log=$LOGS/$1.log exe found count rc t0 secs key left bad=""
  if [ "$kind" = cpu-only ]; then
    record "$name" SKIP - "CPU-only: measures $args"
    return
  fi
  left=$(awk -v s="$START" -v b="$budget" -v n="$(now)" 'BEGIN { printf "%d", b - (n - s) }')
  if [ "$left" -lt 15 ]; then
    record "$name" SKIP - "the ${budget} s budget is spent"
    return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  count=1
  if [ "$kind" = job ]; then
    exe=$BIN/sampler
    [ -x "$exe" ] || { record "$name" FAIL - "no sampler binary in $BIN"; return; }
  else
    if ! found=$(find_exe "$TESTS" "$exe_name"); then
      record "$name" FAIL - "no $exe_name-<hash> executable in $TESTS (build with --tests --benches)"
      return
    fi
    exe=${found% *} count=${found##* }
  fi
  if [ "$kind" = test ] && [ "$exe_name" != shared ]; then
    setup_sampler_tests
    if [ -n "$SETUP_PROBLEM" ]; then
      record "$name" FAIL - "not run: $SETUP_PROBLEM"
      return
    fi
  fi
  t0=$(now)
  case $kind in
    test)
      # shellcheck disable=SC2086 # the filters are words
      WORLDGRAD_TEST_DEVICE=$device timeout -k 10 "$limit" "$exe" $args >"$log" 2>&1
      rc=$?
      key=$(test_summary "$log")
      [ "$key" = "0 passed" ] && bad="no test ran"
      ;;
    job)
      rm -rf "$LOGS/job"
      # 4 of the default job's 20 held-out scenarios: the same path, within the step's budget.
      timeout -k 10 "$limit" "$exe" --device "$device" --num-scenarios 4 -o "$LOGS/job" >"$log" 2>&1
      rc=$?
      key=$(job_summary "$log") || bad=$key
      ;;
    bench)
      # shellcheck disable=SC2086
      WORLDGRAD_BENCH_DEVICE=$device timeout -k 10 "$limit" "$exe" $args >"$log" 2>&1
      rc=$?
      key=$(grep -aoE 'lapo_iteration_ms median [0-9.]+' "$log" | awk '{ print "median " $3 " ms per LAPO iteration (ResNet18, batch 64)" }')
      [ -n "$key" ] || bad="no lapo_iteration_ms in the output"
      ;;
  esac
  secs=$(since "$t0")
  # A bundle should hold one build of each (a target/debug/deps folder holds many, harmlessly).
  [ "$mode" = gpu ] && [ "$count" -gt 1 ] && key="$key [newest of $count builds in the bundle]"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    record "$name" FAIL "$secs" "timed out after $limit s; $key"
  elif [ "$rc" -ne 0 ]; then
    if [ -z "$key" ] || [ -n "$bad" ]; then
      # The binary's error (anyhow's "Error: …"), else the log's last line.
      key=$(awk '/^Error: / { e = 1; s = $0; next } e && /^Stack backtrace:/ { exit }
                 e && NF && $0 !~ /^Caused by:/ { sub(/^ *([0-9]+: )?/, ""); s = s "; " $0 } END { print s }' "$log" |
        cut -c1-160)
      [ -n "$key" ] || key=$(grep -av '^\s*$' "$log" | tail -n 1 | cut -c1-160)
    fi
    record "$name" FAIL "$secs" "exit $rc: $key"
  elif [ -n "$bad" ]; then
    record "$name" FAIL "$secs" "$bad"
  else
    record "$name" PASS "$secs" "$key"
  fi
}

note "device $device; GPU: $gpu; executables from $BIN; logs in $LOGS; budget $budget s"
for step in "${STEPS[@]}"; do
  IFS='|' read -r name kind exe_name limit args <<<"$step"
  if [ -n "$only" ] && [[ ",$only," != *",$name,"* ]]; then
    continue
  fi
  run_step "$name" "$kind" "$exe_name" "$limit" "$args"
done

# ---- The table -----------------------------------------------------------------------------
echo
echo "== gpu-check on $device ($gpu), $(since "$START") s; logs in $LOGS"
printf '%-24s %-6s %8s  %s\n' step status seconds "key figure"
for row in "${ROWS[@]}"; do
  IFS='|' read -r name status secs key <<<"$row"
  printf '%-24s %-6s %8s  %s\n' "$name" "$status" "$secs" "$key"
done
echo "== $PASSED passed, $FAILED failed, $SKIPPED skipped"
[ "$FAILED" -eq 0 ]
