#!/usr/bin/env bash
# The GN paper's batch-size study (its Figure 1) in miniature: BN, GN and LN (--norms) trained
# on MNIST at batch sizes 2..64 over several seeds with `normcli sweep`, then the table (mean ±
# std over seeds) and the plot of test error against batch size.
#
#   examples/batch_size_study.sh [--out DIR] [--data-dir DIR] [--epochs N] [--limit N]
#                                [--seeds 1,2,3] [--norms bn,gn,ln] [--workers N]
#
# Re-running the same command resumes: finished runs are kept, unfinished ones continue.
# The learning rate is the dataset's default at every batch size (no linear scaling).
set -euo pipefail

usage() { echo "usage: $0 [--out DIR] [--data-dir DIR] [--epochs N] [--limit N] [--seeds LIST] [--norms LIST] [--workers N]" >&2; exit 2; }
out=runs/batch_study; epochs=5; seeds=1,2,3; norms=bn,gn,ln
opts=()
while [[ $# -gt 0 ]]; do
  [[ $# -ge 2 ]] || usage
  case $1 in
    --out) out=$2 ;;
    --epochs) epochs=$2 ;;
    --seeds) seeds=$2 ;;
    --norms) norms=$2 ;;
    --data-dir|--limit|--workers) opts+=("$1" "$2") ;;
    *) usage ;;
  esac
  shift 2
done

start=$SECONDS
normcli sweep --dataset mnist --norm "$norms" --batch-size 2,4,8,16,32,64 --seed "$seeds" \
  --epochs "$epochs" "${opts[@]}" --out "$out" >/dev/null
echo "sweep: $((SECONDS - start)) s wall" >&2
normcli eval "$out" --group-by norm,batch_size --markdown >"$out/table.md"
normcli eval "$out" --group-by norm,batch_size --csv >"$out/table.csv"
normcli plot "$out" --x batch_size --y test_error --hue norm --out "$out/test_error.png" --overwrite >/dev/null
cat "$out/table.md"
