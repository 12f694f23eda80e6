"""``earlybert-finetune``: fine-tune a BERT folder on a GLUE task or SQuAD v1.1, dense or with an EarlyBERT ticket.

    earlybert-finetune --task mnli --model runs/pretrain/final --mode earlybert data.data_dir=glue/MNLI
    earlybert-finetune --config configs/finetune_glue.yaml --task sst2 --model M --mode random --seed 3
    earlybert-finetune --task squad --model M --mode ticket --ticket runs/pretrain/ticket.json data.data_dir=squad
    earlybert-finetune --task sst2 --model M --mode reduced --match-time runs/sst2_earlybert \
        --dense-metrics runs/sst2_dense/metrics.json data.data_dir=glue/SST-2
    earlybert-finetune --task sst2 --model M --mode earlybert search.objective=mlm data.data_dir=glue/SST-2

Flags are shorthands for the same ``key=value`` overrides (see ``finetune/config.py`` for every key). Errors the user
can fix print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from earlybert_pretrain.common.oserrors import user_filesystem_errors
from earlybert_pretrain.common.run_folder import ALLOW_WORLD_SIZE_CHANGE
from earlybert_pretrain.config import load_config
from earlybert_pretrain.errors import LostRankError, UserError
from earlybert_pretrain.finetune.config import MODES, FinetuneConfig
from earlybert_pretrain.finetune.tasks import TASKS

_FLAGS = ("task", "model_dir", "mode", "ticket", "seed", "output_dir", "dense_metrics", "match_time", "match_flops")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="earlybert-finetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML file of FinetuneConfig fields")
    parser.add_argument("--task", help=f"one of {', '.join(TASKS)}")
    parser.add_argument("--model", dest="model_dir",
                        help="HF-format BERT folder (config.json, weights, vocab.txt or tokenizer.json)")
    parser.add_argument("--mode", choices=MODES)
    parser.add_argument("--ticket", help="ticket.json for --mode ticket")
    parser.add_argument("--seed", type=int, help="head init, data order, random ticket")
    parser.add_argument("--output-dir", dest="output_dir")
    parser.add_argument("--dense-metrics", dest="dense_metrics", help="a dense run's metrics.json: report the saving")
    parser.add_argument("--match-time", dest="match_time", metavar="RUN_DIR",
                        help="--mode reduced: as many dense steps as this EarlyBERT run's time (Appendix A)")
    parser.add_argument("--match-flops", dest="match_flops", metavar="RUN_DIR",
                        help="--mode reduced: as many dense steps as this EarlyBERT run's training FLOPs")
    parser.add_argument("--resume", action="store_true", help="continue the run in output_dir (same settings)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace output_dir's previous run (only the files a run writes)")
    parser.add_argument(ALLOW_WORLD_SIZE_CHANGE, dest="allow_world_size_change", action="store_true",
                        help="--resume on another number of ranks than wrote the checkpoints (the same global "
                             "batches; new per-rank random streams)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.data_dir=glue/SST-2 lr=4e-5")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = [f"{name}={getattr(args, name)}" for name in _FLAGS if getattr(args, name) is not None]
    try:
        config = load_config(FinetuneConfig, args.config, overrides + list(args.overrides))
        # heavy imports (torch, datasets, transformers) after the arguments are checked
        from earlybert_pretrain.finetune.trainer import run

        with user_filesystem_errors(config.output_dir):  # run() owns its process group (made and ended there)
            metrics = run(config, resume=args.resume, overwrite=args.overwrite,
                          allow_world_size_change=args.allow_world_size_change)
    except (UserError, LostRankError) as err:  # a lost rank: exit 1; anything else is a bug: it keeps its traceback
        print(f"earlybert-finetune: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, UserError) else 1
    scores = ", ".join(f"{split}: " + ", ".join(f"{name} {value:.2f}" for name, value in values.items())
                       for split, values in metrics["scores"].items())
    print(f"{metrics['task']} {metrics['mode']}: best epoch {metrics['best_epoch']}: {scores}; "
          f"time {metrics['time']['total_seconds']:.1f} s over {metrics['time']['total_steps']} steps; "
          f"metrics in {config.output_dir}/metrics.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
