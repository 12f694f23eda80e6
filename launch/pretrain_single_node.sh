#!/usr/bin/env bash
# EarlyBERT pre-training on one node with the DeepSpeed launcher.
#   NUM_GPUS=8 CONFIG=configs/pretrain_bert_base.yaml launch/pretrain_single_node.sh [key=value ...] [--resume]
# Extra arguments (config overrides such as output_dir=runs/base mode=dense, or --resume) are forwarded.
set -euo pipefail
cd "$(dirname "$0")/.."
NUM_GPUS="${NUM_GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}"
CONFIG="${CONFIG:-configs/pretrain_bert_base.yaml}"
MASTER_PORT="${MASTER_PORT:-29500}"
exec deepspeed --num_gpus "${NUM_GPUS}" --master_port "${MASTER_PORT}" \
  --module earlybert_pretrain.pretrain --config "${CONFIG}" "$@"
