#!/usr/bin/env bash
# Paper SQuAD v1.1 runs on one GPU node (Sec. 4.1-4.2): dense BERT (2 epochs, 3e-5, max_seq 384, doc stride 128) and
# EarlyBERT (0.2-epoch search, then the pruned model with SQuAD's default 2 epochs at 3e-5), plus the random-ticket
# baseline; EarlyBERT and random report their time saving against the dense run.
#
#   launch/finetune_squad.sh MODEL_DIR [key=value ...]
#   e.g. SQUAD_DIR=data/squad launch/finetune_squad.sh runs/pretrain/final batch_size=32
#
# Environment: SQUAD_DIR  folder with train-v1.1.json and dev-v1.1.json; unset: the datasets hub copy (network)
#              OUT        output root (runs/finetune)    GPUS   ranks (all visible GPUs)
#              MODES      "dense earlybert random"       SEEDS  random-ticket seeds ("1 2 3 4 5")
# Extra key=value arguments are passed to every run (see earlybert_pretrain/finetune/config.py).
set -euo pipefail

if [[ $# -lt 1 ]]; then
    sed -n '2,13p' "$0" >&2
    exit 2
fi
MODEL=$1
shift
OUT=${OUT:-runs/finetune}
MODES=${MODES:-dense earlybert random}
SEEDS=${SEEDS:-1 2 3 4 5}
GPUS=${GPUS:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}
[[ $GPUS -ge 1 ]] || GPUS=1
DATA=()
[[ -n ${SQUAD_DIR:-} ]] && DATA=("data.data_dir=$SQUAD_DIR")

finetune() {
    torchrun --standalone --nproc_per_node "$GPUS" -m earlybert_pretrain.finetune.cli \
        --task squad --model "$MODEL" "${DATA[@]}" "$@"
}

DENSE_METRICS=$OUT/squad/dense/metrics.json
dense_flag() { [[ -f $DENSE_METRICS ]] && echo "--dense-metrics=$DENSE_METRICS" || true; }
for mode in $MODES; do
    case $mode in
        dense) finetune --mode dense --output-dir "$OUT/squad/dense" "$@" ;;
        earlybert) finetune --mode earlybert --output-dir "$OUT/squad/earlybert" $(dense_flag) "$@" ;;
        random)
            for seed in $SEEDS; do
                finetune --mode random --seed "$seed" --output-dir "$OUT/squad/random_seed$seed" $(dense_flag) "$@"
            done ;;
        *) echo "unknown mode '$mode' in MODES; expected dense, earlybert or random" >&2; exit 2 ;;
    esac
done
