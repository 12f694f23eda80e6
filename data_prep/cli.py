"""``earlybert-prep``: the data pipeline's command line (download, extract, sentences, vocab, shard, all).

Every subcommand is idempotent (a stage whose manifest matches its parameters is skipped) and resumable (files are
renamed into place when complete; a rerun keeps them and does the rest). User errors print one line,
``earlybert-prep: error: ...``, and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

from data_prep.common import PrepError
from earlybert_pretrain.common.lock import hold_run_lock
from earlybert_pretrain.common.oserrors import user_filesystem_errors
from earlybert_pretrain.common.run_folder import check_no_symlink_loop
from earlybert_pretrain.errors import UserError

DUMP_SUFFIXES = (".xml.bz2", ".xml")
ALL_STAGE_FOLDERS = ("download", "articles", "sentences", "vocab", "shards")  # what `all` writes under OUTPUT


def _add_workers(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")


def _add_shard_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-shards", type=int, default=8, help="training shards (default 8)")
    parser.add_argument("--validation-fraction", type=float, default=0.01, help="documents held out (default 0.01)")
    parser.add_argument("--num-validation-shards", type=int, default=1)
    parser.add_argument("--split-seed", type=int, default=12345, help="seed of the train/validation split")


def _add_vocab_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vocab-size", type=int, default=30_522, help="WordPiece vocab size (default 30522)")
    parser.add_argument("--vocab-file", help="use this vocab.txt or tokenizer.json instead of training one")
    parser.add_argument("--cased", action="store_true", help="keep case and accents (default: uncased)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="earlybert-prep", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("download", help="fetch and verify a pages-articles dump (resumable)")
    p.add_argument("--url", help="dump URL (http(s):// or file://) or a local path")
    p.add_argument("--date", default="latest",
                   help="dump date YYYYMMDD, or 'latest' (default): the newest complete dump in the dump index")
    p.add_argument("--checksums", help="checksum list URL or path (default: the dump's sha1sums.txt)")
    p.add_argument("--url-template", default=None, help="dump URL with {date}")
    p.add_argument("--output", required=True, help="directory for the dump")

    p = sub.add_parser("extract", help="dump (.xml.bz2) -> JSONL articles {id, title, text}")
    p.add_argument("--input", required=True, nargs="+", help="pages-articles .xml.bz2 (or .xml) file(s)")
    p.add_argument("--output", required=True)
    p.add_argument("--docs-per-chunk", type=int, default=2_000)
    _add_workers(p)

    p = sub.add_parser("sentences", help="articles -> sentence-split JSONL documents")
    p.add_argument("--input", required=True, help="the extract output directory")
    p.add_argument("--output", required=True)
    _add_workers(p)

    p = sub.add_parser("vocab", help="train an uncased WordPiece vocab (or adopt --vocab-file)")
    p.add_argument("--input", help="the sentences output directory (not needed with --vocab-file)")
    p.add_argument("--output", required=True)
    _add_vocab_options(p)

    p = sub.add_parser("shard", help="sentences + vocab -> token-balanced .bin/.idx shards + manifest.json")
    p.add_argument("--input", required=True, help="the sentences output directory")
    p.add_argument("--vocab", required=True, help="the vocab output directory")
    p.add_argument("--output", required=True)
    _add_shard_options(p)
    _add_workers(p)

    p = sub.add_parser("all", help="the whole chain into OUTPUT/{articles,sentences,vocab,shards}")
    p.add_argument("--input", nargs="+", help="dump path(s)/URL (.xml.bz2), or one datasets source "
                   "(.parquet/.jsonl/hub name)")
    p.add_argument("--date", help="download the enwiki dump of this date (YYYYMMDD or 'latest') instead of --input")
    p.add_argument("--checksums", help="checksum list for a downloaded dump")
    p.add_argument("--dataset-config", help="config of a hub dataset (e.g. 20231101.en)")
    p.add_argument("--dataset-split", default="train")
    p.add_argument("--output", required=True)
    p.add_argument("--docs-per-chunk", type=int, default=2_000)
    _add_vocab_options(p)
    _add_shard_options(p)
    _add_workers(p)
    return parser


def _is_dump(sources: list[str]) -> bool:
    return all(source.endswith(DUMP_SUFFIXES) for source in sources)


def _run_all(args: argparse.Namespace) -> Path:
    from data_prep.dataset_source import articles_from_dataset
    from data_prep.download import download
    from data_prep.extract import extract
    from data_prep.sentences import split_corpus
    from data_prep.shard import shard_corpus
    from data_prep.vocab import build_vocab

    out = Path(args.output)
    if args.input is None and args.date is None:
        raise PrepError("all: give --input (dump or datasets source) or --date (dump to download)")
    timings = {}
    start = time.perf_counter()
    if args.date is not None or _is_dump(args.input):
        sources = args.input or [None]
        if args.date is not None or any("://" in source for source in sources):
            if len(sources) > 1:
                raise PrepError("all: download one dump URL at a time (or give local files)")
            sources = [download(out / "download", url=sources[0], date=args.date, checksums=args.checksums)]
            timings["download"] = time.perf_counter() - start
        extract([Path(s) for s in sources], out / "articles", workers=args.workers,
                docs_per_chunk=args.docs_per_chunk)
    elif len(args.input) > 1:
        raise PrepError(f"all: one datasets source at a time, got {len(args.input)}: {' '.join(args.input)}")
    else:
        articles_from_dataset(args.input[0], out / "articles", config=args.dataset_config,
                              split=args.dataset_split, docs_per_chunk=args.docs_per_chunk)
    timings["articles"] = time.perf_counter() - start
    split_corpus(out / "articles", out / "sentences", workers=args.workers)
    timings["sentences"] = time.perf_counter() - start
    build_vocab(out / "sentences", out / "vocab", vocab_size=args.vocab_size, existing=args.vocab_file,
                lowercase=not args.cased)
    timings["vocab"] = time.perf_counter() - start
    shard_corpus(out / "sentences", out / "vocab", out / "shards", num_shards=args.num_shards,
                 validation_fraction=args.validation_fraction, num_validation_shards=args.num_validation_shards,
                 split_seed=args.split_seed, workers=args.workers)
    timings["shards"] = time.perf_counter() - start
    print("done: " + ", ".join(f"{stage} at {t:.1f}s" for stage, t in timings.items()), file=sys.stderr)
    return out / "shards"


def run(args: argparse.Namespace) -> Path:
    """Execute one parsed subcommand; returns the directory it produced."""
    if args.command == "download":
        from data_prep.download import DUMP_URL_TEMPLATE, download

        return download(args.output, url=args.url, date=args.date, checksums=args.checksums,
                        url_template=args.url_template or DUMP_URL_TEMPLATE)
    if args.command == "extract":
        from data_prep.extract import extract

        extract([Path(p) for p in args.input], args.output, workers=args.workers, docs_per_chunk=args.docs_per_chunk)
    elif args.command == "sentences":
        from data_prep.sentences import split_corpus

        split_corpus(args.input, args.output, workers=args.workers)
    elif args.command == "vocab":
        from data_prep.vocab import build_vocab

        build_vocab(args.input, args.output, vocab_size=args.vocab_size, existing=args.vocab_file,
                    lowercase=not args.cased)
    elif args.command == "shard":
        from data_prep.shard import shard_corpus

        shard_corpus(args.input, args.vocab, args.output, num_shards=args.num_shards,
                     validation_fraction=args.validation_fraction, num_validation_shards=args.num_validation_shards,
                     split_seed=args.split_seed, workers=args.workers)
    else:
        return _run_all(args)
    return Path(args.output)


def run_locked(args: argparse.Namespace) -> Path:
    """``run`` holding the lock of the output folder (for ``all``, of each stage folder too): one run per folder."""
    output = Path(args.output)
    folders = [output, *(output / name for name in ALL_STAGE_FOLDERS)] if args.command == "all" else [output]
    with user_filesystem_errors(output), contextlib.ExitStack() as locks:
        check_no_symlink_loop(output)
        for folder in folders:
            locks.enter_context(hold_run_lock(folder, f"earlybert-prep {args.command}"))
        return run(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        produced = run_locked(args)
    except UserError as exc:  # anything else is a bug: it keeps its traceback
        print(f"earlybert-prep: error: {exc}", file=sys.stderr)
        return 2
    print(produced)
    return 0


if __name__ == "__main__":
    sys.exit(main())
