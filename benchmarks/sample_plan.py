"""Start-up cost of the sample plan: the chunk-level ``build_sample_plan`` vs the sentence loop it replaced.

    python benchmarks/sample_plan.py [--tokens 300000000] [--shards 32] [--seq-lens 128 512] [--json OUT]

Generates a synthetic corpus in memory (nothing is written to disk): per shard, documents of a geometric number
of sentences (mean 23, one-sentence documents included) and sentences of lognormal token length (median 20,
mean ~24), about the shape of WordPiece-tokenised Wikipedia. Each build (old, new; per sequence length) runs in
its own process, which reports its build time (CPU seconds and wall) and its peak resident memory above the
corpus it started with. Both plans' digests are compared; the numbers are scaled linearly to English Wikipedia's
3.5B tokens (both builds are linear in the corpus). The old loop is ``tests/test_sample_plan.py``'s reference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
WIKIPEDIA_TOKENS = 3.5e9
MEAN_SENTENCES_PER_DOC = 23


def synthetic_corpus(tokens: int, shards: int, seed: int = 0) -> SimpleNamespace:
    """A corpus of ~``tokens`` tokens with the attributes both plan builders read (no token ids)."""
    rng = np.random.default_rng(seed)
    mean_length = float(np.exp(3.0 + 0.6**2 / 2))
    per_shard = int(tokens / mean_length / shards)  # sentences per shard
    shard_list, doc_shard, doc_first, doc_sentences = [], [], [], []
    for index in range(shards):
        lengths = np.clip(rng.lognormal(3.0, 0.6, per_shard), 1, 400).astype(np.int32)
        counts = rng.geometric(1 / MEAN_SENTENCES_PER_DOC, per_shard // MEAN_SENTENCES_PER_DOC * 2)
        counts = counts[: np.searchsorted(np.cumsum(counts), per_shard)]
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        shard_list.append(SimpleNamespace(num_sentences=int(counts.sum()), sentence_lengths=lengths[: counts.sum()]))
        doc_shard.append(np.full(len(counts), index, dtype=np.int32))
        doc_first.append(starts)
        doc_sentences.append(counts)
    corpus = SimpleNamespace(shards=shard_list, doc_shard=np.concatenate(doc_shard),
                             doc_first=np.concatenate(doc_first), doc_sentences=np.concatenate(doc_sentences),
                             manifest_path=Path("synthetic/manifest.json"), split="train")
    corpus.num_documents = len(corpus.doc_shard)
    corpus.num_tokens = int(sum(int(s.sentence_lengths.sum(dtype=np.int64)) for s in shard_list))

    def sentence_lengths(doc: int) -> np.ndarray:
        first = corpus.doc_first[doc]
        return shard_list[corpus.doc_shard[doc]].sentence_lengths[first : first + corpus.doc_sentences[doc]]

    corpus.sentence_lengths = sentence_lengths
    return corpus


def measure(which: str, tokens: int, shards: int, seq_len: int) -> dict:
    """One build in this process: seconds, peak RSS above the corpus, the plan's size and digest."""
    sys.path.insert(0, str(REPO / "tests"))
    from test_sample_plan import reference_plan

    from earlybert_pretrain.pretrain.batches import build_sample_plan

    corpus = synthetic_corpus(tokens, shards)
    build = reference_plan if which == "old" else build_sample_plan
    base_rss = psutil.Process().memory_info().rss
    cpu, wall = time.process_time(), time.perf_counter()
    plan = build(corpus, seq_len, 0.1, 12345)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"which": which, "seq_len": seq_len, "tokens": corpus.num_tokens, "documents": corpus.num_documents,
            "sentences": int(corpus.doc_sentences.sum()), "chunks": len(plan), "cpu_seconds": cpu,
            "wall_seconds": wall, "peak_extra_bytes": max(0, peak_rss - base_rss),
            "digest": hashlib.sha256(np.ascontiguousarray(plan, dtype=np.int64).tobytes()).hexdigest()}


def run_isolated(which: str, tokens: int, shards: int, seq_len: int) -> dict:
    """``measure`` in a fresh process, so each peak RSS is its own."""
    done = subprocess.run([sys.executable, __file__, "--measure", which, "--tokens", str(tokens), "--shards",
                           str(shards), "--seq-lens", str(seq_len)], cwd=REPO, capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=300_000_000)
    parser.add_argument("--shards", type=int, default=32)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--json", type=Path, help="write the measurements here")
    parser.add_argument("--measure", choices=["old", "new"], help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.tokens, args.shards, args.seq_lens[0])))
        return
    results = []
    print(f"{'seq':>4} {'build':<5} {'tokens':>12} {'chunks':>10} {'CPU s':>8} {'wall s':>8} {'peak MB':>8}"
          f"   at 3.5B tokens: {'CPU s':>8} {'peak GB':>8}")
    for seq_len in args.seq_lens:
        pair = [run_isolated(which, args.tokens, args.shards, seq_len) for which in ("old", "new")]
        if pair[0]["digest"] != pair[1]["digest"]:
            sys.exit(f"seq {seq_len}: the new plan differs from the old one")
        for row in pair:
            scale = WIKIPEDIA_TOKENS / row["tokens"]
            row.update(wikipedia_cpu_seconds=row["cpu_seconds"] * scale,
                       wikipedia_peak_bytes=row["peak_extra_bytes"] * scale)
            print(f"{seq_len:>4} {row['which']:<5} {row['tokens']:>12,} {row['chunks']:>10,} {row['cpu_seconds']:>8.1f}"
                  f" {row['wall_seconds']:>8.1f} {row['peak_extra_bytes'] / 2**20:>8.0f}"
                  f"{'':19}{row['wikipedia_cpu_seconds']:>8.0f} {row['wikipedia_peak_bytes'] / 2**30:>8.2f}")
        print(f"     new/old: {pair[1]['cpu_seconds'] / pair[0]['cpu_seconds']:.2f}x CPU time, "
              f"{pair[1]['peak_extra_bytes'] / max(1, pair[0]['peak_extra_bytes']):.2f}x peak memory; plans identical "
              f"(sha256 {pair[1]['digest'][:12]})")
        results += pair
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
