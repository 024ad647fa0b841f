#!/usr/bin/env bash
# The GN paper's group-number ablation (its Table 3) in miniature: GroupNorm with 1 (= LN), 2,
# 4, 8 and 16 (= IN) groups on MNIST over several seeds with `normcli sweep`, then the table
# (mean ± std over seeds) and the plot of test error against the group count. The model is
# mnist_net_w16, 16 channels in every norm layer (mnist_net's 8 and 12 allow only 1, 2, 4), so
# G = 1 is LayerNorm and G = 16 InstanceNorm exactly (normcli's LN and IN are GroupNorm(1, C)
# and GroupNorm(C, C)).
#
#   examples/groups_study.sh [--out DIR] [--data-dir DIR] [--epochs N] [--limit N]
#                            [--seeds 1,2,3] [--workers N]
#
# Re-running the same command resumes: finished runs are kept, unfinished ones continue.
set -euo pipefail

usage() { echo "usage: $0 [--out DIR] [--data-dir DIR] [--epochs N] [--limit N] [--seeds LIST] [--workers N]" >&2; exit 2; }
out=runs/groups; seeds=1,2,3; epochs=5
opts=()
while [[ $# -gt 0 ]]; do
  [[ $# -ge 2 ]] || usage
  case $1 in
    --out) out=$2 ;;
    --seeds) seeds=$2 ;;
    --epochs) epochs=$2 ;;
    --data-dir|--limit|--workers) opts+=("$1" "$2") ;;
    *) usage ;;
  esac
  shift 2
done

start=$SECONDS
normcli sweep --dataset mnist --model mnist_net_w16 --norm gn --groups 1,2,4,8,16 \
  --seed "$seeds" --epochs "$epochs" "${opts[@]}" --out "$out" >/dev/null
echo "sweep: $((SECONDS - start)) s wall" >&2
normcli eval "$out" --group-by groups --markdown >"$out/table.md"
normcli eval "$out" --group-by groups --csv >"$out/table.csv"
normcli plot "$out" --x groups --y test_error --out "$out/test_error.png" --overwrite >/dev/null
cat "$out/table.md"
