"""`earlybert-pretrain`: the pre-training CLI (see ``earlybert_pretrain.pretrain.recipe`` for the stages).

    earlybert-pretrain --config configs/pretrain_bert_base.yaml [key=value ...] [--resume] [--overwrite]
        [--compare-to DENSE_RUN_DIR]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from earlybert_pretrain.config import PretrainConfig, load_config
from earlybert_pretrain.pretrain.batches import ShardedCorpus
from earlybert_pretrain.pretrain.recipe import (
    Run,
    RunError,
    obtain_ticket,
    phase_steps,
    prepare_output,
    train_phases,
    validate,
)
from earlybert_pretrain.pretrain.report import render_run_report, write_run_report
from earlybert_pretrain.train.distributed import barrier
from earlybert_pretrain.train.engine import init_distributed, resolve_precision
from earlybert_pretrain.train.telemetry import TensorBoardLogger


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="earlybert-pretrain", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML recipe (configs/pretrain_*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. phase1.lr=1e-3")
    parser.add_argument("--resume", action="store_true", help="continue the run in output_dir (or start it)")
    parser.add_argument("--overwrite", action="store_true", help="delete output_dir's previous run first")
    parser.add_argument("--compare-to", type=Path, help="a dense run's output_dir, for the time saving")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # DeepSpeed's launcher
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(PretrainConfig, args.config, args.overrides)
        if args.compare_to is not None and not (args.compare_to / "report.json").is_file():
            raise RunError(f"--compare-to {args.compare_to}: no report.json there (run the dense baseline first)")
        rank, world_size, device = init_distributed()
        # No force=True: a host application's (or pytest's) logging set-up stays as it is.
        logging.basicConfig(stream=sys.stdout, format=f"%(asctime)s [rank {rank}] %(message)s")
        logging.getLogger("earlybert_pretrain").setLevel(logging.INFO if rank == 0 else logging.WARNING)
        validate(cfg, world_size)
        out = Path(cfg.output_dir)
        precision = resolve_precision(cfg.engine.precision, device)
        progress = prepare_output(cfg, out, args.resume, args.overwrite, rank == 0)
        run = Run(cfg, out, rank, world_size, device, precision,
                  TensorBoardLogger(out / "tensorboard", enabled=rank == 0), progress,
                  ShardedCorpus(cfg.data.shard_dir, "train"))
        ticket = obtain_ticket(run, phase_steps(cfg, dense=True))
        train_phases(run, ticket)
        if run.is_main:
            report = write_run_report(out, cfg.mode, run.progress, args.compare_to)
            print(render_run_report(report), end="")
        run.tensorboard.close()
        barrier()
    except ValueError as err:
        print(f"earlybert-pretrain: error: {err}", file=sys.stderr)
        return 2
    return 0

