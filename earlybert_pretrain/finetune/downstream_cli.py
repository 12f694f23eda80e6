"""``earlybert-downstream``: the paper's downstream table (Tables 2 and 5) for one or more pre-trained folders.

    earlybert-downstream --model BERT=runs/dense/final_model --model EarlyBERT=runs/earlybert/final_model \\
        --data-dir glue_data --output-dir runs/downstream
    earlybert-downstream --model BERT=bert-base --modes dense,earlybert,random,reduced --data-dir glue_data \\
        --output-dir runs/table2 --tasks sst2,qnli epochs=1

``--data-dir`` holds the GLUE download's task folders (SST-2/, MRPC/, STS-B/, MNLI/, ...) and/or SQuAD/ (or squad/)
with train-v1.1.json and dev-v1.1.json: every task present is run. Trailing ``key=value`` settings apply to every
fine-tuning run (see finetune/config.py). Run again to resume: finished runs are read, unfinished ones resumed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from earlybert_pretrain.common.oserrors import user_filesystem_errors
from earlybert_pretrain.errors import ConfigError, LostRankError, UserError
from earlybert_pretrain.finetune.table import build_table, parse_rows, present_tasks, write_table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="earlybert-downstream", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, metavar="NAME=FOLDER",
                        help="a pre-trained HF-format BERT folder and its name in the table; repeat for several "
                             "(the first one's first mode is the time reference)")
    parser.add_argument("--data-dir", required=True, help="folder of GLUE task folders and/or SQuAD/")
    parser.add_argument("--output-dir", required=True, help="one fine-tuning run per model, mode and task; the table")
    parser.add_argument("--modes", default="dense", help="comma-separated fine-tuning modes (default: dense)")
    parser.add_argument("--tasks", default="", help="comma-separated tasks to run (default: every task present)")
    parser.add_argument("--config", help="YAML file of FinetuneConfig fields for every run")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="settings for every run, e.g. epochs=1")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        rows = parse_rows(args.model, [mode for mode in args.modes.split(",") if mode])
        wanted = [task for task in args.tasks.split(",") if task]
        tasks = present_tasks(Path(args.data_dir), wanted)
        if not tasks:
            among = f" for {', '.join(wanted)}" if wanted else ""
            raise ConfigError(f"--data-dir: {args.data_dir} holds no task folder with a training file{among} (e.g. "
                              "SST-2/train.tsv, SQuAD/train-v1.1.json)")
        with user_filesystem_errors(args.output_dir):  # each fine-tuning run owns its process group
            table = build_table(rows, tasks, Path(args.output_dir), list(args.overrides), args.config)
            text = write_table(table, Path(args.output_dir))
    except (UserError, LostRankError) as err:  # a lost rank: one line naming it, exit 1
        print(f"earlybert-downstream: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, UserError) else 1
    print(text)
    print(f"table in {args.output_dir}/table.txt and table.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
