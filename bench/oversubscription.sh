#!/usr/bin/env bash
# Two trainings sharing the cores, OpenMP idle threads spinning (ACTIVE) or sleeping (PASSIVE,
# normcli's default until bench/threads_per_run.sh showed a short spin better), and one
# training alone under each policy. Prints a Markdown table of training img/s; run on a quiet machine.
#
#   bench/oversubscription.sh [DATA_DIR] > bench/results/threads.md
set -euo pipefail
data=${1:-../shared/data}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
threads=$(nproc)

speed() {  # speed POLICY NAME: one 4,000-image epoch at $threads threads; prints img/s
  OMP_WAIT_POLICY=$1 normcli train --data-dir "$data" --limit 4000 --epochs 1 --device cpu \
    --threads "$threads" --out "$tmp/$2.safetensors" --overwrite >/dev/null 2>"$tmp/$2.log"
  python3 -c "import json,sys; from normcli.checkpoint import read_metadata as r; print(round(r(sys.argv[1]).history[-1]['images_per_second']))" "$tmp/$2.safetensors"
}

echo "# Thread policy: several trainings on $(nproc) cores"
echo
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p'); $(nproc) cores; $(date -u +%FT%TZ);"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg). Command: \`bench/oversubscription.sh\`."
echo "Each run: \`normcli train --limit 4000 --epochs 1 --threads $threads\` (mnist_net, BN, batch 64)."
echo
echo "| OMP_WAIT_POLICY | runs at once | img/s of each run |"
echo "| --- | ---: | --- |"
for policy in ACTIVE PASSIVE; do
  echo "| $policy | 1 | $(speed $policy alone) |"
  pids=()
  speed $policy p1 >"$tmp/p1.out" & pids+=($!)
  speed $policy p2 >"$tmp/p2.out" & pids+=($!)
  wait "${pids[@]}"
  echo "| $policy | 2 | $(cat "$tmp/p1.out"), $(cat "$tmp/p2.out") |"
done
echo
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)."
