#!/bin/bash
# second call: the stacked evaluation with static compiled graphs, under NCFM's protocol, on the IF 200 sets
set -u
export PYTHONUNBUFFERED=1 CSDM_CACHE_DIR=/tmp/csdm-cache
P=${P:-python3}; T0=$(date +%s); STOP_AT=$((T0 + ${BUDGET_S:-175}))
rm -rf .gpu/logs; mkdir -p data .gpu/logs && tar -xzf .gpu/cifar10-jpeg.tar.gz -C data
$P -c "import data_lt; [data_lt.read_split('cifar10','data/cifar10',t) for t in (True,False)]" > .gpu/logs/machine.txt 2>&1
echo "setup $(( $(date +%s) - T0 )) s" >> .gpu/logs/machine.txt
BF=(--device auto --precision bf16); EV=(--num-eval 5 --epochs 1000 --compile)
job() { local name=$1; shift; ( s=$(date +%s); "$@" > .gpu/logs/$name.log 2>&1; echo "rc=$? wall=$(( $(date +%s) - s )) s" >> .gpu/logs/$name.log ) & }
for m in csdm dm; do
  job ncfm-200-$m $P evaluate.py --syn results/full_cell/dm/cifar10/if200/ipc10/$m/synthetic.pt "${BF[@]}" "${EV[@]}" --protocol ncfm --out results/full_cell/ncfm/cifar10/if200/ipc10/$m
done
job ncfm-200-random $P evaluate.py --baseline random --ipc 10 --factor 2 --dataset cifar10 --data-dir data/cifar10 --imbalance-factor 200 --seed 0 "${BF[@]}" "${EV[@]}" --protocol ncfm --out results/full_cell/ncfm/cifar10/if200/ipc10/random
pack() { tar -cf $OUT/evals.tar.tmp .gpu/logs results/full_cell/ncfm 2>/dev/null; mv $OUT/evals.tar.tmp $OUT/evals.tar; }
while [[ -n "$(jobs -r)" && $(date +%s) -lt $STOP_AT ]]; do sleep 5; pack; done
pack; tail -n 4 .gpu/logs/*.log; echo "total $(( $(date +%s) - T0 )) s"
