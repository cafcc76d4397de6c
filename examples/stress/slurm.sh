#!/usr/bin/env bash
# The policy stress test as a Slurm array job: task i of n runs shard i/n of the scenarios into
# $RUN/shard-i-of-n; a dependent job merges them. No code of ours coordinates the workers: the
# split is deterministic (scenario k goes to shard k mod n), each result file is written when its
# scenario finishes, and a re-queued task (--requeue, preemption) resumes where it stopped.
#
#   sbatch --array=0-15 examples/stress/slurm.sh            # 16 workers
#   sbatch --dependency=afterok:<array job id> --wrap "sampler stress-report $RUN"
#
# Set SAMPLER (the built binary), RUN (a directory on a shared file system) and the scenario
# source in ARGS (--scenarios FILE.jsonl, or --num-scenarios N held-out episodes; add
# --world-model cosmos:REF --cosmos-prompt-embeds FILE --device cuda for a Cosmos world).
#SBATCH --job-name=stress
#SBATCH --cpus-per-task=2
#SBATCH --time=02:00:00
#SBATCH --requeue
set -euo pipefail
SAMPLER=${SAMPLER:-target/release/sampler}
RUN=${RUN:-out/stress-cluster}
ARGS=${ARGS:---num-scenarios 200}
: "${SLURM_ARRAY_TASK_ID:?run this with sbatch --array}"
: "${SLURM_ARRAY_TASK_COUNT:?run this with sbatch --array}"
shard="$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT"
dir="$RUN/shard-$SLURM_ARRAY_TASK_ID-of-$SLURM_ARRAY_TASK_COUNT"
# A re-queued task continues its shard; a first attempt starts it.
resume=()
if [ -n "$(ls -A "$dir" 2>/dev/null | grep -v '^\.worldgrad\.lock$')" ]; then resume=(--resume); fi
# shellcheck disable=SC2086
exec "$SAMPLER" -o "$RUN" --shard "$shard" "${resume[@]}" $ARGS
