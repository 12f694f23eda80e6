"""Start-up cost of the sample plan: the chunk-level ``build_sample_plan`` vs the sentence loop it replaced, and
the memory the ranks of a node hold when they memory-map the cached plan instead of each holding a copy.

    python benchmarks/sample_plan.py [--tokens 300000000] [--shards 32] [--seq-lens 128 512] [--json OUT]

Generates a synthetic corpus in memory: per shard, documents of a geometric number of sentences (mean 23,
one-sentence documents included) and sentences of lognormal token length (median 20, mean ~24), about the shape of
WordPiece-tokenised Wikipedia. Each build (old, new; per sequence length) runs in its own process, which reports its
build time (CPU seconds and wall), its peak resident memory above the corpus it started with and the plan's bytes
(the new int32 plan; the old loop's int64 one, which the ranks held before). Both plans' digests are compared. The
new build's process also writes the plan's cache (``sample_plan.ensure_cached``: the ``.npy`` + sidecar a run keeps
in ``plans/``) into a temp folder, removed at the end; then 2 processes at once each map it (``np.load(mmap_mode=
"r")``, every page touched) or each load their own copy (int32, and int64 as before), and report what
``/proc/self/smaps_rollup`` says the plan added: private (Private_Clean + Private_Dirty), shared and Pss bytes. The
numbers are scaled linearly to English Wikipedia's 3.5B tokens (builds and plans are linear in the corpus). The old
loop is ``tests/test_sample_plan.py``'s reference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
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


def measure(which: str, tokens: int, shards: int, seq_len: int, cache: Path | None = None) -> dict:
    """One build in this process: seconds, peak RSS above the corpus, the plan's size and digest; with ``cache``
    (the new build), then the plan's cache written there as a run writes it."""
    sys.path.insert(0, str(REPO / "tests"))
    from test_sample_plan import reference_plan

    from earlybert_pretrain.pretrain.sample_plan import build_sample_plan, ensure_cached

    corpus = synthetic_corpus(tokens, shards)
    build = reference_plan if which == "old" else build_sample_plan
    base_rss = psutil.Process().memory_info().rss
    cpu, wall = time.process_time(), time.perf_counter()
    plan = build(corpus, seq_len, 0.1, 12345)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row = {"which": which, "seq_len": seq_len, "tokens": corpus.num_tokens, "documents": corpus.num_documents,
           "sentences": int(corpus.doc_sentences.sum()), "chunks": len(plan), "dtype": str(plan.dtype),
           "plan_bytes": plan.nbytes, "cpu_seconds": cpu, "wall_seconds": wall,
           "peak_extra_bytes": max(0, peak_rss - base_rss),
           "digest": hashlib.sha256(np.ascontiguousarray(plan, dtype=np.int64).tobytes()).hexdigest()}
    if cache is not None:
        corpus.manifest_path = cache / "manifest.json"  # the corpus identity the sidecar records
        corpus.manifest_path.write_text(json.dumps({"synthetic": {"tokens": tokens, "shards": shards}}))
        del plan
        wall = time.perf_counter()
        row["cache"] = str(ensure_cached(corpus, seq_len, 0.1, 12345, cache / "plans"))
        row["cache_write_wall_seconds"] = time.perf_counter() - wall  # a second build, then np.save + sidecar
    return row


SMAPS_FIELDS = ("Rss", "Pss", "Shared_Clean", "Shared_Dirty", "Private_Clean", "Private_Dirty")


def smaps_rollup() -> dict[str, int]:
    """This process's memory by kind, in bytes (``/proc/self/smaps_rollup``)."""
    found = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in SMAPS_FIELDS:
            found[name] = int(value.split()[0]) * 1024
    return found


def hold(mode: str, path: str) -> None:
    """A rank's view of the plan: map it (every page touched) or load a copy; report the memory it added once every
    holder holds it (the parent says when, on stdin)."""
    before = smaps_rollup()
    if mode == "mapped":
        plan = np.load(path, mmap_mode="r")
    else:
        plan = np.load(path).astype(np.int64 if mode == "copy-int64" else np.int32)
    checksum = int(plan.sum(dtype=np.int64))  # touches every page
    print("ready", flush=True)
    sys.stdin.readline()
    after = smaps_rollup()
    delta = {name: after[name] - before[name] for name in SMAPS_FIELDS}
    delta["private"] = delta["Private_Clean"] + delta["Private_Dirty"]
    delta["shared"] = delta["Shared_Clean"] + delta["Shared_Dirty"]
    print(json.dumps({"mode": mode, "checksum": checksum, **delta}), flush=True)
    sys.stdin.readline()


def held_together(mode: str, path: str, ranks: int = 2) -> list[dict]:
    """``ranks`` processes holding the plan at once (``hold``): each one's memory deltas."""
    children = [subprocess.Popen([sys.executable, __file__, "--hold", mode, path], cwd=REPO, text=True,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(ranks)]
    for child in children:
        assert child.stdout.readline().strip() == "ready"
    reports = []
    for child in children:
        child.stdin.write("measure\n")
        child.stdin.flush()
        reports.append(json.loads(child.stdout.readline()))
    for child in children:
        child.stdin.write("exit\n")
        child.stdin.flush()
        child.wait(timeout=60)
    if len({report["checksum"] for report in reports}) != 1:
        sys.exit(f"{mode}: the ranks read different plans")
    return reports


def run_isolated(which: str, tokens: int, shards: int, seq_len: int, cache: Path | None = None) -> dict:
    """``measure`` in a fresh process, so each peak RSS is its own."""
    extra = ["--cache", str(cache)] if cache is not None else []
    done = subprocess.run([sys.executable, __file__, "--measure", which, "--tokens", str(tokens), "--shards",
                           str(shards), "--seq-lens", str(seq_len), *extra], cwd=REPO, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=300_000_000)
    parser.add_argument("--shards", type=int, default=32)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--json", type=Path, help="write the measurements here")
    parser.add_argument("--measure", choices=["old", "new"], help=argparse.SUPPRESS)  # the child processes
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--hold", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.tokens, args.shards, args.seq_lens[0], args.cache)))
        return
    if args.hold:
        hold(*args.hold)
        return
    with tempfile.TemporaryDirectory(prefix="sample-plan-bench-") as scratch:
        results = builds(args, Path(scratch))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def builds(args: argparse.Namespace, scratch: Path) -> list[dict]:
    results = []
    print(f"{'seq':>4} {'build':<5} {'tokens':>12} {'chunks':>10} {'CPU s':>8} {'wall s':>8} {'peak MB':>8}"
          f"   at 3.5B tokens: {'CPU s':>8} {'peak GB':>8}")
    for seq_len in args.seq_lens:
        cache = scratch / f"seq{seq_len}"
        cache.mkdir()
        pair = [run_isolated(which, args.tokens, args.shards, seq_len, cache if which == "new" else None)
                for which in ("old", "new")]
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
        old, new = pair
        scale = WIKIPEDIA_TOKENS / new["tokens"]
        print(f"     plan: {new['plan_bytes'] / 2**20:.1f} MB int32 vs {old['plan_bytes'] / 2**20:.1f} MB int64 before"
              f" ({new['plan_bytes'] / new['chunks']:.0f} vs {old['plan_bytes'] / old['chunks']:.0f} B a chunk); "
              f"at 3.5B tokens {new['plan_bytes'] * scale / 2**30:.2f} GB vs {old['plan_bytes'] * scale / 2**30:.2f}"
              f" GB; cache written in {new['cache_write_wall_seconds']:.1f} s wall (build + np.save + sidecar)")
        sharing = {mode: held_together(mode, new["cache"]) for mode in ("mapped", "copy-int32", "copy-int64")}
        print("     2 ranks at once, per rank (MB: private / shared / Pss)   at 3.5B tokens: private / Pss GB")
        for mode, reports in sharing.items():
            private, shared, pss = (max(r[key] for r in reports) for key in ("private", "shared", "Pss"))
            print(f"     {mode:<11} {private / 2**20:>8.1f} / {shared / 2**20:>7.1f} / {pss / 2**20:>7.1f}"
                  f"{'':25}{private * scale / 2**30:>8.2f} / {pss * scale / 2**30:.2f}")
        new["sharing"] = sharing
        results += pair
    return results


if __name__ == "__main__":
    main()
