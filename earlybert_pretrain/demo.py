"""The README's demo, end to end on a CPU: real Wikipedia text -> shards -> EarlyBERT pre-training vs dense BERT.

1. Finds the real (shortened) English Wikipedia dump (``data_prep.sample_dump``: ``$EARLYBERT_WIKI_DUMP``, the
   ``shared/data`` folder beside the repository, the cache, or — on a fresh machine — the gensim wheel on PyPI).
2. ``earlybert-prep all``: extract -> sentences -> WordPiece vocab -> token shards.
3. ``earlybert-pretrain`` twice on ``configs/pretrain_demo_cpu.yaml``: the dense baseline, then EarlyBERT
   (search -> draw -> re-init -> phase 1 -> phase 2, 80% of the steps) compared against it.
4. Prints the report: losses, the ticket, the Figure-1 heatmap's path, the time saved and the loss plot's path.

Every stage resumes: rerunning the demo reuses what is already there.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from data_prep.sample_dump import sample_dump

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
    print(f"report: {out / 'earlybert' / 'report.txt'}\nloss curves (EarlyBERT vs dense): "
          f"{out / 'earlybert' / 'report.png'}\nTensorBoard: tensorboard --logdir {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
