#!/usr/bin/env bash
# Peak resident memory of Wanda 50% on a Llama-2-7B-shaped model (random bf16 weights on disk),
# end to end through the CLI including the save. Needs ~45 GB of free disk.
#   bash benchmarks/llama7b_memory.sh [WORKDIR]
set -euo pipefail
work=${1:-/tmp/prunekit-7b}
mkdir -p "$work"
[ -f "$work/model/config.json" ] || python benchmarks/make_random_llama.py "$work/model"
rm -rf "$work/pruned"
/usr/bin/time -v prunekit prune --model "$work/model" --method wanda --sparsity 0.5 --lazy --dtype bfloat16 \
    --calib c4 --nsamples 4 --seqlen 128 --device cpu --out "$work/pruned" 2> "$work/time.txt"
grep -E "Maximum resident|Elapsed" "$work/time.txt"
du -sh "$work/model" "$work/pruned"
