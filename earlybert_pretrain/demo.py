"""The README's demo, end to end on a CPU: real Wikipedia text -> shards -> EarlyBERT pre-training vs dense BERT.

1. Finds the real (shortened) English Wikipedia dump: ``$EARLYBERT_WIKI_DUMP``, the ``shared/data`` folder beside
   the repository, a cached copy, or — on a fresh machine — the same file inside the gensim wheel on PyPI.
2. ``earlybert-prep all``: extract -> sentences -> WordPiece vocab -> token shards.
3. ``earlybert-pretrain`` twice on ``configs/pretrain_demo_cpu.yaml``: the dense baseline, then EarlyBERT
   (search -> draw -> re-init -> phase 1 -> phase 2, 80% of the steps) compared against it.
4. Prints the report: losses, the ticket, the Figure-1 heatmap's path and the time saved.

Every stage resumes: rerunning the demo reuses what is already there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLE_NAME = "enwiki-sample-pages-articles.xml.bz2"
GENSIM_WHEEL = "gensim==4.4.0"
GENSIM_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "earlybert"


def find_sample_dump() -> Path:
    """The real Wikipedia sample dump; fetched once from the gensim wheel (PyPI) when nothing local has it."""
    candidates = [os.environ.get("EARLYBERT_WIKI_DUMP"), REPO.parent / "shared/data/wikipedia" / SAMPLE_NAME,
                  CACHE / SAMPLE_NAME]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    print(f"fetching the Wikipedia sample from the {GENSIM_WHEEL} wheel on PyPI ...", flush=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as download_dir:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "-d", download_dir, GENSIM_WHEEL], check=True)
        wheel = next(Path(download_dir).glob("gensim-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            partial = CACHE / f".{SAMPLE_NAME}.tmp"
            partial.write_bytes(archive.read(GENSIM_MEMBER))
            partial.replace(CACHE / SAMPLE_NAME)
    return CACHE / SAMPLE_NAME


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
    dump = find_sample_dump()
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
    print(f"report: {out / 'earlybert' / 'report.txt'}\nTensorBoard: tensorboard --logdir {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
