#!/usr/bin/env bash
# Paper fine-tuning runs on one GPU node (Sec. 4.1-4.2): dense BERT (3 epochs, 2e-5), EarlyBERT (0.2-epoch search,
# lambda 1e-4, 4 heads/layer for base or 6 for large, 40% FFN global, then 2 epochs at 4e-5) and the random-ticket
# baseline (5 seeds, the paper's average), each timed by the protocol of Sec. 4.1; EarlyBERT and random report their
# saving against the dense run.
#
#   launch/finetune_glue.sh TASK MODEL_DIR [key=value ...]     (TASK squad: what launch/finetune_squad.sh runs)
#   e.g. GLUE_DIR=data/glue launch/finetune_glue.sh qqp runs/pretrain/final batch_size=32
#
# Environment: GLUE_DIR  folder of the GLUE task folders (CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE);
#                        unset: the datasets hub copy (needs the network)
#              SQUAD_DIR (TASK squad) folder with train-v1.1.json and dev-v1.1.json; unset: the hub copy
#              OUT       output root (runs/finetune)      GPUS   ranks (all visible GPUs)
#              MODES     "dense earlybert random"         SEEDS  random-ticket seeds ("1 2 3 4 5")
# Extra key=value arguments are passed to every run (see earlybert_pretrain/finetune/config.py).
set -euo pipefail

if [[ $# -lt 2 ]]; then
    sed -n '2,17p' "$0" >&2
    exit 2
fi
TASK=$1
MODEL=$2
shift 2
OUT=${OUT:-runs/finetune}
MODES=${MODES:-dense earlybert random}
SEEDS=${SEEDS:-1 2 3 4 5}
GPUS=${GPUS:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}
[[ $GPUS -ge 1 ]] || GPUS=1

declare -A FOLDERS=([cola]=CoLA [sst2]=SST-2 [mrpc]=MRPC [stsb]=STS-B [qqp]=QQP [mnli]=MNLI [qnli]=QNLI [rte]=RTE)
DATA=()
if [[ $TASK == squad ]]; then
    [[ -n ${SQUAD_DIR:-} ]] && DATA=("data.data_dir=$SQUAD_DIR")
elif [[ -n ${GLUE_DIR:-} ]]; then
    [[ -n ${FOLDERS[$TASK]:-} ]] || { echo "unknown GLUE task '$TASK'; known: ${!FOLDERS[*]}" >&2; exit 2; }
    DATA=("data.data_dir=$GLUE_DIR/${FOLDERS[$TASK]}")
fi

finetune() {
    torchrun --standalone --nproc_per_node "$GPUS" -m earlybert_pretrain.finetune.cli \
        --task "$TASK" --model "$MODEL" "${DATA[@]}" "$@"
}

DENSE_METRICS=$OUT/$TASK/dense/metrics.json
dense_flag() { [[ -f $DENSE_METRICS ]] && echo "--dense-metrics=$DENSE_METRICS" || true; }
for mode in $MODES; do
    case $mode in
        dense) finetune --mode dense --output-dir "$OUT/$TASK/dense" "$@" ;;
        earlybert) finetune --mode earlybert --output-dir "$OUT/$TASK/earlybert" $(dense_flag) "$@" ;;
        random)
            for seed in $SEEDS; do
                finetune --mode random --seed "$seed" --output-dir "$OUT/$TASK/random_seed$seed" $(dense_flag) "$@"
            done ;;
        *) echo "unknown mode '$mode' in MODES; expected dense, earlybert or random" >&2; exit 2 ;;
    esac
done
