#!/usr/bin/env bash
# Re-measures the constraint table of sampler/README.md ("Measured: constraints over the 20
# default scenarios"): the default stress job once per constraint, each into OUT/<row>, then one
# Markdown row per constraint from OUT/<row>/report/summary.json (means over the scenarios).
#   bash scripts/stress-constraints.sh OUT        (OUT must not exist; ~6 default jobs of time)
# Uses target/release/sampler (built first by cargo if missing or stale) and GNU time for the
# wall time and peak memory of each job.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/stress-constraints.sh OUT_DIR (must not exist)}
[ -e "$out" ] && { echo "stress-constraints: $out exists; give a new directory" >&2; exit 2; }
cargo build --release -p sampler --bin sampler
rows=(
  "none|--trust-region none"
  "renormalise|--trust-region none --renorm true"
  "χ regulariser|--trust-region none --chi-reg 0.001"
  "trust 0.2 + renormalise|--trust-region 0.2 --renorm true"
  "trust 0.1|--trust-region 0.1"
  "trust 0.05 (default)|"
)
mkdir -p "$out"
for i in "${!rows[@]}"; do
  name=${rows[$i]%%|*} flags=${rows[$i]#*|}
  echo "row $i: $name"
  # shellcheck disable=SC2086  # the flags are words
  /usr/bin/time -f '%e\t%M' -o "$out/row$i.time" target/release/sampler -o "$out/row$i" $flags > "$out/row$i.log" 2>&1
  printf '%s\t%s\t%s\n' "$name" "$flags" "$(cat "$out/row$i.time")" >> "$out/rows.tsv"
done
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
print("| constraint (flags) | error raised | error before → after | nearest real before → after | denoising before → after | ‖z0‖/√d after | moved | wall s | max RSS MB |")
print("|---|---:|---|---|---|---:|---:|---:|---:|")
for i, line in enumerate(open(f"{out}/rows.tsv")):
    name, flags, secs, rss_kb = line.rstrip("\n").split("\t")
    s = json.load(open(f"{out}/row{i}/report/summary.json"))
    m, n = s["mean"], s["scenarios"]
    label = f"{name} (`{flags}`)" if flags else name
    print(f"| {label} | {s['error_increased']}/{n} | {m['error_before']:.4f} → {m['error_after']:.4f} "
          f"| {m['nearest_real_before']:.2f} → {m['nearest_real_after']:.2f} "
          f"| {m['realism_before']:.2f} → {m['realism_after']:.2f} | {m['z0_rms_after']:.3f} | {m['z0_moved']:.3f} | {float(secs):.1f} | {int(rss_kb) / 1024:.0f} |")
print(f"real frames: error {m['error_real']:.4f}, nearest real {m['nearest_real_real']:.2f}, denoising {m['realism_real']:.2f}")
PY
