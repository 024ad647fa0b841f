#!/usr/bin/env bash
# Threads and OpenMP wait policy for `normcli train`: one run's epoch speed on 1 thread and on
# all cores, alone, beside another 1-thread training, and two all-core runs at once, under each
# wait policy (libgomp spins GOMP_SPINCOUNT times, then sleeps; PASSIVE = 0, unset = 300,000),
# the variants alternated round by round: the measurement behind normcli's OpenMP default
# (normcli.entry.configure_threads). Prints a Markdown report; run it on a quiet machine.
#
#   bench/threads_per_run.sh [DATA_DIR] [ROUNDS] [DATASETS] > bench/results/threads_per_run.md
set -euo pipefail
data=${1:-../shared/data}
rounds=${2:-2}
datasets=${3:-mnist cifar10}
limit=${LIMIT:-12800}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cores=$(nproc)
# name=environment; "normcli" is whatever normcli sets when the user sets nothing.
policies=("normcli (spin 1k)=" "PASSIVE=OMP_WAIT_POLICY=PASSIVE" "spin 10k=GOMP_SPINCOUNT=10000"
          "spin 300k (libgomp's default)=GOMP_SPINCOUNT=300000")

speed() {  # speed DATASET THREADS ENV NAME: one $limit-image epoch; prints its training img/s
  env -u OMP_WAIT_POLICY -u GOMP_SPINCOUNT $3 \
    normcli train --dataset "$1" --data-dir "$data" --limit "$limit" --epochs 1 --device cpu \
    --threads "$2" --out "$tmp/$4.safetensors" --overwrite >/dev/null 2>"$tmp/$4.log"
  python3 -c "import sys; from normcli.checkpoint import read_metadata as r; print(round(r(sys.argv[1]).history[-1]['images_per_second']))" "$tmp/$4.safetensors"
}

echo "# Threads and OpenMP wait policy for one training on $cores cores"
echo
echo "Measured $(date -u '+%F %H:%M UTC') on $(python3 "$(dirname "$0")/machine.py")."
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg). Command: \`bench/threads_per_run.sh $*\`."
echo "Each run: \`normcli train --dataset D --limit $limit --epochs 1 --threads T\` (BN, the"
echo "dataset's default model and batch size), training img/s of each run, one number per round."
echo "*beside*: the all-core run next to a 1-thread training of the same kind started with it"
echo "(its speed second); *two at once*: two all-core runs started together."
echo
echo "| dataset | policy | $cores threads alone | $cores threads beside 1 thread | two x $cores threads at once |"
echo "| --- | --- | --- | --- | --- |"
for dataset in $datasets; do
  declare -A cell=()
  for ((r = 0; r < rounds; r++)); do
    cell[one]+="${cell[one]:+, }$(speed "$dataset" 1 "" one)"  # no idle threads: any policy
    for entry in "${policies[@]}"; do
      name=${entry%%=*} env=${entry#*=}
      cell[$name,all]+="${cell[$name,all]:+, }$(speed "$dataset" "$cores" "$env" all)"
      speed "$dataset" "$cores" "$env" a >"$tmp/a.out" & a=$!
      speed "$dataset" 1 "$env" b >"$tmp/b.out" & b=$!
      wait $a $b
      cell[$name,beside]+="${cell[$name,beside]:+; }$(cat "$tmp/a.out") / $(cat "$tmp/b.out")"
      speed "$dataset" "$cores" "$env" a >"$tmp/a.out" & a=$!
      speed "$dataset" "$cores" "$env" b >"$tmp/b.out" & b=$!
      wait $a $b
      cell[$name,two]+="${cell[$name,two]:+; }$(cat "$tmp/a.out") / $(cat "$tmp/b.out")"
    done
  done
  for entry in "${policies[@]}"; do
    name=${entry%%=*}
    echo "| $dataset | $name | ${cell[$name,all]} | ${cell[$name,beside]} | ${cell[$name,two]} |"
  done
  echo "| $dataset | 1 thread alone (any policy) | ${cell[one]} | | |"
  unset cell
done
echo
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)."
