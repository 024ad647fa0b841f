#!/usr/bin/env bash
# One training alone: its epoch speed on 1 thread and on all cores (normcli's OpenMP policy,
# PASSIVE), per dataset, the variants alternated round by round. This is the measurement
# behind each dataset's default thread count (normcli.data: MNIST's record caps it at 1).
# Prints a Markdown table of training img/s; run on a quiet machine.
#
#   bench/threads_per_run.sh [DATA_DIR] [ROUNDS] > bench/results/threads_per_run.md
set -euo pipefail
data=${1:-../shared/data}
rounds=${2:-3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cores=$(nproc)

speed() {  # speed DATASET THREADS: one 6,400-image epoch; prints its training img/s
  normcli train --dataset "$1" --data-dir "$data" --limit 6400 --epochs 1 --device cpu \
    --threads "$2" --out "$tmp/run.safetensors" --overwrite >/dev/null 2>"$tmp/run.log"
  python3 -c "import sys; from normcli.checkpoint import read_metadata as r; print(round(r(sys.argv[1]).history[-1]['images_per_second']))" "$tmp/run.safetensors"
}

echo "# Threads for one training alone on $cores cores"
echo
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p'); $cores cores; $(date -u +%FT%TZ);"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg). Command: \`bench/threads_per_run.sh $*\`."
echo "Each run: \`normcli train --dataset D --limit 6400 --epochs 1 --threads T\` (BN, the"
echo "dataset's default model and batch size; OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE, as normcli sets it})."
echo
echo "| dataset | threads | img/s per round |"
echo "| --- | ---: | --- |"
for dataset in mnist cifar10; do
  declare -A speeds=()
  for ((r = 0; r < rounds; r++)); do
    for t in 1 "$cores"; do speeds[$t]+="${speeds[$t]:+, }$(speed "$dataset" "$t")"; done
  done
  for t in 1 "$cores"; do echo "| $dataset | $t | ${speeds[$t]} |"; done
  unset speeds
done
echo
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)."
