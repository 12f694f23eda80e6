#!/usr/bin/env bash
# Paper SQuAD v1.1 runs on one GPU node (Sec. 4.1-4.2): dense BERT (2 epochs, 3e-5, max_seq 384, doc stride 128) and
# EarlyBERT (0.2-epoch search, then the pruned model with SQuAD's default 2 epochs at 3e-5), plus the random-ticket
# baseline; EarlyBERT and random report their time saving against the dense run.
#
#   launch/finetune_squad.sh MODEL_DIR [key=value ...]
#   e.g. SQUAD_DIR=data/squad launch/finetune_squad.sh runs/pretrain/final batch_size=32
#
# Environment: SQUAD_DIR, OUT, GPUS, MODES, SEEDS as in launch/finetune_glue.sh, which runs the modes.
set -euo pipefail
exec "$(dirname "$0")/finetune_glue.sh" squad "$@"
