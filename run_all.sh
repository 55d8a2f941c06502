#!/usr/bin/env bash
# Distill long-tailed CIFAR with each method and evaluate the results.
#
#   ./run_all.sh                     # CIFAR-10-LT IPC 10, IF 10 and 200: csdm, dm, random at the field's protocol (GPU)
#   ./run_all.sh --quick --data-dir ../shared/data/cifar10   # the same runs with a CPU-sized budget
#   ./run_all.sh --ifs "100" --methods "csdm dm" --ipcs "10 50"
#
# Each run lives in results/<dataset>/if<IF>/ipc<IPC>/<method>/; a run whose results.json
# exists is skipped, so the script can be stopped and started again.
set -euo pipefail
cd "$(dirname "$0")"

usage() {
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
  cat <<'EOF'
options:
  --quick              CPU budget: 200 iterations, batch-real 64, 2 networks x 300 epochs
  --datasets LIST      data sets (default: "cifar10")
  --ifs LIST           imbalance factors (default: "10 200")
  --ipcs LIST          images per class (default: "10")
  --methods LIST       among csdm sdm ncfm mmd dm random full (default: "csdm dm random")
  --data-dir DIR       data folder passed to distill.py / evaluate.py (default: download)
  --out DIR            results folder (default: results)
  --device DEV         auto, cpu, cuda, cuda:N (default: auto)
  --seed N             the seed of every run (default: 0)
EOF
}

fail() { echo "run_all.sh: error: $*" >&2; exit 2; }

QUICK=0; DATASETS="cifar10"; IF_LIST="10 200"; IPC_LIST="10"; METHODS="csdm dm random"
DATA_DIR=""; OUT="results"; DEVICE="auto"; SEED=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) QUICK=1; shift ;;
    --datasets|--ifs|--ipcs|--methods|--data-dir|--out|--device|--seed)
      [[ $# -ge 2 ]] || fail "$1 needs a value; see ./run_all.sh --help"
      case "$1" in
        --datasets) DATASETS="$2" ;; --ifs) IF_LIST="$2" ;; --ipcs) IPC_LIST="$2" ;;
        --methods) METHODS="$2" ;; --data-dir) DATA_DIR="$2" ;; --out) OUT="$2" ;;
        --device) DEVICE="$2" ;; --seed) SEED="$2" ;;
      esac
      shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) fail "unknown option '$1'; see ./run_all.sh --help" ;;
  esac
done

for m in $METHODS; do
  case "$m" in csdm|sdm|ncfm|mmd|dm|random|full) ;; *) fail "--methods: unknown method '$m'; use csdm sdm ncfm mmd dm random full" ;; esac
done
for d in $DATASETS; do
  case "$d" in cifar10|cifar100) ;; *) fail "--datasets: '$d' is not cifar10 or cifar100" ;; esac
done
[[ -z "$DATA_DIR" || -d "$DATA_DIR" ]] || fail "--data-dir: $DATA_DIR does not exist; give the data folder or omit it to download"
PYTHON="${PYTHON:-python}"

if [[ $QUICK -eq 1 ]]; then
  DISTILL_BUDGET=(--iterations 200 --batch-real 64)
  EVAL_BUDGET=(--num-eval 2 --epochs 300)
else
  DISTILL_BUDGET=(--iterations 20000 --batch-real 256)
  EVAL_BUDGET=(--num-eval 5 --epochs 1000)
fi
DATA_ARGS=(); [[ -n "$DATA_DIR" ]] && DATA_ARGS=(--data-dir "$DATA_DIR")

for dataset in $DATASETS; do
  for imbalance in $IF_LIST; do
    for ipc in $IPC_LIST; do
      for method in $METHODS; do
        dir="$OUT/$dataset/if$imbalance/ipc$ipc/$method"
        if [[ -f "$dir/results.json" ]]; then
          echo "== $dir: done, skipped"; continue
        fi
        echo "== $dir"
        common=(--dataset "$dataset" "${DATA_ARGS[@]}" --imbalance-factor "$imbalance" --seed "$SEED" --device "$DEVICE")
        case "$method" in
          random|full)
            "$PYTHON" evaluate.py --baseline "$method" --ipc "$ipc" "${common[@]}" "${EVAL_BUDGET[@]}" --out "$dir" ;;
          *)
            "$PYTHON" distill.py --method "$method" --ipc "$ipc" "${common[@]}" "${DISTILL_BUDGET[@]}" --out "$dir"
            "$PYTHON" evaluate.py --syn "$dir/synthetic.pt" "${EVAL_BUDGET[@]}" --device "$DEVICE" ;;
        esac
      done
    done
  done
done
echo "== all runs finished; results under $OUT/"
