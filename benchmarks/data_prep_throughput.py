"""Throughput of the data pipeline per stage, for 1 and 2 workers, and against a create_pretraining_data-style
baseline (single process, pure-Python BERT FullTokenizer) on the same sentences.

    .venv/bin/python benchmarks/data_prep_throughput.py [--dump PATH] [--extract-repeat 20] [--text-repeat 100]

The real shortened dump is repeated: its pages ``--extract-repeat`` times into a new .xml.bz2 for `extract`, its
clean articles ``--text-repeat`` times (~280 MB of text by default) for `sentences`, `vocab` and `shard`.
Prints the results as JSON and, with ``--json``, writes them to a file.
"""

from __future__ import annotations

import argparse
import bz2
import collections
import json
import os
import random
import resource
import shutil
import tempfile
import time
import unicodedata
from pathlib import Path

from data_prep.extract import chunk_name, extract, iter_pages, write_jsonl
from data_prep.sentences import split_corpus
from data_prep.shard import shard_corpus
from data_prep.vocab import build_vocab

MB = 1e6
DEFAULT_DUMP = Path(__file__).resolve().parents[2] / "shared/data/wikipedia/enwiki-sample-pages-articles.xml.bz2"


def repeat_dump(source: Path, target: Path, repeat: int) -> int:
    """Write ``source``'s pages ``repeat`` times into one .xml.bz2 (level 9, like the real dumps); returns XML bytes."""
    xml = bz2.decompress(source.read_bytes())
    first, end = xml.index(b"  <page>"), xml.rindex(b"</mediawiki>")
    body = xml[first:end]
    with bz2.open(target, "wb", compresslevel=9) as out:
        out.write(xml[:first])
        for _ in range(repeat):
            out.write(body)
        out.write(xml[end:])
    return first + len(body) * repeat + len(xml) - end


def repeat_articles(source: Path, target: Path, repeat: int, docs_per_chunk: int = 2000) -> int:
    """An extract-stage directory holding ``source``'s articles ``repeat`` times; returns the text bytes."""
    docs = []
    for entry in json.loads((source / "manifest.json").read_text())["files"]:
        with open(source / entry["name"], encoding="utf-8") as handle:
            docs.extend(json.loads(line) for line in handle)
    everything = [{**d, "id": f"{d['id']}-{r}"} for r in range(repeat) for d in docs]
    target.mkdir(parents=True)
    files = []
    for index in range(0, len(everything), docs_per_chunk):
        name = chunk_name(0, index // docs_per_chunk)
        write_jsonl(target / name, everything[index : index + docs_per_chunk])
        files.append({"name": name, "documents": len(everything[index : index + docs_per_chunk])})
    manifest = {"stage": "extract", "params": {"benchmark": repeat}, "stats": {}, "files": files}
    (target / "manifest.json").write_text(json.dumps(manifest))
    return sum(len(d["text"].encode()) for d in everything)


# ---- the baseline: google-research/bert tokenization.py (BasicTokenizer + WordpieceTokenizer), uncased


def _is_punctuation(char: str) -> bool:
    cp = ord(char)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def _is_chinese(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF
            or 0x2F800 <= cp <= 0x2FA1F)


class BaselineTokenizer:
    """BERT's FullTokenizer, as create_pretraining_data.py runs it: pure Python, one process."""

    def __init__(self, vocab_path: Path) -> None:
        tokens = vocab_path.read_text(encoding="utf-8").rstrip("\n").split("\n")
        self.vocab = {token: index for index, token in enumerate(tokens)}
        self.unk = self.vocab["[UNK]"]

    def _basic(self, text: str) -> list[str]:
        chars = []
        for char in text:
            cp = ord(char)
            if cp == 0 or cp == 0xFFFD or (unicodedata.category(char).startswith("C") and char not in "\t\n\r"):
                continue
            if _is_chinese(cp):
                chars.extend((" ", char, " "))
            elif char in " \t\n\r" or unicodedata.category(char) == "Zs":
                chars.append(" ")
            else:
                chars.append(char)
        words = []
        for word in "".join(chars).split():
            word = unicodedata.normalize("NFD", word.lower())
            word = "".join(c for c in word if unicodedata.category(c) != "Mn")
            current: list[str] = []
            for char in word:
                if _is_punctuation(char):
                    if current:
                        words.append("".join(current))
                        current = []
                    words.append(char)
                else:
                    current.append(char)
            if current:
                words.append("".join(current))
        return words

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in self._basic(text):
            if len(word) > 100:
                ids.append(self.unk)
                continue
            start, pieces = 0, []
            while start < len(word):
                end = len(word)
                while start < end:
                    piece = word[start:end] if start == 0 else "##" + word[start:end]
                    if piece in self.vocab:
                        break
                    end -= 1
                if start == end:
                    pieces = [self.unk]
                    break
                pieces.append(self.vocab[piece])
                start = end
            ids.extend(pieces)
        return ids


def create_instances(documents: list[list[list[int]]], vocab_size: int, dupe_factor: int, max_seq_len: int = 128,
                     short_seq_prob: float = 0.1, masked_lm_prob: float = 0.15, max_predictions: int = 20) -> int:
    """create_pretraining_data.py's create_instances_from_document + create_masked_lm_predictions (static masking,
    ``dupe_factor`` passes), on ids instead of token strings; returns the number of instances."""
    rng = random.Random(12345)
    cls, sep, mask = 2, 3, 4
    max_num_tokens = max_seq_len - 3
    count = 0
    for _ in range(dupe_factor):
        for doc_index, document in enumerate(documents):
            target = rng.randint(2, max_num_tokens) if rng.random() < short_seq_prob else max_num_tokens
            chunk: list[list[int]] = []
            length, i = 0, 0
            while i < len(document):
                chunk.append(document[i])
                length += len(document[i])
                if i == len(document) - 1 or length >= target:
                    if chunk:
                        a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
                        tokens_a = [t for s in chunk[:a_end] for t in s]
                        tokens_b: list[int] = []
                        if len(chunk) == 1 or rng.random() < 0.5:
                            target_b = target - len(tokens_a)
                            for _ in range(10):
                                other = rng.randint(0, len(documents) - 1)
                                if other != doc_index:
                                    break
                            start = rng.randint(0, len(documents[other]) - 1)
                            for sentence in documents[other][start:]:
                                tokens_b.extend(sentence)
                                if len(tokens_b) >= target_b:
                                    break
                            i -= len(chunk) - a_end  # put the unused sentences back
                        else:
                            tokens_b = [t for s in chunk[a_end:] for t in s]
                        while len(tokens_a) + len(tokens_b) > max_num_tokens:
                            longer = tokens_a if len(tokens_a) > len(tokens_b) else tokens_b
                            del longer[0 if rng.random() < 0.5 else -1]
                        tokens = [cls, *tokens_a, sep, *tokens_b, sep]
                        candidates = [j for j, t in enumerate(tokens) if t not in (cls, sep)]
                        rng.shuffle(candidates)
                        budget = min(max_predictions, max(1, int(round(len(tokens) * masked_lm_prob))))
                        for j in sorted(candidates[:budget]):
                            draw = rng.random()
                            if draw < 0.8:
                                tokens[j] = mask
                            elif draw >= 0.9:
                                tokens[j] = rng.randint(5, vocab_size - 1)
                        count += 1
                    chunk, length = [], 0
                i += 1
    return count


def baseline(sentences_dir: Path, vocab_path: Path, megabytes: float, dupe_factor: int) -> dict[str, float]:
    """create_pretraining_data.py-style, one process: tokenize the first ``megabytes`` of sentences with the
    pure-Python FullTokenizer, then build ``dupe_factor`` statically masked copies of the instances (no TFRecord
    writing, which only flatters the baseline)."""
    tokenizer = BaselineTokenizer(vocab_path)
    documents: list[list[list[int]]] = []
    text_bytes = tokens = 0
    start = time.perf_counter()
    for entry in json.loads((sentences_dir / "manifest.json").read_text())["files"]:
        with open(sentences_dir / entry["name"], encoding="utf-8") as handle:
            for line in handle:
                document = [tokenizer.encode(sentence) for sentence in json.loads(line)["sentences"]]
                documents.append([s for s in document if s])
                tokens += sum(len(s) for s in document)
                text_bytes += len(line.encode())
                if text_bytes >= megabytes * MB:
                    break
        if text_bytes >= megabytes * MB:
            break
    tokenize_s = time.perf_counter() - start
    instances = create_instances(documents, len(tokenizer.vocab), dupe_factor)
    total_s = time.perf_counter() - start
    return {"text_MB": text_bytes / MB, "tokens": tokens, "tokenize_seconds": tokenize_s,
            "tokenize_text_MB_per_s": text_bytes / MB / tokenize_s, "tokenize_tokens_per_s": tokens / tokenize_s,
            "dupe_factor": dupe_factor, "instances": instances, "pipeline_seconds": total_s,
            "pipeline_text_MB_per_s": text_bytes / MB / total_s, "pipeline_tokens_per_s": tokens / total_s}


def loader_speed(shard_dir: Path, examples: int = 3000) -> dict[str, float]:
    """Examples per second of earlybert_pretrain.pretrain.batches at seq 128 and 512 (one process)."""
    from earlybert_pretrain.pretrain.batches import PretrainingBatches, ShardedCorpus

    corpus = ShardedCorpus(shard_dir)
    speeds = {}
    for seq, predictions in ((128, 20), (512, 80)):
        start = time.perf_counter()
        batches = PretrainingBatches(corpus, seq, predictions, micro_batch_size=100)
        plan_s = time.perf_counter() - start
        stream = iter(batches)
        start = time.perf_counter()
        for _ in range(examples // 100):
            next(stream)
        speeds[f"seq{seq}_examples_per_s"] = examples / (time.perf_counter() - start)
        speeds[f"seq{seq}_plan_seconds"] = plan_s
    speeds["sentences"] = corpus.num_sentences
    return speeds


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (pool workers are joined when a stage ends)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(megabytes: float, func, *args, **kwargs) -> tuple[dict[str, float], object]:
    """Run a stage; wall and CPU seconds, MB per wall second, MB per CPU second (robust to a shared machine)."""
    wall, cpu = time.perf_counter(), _cpu_seconds()
    result = func(*args, **kwargs)
    wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
    return {"wall_s": wall, "cpu_s": cpu, "MB_per_s": megabytes / wall, "MB_per_cpu_s": megabytes / cpu}, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dump", type=Path, default=Path(os.environ.get("EARLYBERT_WIKI_DUMP", DEFAULT_DUMP)))
    parser.add_argument("--extract-repeat", type=int, default=10, help="dump pages repeated for `extract`")
    parser.add_argument("--text-repeat", type=int, default=100,
                        help="the sample's clean articles repeated this many times for the later stages")
    parser.add_argument("--vocab-size", type=int, default=30_522)
    parser.add_argument("--baseline-mb", type=float, default=10.0, help="text the pure-Python baseline processes")
    parser.add_argument("--dupe-factor", type=int, default=5, help="baseline's static maskings (BERT 10, NVIDIA 5)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    results: dict[str, object] = {"cpu_count": os.cpu_count(), "load_average_before": os.getloadavg()}
    work = Path(tempfile.mkdtemp(prefix="earlybert-bench-"))
    try:
        dump = work / "repeated.xml.bz2"
        xml_mb = repeat_dump(args.dump, dump, args.extract_repeat) / MB
        results["parse_only"], _ = measure(xml_mb, lambda: sum(1 for _ in iter_pages(dump, collections.Counter())))
        for workers in args.workers:
            results[f"extract_w{workers}"], _ = measure(xml_mb, extract, dump, work / f"articles-{workers}",
                                                        workers=workers)
        # articles-* already hold the sample extract_repeat times.
        factor = max(1, round(args.text_repeat / args.extract_repeat))
        text_mb = repeat_articles(work / f"articles-{args.workers[0]}", work / "articles", factor) / MB
        results["text_MB"] = text_mb
        for workers in args.workers:
            results[f"sentences_w{workers}"], _ = measure(text_mb, split_corpus, work / "articles",
                                                          work / f"sentences-{workers}", workers=workers)
        sentences = work / f"sentences-{args.workers[0]}"
        results["vocab"], _ = measure(text_mb, build_vocab, sentences, work / "vocab", vocab_size=args.vocab_size)
        for workers in args.workers:
            stats, manifest = measure(text_mb, shard_corpus, sentences, work / "vocab", work / f"shards-{workers}",
                                      num_shards=8, validation_fraction=0.01, workers=workers)
            tokens = sum(t["tokens"] for t in manifest["totals"].values())
            results[f"shard_w{workers}"] = {**stats, "tokens": tokens, "tokens_per_s": tokens / stats["wall_s"],
                                            "tokens_per_cpu_s": tokens / stats["cpu_s"]}
        cpu = _cpu_seconds()
        results["baseline"] = base = baseline(sentences, work / "vocab" / "vocab.txt", args.baseline_mb,
                                              args.dupe_factor)
        base["cpu_s"] = _cpu_seconds() - cpu
        # The baseline is one process: its CPU split between stages follows its wall split.
        base_cpu_per_wall = base["cpu_s"] / base["pipeline_seconds"]
        base_tok_mb_per_cpu_s = base["tokenize_text_MB_per_s"] / base_cpu_per_wall
        base_all_mb_per_cpu_s = base["pipeline_text_MB_per_s"] / base_cpu_per_wall
        for workers in args.workers:
            chain = [results[f"sentences_w{workers}"], results[f"shard_w{workers}"]]  # same input, same job
            wall_rate = text_mb / sum(stage["wall_s"] for stage in chain)
            cpu_rate = text_mb / sum(stage["cpu_s"] for stage in chain)
            results[f"ours_w{workers}"] = {"MB_per_s": wall_rate, "MB_per_cpu_s": cpu_rate,
                                           "vs_tokenize_only_wall": wall_rate / base["tokenize_text_MB_per_s"],
                                           "vs_pipeline_wall": wall_rate / base["pipeline_text_MB_per_s"],
                                           "vs_tokenize_only_per_cpu_s": cpu_rate / base_tok_mb_per_cpu_s,
                                           "vs_pipeline_per_cpu_s": cpu_rate / base_all_mb_per_cpu_s}
        results["loader"] = loader_speed(work / f"shards-{args.workers[-1]}")
        results["load_average_after"] = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
