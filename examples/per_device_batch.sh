#!/usr/bin/env bash
# How BatchNorm depends on the batch each process normalizes: BN, BN with --sync-bn and GN
# trained data-parallel in 2 processes at per-process batches 2, 4, 8, 16, 32 (global batch
# twice that), then one plot of final test error against per-process batch.
#
#   examples/per_device_batch.sh [DATASET] [--epochs N] [--data-dir DIR] [--out DIR]
#                                [--limit N] [--device D] [--batches "2 4 8 16 32"]
#
# Plain BN normalizes over each process's share of the batch; --sync-bn over the global
# batch; GN normalizes each image on its own and is the control: its curve shows what the
# batch size does to optimization alone. Everything else (learning rate, epochs, seed) is the
# dataset's default for every run. Re-running it resumes unfinished runs and keeps finished
# ones.
set -euo pipefail

usage() { echo "usage: $0 [mnist|fashion_mnist|kmnist|cifar10|cifar100] [--epochs N] [--data-dir DIR] [--out DIR] [--limit N] [--device D] [--batches \"2 4 8 16 32\"]" >&2; exit 2; }
dataset=mnist
if [[ $# -gt 0 && $1 != --* ]]; then dataset=$1; shift; fi
nproc=2
batches="2 4 8 16 32"  # images per process per step
out=runs/per_device_batch_$dataset  # like every example: bench/results is written on purpose only
data_opts=()   # where the data is and what runs it: every command
train_opts=()  # --epochs, --limit: training only
while [[ $# -gt 0 ]]; do
  [[ $# -ge 2 ]] || usage
  case $1 in
    --epochs|--limit) train_opts+=("$1" "$2"); shift 2 ;;
    --data-dir|--device) data_opts+=("$1" "$2"); shift 2 ;;
    --out) out=$2; shift 2 ;;
    --batches) batches=$2; shift 2 ;;
    *) usage ;;
  esac
done
for b in $batches; do [[ $b =~ ^[1-9][0-9]*$ ]] || usage; done
mkdir -p "$out"
log="$out/log.txt"
echo "# $(date -u +%FT%TZ) $0 $dataset ${data_opts[*]} ${train_opts[*]} --out $out --batches '$batches'" >>"$log"

ckpts=()
for run in "bn:--norm bn" "bn_sync:--norm bn --sync-bn" "gn:--norm gn"; do
  name=${run%%:*}; read -r -a opts <<<"${run#*:}"
  for b in $batches; do
    ckpt="$out/${name}_b$b.safetensors"
    t0=$SECONDS
    if [[ -f $ckpt ]]; then  # finished runs return at once; interrupted ones continue
      normcli train --resume "$ckpt" --nproc "$nproc" "${data_opts[@]}" >/dev/null
    else
      normcli train --dataset "$dataset" "${opts[@]}" --batch-size $((b * nproc)) \
        --nproc "$nproc" "${train_opts[@]}" "${data_opts[@]}" --out "$ckpt" >/dev/null
    fi
    echo "train ${name} per-process batch $b: $((SECONDS - t0)) s" >>"$log"
    ckpts+=("$ckpt")
  done
done

python "$(dirname "$0")/plot_per_device_batch.py" "$out/test_error.png" "${ckpts[@]}"
normcli eval "${ckpts[@]}" "${data_opts[@]}" --markdown >"$out/eval.md"
cat "$out/eval.md"
