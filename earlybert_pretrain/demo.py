"""The README's demo, end to end on a CPU: real Wikipedia text -> shards -> EarlyBERT pre-training vs dense BERT.

1. Finds the real (shortened) English Wikipedia dump (``data_prep.sample_dump``: ``$EARLYBERT_WIKI_DUMP``, the
   ``shared/data`` folder beside the repository, the cache, or — on a fresh machine — the gensim wheel on PyPI).
2. ``earlybert-prep all``: extract -> sentences -> WordPiece vocab -> token shards.
3. ``earlybert-pretrain`` twice on ``configs/pretrain_demo_cpu.yaml``: the dense baseline, then EarlyBERT
   (search -> draw -> re-init -> phase 1 -> phase 2, 80% of the steps) compared against it.
4. Prints the report: losses, validation scores, the ticket, the Figure-1 heatmap's path, the time saved, the time
   EarlyBERT took to reach the dense run's final validation MLM accuracy (Sec. 4's claim) and the plot's path.

Every stage resumes: rerunning the demo reuses what is already there.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from data_prep.sample_dump import sample_dump
from earlybert_pretrain.pretrain.report import render_time_to_accuracy

REPO = Path(__file__).resolve().parent.parent


def run(command: list[str]) -> None:
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=REPO)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="demo_out", help="where data, runs and reports go (default demo_out)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--config", default=str(REPO / "configs" / "pretrain_demo_cpu.yaml"))
    parser.add_argument("overrides", nargs="*", help="key=value overrides for both pre-training runs")
    args = parser.parse_args(argv)
    out = Path(args.output).resolve()
    dump = sample_dump()
    print(f"Wikipedia sample: {dump}", flush=True)

    run([sys.executable, "-m", "data_prep.cli", "all", "--input", str(dump), "--output", str(out / "data"),
         "--workers", str(args.workers), "--vocab-size", "8000", "--num-shards", "2",
         "--validation-fraction", "0.02"])
    shard_dir = out / "data" / "shards"
    vocab_size = json.loads((shard_dir / "manifest.json").read_text())["vocab"]["size"]

    pretrain = [sys.executable, "-m", "earlybert_pretrain.pretrain", "--config", args.config, "--resume",
                f"data.shard_dir={shard_dir}", f"model.vocab_size={vocab_size}", *args.overrides]
    run([*pretrain, "mode=dense", f"output_dir={out / 'dense'}"])
    run([*pretrain, "mode=earlybert", f"output_dir={out / 'earlybert'}", "--compare-to", str(out / "dense")])

    # The EarlyBERT run has just printed its report (losses, ticket, heatmap, time saved vs the dense run).
    print(summary(json.loads((out / "earlybert" / "report.json").read_text())), end="")
    print(f"report: {out / 'earlybert' / 'report.txt'}\nloss curves (EarlyBERT vs dense): "
          f"{out / 'earlybert' / 'report.png'}\nTensorBoard: tensorboard --logdir {out}")
    return 0


def summary(report: dict) -> str:
    """Validation scores of both runs' final models and the time-to-dense-accuracy line (the paper's quantity)."""
    lines = ["validation (final models):"]
    for row in report.get("side_by_side", []):
        scores = row.get("validation")
        if scores:
            lines.append(f"  {row['mode']:<10} MLM loss {scores['mlm_loss']:.4f}  MLM accuracy "
                         f"{scores['mlm_accuracy']:.4f}  NSP accuracy {scores['nsp_accuracy']:.4f}  "
                         f"({row['total_seconds']:.1f} s, Sec. 4.1)")
    compare = report.get("compare_to", {})
    if "time_to_dense_accuracy" in compare:
        lines.append(render_time_to_accuracy(compare["time_to_dense_accuracy"]))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
