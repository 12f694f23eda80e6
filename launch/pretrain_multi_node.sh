#!/usr/bin/env bash
# EarlyBERT pre-training across nodes with `deepspeed --hostfile` (passwordless ssh between nodes, same paths).
#   HOSTFILE=launch/hostfile.example CONFIG=configs/pretrain_bert_base.yaml launch/pretrain_multi_node.sh [key=value ...]
# The paper's setting is 16 V100s (Sec. 4.1): two nodes of 8 in the hostfile.
set -euo pipefail
cd "$(dirname "$0")/.."
HOSTFILE="${HOSTFILE:-launch/hostfile.example}"
CONFIG="${CONFIG:-configs/pretrain_bert_base.yaml}"
MASTER_ADDR="${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "${HOSTFILE}")}"
MASTER_PORT="${MASTER_PORT:-29500}"
exec deepspeed --hostfile "${HOSTFILE}" --master_addr "${MASTER_ADDR}" --master_port "${MASTER_PORT}" \
  --module earlybert_pretrain.pretrain --config "${CONFIG}" "$@"
