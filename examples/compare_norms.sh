#!/usr/bin/env bash
# The normalization study as a shell script: train BN + L1, GN and LN on one
# dataset, compare them, and write the study's report (curves, misclassified images,
# confusion matrices, differences between the norms) as one HTML page.
#
#   examples/compare_norms.sh DATASET [--epochs N] [--data-dir DIR] [--out DIR] [--seed N]
#                                     [--limit N] [--device D] [--l1 LAMBDA] [--fresh]
#
# Everything goes to --out (default runs/DATASET, which git ignores): the checkpoints,
# eval.json, eval.md, log.txt, report.html and its Markdown twin report.md (figures in
# report_figures/). Re-running it resumes unfinished runs and keeps finished ones; --fresh
# retrains every run from scratch (replacing the checkpoints in --out: `make results` uses
# it to regenerate bench/results).
#
# The data is checked once (and downloaded if missing) before anything is created or
# started. The three trainings then run at the same time, one CPU thread each (on a small
# CPU three one-thread runs train faster together than one after another with all threads
# each: bench/results/levers.md); each names its run on every line it prints.
set -euo pipefail

usage() { echo "usage: $0 mnist|cifar10 [--epochs N] [--data-dir DIR] [--out DIR] [--seed N] [--limit N] [--device D] [--l1 LAMBDA] [--fresh]" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
dataset=$1; shift
case $dataset in
  mnist) l1=1e-4 ;;
  cifar10) l1=1e-5 ;;
  *) usage ;;
esac
out=runs/$dataset
data_dir=  # default: $NORMCLI_DATA, else ./data (normcli's own rule)
fresh=0
data_opts=()   # where the data is and what runs it: every command
limit_opts=()  # --limit: training, eval and misclassified
epoch_opts=()
seed_opts=()   # --seed: the three trainings
while [[ $# -gt 0 ]]; do
  if [[ $1 == --fresh ]]; then fresh=1; shift; continue; fi
  [[ $# -ge 2 ]] || usage
  case $1 in
    --epochs) epoch_opts=("$1" "$2"); shift 2 ;;
    --seed) seed_opts=("$1" "$2"); shift 2 ;;
    --limit) limit_opts=("$1" "$2"); shift 2 ;;
    --data-dir) data_dir=$2; [[ $data_dir == /* ]] || data_dir=$PWD/$data_dir
                data_opts+=("$1" "$data_dir"); shift 2 ;;
    --device) data_opts+=("$1" "$2"); shift 2 ;;
    --out) out=$2; shift 2 ;;
    --l1) l1=$2; shift 2 ;;
    *) usage ;;
  esac
done

# The data, checked once before anything is created or started (three trainings finding it
# missing would each say so, and race to download it).
normcli data "$dataset" ${data_dir:+--data-dir "$data_dir"} >/dev/null

mkdir -p "$out"
# Every step runs beside others, so each takes one thread unless told otherwise.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
log="$out/log.txt"
echo "# $(date -u +%FT%TZ) $0 $dataset ${data_opts[*]} ${limit_opts[*]} ${epoch_opts[*]} ${seed_opts[*]} --out $out --l1 $l1" >>"$log"

step() {  # step NAME CMD...: run a command, log its wall time
  local name=$1; shift
  local t0=$SECONDS
  "$@"
  echo "$name: $((SECONDS - t0)) s" >>"$log"
}

jobs_started=()
start() {  # start NAME CMD...: run `step NAME CMD...` in the background
  step "$@" &
  jobs_started+=("$!")
}
finish() {  # wait for every started job; fail if any failed (set -e does not see them)
  local pid failed=0
  for pid in "${jobs_started[@]}"; do wait "$pid" || failed=1; done
  jobs_started=()
  [[ $failed == 0 ]] || { echo "$0: a step failed; see the messages above" >&2; exit 1; }
}

ckpts=()
for run in "bn_l1:--norm bn --l1 $l1" "gn:--norm gn" "ln:--norm ln"; do
  name=${run%%:*}; read -r -a opts <<<"${run#*:}"
  ckpt="$out/$name.safetensors"
  if [[ -f $ckpt && $fresh == 0 ]]; then  # finished runs return at once; interrupted ones continue
    start "train $name" normcli train --resume "$ckpt" "${data_opts[@]}" >/dev/null
  else
    start "train $name" normcli train --dataset "$dataset" "${opts[@]}" "${epoch_opts[@]}" \
      "${seed_opts[@]}" "${limit_opts[@]}" "${data_opts[@]}" --threads 1 \
      --out "$ckpt" --overwrite >/dev/null
  fi
  ckpts+=("$ckpt")
done
finish

# The figures live in the report, not beside the checkpoints: `normcli plot` there writes
# its own curves.png without meeting one of the study's.
start report normcli report "${ckpts[@]}" "${data_opts[@]}" "${limit_opts[@]}" \
  --out "$out/report.html" --markdown --overwrite >/dev/null
start "eval" normcli eval "${ckpts[@]}" "${data_opts[@]}" "${limit_opts[@]}" --json >"$out/eval.json"
start "eval markdown" normcli eval "${ckpts[@]}" "${data_opts[@]}" "${limit_opts[@]}" --markdown >"$out/eval.md"
finish
cat "$out/eval.md"
echo
echo "report: $out/report.html (Markdown: $out/report.md)"
