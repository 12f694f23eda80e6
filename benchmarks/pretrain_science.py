"""Quality per unit of time (issue 23, item 4): the paper's Table-7 comparison on the real Wikipedia sample.

    python benchmarks/pretrain_science.py [--seeds 2] [--work-dir /tmp/earlybert-science] [--scale cpu] [key=value ...]

Per seed, four runs of ``python -m earlybert_pretrain.pretrain`` on the demo recipe (``configs/pretrain_demo_cpu.yaml``,
a model small enough for 2 CPU cores to train past the unigram plateau in minutes), one after the other:

* ``dense``: BERT for all the steps, the baseline every other run is compared to (``--compare-to``);
* ``earlybert``: search -> draw -> re-initialise -> 80% of the steps (Sec. 4.3);
* ``random``: a random ticket with the same head and neuron counts, 80% of the steps;
* ``reduced``: BERT for the steps that take EarlyBERT's time (``--match-time``, Appendix A).

Each run scores the same fixed validation examples (``eval.*``: masked with their own seed, so every mode and seed
sees the same ones). Prints, per mode, the mean and spread (min..max) over seeds of: validation MLM loss, MLM
accuracy and NSP accuracy of the final model, the Sec. 4.1 time, and the time at which the run first reached its
seed's dense run's final validation MLM accuracy as a fraction of the dense run's time ("-" where it never did; the
count of seeds that reached it beside). ``--scale small|base`` runs the comparison at BERT-small (4 x 512) or
BERT-base geometry with batches sized for a GPU; the shards are the same sample (a GPU run of this size takes the
sample through several epochs). ``--json OUT`` keeps every number.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from data_prep.sample_dump import sample_dump
from earlybert_pretrain.common.files import atomic_write_json

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "pretrain_demo_cpu.yaml"
MODES = ("dense", "earlybert", "random", "reduced")
# GPU geometries: BERT-small (Turc et al. 2019: L=4, H=512, A=8) and BERT-base, batches a single GPU holds.
SCALES = {
    "cpu": [],
    "small": ["model.hidden_size=512", "model.num_hidden_layers=4", "model.num_attention_heads=8",
              "model.intermediate_size=2048", "model.max_position_embeddings=512", "total_steps=2000",
              "phase1.global_batch_size=256", "phase1.micro_batch_size=256", "phase2.seq_len=512",
              "phase2.global_batch_size=64", "phase2.micro_batch_size=64", "phase2.max_predictions=80",
              "search.steps=100", "search.heads_to_prune=3", "eval.every=200", "eval.batches=8",
              "engine.precision=auto", "data.num_workers=4"],
    "base": ["model=bert-base.yaml", "model.vocab_size=8000", "total_steps=2000", "phase1.global_batch_size=256",
             "phase1.micro_batch_size=128", "phase2.seq_len=512", "phase2.global_batch_size=64",
             "phase2.micro_batch_size=32", "phase2.max_predictions=80", "search.steps=100", "search.heads_to_prune=4",
             "eval.every=200", "eval.batches=8", "engine.precision=auto", "data.num_workers=4"],
}


def run(command: list[str]) -> None:
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=REPO)


def prepare_shards(work: Path) -> Path:
    """The demo's shards (2% held out for validation; prep never leaves that split empty)."""
    run([sys.executable, "-m", "data_prep.cli", "all", "--input", str(sample_dump()), "--output", str(work / "data"),
         "--workers", "2", "--vocab-size", "8000", "--num-shards", "2", "--validation-fraction", "0.02"])
    return work / "data" / "shards"


def train_seed(work: Path, shards: Path, seed: int, overrides: list[str]) -> dict[str, dict]:
    """The four runs of one seed (each resumes if already there); their report.json by mode."""
    folder = work / f"seed{seed}"
    base = [sys.executable, "-m", "earlybert_pretrain.pretrain", "--config", str(CONFIG), "--resume",
            f"data.shard_dir={shards}", "model.vocab_size=8000", f"seed={seed}", *overrides]
    dense = ["--compare-to", str(folder / "dense")]
    run([*base, "mode=dense", f"output_dir={folder / 'dense'}"])
    run([*base, "mode=earlybert", f"output_dir={folder / 'earlybert'}", *dense])
    run([*base, "mode=random", f"output_dir={folder / 'random'}", *dense])
    run([*base, "mode=reduced", f"output_dir={folder / 'reduced'}", "--match-time", str(folder / "earlybert"), *dense])
    return {mode: json.loads((folder / mode / "report.json").read_text()) for mode in MODES}


def row(reports: list[dict]) -> dict:
    """One mode's numbers per seed: final validation scores, Sec. 4.1 time, time-to-dense-accuracy fraction."""
    values: dict[str, list] = {"mlm_loss": [], "mlm_accuracy": [], "nsp_accuracy": [], "seconds": [], "fraction": []}
    for report in reports:
        scores = report.get("validation") or {}
        for name in ("mlm_loss", "mlm_accuracy", "nsp_accuracy"):
            values[name].append(scores.get(name))
        values["seconds"].append(report["total_seconds"])
        reached = report.get("compare_to", {}).get("time_to_dense_accuracy")
        values["fraction"].append(reached.get("fraction") if reached else 1.0 if report["mode"] == "dense" else None)
    return values


def spread(values: list, spec: str) -> str:
    """mean [min..max] over the seeds that have a value; '-' for none."""
    present = [value for value in values if value is not None]
    if not present:
        return "-"
    return f"{format(statistics.mean(present), spec)} [{format(min(present), spec)}..{format(max(present), spec)}]"


def table(rows: dict[str, dict], seeds: int) -> str:
    header = (f"{'mode':<10} {'val MLM loss':>24} {'val MLM acc':>24} {'val NSP acc':>24} {'time (s, Sec. 4.1)':>24} "
              f"{'time to dense acc':>24}")
    lines = [f"Table-7 layout: mean [min..max] over {seeds} seed(s); validation scores of the final model", header]
    for mode, values in rows.items():
        reached = sum(value is not None for value in values["fraction"])
        lines.append(f"{mode:<10} {spread(values['mlm_loss'], '.4f'):>24} {spread(values['mlm_accuracy'], '.4f'):>24}"
                     f" {spread(values['nsp_accuracy'], '.4f'):>24} {spread(values['seconds'], '.1f'):>24} "
                     f"{spread(values['fraction'], '.3f'):>18} ({reached}/{seeds})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/earlybert-science"))
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu",
                        help="cpu: the demo model (2 cores, minutes); small/base: BERT-small/BERT-base on a GPU")
    parser.add_argument("--json", type=Path, help="write every number here")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        shards = prepare_shards(args.work_dir)
        per_seed = [train_seed(args.work_dir / args.scale, shards, seed, [*SCALES[args.scale], *args.overrides])
                    for seed in range(1, args.seeds + 1)]
    except subprocess.CalledProcessError as err:  # the run printed its own error above
        print(f"error: a run failed (exit {err.returncode}); its output is above", file=sys.stderr)
        return 1
    rows = {mode: row([reports[mode] for reports in per_seed]) for mode in MODES}
    print(table(rows, args.seeds), end="")
    print(f"wall time {time.perf_counter() - started:.0f} s")
    if args.json:
        atomic_write_json(args.json, {"scale": args.scale, "seeds": args.seeds, "overrides": args.overrides,
                                      "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
