"""Every CLI through a table of bad inputs: exit code 2, one line on stderr naming the file or field, no traceback,
and the folders it was pointed at left exactly as they were (every file hashed before and after).

A row is (CLI, id, setup, argv, expected fragments of the line). ``setup(case)`` builds the inputs under
``case.root`` and returns the argv; ``{root}`` / ``{wiki}`` in an expected fragment stand for the row's folder and
the shared real-dump build. Pre-training and fine-tuning rows go in ``ROWS`` the same way.
"""

from __future__ import annotations

import bz2
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from finetune_fixtures import make_tiny_model, sentiment_rows, write_jsonl
from test_pretrain import tiny_recipe

from data_prep.cli import main as prep_main
from earlybert_pretrain.finetune.cli import main as finetune_main
from earlybert_pretrain.model.bert import BertConfig
from earlybert_pretrain.pretrain.cli import main as pretrain_main
from earlybert_pretrain.tickets.cli import main as ticket_main
from earlybert_pretrain.tickets.draw import draw_ticket
from earlybert_pretrain.tickets.ticket import STRUCTURAL_FIELDS

pytest_plugins = ["data_fixtures"]  # the session-wide build of the real dump (inputs of the later stages)

REPO = Path(__file__).resolve().parent.parent
CLIS: dict[str, Callable[[list[str]], int]] = {"earlybert-prep": prep_main, "earlybert-ticket": ticket_main,
                                               "earlybert-pretrain": pretrain_main,
                                               "earlybert-finetune": finetune_main}
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@dataclass
class Case:
    root: Path  # the row's own folder: inputs and outputs
    wiki: object | None  # the WikiBuild of data_fixtures, for rows that read its stages

    def file(self, name: str, content: bytes | str) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def jsonl(self, name: str, lines: list[bytes]) -> Path:
        return self.file(name, b"\n".join(lines) + b"\n")

    def ticket(self, name: str = "t.json", config: BertConfig | None = None) -> Path:
        config = config or BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128)
        generator = torch.Generator().manual_seed(0)
        coefficients = {
            "head": [torch.rand(config.num_attention_heads, generator=generator)
                     for _ in range(config.num_hidden_layers)],
            "ffn": [torch.rand(config.intermediate_size, generator=generator)
                    for _ in range(config.num_hidden_layers)]}
        path = self.root / name
        draw_ticket(coefficients, heads_to_prune=1, ffn_ratio=0.3, config=config, step=10).save(path)
        return path


@dataclass
class Row:
    cli: str
    id: str
    setup: Callable[[Case], list[str]]
    expect: tuple[str, ...]
    wiki: bool = False  # needs the real-dump build
    fault: str | None = None  # "enospc": every fsync fails with a full disk; "read-only": see _read_only_for_root
    dist: bool = False  # the CLI joins a (one-process) DeepSpeed process group


def _dump(case: Case, name: str, body: str) -> Path:
    return case.file(name, bz2.compress(f"<mediawiki><siteinfo/>{body}</mediawiki>".encode()))


def _page(k: int) -> str:
    return (f"<page><title>Article {k}</title><ns>0</ns><id>{k}</id><revision><text>'''Article {k}''' is a "
            "[[test]] page. It has two sentences.</text></revision></page>")


def _all(case: Case, source: Path, *extra: str) -> list[str]:
    return ["all", "--input", str(source), "--output", str(case.root / "out"), "--vocab-size", "200", *extra]


def _shard(case: Case, *extra: str, vocab: str | None = None, sentences: str | None = None) -> list[str]:
    return ["shard", "--input", sentences or str(case.wiki.sentences), "--vocab", vocab or str(case.wiki.vocab),
            "--output", str(case.root / "shards"), *extra]


def _vocab(case: Case, *extra: str) -> list[str]:
    return ["vocab", "--input", str(case.wiki.sentences), "--output", str(case.root / "vocab"), *extra]


def _locked_output(case: Case) -> list[str]:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom earlybert_pretrain.common.lock import hold_run_lock\n"
         "with hold_run_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(60)",
         str(case.root / "out")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    case.holder = holder
    return ["sentences", "--input", str(case.wiki.articles), "--output", str(case.root / "out")]


def _model_folder(case: Case) -> Path:
    from earlybert_pretrain.model.bert import BertModel
    from earlybert_pretrain.model.hf import save_pretrained

    torch.manual_seed(0)
    folder = case.root / "model"
    save_pretrained(BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=16)), folder)
    return folder


def _pretrain(case: Case, *overrides: str, output: Path | None = None) -> list[str]:
    """The tiny pre-training recipe on the real-dump shards, into the row's folder, with ``overrides``."""
    recipe = case.file("tiny.yaml", yaml.safe_dump(tiny_recipe(case.wiki.shards)))
    return ["--config", str(recipe), f"output_dir={output or case.root / 'run'}", *overrides]


def _finetune(case: Case, *overrides: str, model: Path | None = None) -> list[str]:
    """A tiny sentiment fine-tuning with a tiny model of its own vocab, into the row's folder."""
    model = model or make_tiny_model(case.root / "model")
    train = write_jsonl(case.root / "train.jsonl", sentiment_rows(16, 0))
    return ["--task", "sst2", "--model", str(model), f"data.train_file={train}",
            f"data.validation_files=[{train}]", f"output_dir={case.root / 'ft'}", "batch_size=8", *overrides]


def _corrupt_shards(case: Case) -> Path:
    """A copy of the real-dump shards with one byte of the first shard flipped (its size unchanged)."""
    shards = case.root / "shards"
    shutil.copytree(case.wiki.shards, shards)
    first = sorted(shards.glob("*.bin"))[0]
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF
    first.write_bytes(bytes(data))
    return shards


def _symlink_loop(case: Case, name: str = "loop") -> Path:
    """``name`` -> ``name.2`` -> ``name``: a folder path no one can create or enter."""
    (case.root / name).symlink_to(case.root / f"{name}.2")
    (case.root / f"{name}.2").symlink_to(case.root / name)
    return case.root / name


def _run_with_linked_checkpoints(case: Case) -> list[str]:
    """A pre-training run folder whose checkpoints/ was moved to another disk and linked back, then --overwrite."""
    run, elsewhere = case.root / "run", case.root / "disk2" / "checkpoints"
    case.file("run/run.json", json.dumps({"kind": "pre-training", "config": {}, "inputs": {}}))
    case.file("run/progress.json", "{}")
    case.file("disk2/checkpoints/search_step6/complete.json", "{}")
    (run / "checkpoints").symlink_to(elsewhere)
    return _pretrain(case, "--overwrite")


def _ticket_with(case: Case, edit: Callable[[dict], None]) -> Path:
    """A valid ticket file edited by ``edit`` and re-digested the way Ticket.digest does (so only the edit is wrong)."""
    values = json.loads(case.ticket().read_text())
    edit(values)
    content = {"heads_kept": values["heads_kept"], "ffn_kept": values["ffn_kept"],
               "geometry": {name: values["source_geometry"][name] for name in STRUCTURAL_FIELDS}}
    values["digest"] = hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return case.file("t.json", json.dumps(values))


def _export_into_its_run(case: Case) -> list[str]:
    """`export run/final_model run --overwrite`: the output folder holds the input, with the run's other files."""
    model = _model_folder(case)
    run = case.root / "run"
    run.mkdir()
    model.rename(run / "final_model")
    case.file("run/checkpoints/step10.pt", b"weights")
    case.file("run/notes.txt", "mine")
    return ["export", str(run / "final_model"), str(run), "--format", "padded", "--overwrite"]


def _data_edited_before_resume(case: Case) -> list[str]:
    """A finished fine-tuning run, then a label of train.jsonl flipped, then --resume."""
    argv = _finetune(case)
    assert finetune_main(argv) == 0
    train = case.root / "train.jsonl"
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    rows[0]["label"] = 1 - rows[0]["label"]
    write_jsonl(train, rows)
    return argv + ["--resume"]


PREP = "earlybert-prep"
TICKET = "earlybert-ticket"
PRE = "earlybert-pretrain"
FT = "earlybert-finetune"


def _pre(name: str, setup, *expect: str) -> Row:
    return Row(PRE, name, setup, expect, wiki=True, dist=True)


def _ft(name: str, setup, *expect: str) -> Row:
    return Row(FT, name, setup, expect, dist=True)


ROWS = [
    # ---- earlybert-prep extract
    Row(PREP, "extract-missing-dump", lambda c: ["extract", "--input", str(c.root / "nope.xml.bz2"),
                                                 "--output", str(c.root / "articles")], ("{root}/nope.xml.bz2",)),
    Row(PREP, "extract-dump-is-a-folder", lambda c: (c.root / "d.xml.bz2").mkdir() or [
        "extract", "--input", str(c.root / "d.xml.bz2"), "--output", str(c.root / "articles")], ("{root}/d.xml.bz2",)),
    Row(PREP, "extract-dump-not-bz2", lambda c: [
        "extract", "--input", str(c.file("d.xml.bz2", "plain text")), "--output", str(c.root / "articles")],
        ("{root}/d.xml.bz2",)),
    Row(PREP, "extract-dump-not-mediawiki", lambda c: [
        "extract", "--input", str(c.file("d.xml.bz2", bz2.compress(b"<html><body/></html>"))),
        "--output", str(c.root / "a")], ("{root}/d.xml.bz2", "not a MediaWiki")),
    Row(PREP, "extract-dump-truncated", lambda c: ["extract", "--input", str(c.file(
        "d.xml.bz2", _dump(c, "full.xml.bz2", _page(1) * 50).read_bytes()[:60])), "--output", str(c.root / "a")],
        ("{root}/d.xml.bz2",)),
    Row(PREP, "extract-output-is-a-file", lambda c: ["extract", "--input", str(_dump(c, "d.xml.bz2", _page(1))),
                                                     "--output", str(c.file("articles", "x"))], ("{root}/articles",)),
    Row(PREP, "extract-output-under-a-file", lambda c: [
        "extract", "--input", str(_dump(c, "d.xml.bz2", _page(1))), "--output", str(c.file("f", "x") / "articles")],
        ("{root}/f",)),
    Row(PREP, "extract-docs-per-chunk-0", lambda c: ["extract", "--input", str(_dump(c, "d.xml.bz2", _page(1))),
                                                     "--output", str(c.root / "a"), "--docs-per-chunk", "0"],
        ("--docs-per-chunk",)),
    Row(PREP, "extract-read-only-output", lambda c: (c.root / "ro").mkdir(mode=0o555) or [
        "extract", "--input", str(_dump(c, "d.xml.bz2", _page(1))), "--output", str(c.root / "ro" / "a")],
        ("{root}/ro",), fault="read-only"),
    # ---- earlybert-prep sentences
    Row(PREP, "sentences-input-without-manifest", lambda c: (c.root / "articles").mkdir() or [
        "sentences", "--input", str(c.root / "articles"), "--output", str(c.root / "s")],
        ("{root}/articles/manifest.json",)),
    Row(PREP, "sentences-input-is-another-stage", lambda c: [
        "sentences", "--input", str(c.wiki.vocab), "--output", str(c.root / "s")], ("{wiki}/vocab/manifest.json",),
        wiki=True),
    Row(PREP, "sentences-output-is-a-file", lambda c: [
        "sentences", "--input", str(c.wiki.articles), "--output", str(c.file("s", "x"))], ("{root}/s",), wiki=True),
    Row(PREP, "sentences-folder-in-use", _locked_output, ("{root}/out", "pid ", "another earlybert-prep"), wiki=True),
    Row(PREP, "sentences-manifest-not-json", lambda c: [
        "sentences", "--input", str(c.file("articles/manifest.json", "{oops").parent), "--output", str(c.root / "s")],
        ("{root}/articles/manifest.json", "JSON")),
    # ---- earlybert-prep vocab
    Row(PREP, "vocab-without-input", lambda c: ["vocab", "--output", str(c.root / "v")], ("--vocab-file",)),
    Row(PREP, "vocab-size-0", lambda c: _vocab(c, "--vocab-size", "0"), ("--vocab-size",), wiki=True),
    Row(PREP, "vocab-size-negative", lambda c: _vocab(c, "--vocab-size", "-5"), ("--vocab-size",), wiki=True),
    Row(PREP, "vocab-size-below-the-specials", lambda c: _vocab(c, "--vocab-size", "3"), ("--vocab-size",),
        wiki=True),
    Row(PREP, "vocab-file-missing", lambda c: ["vocab", "--vocab-file", str(c.root / "no.txt"), "--output",
                                               str(c.root / "v")], ("{root}/no.txt",)),
    Row(PREP, "vocab-file-without-specials", lambda c: [
        "vocab", "--vocab-file", str(c.file("v.txt", "a\nb\nc\n")), "--output", str(c.root / "v")],
        ("{root}/v.txt", "special")),
    Row(PREP, "vocab-file-not-utf8", lambda c: [
        "vocab", "--vocab-file", str(c.file("v.txt", b"[PAD]\n\xff\xfe\n")), "--output", str(c.root / "v")],
        ("{root}/v.txt",)),
    Row(PREP, "vocab-disk-full", lambda c: _vocab(c, "--vocab-size", "300"), ("{root}/vocab", "No space left"),
        wiki=True, fault="enospc"),
    # ---- earlybert-prep shard
    Row(PREP, "shard-num-shards-0", lambda c: _shard(c, "--num-shards", "0"), ("--num-shards",), wiki=True),
    Row(PREP, "shard-validation-fraction-1.5", lambda c: _shard(c, "--validation-fraction", "1.5"),
        ("--validation-fraction",), wiki=True),
    Row(PREP, "shard-validation-fraction-negative", lambda c: _shard(c, "--validation-fraction", "-0.1"),
        ("--validation-fraction",), wiki=True),
    Row(PREP, "shard-vocab-is-another-stage", lambda c: _shard(c, vocab=str(c.wiki.sentences)),
        ("{wiki}/sentences/manifest.json",), wiki=True),
    Row(PREP, "shard-input-is-the-vocab", lambda c: _shard(c, sentences=str(c.wiki.vocab)),
        ("{wiki}/vocab/manifest.json",), wiki=True),
    Row(PREP, "vocab-output-is-a-symlink-loop", lambda c: _vocab(c)[:-1] + [str(_symlink_loop(c))],
        ("{root}/loop", "symbolic link loop"), wiki=True),
    Row(PREP, "shard-output-under-a-file", lambda c: _shard(c)[:-1] + [str(c.file("f", "x") / "shards")],
        ("{root}/f",), wiki=True),
    # ---- earlybert-prep all (datasets sources)
    Row(PREP, "all-without-input", lambda c: ["all", "--output", str(c.root / "out")], ("--input",)),
    Row(PREP, "all-two-datasets-sources", lambda c: ["all", "--input", str(c.file("a.jsonl", "{}")),
                                                     str(c.file("b.jsonl", "{}")), "--output", str(c.root / "o")],
        ("one datasets source",)),
    Row(PREP, "all-jsonl-missing", lambda c: _all(c, c.root / "no.jsonl"), ("{root}/no.jsonl",)),
    Row(PREP, "all-jsonl-non-utf8-line", lambda c: _all(c, c.jsonl("d.jsonl", [
        b'{"text": "A fine first line. And more."}', b'{"text": "caf\xe9 au lait"}'])), ("{root}/d.jsonl",)),
    Row(PREP, "all-jsonl-text-not-a-string", lambda c: _all(c, c.jsonl("d.jsonl", [
        b'{"text": "A fine first line. And more."}', b'{"text": 42}'])), ("{root}/d.jsonl", "text")),
    Row(PREP, "all-jsonl-malformed-line", lambda c: _all(c, c.jsonl("d.jsonl", [
        b'{"text": "A fine first line. And more."}', b'{"text": "unterminated'])), ("{root}/d.jsonl",)),
    Row(PREP, "all-jsonl-without-text", lambda c: _all(c, c.jsonl("d.jsonl", [b'{"title": "t", "body": "b"}'])),
        ("{root}/d.jsonl", "text")),
    Row(PREP, "all-output-is-a-file", lambda c: _all(c, c.jsonl("d.jsonl", [b'{"text": "One. Two."}']))[:-4]
        + ["--output", str(c.file("out", "x")), "--vocab-size", "200"], ("{root}/out",)),
    # ---- earlybert-ticket
    Row(TICKET, "report-missing-ticket", lambda c: ["report", str(c.root / "no.json")], ("{root}/no.json",)),
    Row(TICKET, "report-ticket-is-a-folder",
        lambda c: (c.root / "t.json").mkdir() or ["report", str(c.root / "t.json")], ("{root}/t.json",)),
    Row(TICKET, "report-malformed-json", lambda c: ["report", str(c.file("t.json", '{"format": '))],
        ("{root}/t.json", "JSON")),
    Row(TICKET, "report-not-utf8", lambda c: ["report", str(c.file("t.json", b'{"a": "\xff"}'))], ("{root}/t.json",)),
    Row(TICKET, "report-json-list", lambda c: ["report", str(c.file("t.json", "[1, 2]"))], ("{root}/t.json",)),
    Row(TICKET, "report-missing-fields", lambda c: ["report", str(c.file("t.json", '{"format": "earlybert-ticket"}'))],
        ("{root}/t.json",)),
    Row(TICKET, "report-heads-out-of-range", lambda c: ["report", str(c.file("t.json", json.dumps(
        {**json.loads(c.ticket().read_text()), "heads_kept": [[0, 99], [1]]})))], ("{root}/t.json",)),
    Row(TICKET, "report-wrong-geometry-config", lambda c: [
        "report", str(c.ticket()), "--config", str(REPO / "configs" / "bert-large.yaml")], ("num_hidden_layers=24",)),
    Row(TICKET, "report-config-missing", lambda c: ["report", str(c.ticket()), "--config", str(c.root / "m.yaml")],
        ("{root}/m.yaml",)),
    Row(TICKET, "report-config-malformed-yaml", lambda c: [
        "report", str(c.ticket()), "--config", str(c.file("m.yaml", "hidden_size: [1, 2\n"))], ("{root}/m.yaml",)),
    Row(TICKET, "report-config-unknown-key", lambda c: [
        "report", str(c.ticket()), "--config", str(c.file("m.yaml", "hiden_size: 64\n"))], ("hiden_size",)),
    Row(TICKET, "distance-different-geometries", lambda c: [
        "distance", str(c.ticket("a.json")), str(c.ticket("b.json", BertConfig(
            hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128)))],
        ("heads_per_layer",)),
    Row(TICKET, "heatmap-output-under-a-file", lambda c: [
        "heatmap", str(c.ticket("a.json")), str(c.ticket("b.json")), "--output", str(c.file("f", "x") / "h.png")],
        ("{root}/f",)),
    Row(TICKET, "heatmap-output-is-a-folder", lambda c: (c.root / "h.png").mkdir() or [
        "heatmap", str(c.ticket("a.json")), str(c.ticket("b.json")), "--output", str(c.root / "h.png")],
        ("{root}/h.png",)),
    Row(TICKET, "heatmap-disk-full", lambda c: [
        "heatmap", str(c.ticket("a.json")), str(c.ticket("b.json")), "--output", str(c.root / "h.png")],
        ("{root}/h.png", "No space left"), fault="enospc"),
    Row(TICKET, "report-geometry-value-a-string", lambda c: [
        "report", str(_ticket_with(c, lambda t: t["source_geometry"].update(hidden_size="64"))), "--config",
        str(c.file("m.yaml", "hidden_size: 64\nnum_hidden_layers: 2\nnum_attention_heads: 4\n"
                             "intermediate_size: 128\n"))],
        ("{root}/t.json", "source_geometry.hidden_size", "expected an integer")),
    Row(TICKET, "report-kept-index-not-an-integer", lambda c: [
        "report", str(_ticket_with(c, lambda t: t["heads_kept"][0].__setitem__(0, 0.5)))],
        ("{root}/t.json", "heads_kept[0][0]", "expected an integer")),
    Row(TICKET, "report-deeply-nested-json", lambda c: [
        "report", str(c.file("t.json", "[" * 100_000 + "]" * 100_000))], ("{root}/t.json", "nested too deeply")),
    Row(TICKET, "export-into-the-run-folder-holding-the-model", _export_into_its_run,
        ("{root}/run", "holds the input folder")),
    Row(TICKET, "export-overwrite-a-folder-it-did-not-write", lambda c: c.file("out/notes.txt", "mine") and [
        "export", str(_model_folder(c)), str(c.root / "out"), "--format", "padded", "--overwrite"],
        ("{root}/out", "not a folder this command wrote (notes.txt)")),
    Row(TICKET, "apply-missing-model-folder", lambda c: [
        "apply", str(c.root / "model"), str(c.ticket()), str(c.root / "out"), "--format", "padded"],
        ("{root}/model",)),
    Row(TICKET, "apply-ticket-of-another-geometry", lambda c: [
        "apply", str(_model_folder(c)), str(c.ticket()), str(c.root / "out"), "--format", "padded"],
        ("hidden_size=64", "hidden_size=32")),
    # ---- earlybert-pretrain: every refusal before the output folder exists (or is touched)
    _pre("unknown-key", lambda c: _pretrain(c, "phase1.lrr=1"), "did you mean 'lr'"),
    _pre("bad-mode", lambda c: _pretrain(c, "mode=fast"), "mode: expected one of"),
    _pre("checkpoint-every-0", lambda c: _pretrain(c, "engine.checkpoint_every=0"), "engine.checkpoint_every"),
    _pre("log-every-0", lambda c: _pretrain(c, "engine.log_every=0"), "engine.log_every"),
    _pre("record-every-0", lambda c: _pretrain(c, "search.record_every=0"), "search.record_every"),
    _pre("keep-checkpoints-0", lambda c: _pretrain(c, "engine.keep_checkpoints=0"), "engine.keep_checkpoints"),
    _pre("ffn-ratio-above-1", lambda c: _pretrain(c, "search.ffn_ratio=1.5"), "ffn_ratio"),
    _pre("prune-every-head", lambda c: _pretrain(c, "search.heads_to_prune=4"), "heads_to_prune"),
    _pre("lr-0", lambda c: _pretrain(c, "phase1.lr=0"), "phase1: lr must be > 0"),
    _pre("lr-inf", lambda c: _pretrain(c, "phase1.lr=inf"), "phase1.lr", "finite"),
    _pre("search-steps-beyond-phase-1", lambda c: _pretrain(c, "search.steps=40"), "search.steps=40", "33 steps"),
    _pre("warmup-1", lambda c: _pretrain(c, "phase2.warmup=1.0"), "phase2", "warmup"),
    _pre("masked-lm-prob", lambda c: _pretrain(c, "data.masked_lm_prob=1.5"), "data.masked_lm_prob"),
    _pre("num-workers-negative", lambda c: _pretrain(c, "data.num_workers=-1"), "data.num_workers"),
    _pre("prefetch-0", lambda c: _pretrain(c, "data.prefetch=0"), "data.prefetch"),
    _pre("batch-not-divisible", lambda c: _pretrain(c, "phase1.global_batch_size=10"), "global batch (10"),
    _pre("seq-beyond-positions", lambda c: _pretrain(c, "phase2.seq_len=128"), "max_position_embeddings=64"),
    _pre("vocab-size-mismatch", lambda c: _pretrain(c, "model.vocab_size=1234"), "1234"),
    _pre("shards-missing", lambda c: _pretrain(c, f"data.shard_dir={c.root / 'nope'}"), "{root}/nope"),
    _pre("shard-bytes-flipped", lambda c: _pretrain(c, f"data.shard_dir={_corrupt_shards(c)}"),
         "{root}/shards/", "disagree with the block digest"),
    _pre("shard-bytes-flipped-full-check", lambda c: _pretrain(c, f"data.shard_dir={_corrupt_shards(c)}",
                                                                "data.verify=full"), "sha256 disagrees"),
    _pre("ticket-missing", lambda c: _pretrain(c, "mode=ticket", f"ticket={c.root / 'nope.json'}"),
         "{root}/nope.json"),
    _pre("ticket-of-another-geometry", lambda c: _pretrain(c, "mode=ticket", f"ticket={c.ticket()}"),
         "hidden_size"),
    _pre("output-is-a-file", lambda c: _pretrain(c, output=c.file("run", "x")), "{root}/run", "is a file"),
    _pre("output-not-a-run-even-with-overwrite", lambda c: c.file("run/notes.txt", "mine") and _pretrain(
        c, "--overwrite"), "{root}/run", "not a pre-training run (notes.txt)"),
    _pre("output-is-a-symlink-loop", lambda c: _pretrain(c, output=_symlink_loop(c)), "{root}/loop",
         "symbolic link loop"),
    _pre("overwrite-a-run-with-linked-checkpoints", _run_with_linked_checkpoints, "{root}/run/checkpoints -> ",
         "nothing was removed"),
    _pre("compare-to-without-report", lambda c: (c.root / "dense").mkdir() or _pretrain(
        c, "--compare-to", str(c.root / "dense")), "no report.json"),
    _pre("compare-to-report-without-times", lambda c: c.file("dense/report.json", "{}") and _pretrain(
        c, "--compare-to", str(c.root / "dense")), "not a finished run's report"),
    # ---- earlybert-finetune
    _ft("model-missing", lambda c: _finetune(c, model=c.root / "nope"), "{root}/nope"),
    _ft("max-seq-beyond-positions", lambda c: _finetune(c, "max_seq_length=4096"), "max_position_embeddings=128"),
    _ft("tokenizer-of-another-model", lambda c: _finetune(c, model=make_tiny_model(
        c.root / "model", vocab_size=64)), "the tokenizer has", "vocab_size is 64"),
    _ft("output-not-a-run", lambda c: c.file("ft/notes.txt", "mine") and _finetune(c), "not a fine-tuning run"),
    _ft("ticket-of-another-geometry", lambda c: _finetune(c, "--mode", "ticket", "--ticket", str(c.ticket())),
        "hidden_size"),
    _ft("lr-negative", lambda c: _finetune(c, "lr=-1"), "lr"),
    _ft("dense-metrics-not-metrics", lambda c: _finetune(c, f"dense_metrics={c.file('m.json', '[]')}"),
        "dense_metrics"),
    _ft("train-file-edited-before-resume", _data_edited_before_resume, "inputs changed", "{root}/train.jsonl"),
    _ft("train-file-not-utf8", lambda c: _finetune(c, f"data.train_file={c.file('bad.jsonl', bytes([255, 254]))}"),
        "{root}/bad.jsonl"),
]


def _hashes(folder: Path) -> dict[str, str]:
    """Every file (and folder) under ``folder``: its sha256 and mode, so any change shows."""
    result = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_dir():
            result[key] = f"dir {path.stat().st_mode:o}"
        elif path.is_file():
            result[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return result


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _read_only_for_root(folder: Path, real_mkdir=os.mkdir):
    """Root ignores a 0o555 folder's mode, so as root the kernel's answer to a mkdir in it (EACCES) is given here."""
    def mkdir(path, *args, **kwargs):
        if Path(path).parent == folder:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_mkdir(path, *args, **kwargs)
    return mkdir


@pytest.mark.parametrize("row", ROWS, ids=[f"{row.cli}:{row.id}" for row in ROWS])
def test_bad_input_is_one_line_and_changes_nothing(row: Row, tmp_path: Path, request, capsys, monkeypatch) -> None:
    wiki = request.getfixturevalue("wiki_build") if row.wiki else None
    if row.dist:
        request.getfixturevalue("single_process_dist")
    case = Case(tmp_path / "row", wiki)
    case.root.mkdir()
    argv = row.setup(case)
    watched = [case.root] + ([wiki.root] if wiki else [])
    before = [_hashes(folder) for folder in watched]
    capsys.readouterr()
    if row.fault == "enospc":
        monkeypatch.setattr(os, "fsync", _full_disk)
    if row.fault == "read-only" and AS_ROOT:
        monkeypatch.setattr(os, "mkdir", _read_only_for_root(case.root / "ro"))
    try:
        try:
            code = CLIS[row.cli](argv)
        except SystemExit as exit_:  # argparse refusing a value
            code = exit_.code
    finally:
        monkeypatch.undo()
        if hasattr(case, "holder"):
            case.holder.kill()
            case.holder.wait()
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert "Traceback" not in out + err
    assert len(lines) == 1, err
    for fragment in row.expect:
        fragment = fragment.replace("{root}", str(case.root)).replace("{wiki}", str(wiki.root) if wiki else "")
        assert fragment in lines[0], (fragment, lines[0])
    after = [_hashes(folder) for folder in watched]
    for folder, old, new in zip(watched, before, after):
        assert new == old, (folder, set(new.items()) ^ set(old.items()))
