#!/usr/bin/env bash
# Distill long-tailed CIFAR with every method, evaluate, and tabulate.
#
#   ./run_all.sh                  # the paper's grid at the field's protocol (a GPU job): CIFAR-10-LT IF 10 50 100 200
#                                 #   x IPC 10 20 50 and CIFAR-100-LT IF 10 20 x IPC 10 20, every method
#   ./run_all.sh --datasets cifar10 --ifs "10 200" --ipcs 10 --methods "csdm dm random"   # a part of it
#   ./run_all.sh --quick --data-dir data/cifar10 --ifs 100 --methods "csdm dm random"     # CPU-sized budget
#   ./run_all.sh --cpu-bench --data-dir data/cifar10      # CPU benchmark: IF 10 and 200, 5 methods, < 90 min
#   ./run_all.sh --fair-random --data-dir data/cifar10    # the CPU benchmark's random rows at factor 2 and 1
#   ./run_all.sh --protocol-bench --data-dir data/cifar10 # CPU-benchmark sets under DM's and NCFM's evaluation
#   ./run_all.sh --arch-bench --data-dir data/cifar10     # the same sets on AlexNet, VGG-11, ResNet-18
#   ./run_all.sh --calibration-bench --data-dir data/cifar10  # the balanced calibration beside those sets
#   ./run_all.sh --full-cell --data-dir data/cifar10      # the paper's headline cell at the field's full budget
#                                                         #   (many hours on a CPU: stop and rerun to continue)
#   ./run_all.sh --paper-cell --data-dir data/cifar10     # NCFM's pipeline (the paper's): ncfm and csdm, full budget
#   ./run_all.sh --paper-bench --data-dir data/cifar10    # the same pipeline at a CPU budget (pool of 2, 400 its)
#   ./run_all.sh --soft-bench --data-dir data/cifar10     # the full cell's IF 200 sets under soft labels (CPU budget)
#   ./run_all.sh --soft-cell --data-dir data/cifar10      # the full cell's sets under soft labels, full budget
#   ./run_all.sh --ablation kernel --data-dir data/cifar10  # one ablation table, on the validation split
#   ./run_all.sh --gpu-check --data-dir data/cifar10      # a lent GPU's sitting: gpu_check.py (tiny grid, timings,
#                                                         #   then the IF 50 / 100 cells until its budget ends)
#
# Each run lives in its own folder under --out (default runs/, git-ignored: runs/<dataset>/if<IF>/ipc<IPC>/<method>/
# for the grid; runs/quick/... with --quick, runs/seed<N>/... with another seed); a finished run (results.json
# present) is skipped, an interrupted one resumed, and a folder finished with other options (budget, seed,
# precision) refused, so the script can be stopped and started again. The grid ends with runs/table.md and
# runs/accuracy_vs_if.png (runs/quick/table.md, ...). The committed reference results are under results/ and
# are written only when asked for with --out results.
set -euo pipefail
cd "$(dirname "$0")"
if (( BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4) )); then
  # empty arrays under set -u, as below, need bash 4.4 (macOS ships 3.2)
  echo "run_all.sh: error: needs bash 4.4 or newer (this is $BASH_VERSION); on macOS install it" \
       "(brew install bash) and run: \$(brew --prefix)/bin/bash run_all.sh ..." >&2
  exit 2
fi

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  cat <<'EOF'
options:
  --datasets LIST      cifar10 cifar100 (default: both)
  --ifs LIST           imbalance factors (default: 10 50 100 200 for cifar10, 10 20 for cifar100)
  --ipcs LIST          images per class (default: 10 20 50 for cifar10, 10 20 for cifar100)
  --methods LIST       among the methods of methods.py: random dm mmd ncfm sdm csdm full (default: all)
  --quick              CPU budget: 200 iterations, batch-real 64, 2 networks x 300 epochs, into OUT/quick/
                       (these five shape the grid; the jobs below run fixed sets of runs and refuse them)
  --cpu-bench          the CPU benchmark of the README (writes results/cpu_bench.json)
  --fair-random        the CPU benchmark's random baseline at factor 2 (the distilled sets' number of
                       images) and factor 1 (writes results/fair_random.json)
  --protocol-bench     random, dm and csdm sets of the CPU benchmark (IF 200, then IF 10) under the DM and
                       the NCFM evaluation protocols, at the benchmark's epoch budget (results/protocol_bench.md)
  --arch-bench         the same sets (made by --protocol-bench) trained by AlexNet, VGG-11 and ResNet-18,
                       2 networks x 200 epochs (results/arch_bench.md)
  --calibration-bench  dm and csdm at IF 200 with the best balanced calibration of the ablation (pool re-trained
                       on balanced batches, logit adjustment tau 1) at the protocol bench's budget, test split,
                       in fp32 unless --precision says otherwise, beside --protocol-bench's random, dm and csdm
                       sets evaluated again (run --protocol-bench first; results/calibration_bench.md)
  --full-cell          CIFAR-10-LT IPC 10 at the field's full budget (20,000 iterations at batch-real 256, bf16
                       unless --precision says otherwise; 5 networks x 1000 epochs), in this order: csdm, dm and
                       random (factor 2) at IF 200, the same at IF 10, DM as published (dm-f1: factor 1, class
                       pairing) with random-f1, the IF 200 and IF 10 sets under NCFM's protocol, sdm at IF 200,
                       csdm, dm and random at IF 200 with --seed 1 (results/full_cell_seed1.md), the full
                       long-tailed set at IF 200 (5 networks x 200 epochs); finished sets of seed 0 released as
                       results/sets/cifar10-if<IF>-ipc10-<method>.pt (results/full_cell.md). Takes no --quick,
                       --datasets, --ifs, --ipcs or --methods
  --paper-cell         NCFM's pipeline, the one the paper builds CSDM on (distill.py --preset ncfm-paper: a pool of
                       20 ConvNets pre-trained 60 epochs, kept in OUT/paper_cell/pool/, calibration, batch-real
                       1024, 4096 frequencies, AdamW, one step per class), 20,000 iterations, for ncfm (NCFM as
                       published) and csdm at IF 200, then IF 10, each evaluated by 5 networks x 1000 epochs
                       under DM's and under NCFM's protocol (OUT/paper_cell.md); days on a CPU
  --paper-bench        the same pipeline at a CPU budget: the pool's first 2 networks (the full 60-epoch schedule,
                       shared with --paper-cell's pool), 400 iterations, IF 200, 3 networks x 200 epochs under
                       DM's protocol, test split: the CPU benchmark's evaluation (OUT/paper_bench.md)
  --soft-bench        soft labels (evaluate.py --labels soft: a teacher trained on the whole long-tailed split,
                       teacher.py, kept in OUT/teachers/) at a CPU budget: the full cell's IF 200 sets csdm and dm
                       (OUT/full_cell/..., committed in results/) and the random set of their images, each under
                       hard and soft labels, 3 networks x 300 epochs, DM protocol, test split (OUT/soft_bench.md)
  --soft-cell          the same sets at the full budget under soft labels: csdm, dm, random at IF 200 and IF 10,
                       dm-f1 and random-f1 at IF 200, 5 networks x 1000 epochs, beside the full cell's hard labels
                       (OUT/soft_cell.md); bf16 unless --precision says otherwise, as --full-cell, so that
                       its kept networks resume on any machine
  --ablation NAME      kernel, weighting, alpha, freqs, balanced, pipeline, budget, calibration, pairing,
                       balanced-calibration, soft-labels (validation split; writes OUT/ablations/NAME.md, a row
                       and a line of provenance per run)
  --gpu-check          python gpu_check.py (see its --help): the grid at a tiny budget end to end, timings and peak
                       GPU memory, then CIFAR-10-LT IF 50 and 100, IPC 10, csdm dm random at the full budget into
                       OUT until 8 minutes are spent; writes OUT/gpu_check.json after every step
  --jobs-per-gpu N     the grid's cells run concurrently over the visible GPUs (CUDA_VISIBLE_DEVICES, else all
                       that nvidia-smi lists), N on each (default 1; the best N is not measured yet); logs in
                       OUT/logs/. On a CPU, or with --device cpu, one cell after another
  --data-dir DIR       data folder passed to distill.py / evaluate.py (default: download)
  --out DIR            where the runs go (default: runs, git-ignored, yours; the repository's committed
                       reference results are in results/ and are rewritten only with --out results)
  --device DEV         auto, cpu, cuda, cuda:N (default: auto)
  --seed N             the seed of every run's data subset and distillation (default: 0; the grid of another
                       seed goes to OUT/seed<N>/); evaluation networks are always seed 0's, for paired differences
  --precision P        auto, fp32 or bf16, passed to distill.py and evaluate.py (default: auto; bf16 for
                       --full-cell, so that its checkpoints resume on any machine in one arithmetic, which needs
                       a GPU or a CPU with AMX-BF16 or AVX512-BF16: elsewhere bf16 is emulated, about 13 times
                       slower, and distill.py warns; fp32 for --calibration-bench, the protocol bench's precision)
EOF
}

fail() { echo "run_all.sh: error: $*" >&2; exit 2; }

MODE_FLAG=""  # the option that chose a job other than the grid, for the messages
set_mode() {  # set_mode MODE OPTION: one job per call of the script
  [[ -z "$MODE_FLAG" || "$MODE_FLAG" == "$2" ]] || fail "$MODE_FLAG and $2 are two jobs; run ./run_all.sh once for each"
  MODE="$1"; MODE_FLAG="$2"
}

# the methods registered in methods.py (its '    "name": Method(' lines), in their order
KNOWN_METHODS=$(sed -n 's/^    "\([a-z0-9-]*\)": Method(.*/\1/p' methods.py | tr '\n' ' ' | sed 's/ $//')
JOBS_PER_GPU=1; JOBS_GIVEN=""
MODE=grid; ABLATION=""; QUICK=0; DATASETS="cifar10 cifar100"; IF_LIST=""; IPC_LIST=""
METHODS="$KNOWN_METHODS"; DATA_DIR=""; OUT="runs"; DEVICE="auto"; SEED=0; PRECISION=""
GRID_OPTIONS=()  # options that only shape the grid (--quick, --datasets, ...), refused with the other jobs
while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) QUICK=1; GRID_OPTIONS+=("$1"); shift ;;
    --cpu-bench) set_mode cpu-bench "$1"; shift ;;
    --fair-random) set_mode fair-random "$1"; shift ;;
    --protocol-bench) set_mode protocol-bench "$1"; shift ;;
    --arch-bench) set_mode arch-bench "$1"; shift ;;
    --calibration-bench) set_mode calibration-bench "$1"; shift ;;
    --full-cell) set_mode full-cell "$1"; shift ;;
    --paper-cell) set_mode paper-cell "$1"; shift ;;
    --paper-bench) set_mode paper-bench "$1"; shift ;;
    --gpu-check) set_mode gpu-check "$1"; shift ;;
    --soft-bench) set_mode soft-bench "$1"; shift ;;
    --soft-cell) set_mode soft-cell "$1"; shift ;;
    --datasets|--ifs|--ipcs|--methods|--data-dir|--out|--device|--seed|--ablation|--precision|--jobs-per-gpu)
      [[ $# -ge 2 ]] || fail "$1 needs a value; see ./run_all.sh --help"
      case "$1" in
        --datasets) DATASETS="$2" ;; --ifs) IF_LIST="$2" ;; --ipcs) IPC_LIST="$2" ;;
        --methods) METHODS="$2" ;; --data-dir) DATA_DIR="$2" ;; --out) OUT="$2" ;;
        --device) DEVICE="$2" ;; --seed) SEED="$2" ;; --ablation) set_mode ablation --ablation; ABLATION="$2" ;;
        --precision) PRECISION="$2" ;; --jobs-per-gpu) JOBS_PER_GPU="$2"; JOBS_GIVEN=1 ;;
      esac
      case "$1" in --datasets|--ifs|--ipcs|--methods) GRID_OPTIONS+=("$1") ;; esac
      shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) fail "unknown option '$1'; see ./run_all.sh --help" ;;
  esac
done

for m in $METHODS; do
  [[ " $KNOWN_METHODS " == *" $m "* ]] || fail "--methods: unknown method '$m'; use $KNOWN_METHODS"
done
for d in $DATASETS; do
  case "$d" in cifar10|cifar100) ;; *) fail "--datasets: '$d' is not cifar10 or cifar100" ;; esac
done
[[ -z "$DATA_DIR" || -d "$DATA_DIR" ]] ||
  fail "--data-dir: $DATA_DIR does not exist; give the data folder or omit it to download"
[[ "$SEED" =~ ^[0-9]+$ ]] || fail "--seed: '$SEED' is not a non-negative integer"
[[ "$JOBS_PER_GPU" =~ ^[1-9][0-9]*$ ]] || fail "--jobs-per-gpu: '$JOBS_PER_GPU' is not a positive integer"
case "$PRECISION" in ""|auto|fp32|bf16) ;; *) fail "--precision: '$PRECISION' is not auto, fp32 or bf16" ;; esac
if [[ "$MODE" != grid && ${#GRID_OPTIONS[@]} -gt 0 ]]; then
  if [[ "$MODE" == full-cell ]]; then why="the cell is fixed: CIFAR-10-LT IPC 10 at the full budget"
  else why="it shapes the grid; $MODE_FLAG runs a fixed set of runs"; fi
  fail "$MODE_FLAG: ${GRID_OPTIONS[0]} does not apply ($why); drop it"
fi
echo "== run_all.sh: runs go to $OUT/ (--out; the committed reference results are in results/)"
[[ "$MODE" != full-cell || "$SEED" == 0 ]] ||
  fail "--full-cell: --seed does not apply (the cell runs seed 0, then seed 1 for its second seed); drop it"
[[ "$MODE" != soft-* || "$SEED" == 0 ]] ||
  fail "$MODE_FLAG: --seed does not apply (it evaluates the full cell's seed-0 sets beside their rulers); drop it"
# the full cell's checkpoints resume on any machine in bf16; the calibration bench matches the protocol bench (fp32)
if [[ -z "$PRECISION" ]]; then
  case "$MODE" in full-cell|paper-cell|paper-bench|soft-cell) PRECISION=bf16 ;; calibration-bench) PRECISION=fp32 ;; *) PRECISION=auto ;; esac
fi
case "$MODE:$ABLATION" in
  ablation:kernel|ablation:weighting|ablation:alpha|ablation:freqs|ablation:balanced|ablation:pipeline|ablation:budget|ablation:calibration|ablation:pairing|ablation:balanced-calibration|ablation:soft-labels) ;;
  grid:|cpu-bench:|fair-random:|protocol-bench:|arch-bench:|calibration-bench:|full-cell:|paper-cell:|paper-bench:|gpu-check:|soft-bench:|soft-cell:) ;;
  *) fail "--ablation: unknown ablation '$ABLATION'; use kernel, weighting, alpha, freqs, balanced, pipeline, budget, calibration, pairing, balanced-calibration or soft-labels" ;;
esac
if [[ "$MODE" != grid && "$MODE" != full-cell && -z "$DATA_DIR" ]]; then
  fail "--data-dir: the CPU benchmark and the ablations read a local CIFAR-10 copy; pass --data-dir DIR"
fi
PYTHON="${PYTHON:-python}"
DATA_ARGS=(); [[ -n "$DATA_DIR" ]] && DATA_ARGS=(--data-dir "$DATA_DIR")

# one run: distill (resuming if interrupted) and evaluate, or evaluate a baseline; skipped when done
#   run_one DIR METHOD DATASET IF IPC [extra distill.py options...]   (uses DISTILL_BUDGET, EVAL_BUDGET, SPLIT_ARGS)
# The random baseline takes the --factor of the extra options (default 2, distill.py's): the same real images
# as the distilled sets' starting point, decoded, so that it trains on as many images as they do. Every
# evaluation's networks are those of seed 0 (--eval-seed 0; a set's evaluation takes no --seed), so a set and
# the baseline of its seed are judged by the same networks, whatever --seed.
run_one() {
  local dir=$1 method=$2 dataset=$3 imbalance=$4 ipc=$5; shift 5
  local budget; budget=$(budget_of "$method" "$@")
  if finished "$dir" "$budget" "${EVAL_BUDGET[@]}"; then return; fi
  echo "== $dir"
  local common=(--dataset "$dataset" "${DATA_ARGS[@]}" --imbalance-factor "$imbalance" --seed "$SEED" --device "$DEVICE"
                --precision "$PRECISION" "${SPLIT_ARGS[@]}")
  case "$method" in
    random)
      "$PYTHON" evaluate.py --baseline random --ipc "$ipc" --factor "$(factor_of "$@")" "${common[@]}" \
        --eval-seed 0 "${EVAL_BUDGET[@]}" --out "$dir" $(continued "$dir") ;;
    full)
      "$PYTHON" evaluate.py --baseline full "${common[@]}" --eval-seed 0 "${EVAL_BUDGET[@]}" --out "$dir" \
        $(continued "$dir") ;;
    *)
      local resume=(); [[ -e "$dir" ]] && resume=(--resume)
      "$PYTHON" distill.py --method "$method" --ipc "$ipc" "${common[@]}" "${DISTILL_BUDGET[@]}" "$@" \
        "${resume[@]}" --out "$dir"
      "$PYTHON" evaluate.py --syn "$dir/synthetic.pt" "${EVAL_BUDGET[@]}" --device "$DEVICE" --precision "$PRECISION" \
        $(continued "$dir") ;;
  esac
  echo "$budget" > "$dir/run_all.budget"
}

# "--resume" where DIR keeps the finished networks of an interrupted evaluation (evaluate.py's
# evaluation.partial/), so that a stopped script continues it network by network
continued() {
  if [[ -d "$1/evaluation.partial" ]]; then echo --resume; fi
}

# what a run's results are made with (the budgets, seed, precision, split and the run's own options); a folder
# that finished with other ones is refused, not taken for this run: --quick and the full grid, or two seeds,
# must not fill one table
budget_of() {
  echo "$*; distill ${DISTILL_BUDGET[*]}; evaluate ${EVAL_BUDGET[*]}; seed $SEED; precision $PRECISION;" \
       "${SPLIT_ARGS[*]}"
}

# finished DIR BUDGET EVALUATE-OPTIONS...: true (and says so) if DIR holds results.json of a run made with
# BUDGET; exits on a run made with another. A folder from before run_all.budget is judged by the networks x
# epochs its results.json records (its seed and distillation budget went unrecorded there).
finished() {
  local dir=$1 want=$2 made; shift 2
  [[ -f "$dir/results.json" ]] || return 1
  if [[ -f "$dir/run_all.budget" ]]; then
    made=$(cat "$dir/run_all.budget")
  else  # an option this call leaves to evaluate.py's default is not compared
    local networks epochs asked_networks asked_epochs
    networks=$(top_level "$dir/results.json" num_eval); epochs=$(top_level "$dir/results.json" epochs)
    asked_networks=$(option_of --num-eval "$@"); asked_epochs=$(option_of --epochs "$@")
    made="$networks networks x $epochs epochs"
    want="${asked_networks:-$networks} networks x ${asked_epochs:-$epochs} epochs"
  fi
  [[ "$made" == "$want" ]] ||
    fail "$dir holds a finished run made with other options ($made), not ($want); give another --out, or move it away"
  rm -rf "$dir/evaluation.partial"  # networks kept by a stop after results.json was written: a leftover
  echo "== $dir: done, skipped"
}

# option_of OPTION ARGS...: the value of the last OPTION among ARGS (empty when absent)
option_of() {
  local name=$1 value=""; shift
  while [[ $# -gt 0 ]]; do [[ "$1" == "$name" && $# -ge 2 ]] && value=$2; shift; done
  echo "$value"
}

# top_level FILE KEY: the value of KEY at the top level of a results.json (written with an indent of 2)
top_level() {
  sed -n "s/^  \"$2\": \([^,]*\),\{0,1\}\$/\1/p" "$1" | head -n 1
}

# the value of --factor among distill.py options (2, distill.py's default, when absent)
factor_of() {
  local factor; factor=$(option_of --factor "$@")
  echo "${factor:-2}"
}

# evaluate a run folder's set (or the fair random baseline) into another folder with other evaluate.py options
#   eval_into SETDIR OUTDIR METHOD DATASET IF IPC [evaluate.py options...]
eval_into() {
  local set=$1 out=$2 method=$3 dataset=$4 imbalance=$5 ipc=$6; shift 6
  local budget; budget=$(budget_of "$method" "${set#"$OUT"/}" "$@")  # the set as a path inside $OUT
  if finished "$out" "$budget" "$@"; then return; fi
  echo "== $out"
  case "$method" in
    random)
      "$PYTHON" evaluate.py --baseline random --ipc "$ipc" --factor 2 --dataset "$dataset" "${DATA_ARGS[@]}" \
        --imbalance-factor "$imbalance" --seed "$SEED" --eval-seed 0 --device "$DEVICE" --precision "$PRECISION" \
        "$@" --out "$out" $(continued "$out") ;;
    *)
      "$PYTHON" evaluate.py --syn "$set/synthetic.pt" --device "$DEVICE" --precision "$PRECISION" "$@" --out "$out" \
        $(continued "$out") ;;
  esac
  echo "$budget" > "$out/run_all.budget"
}

# the full long-tailed set does not depend on IPC: train it once per data set and IF, then copy its
# results into each IPC's cell of the grid
#   run_full ROOT DATASET IF IPC...
run_full() {
  local root=$1 dataset=$2 imbalance=$3; shift 3
  local once="$root/$dataset/if$imbalance/full"
  run_one "$once" full "$dataset" "$imbalance" 0
  for ipc in "$@"; do
    mkdir -p "$root/$dataset/if$imbalance/ipc$ipc/full"
    cp "$once/results.json" "$root/$dataset/if$imbalance/ipc$ipc/full/results.json"
  done
}

# copy a finished distilled set to the released sets: release_set RUNDIR NAME -> $OUT/sets/NAME.pt
release_set() {
  [[ -f "$1/synthetic.pt" ]] || return 0
  mkdir -p "$OUT/sets"
  cmp -s "$1/synthetic.pt" "$OUT/sets/$2.pt" || cp "$1/synthetic.pt" "$OUT/sets/$2.pt"
}

SPLIT_ARGS=()
if [[ $QUICK -eq 1 || ( "$MODE" != grid && "$MODE" != full-cell ) ]]; then
  DISTILL_BUDGET=(--iterations 200 --batch-real 64 --compile)
  EVAL_BUDGET=(--num-eval 2 --epochs 300 --compile)
else
  DISTILL_BUDGET=(--iterations 20000 --batch-real 256 --compile)
  EVAL_BUDGET=(--num-eval 5 --epochs 1000 --compile)
fi

# The grid's queue: on a machine with GPUs its cells run concurrently, --jobs-per-gpu of them on each visible
# GPU (CUDA_VISIBLE_DEVICES if set, else every GPU nvidia-smi lists), each job pinned to one GPU through
# CUDA_VISIBLE_DEVICES and logged to OUT/logs/; on a CPU (or with --device cpu) one cell after another, in
# the foreground, as before. A failed cell stops no other; the failures are listed at the end (exit 1).
gpu_ids() {
  [[ "$DEVICE" == cpu ]] && return 0
  if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then echo "${CUDA_VISIBLE_DEVICES//,/ }"; return 0; fi
  if command -v nvidia-smi > /dev/null; then nvidia-smi --query-gpu=index --format=csv,noheader 2> /dev/null | tr '\n' ' '; fi
  return 0
}
QUEUE_SLOTS=(); QUEUE_PIDS=(); QUEUE_NAMES=(); QUEUE_FAILED=()
start_queue() {
  local gpu k
  for gpu in $(gpu_ids); do for ((k = 0; k < JOBS_PER_GPU; k++)); do QUEUE_SLOTS+=("$gpu"); done; done
  (( ${#QUEUE_SLOTS[@]} > 1 )) || QUEUE_SLOTS=()  # one GPU, one job: the foreground path
  (( ${#QUEUE_SLOTS[@]} == 0 )) || echo "== the queue: ${#QUEUE_SLOTS[@]} jobs at once on GPUs $(gpu_ids)"
}
# queued NAME COMMAND...: run COMMAND in a free slot (waiting for one), or now in the foreground without slots
queued() {
  local name=$1 slot; shift
  if (( ${#QUEUE_SLOTS[@]} == 0 )); then "$@"; return; fi
  while slot=$(free_slot); [[ -z "$slot" ]]; do reap_finished; sleep 1; done
  mkdir -p "$OUT/logs"
  echo "== started $name on GPU ${QUEUE_SLOTS[$slot]} (log: $OUT/logs/${name//\//_}.log)"
  ( export CUDA_VISIBLE_DEVICES=${QUEUE_SLOTS[$slot]}; "$@" ) > "$OUT/logs/${name//\//_}.log" 2>&1 &
  QUEUE_PIDS[$slot]=$!; QUEUE_NAMES[$slot]=$name
}
free_slot() {
  local slot
  for slot in "${!QUEUE_SLOTS[@]}"; do [[ -n "${QUEUE_PIDS[$slot]:-}" ]] || { echo "$slot"; return; }; done
}
reap_finished() {  # free the slots whose jobs ended, noting failures
  local slot pid
  for slot in "${!QUEUE_PIDS[@]}"; do
    pid=${QUEUE_PIDS[$slot]}
    [[ -n "$pid" ]] && ! kill -0 "$pid" 2> /dev/null || continue
    if wait "$pid"; then echo "== finished ${QUEUE_NAMES[$slot]}"
    else QUEUE_FAILED+=("${QUEUE_NAMES[$slot]}"); echo "== FAILED ${QUEUE_NAMES[$slot]}"; fi
    QUEUE_PIDS[$slot]=""
  done
}
running_jobs() {
  local pid
  for pid in "${QUEUE_PIDS[@]}"; do [[ -z "$pid" ]] || return 0; done
  return 1
}
drain_queue() {  # wait for every queued job; exit 1 naming the failed ones
  while running_jobs; do reap_finished; sleep 1; done
  if (( ${#QUEUE_FAILED[@]} > 0 )); then
    echo "run_all.sh: ${#QUEUE_FAILED[@]} runs failed (logs in $OUT/logs/): ${QUEUE_FAILED[*]}" >&2
    exit 1
  fi
}

case "$MODE" in
  grid)
    # the full budget of seed 0 in $OUT; --quick and other seeds in folders of their own, so that no table
    # mixes budgets or seeds
    grid="$OUT"; [[ $QUICK -eq 1 ]] && grid="$grid/quick"; [[ "$SEED" == 0 ]] || grid="$grid/seed$SEED"
    start_queue
    for dataset in $DATASETS; do
      ifs="$IF_LIST"; ipcs="$IPC_LIST"
      [[ -n "$ifs" ]] || { [[ $dataset == cifar10 ]] && ifs="10 50 100 200" || ifs="10 20"; }
      [[ -n "$ipcs" ]] || { [[ $dataset == cifar10 ]] && ipcs="10 20 50" || ipcs="10 20"; }
      for imbalance in $ifs; do
        for ipc in $ipcs; do
          for method in $METHODS; do
            [[ $method == full ]] && continue
            queued "$dataset/if$imbalance/ipc$ipc/$method" \
              run_one "$grid/$dataset/if$imbalance/ipc$ipc/$method" "$method" "$dataset" "$imbalance" "$ipc"
          done
        done
        if [[ " $METHODS " == *" full "* ]]; then
          queued "$dataset/if$imbalance/full" run_full "$grid" "$dataset" "$imbalance" $ipcs
        fi
      done
    done
    drain_queue
    "$PYTHON" evaluate.py --report "$grid" ;;

  cpu-bench)
    # one fixed reduced budget for every method, sized to finish in ~70 min on 2 CPU cores with the
    # default factor 2 (400 training images per distilled set): 400 iterations, batch-real 64;
    # 3 networks x 200 epochs per evaluation; test split
    DISTILL_BUDGET=(--iterations 400 --batch-real 64 --compile)
    EVAL_BUDGET=(--num-eval 3 --epochs 200 --compile)
    bench="$OUT/cpu_bench"
    for imbalance in 10 200; do
      for method in random dm sdm ncfm csdm; do
        run_one "$bench/cifar10/if$imbalance/ipc10/$method" "$method" cifar10 "$imbalance" 10
      done
    done
    "$PYTHON" evaluate.py --report "$bench" --summary "$OUT/cpu_bench.json" ;;

  fair-random)
    # the CPU benchmark's random baseline at its budget: at factor 2, the same real images the distilled sets
    # start from (IPC x 4 per class), and at factor 1 (IPC per class), labelled random-f1
    DISTILL_BUDGET=(); EVAL_BUDGET=(--num-eval 3 --epochs 200 --compile)
    fair="$OUT/fair_random"
    for imbalance in 10 200; do
      run_one "$fair/cifar10/if$imbalance/ipc10/random" random cifar10 "$imbalance" 10 --factor 2
      run_one "$fair/cifar10/if$imbalance/ipc10/random-f1" random cifar10 "$imbalance" 10 --factor 1
    done
    "$PYTHON" report.py "$fair" --summary "$OUT/fair_random.json" ;;

  protocol-bench|arch-bench)
    # the CPU benchmark's budget (400 iterations, batch-real 64; 3 networks x 200 epochs) for random, dm and csdm,
    # evaluated under DM's protocol (the tree dm/) and NCFM's (ncfm/: its AdamW, CutMix and DiffAug, scaled
    # to 200 epochs); --arch-bench trains the dm/ tree's sets on the other architectures (2 networks x 200 epochs)
    DISTILL_BUDGET=(--iterations 400 --batch-real 64 --compile)
    EVAL_BUDGET=(--num-eval 3 --epochs 200 --compile)
    tree="$OUT/protocol_bench"
    for imbalance in 200 10; do
      for method in random dm csdm; do
        cell="cifar10/if$imbalance/ipc10/$method"
        if [[ "$MODE" == protocol-bench ]]; then
          run_one "$tree/dm/$cell" "$method" cifar10 "$imbalance" 10
          eval_into "$tree/dm/$cell" "$tree/ncfm/$cell" "$method" cifar10 "$imbalance" 10 "${EVAL_BUDGET[@]}" \
            --protocol ncfm
        else
          [[ $method == random || -f "$tree/dm/$cell/synthetic.pt" ]] ||
            fail "--arch-bench: $tree/dm/$cell/synthetic.pt is missing; run --protocol-bench first"
          for model in alexnet vgg11 resnet18; do
            eval_into "$tree/dm/$cell" "$OUT/arch_bench/$model/$cell" "$method" cifar10 "$imbalance" 10 \
              --num-eval 2 --epochs 200 --compile --model "$model"
          done
        fi
      done
    done
    if [[ "$MODE" == protocol-bench ]]; then
      "$PYTHON" report.py "$tree/dm" "$tree/ncfm" --table "$OUT/protocol_bench.md"
    else
      "$PYTHON" report.py "$tree/dm" "$OUT"/arch_bench/* --table "$OUT/arch_bench.md"
    fi ;;

  calibration-bench)
    # the test-split check of the balanced-calibration ablation's best rows (val, IF 200): both methods with pool
    # classifiers re-trained on class-balanced batches (crt) and the logit adjustment tau 1, each at its best
    # weight there (dm 1, csdm 0.002), at the protocol bench's budget and precision; the protocol bench's random,
    # dm and csdm sets (the defaults) are evaluated again beside them, by the same code
    DISTILL_BUDGET=(--iterations 400 --batch-real 64 --compile)
    EVAL_BUDGET=(--num-eval 3 --epochs 200 --compile)
    tree="$OUT/calibration_bench/cifar10/if200/ipc10"
    defaults="$OUT/protocol_bench/dm/cifar10/if200/ipc10"
    for method in dm csdm; do
      [[ -f "$defaults/$method/synthetic.pt" ]] ||
        fail "--calibration-bench: $defaults/$method/synthetic.pt is missing; run --protocol-bench first"
    done
    for method in random dm csdm; do
      eval_into "$defaults/$method" "$tree/$method" "$method" cifar10 200 10 "${EVAL_BUDGET[@]}"
    done
    balanced=(--extractor pool --pool-rebalance crt --calibration-tau 1)
    run_one "$tree/dm-crt-tau1" dm cifar10 200 10 "${balanced[@]}" --calibration 1
    run_one "$tree/csdm-crt-tau1" csdm cifar10 200 10 "${balanced[@]}" --calibration 0.002
    "$PYTHON" report.py "$OUT/calibration_bench" --table "$OUT/calibration_bench.md" ;;

  full-cell)
    # the field's full budget for one cell, most telling runs first, so that a stopped script has the
    # headline (csdm - dm and each over random at IF 200, DM's protocol) earliest; rerun to continue: finished
    # runs are skipped, an interrupted distillation resumes from its checkpoint.pt and an interrupted
    # evaluation from the networks it kept
    tree="$OUT/full_cell"
    cell_run() {  # LABEL METHOD IF [distill.py options]: distil, evaluate (DM protocol), release the set
      local label=$1 method=$2 imbalance=$3; shift 3
      run_one "$tree/dm/cifar10/if$imbalance/ipc10/$label" "$method" cifar10 "$imbalance" 10 "$@"
      [[ $method == random ]] || release_set "$tree/dm/cifar10/if$imbalance/ipc10/$label" "cifar10-if$imbalance-ipc10-$label"
    }
    for imbalance in 200 10; do
      cell_run csdm csdm "$imbalance"
      cell_run dm dm "$imbalance"
      cell_run random random "$imbalance"
    done
    cell_run dm-f1 dm 200 --factor 1 --dsa-pairing class   # DM as published: one image per stored image
    cell_run random-f1 random 200 --factor 1
    for imbalance in 200 10; do
      for method in csdm dm random; do
        cell="cifar10/if$imbalance/ipc10/$method"
        eval_into "$tree/dm/$cell" "$tree/ncfm/$cell" "$method" cifar10 "$imbalance" 10 "${EVAL_BUDGET[@]}" \
          --protocol ncfm
      done
    done
    # a second seed of the IF 200 pair and its random baseline: how far csdm - dm moves when every draw of
    # the distillation changes (the long-tailed subset, the starting images, its networks and augmentation);
    # every evaluation's networks are those of seed 0, so the random baseline of seed 1 pairs with the sets
    for method in csdm dm random; do
      ( SEED=1; run_one "${tree}_seed1/dm/cifar10/if200/ipc10/$method" "$method" cifar10 200 10 )
    done
    # the full long-tailed set (11,203 images at IF 200): 5 x 1000 epochs would cost 28 sets' evaluations, so
    # 5 networks x 200 epochs (its results.json records them; the README states it beside the row)
    ( EVAL_BUDGET=(--num-eval 5 --epochs 200 --compile); run_full "$tree/dm" cifar10 200 10 )
    cell_run sdm sdm 200  # csdm without its class weights, the least telling run of the cell: last
    "$PYTHON" report.py "$tree/dm" "$tree/ncfm" --table "$OUT/full_cell.md"
    "$PYTHON" report.py "${tree}_seed1/dm" --table "$OUT/full_cell_seed1.md" ;;

  paper-cell|paper-bench)
    # NCFM's pipeline with NCFM's loss (NCFM as published) and with csdm's; the pool is trained once per IF
    # (distill.py caches it network by network in $tree/pool, so that a stopped pool continues) and shared
    tree="$OUT/${MODE//-/_}" pool=(--preset ncfm-paper --pool-cache "$OUT/paper_cell/pool") ifs="200 10"
    if [[ $MODE == paper-bench ]]; then
      DISTILL_BUDGET=(--iterations 400 --compile); EVAL_BUDGET=(--num-eval 3 --epochs 200 --compile); ifs=200
      pool+=(--pool-size 2)
    else
      DISTILL_BUDGET=(--iterations 20000 --compile)
    fi
    for imbalance in $ifs; do
      for method in ncfm csdm; do
        run_one "$tree/dm/cifar10/if$imbalance/ipc10/$method-paper" "$method" cifar10 "$imbalance" 10 "${pool[@]}"
        [[ $MODE == paper-bench ]] || eval_into "$tree/dm/cifar10/if$imbalance/ipc10/$method-paper" \
          "$tree/ncfm/cifar10/if$imbalance/ipc10/$method-paper" "$method" cifar10 "$imbalance" 10 \
          "${EVAL_BUDGET[@]}" --protocol ncfm
      done
    done
    tables=("$tree/dm"); [[ $MODE == paper-bench ]] || tables+=("$tree/ncfm")
    "$PYTHON" report.py "${tables[@]}" --table "$tree.md" ;;

  soft-bench|soft-cell)
    # the full cell's distilled sets and the random sets of their images under the teacher's soft labels (and, at
    # the bench's budget, under hard labels beside them); the teachers are trained once per IF and kept
    tree="$OUT/${MODE//-/_}" sets="$OUT/full_cell/dm/cifar10" soft=(--labels soft --teacher-cache "$OUT/teachers")
    if [[ $MODE == soft-bench ]]; then
      EVAL_BUDGET=(--num-eval 3 --epochs 300 --compile); ifs=200; kinds="soft hard"
    else
      EVAL_BUDGET=(--num-eval 5 --epochs 1000 --compile); ifs="200 10"; kinds=soft
    fi
    for imbalance in $ifs; do
      # a set and its ruler first, so that a stopped cell is read in pairs
      methods="csdm random dm"; [[ $MODE == soft-cell && $imbalance == 200 ]] && methods+=" dm-f1 random-f1"
      for kind in $kinds; do
        for method in $methods; do
          extra=(); [[ $kind == soft ]] && extra=("${soft[@]}")
          as=$method; [[ $method == random-f1 ]] && { as=random; extra+=(--factor 1); }
          eval_into "$sets/if$imbalance/ipc10/$method" "$tree/$kind/cifar10/if$imbalance/ipc10/$method" "$as" cifar10 \
            "$imbalance" 10 "${EVAL_BUDGET[@]}" "${extra[@]}"
        done
      done
    done
    if [[ $MODE == soft-bench ]]; then tables=("$tree/hard" "$tree/soft"); else tables=("$OUT/full_cell/dm" "$tree/soft"); fi
    "$PYTHON" report.py "${tables[@]}" --table "$tree.md" ;;

  gpu-check)
    # gpu_check.py's own default of --jobs-per-gpu unless one is given here
    jobs=(); [[ -z "$JOBS_GIVEN" ]] || jobs=(--jobs-per-gpu "$JOBS_PER_GPU")
    "$PYTHON" gpu_check.py "${DATA_ARGS[@]}" --device "$DEVICE" --out "$OUT/gpu_check.json" --grid-out "$OUT" \
      "${jobs[@]}" ;;

  ablation)
    # the CPU benchmark's setting at IF 200 with half its iterations (300, so that the tables fit a CPU
    # session), measured on a balanced validation split of 100 images per class left out of training
    SPLIT_ARGS=(--val-per-class 100)
    DISTILL_BUDGET=(--iterations 300 --batch-real 64 --compile)
    EVAL_BUDGET=(--num-eval 2 --epochs 300 --compile --split val)
    dir="$OUT/ablations/$ABLATION"
    variant() {
      local name=$1 method=$2 imbalance=$3; shift 3
      run_one "$dir/$name" "$method" cifar10 "$imbalance" 10 "$@"
    }
    case "$ABLATION" in
      soft-labels)
        # evaluate.py --labels soft on the validation split, to choose its defaults: the temperature with the
        # balanced (logit-adjusted) teacher, and the plain cross-entropy teacher, for the ablation's csdm set
        # (csdm-hard: the kernel ablation's default row distilled again, its set kept in git, evaluated with hard
        # labels) and the random set of its images under the same labels. Teachers are kept in OUT/teachers/
        variant csdm-hard csdm 200
        eval_into "" "$dir/random-hard" random cifar10 200 10 "${EVAL_BUDGET[@]}" --val-per-class 100
        for labels in "balanced 1" "balanced 4" "balanced 8" "ce 4"; do
          set -- $labels
          soft=(--labels soft --teacher-loss "$1" --temperature "$2" --teacher-cache "$OUT/teachers")
          eval_into "$dir/csdm-hard" "$dir/csdm-soft-$1-T$2" csdm cifar10 200 10 "${EVAL_BUDGET[@]}" "${soft[@]}"
          eval_into "" "$dir/random-soft-$1-T$2" random cifar10 200 10 "${EVAL_BUDGET[@]}" --val-per-class 100 \
            "${soft[@]}"
        done ;;
      kernel)
        for kernel in gaussian laplacian imq laplacian-l1 cauchy-product; do
          variant "csdm-$kernel-fixed" csdm 200 --kernel "$kernel"
          variant "csdm-$kernel-median" csdm 200 --kernel "$kernel" --bandwidth-rule median
        done ;;
      weighting)
        for kernel in gaussian laplacian-l1 cauchy-product; do  # the kernels the weighting table measured
          variant "sdm-$kernel" sdm 200 --kernel "$kernel"
          variant "csdm-$kernel" csdm 200 --kernel "$kernel"
        done
        variant ncfm-uniform ncfm 200
        variant ncfm-class-aware ncfm 200 --class-aware ;;
      alpha)
        for pair in "0.5 0.5" "0.6 0.4" "0.7 0.3" "0.8 0.2" "0.9 0.1" "0.5 0.2" "0.8 0.5"; do
          set -- $pair
          variant "csdm-head$1-tail$2" csdm 200 --alpha-head "$1" --alpha-tail "$2"
        done ;;
      freqs)
        for m in 64 256 1024 4096; do variant "csdm-M$m" csdm 200 --num-freqs "$m"; done ;;
      balanced)
        for method in dm sdm csdm; do variant "$method-IF1" "$method" 1; done ;;
      budget)
        # does csdm's lead over dm grow with the number of iterations? (the later --iterations wins) A longer
        # budget continues the shorter run's checkpoint: nothing in the loop depends on the total, and a
        # resumed run is the run it continues (tests/test_resume.py)
        shorter=""
        for iterations in 300 1000 3000 6000; do
          for method in dm csdm; do
            run="$dir/$method-it$iterations"
            if [[ -n "$shorter" && ! -e "$run" && -f "$dir/$method-it$shorter/checkpoint.pt" ]]; then
              mkdir -p "$run" && cp "$dir/$method-it$shorter/checkpoint.pt" "$run/"
            fi
            variant "$method-it$iterations" "$method" 200 --iterations "$iterations"
          done
          shorter=$iterations
        done ;;
      pipeline)
        # one thing added at a time to the plain DM loop (random extractor, factor 1, fixed sigma, L2
        # features), with each method's own optimiser: dm SGD, csdm Adam
        base=(--extractor random --factor 1 --bandwidth-rule fixed --bandwidth 1 --feature-norm l2)
        variant dm-base dm 200 "${base[@]}" --optimizer sgd
        variant dm-adam dm 200 "${base[@]}" --optimizer adam
        variant dm-pool dm 200 "${base[@]}" --optimizer sgd --extractor pool
        variant dm-factor2 dm 200 "${base[@]}" --optimizer sgd --factor 2
        variant csdm-base csdm 200 "${base[@]}" --optimizer adam
        variant csdm-sgd csdm 200 "${base[@]}" --optimizer sgd --lr-img 1
        variant csdm-factor2 csdm 200 "${base[@]}" --optimizer adam --factor 2
        variant csdm-pool csdm 200 "${base[@]}" --optimizer adam --extractor pool
        variant csdm-median csdm 200 "${base[@]}" --optimizer adam --bandwidth-rule median
        variant csdm-sigma2 csdm 200 "${base[@]}" --optimizer adam --bandwidth 2
        variant csdm-no-l2 csdm 200 "${base[@]}" --optimizer adam --feature-norm none ;;
      balanced-calibration)
        # NCFM's calibration term made class-balanced: the logit adjustment tau in {0, 1} crossed with the pool's
        # classifiers as trained on the long-tailed set, re-trained on class-balanced batches (crt) or trained
        # with the logit-adjusted loss (la), at the default factor 2, each method's calibration weight from the
        # calibration ablation (dm 1, csdm 0.01 and 0.002); the rows without calibration are the references
        base=(--extractor pool --factor 2)
        variant dm-pool dm 200 "${base[@]}"
        variant csdm-pool csdm 200 "${base[@]}"
        # the logit-adjusted loss also changes the pool's features, the extractor itself: without calibration too
        variant dm-pool-la dm 200 "${base[@]}" --pool-rebalance la
        variant csdm-pool-la csdm 200 "${base[@]}" --pool-rebalance la
        for rebalance in none crt la; do
          for tau in 0 1; do
            variant "dm-pool-$rebalance-calib1-tau$tau" dm 200 "${base[@]}" --pool-rebalance "$rebalance" \
              --calibration 1 --calibration-tau "$tau"
            for weight in 0.01 0.002; do
              variant "csdm-pool-$rebalance-calib$weight-tau$tau" csdm 200 "${base[@]}" --pool-rebalance "$rebalance" \
                --calibration "$weight" --calibration-tau "$tau"
            done
          done
        done ;;
      pairing)
        # siamese DSA pairing: one transformation per class and iteration (DM's code) or per position in the
        # class, for dm and csdm, at factor 1 (DM as published) and 2 (the default)
        for factor in 1 2; do
          for pairing in class position; do
            variant "dm-factor$factor-$pairing" dm 200 --factor "$factor" --dsa-pairing "$pairing"
            variant "csdm-factor$factor-$pairing" csdm 200 --factor "$factor" --dsa-pairing "$pairing"
          done
        done ;;
      calibration)
        # NCFM's cross-entropy calibration term, which needs the pool's trained networks: the pipeline
        # ablation's -pool rows with and without it
        base=(--extractor pool --factor 1 --bandwidth-rule fixed --bandwidth 1 --feature-norm l2)
        variant dm-pool dm 200 "${base[@]}" --optimizer sgd
        variant dm-pool-calib dm 200 "${base[@]}" --optimizer sgd --calibration 1
        variant csdm-pool csdm 200 "${base[@]}" --optimizer adam
        variant csdm-pool-calib csdm 200 "${base[@]}" --optimizer adam --calibration 1
        # the kernel losses are about 1e-2 per class against dm's ~10: smaller weights keep the same balance
        for weight in 0.1 0.01 0.002; do
          variant "csdm-pool-calib$weight" csdm 200 "${base[@]}" --optimizer adam --calibration "$weight"
        done
        # at the default factor 2, with each method's best weight at factor 1
        variant dm-factor2-pool-calib1 dm 200 "${base[@]}" --optimizer sgd --factor 2 --calibration 1
        variant csdm-factor2-pool-calib0.01 csdm 200 "${base[@]}" --optimizer adam --factor 2 --calibration 0.01
        variant dm-factor2-pool dm 200 "${base[@]}" --optimizer sgd --factor 2
        variant csdm-factor2-pool csdm 200 "${base[@]}" --optimizer adam --factor 2 ;;
    esac
    # the table, with a line per run saying how it came about, where git keeps it
    "$PYTHON" report.py "$dir" --table "$OUT/ablations/$ABLATION.md" ;;
esac
echo "== finished; results under $OUT/"
