#!/bin/bash
# One call on the lent GPU: the full cell's NCFM-protocol evaluations of the finished sets (exactly
# run_all.sh --full-cell's commands), the full long-tailed set (5 x 200 epochs, as the script), and a second
# distillation seed (1) of csdm and dm at IF 200 at the full budget, each evaluated as run_all does; all at once.
set -u
export PYTHONUNBUFFERED=1 CSDM_CACHE_DIR=/tmp/csdm-cache
P=${P:-python3}; T0=$(date +%s); STOP_AT=$((T0 + ${BUDGET_S:-520}))
mkdir -p data .gpu/logs && tar -xzf .gpu/cifar10-jpeg.tar.gz -C data
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc
  $P -c "import torch,torchvision,sys;print(torch.__version__,torchvision.__version__,sys.version.split()[0],torch.cuda.get_device_name(0))"; } > .gpu/logs/machine.txt 2>&1
$P -c "import data_lt; [data_lt.read_split('cifar10','data/cifar10',t) for t in (True,False)]" >> .gpu/logs/machine.txt 2>&1
echo "setup $(( $(date +%s) - T0 )) s" >> .gpu/logs/machine.txt
BF=(--device auto --precision bf16); EV=(--num-eval 5 --epochs 1000 --compile)
job() { local name=$1; shift; ( s=$(date +%s); "$@" > .gpu/logs/$name.log 2>&1; echo "rc=$? wall=$(( $(date +%s) - s )) s" >> .gpu/logs/$name.log ) & }
seed1=results/full_cell_seed1/dm/cifar10/if200/ipc10
for m in csdm dm; do
  job seed1-$m bash -c "$P distill.py --method $m --ipc 10 --dataset cifar10 --data-dir data/cifar10 --imbalance-factor 200 --seed 1 ${BF[*]} --iterations 20000 --batch-real 256 --compile --out $seed1/$m && $P evaluate.py --syn $seed1/$m/synthetic.pt ${EV[*]} ${BF[*]}"
done
job seed1-random $P evaluate.py --baseline random --ipc 10 --factor 2 --dataset cifar10 --data-dir data/cifar10 --imbalance-factor 200 --seed 1 "${BF[@]}" "${EV[@]}" --out $seed1/random
for imb in 200 10; do
  for m in csdm dm random; do
    cell=cifar10/if$imb/ipc10/$m; out=results/full_cell/ncfm/$cell
    if [[ $m == random ]]; then
      job ncfm-$imb-$m $P evaluate.py --baseline random --ipc 10 --factor 2 --dataset cifar10 --data-dir data/cifar10 --imbalance-factor $imb --seed 0 "${BF[@]}" "${EV[@]}" --protocol ncfm --out $out
    elif [[ -f results/full_cell/dm/$cell/synthetic.pt ]]; then
      job ncfm-$imb-$m $P evaluate.py --syn results/full_cell/dm/$cell/synthetic.pt "${BF[@]}" "${EV[@]}" --protocol ncfm --out $out
    fi
  done
done
job full-200 $P evaluate.py --baseline full --dataset cifar10 --data-dir data/cifar10 --imbalance-factor 200 --seed 0 "${BF[@]}" --num-eval 5 --epochs 200 --compile --out results/full_cell/dm/cifar10/if200/full
pack() {
  tar -cf $OUT/evals.tar.tmp .gpu/logs results/full_cell/ncfm results/full_cell/dm/cifar10/if200/full $seed1/random 2>/dev/null; mv $OUT/evals.tar.tmp $OUT/evals.tar
  for m in csdm dm; do [[ -d $seed1/$m ]] && tar -cf $OUT/seed1-$m.tar.tmp $seed1/$m 2>/dev/null && mv $OUT/seed1-$m.tar.tmp $OUT/seed1-$m.tar; done
}
while [[ -n "$(jobs -r)" && $(date +%s) -lt $STOP_AT ]]; do sleep 10; pack; done
pkill -TERM -f distill.py; sleep 20; pack
nvidia-smi >> .gpu/logs/machine.txt 2>&1; pack
tail -n 3 .gpu/logs/*.log; echo "total $(( $(date +%s) - T0 )) s"
