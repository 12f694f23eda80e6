"""`earlybert-pretrain`: the pre-training CLI (the stages are in ``earlybert_pretrain.pretrain.recipe``).

    earlybert-pretrain --config configs/pretrain_bert_base.yaml [key=value ...] [--resume] [--overwrite]
        [--compare-to RUN_DIR ...] [--match-time EARLYBERT_RUN_DIR | --match-flops EARLYBERT_RUN_DIR]
    earlybert-pretrain --config configs/pretrain_bert_base.yaml --dry-run --world-size 64 --gpu V100-32GB

``mode=reduced`` (BERT-Reduced, paper Appendix A) trains dense BERT for the steps that match a finished EarlyBERT
run's time (``--match-time``, the per-step times from the dense ``--compare-to`` run) or FLOPs (``--match-flops``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from earlybert_pretrain.common.oserrors import user_filesystem_errors
from earlybert_pretrain.common.run_folder import ALLOW_WORLD_SIZE_CHANGE
from earlybert_pretrain.config import PretrainConfig, load_config
from earlybert_pretrain.errors import ConfigError, LostRankError, UserError
from earlybert_pretrain.pretrain import dry_run
from earlybert_pretrain.pretrain.recipe import pretrain


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="earlybert-pretrain", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML recipe (configs/pretrain_*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. phase1.lr=1e-3")
    parser.add_argument("--resume", action="store_true", help="continue the run in output_dir (or start it)")
    parser.add_argument("--overwrite", action="store_true", help="delete output_dir's previous run first")
    parser.add_argument(ALLOW_WORLD_SIZE_CHANGE, dest="allow_world_size_change", action="store_true",
                        help="--resume on another number of ranks than wrote the checkpoints (ZeRO 0: the same "
                             "samples per step; new per-rank dropout streams)")
    parser.add_argument("--compare-to", type=Path, action="append",
                        help="a finished run's output_dir (repeatable): a dense one gives the time saving; all are "
                             "drawn and tabled beside this run")
    match = parser.add_mutually_exclusive_group()
    match.add_argument("--match-time", type=Path, metavar="RUN_DIR",
                       help="mode=reduced: as many dense steps as this EarlyBERT run's Sec. 4.1 time")
    match.add_argument("--match-flops", type=Path, metavar="RUN_DIR",
                       help="mode=reduced: as many dense steps as this EarlyBERT run's training FLOPs")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (accumulation, steps, FLOPs, memory per GPU) and exit; creates nothing")
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")),
                        help="--dry-run: the number of GPUs in all (default: $WORLD_SIZE or 1)")
    parser.add_argument("--gpu", default="V100-16GB", help="--dry-run: the GPU to check the memory against, one of "
                        "V100-16GB, V100-32GB, A100-40GB, A100-80GB, H100-80GB, H200 (default V100-16GB)")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # DeepSpeed's launcher
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(PretrainConfig, args.config, args.overrides)
        if args.dry_run:
            if args.world_size < 1:
                raise ConfigError(f"--world-size: expected >= 1, got {args.world_size}")
            print(dry_run.report(cfg, args.world_size, args.gpu)[0])
            return 0
        with user_filesystem_errors(cfg.output_dir):  # pretrain() owns its process group (made and ended there)
            pretrain(cfg, resume=args.resume, overwrite=args.overwrite, compare_to=args.compare_to,
                     match_time=args.match_time, match_flops=args.match_flops,
                     allow_world_size_change=args.allow_world_size_change)
    except (UserError, LostRankError) as err:  # a lost rank: one line naming it, exit 1; anything else: traceback
        print(f"earlybert-pretrain: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, UserError) else 1
    return 0
