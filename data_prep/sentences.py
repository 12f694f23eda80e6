"""`sentences`: split each article into sentences, one JSONL line per document: ``{id, title, sentences}``.

The splitter is a rule-based regex (no model, nothing to download): a sentence ends at ``.``, ``!`` or ``?``
(plus closing quotes/brackets) followed by whitespace and an upper-case letter, digit or opening quote, unless the
word before the period is a known abbreviation ("Dr.", "e.g.", "U.S.", "Jan.") or a single initial ("J. R. R.").
Paragraph breaks (one per line from `extract`) always end a sentence; pieces without a letter are dropped.
Documents keep their boundaries: one line each.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_prep.common import (
    MANIFEST,
    PrepError,
    begin_stage,
    manifest_digest,
    ordered_parallel_map,
    require_manifest,
    stage_done,
)
from earlybert_pretrain.common.files import atomic_path, atomic_write_json, sha256_file

STAGE = "sentences"
ABBREVIATIONS = frozenset(
    """mr mrs ms dr prof sr jr st mt ft gen col lt sgt capt cmdr adm gov sen rep rev hon pres supt
    inc ltd co corp bros dept univ assn est no nos vol vols ed eds fig figs pp p ch sec art approx ca c cf
    e.g i.e etc vs viz al op cit ibid jan feb mar apr jun jul aug sep sept oct nov dec
    u.s u.k u.n u.s.a a.d b.c b.c.e c.e a.m p.m ph.d m.d b.a m.a d.c""".split()
)
BOUNDARY = re.compile(r"[.!?][\"'”’)\]]*\s+(?=[\"'“‘(\[]?[A-Z0-9])")
TRAILING_WORD = re.compile(r"[\w.]+$")
HAS_LETTER = re.compile(r"[^\W\d_]")


def split_sentences(text: str) -> list[str]:
    """Sentences of a paragraph-per-line text, in order."""
    sentences = []
    for paragraph in text.split("\n"):
        start = 0
        for match in BOUNDARY.finditer(paragraph):
            if paragraph[match.start()] == ".":
                # The word before the period: after the last space, trailing word characters and dots.
                space = paragraph.rfind(" ", start, match.start())
                before = TRAILING_WORD.search(paragraph[space + 1 : match.start()])
                word = before.group(0).lower() if before else ""
                if word in ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
                    continue
            sentence = paragraph[start : match.end()].strip()
            if HAS_LETTER.search(sentence):
                sentences.append(sentence)
            start = match.end()
        tail = paragraph[start:].strip()
        if HAS_LETTER.search(tail):
            sentences.append(tail)
    return sentences


def _describe(path: Path, documents: int, sentences: int) -> dict[str, Any]:
    return {"name": path.name, "documents": documents, "sentences": sentences, "bytes": path.stat().st_size,
            "sha256": sha256_file(path)}


def _split_file(paths: tuple[Path, Path]) -> dict[str, Any]:
    """Worker task: one articles chunk -> one sentences chunk (same name), renamed into place when complete."""
    source, target = paths
    documents = sentences = 0
    with atomic_path(target) as tmp, open(source, encoding="utf-8") as reader, open(tmp, "w", encoding="utf-8") as out:
        for line_number, line in enumerate(reader, 1):
            try:
                doc = json.loads(line)
                text = doc["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise PrepError(f"{source}:{line_number}: not an article record {{id, title, text}} ({exc})") from exc
            parts = split_sentences(text)
            if parts:
                out.write(json.dumps({"id": doc.get("id", ""), "title": doc.get("title", ""), "sentences": parts},
                                     ensure_ascii=False) + "\n")
                documents += 1
                sentences += len(parts)
    return _describe(target, documents, sentences)


def _count(path: Path) -> dict[str, Any]:
    """Describe a chunk an earlier (interrupted) run finished."""
    documents = sentences = 0
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            documents += 1
            sentences += len(json.loads(line)["sentences"])
    return _describe(path, documents, sentences)


def split_corpus(articles_dir: str | Path, out_dir: str | Path, workers: int = 1) -> dict[str, Any]:
    """Run the stage over every chunk listed in ``articles_dir/manifest.json``; returns this stage's manifest."""
    articles_dir, out_dir = Path(articles_dir), Path(out_dir)
    upstream = require_manifest(articles_dir, "extract")
    params = {"input": str(articles_dir.resolve()), "input_manifest": manifest_digest(upstream)}
    if done := stage_done(out_dir, STAGE, params):
        return done
    begin_stage(out_dir, params, ["wiki_*.jsonl"])
    names = [f["name"] for f in upstream["files"]]
    todo = [(articles_dir / n, out_dir / n) for n in names if not (out_dir / n).exists()]
    described = {}
    for entry in tqdm(ordered_parallel_map(_split_file, todo, workers), total=len(todo), desc="sentences",
                      disable=None):
        described[entry["name"]] = entry
    files = [described.get(name) or _count(out_dir / name) for name in names]
    manifest = {
        "stage": STAGE,
        "params": params,
        "splitter": "regex+abbreviations",
        "stats": {"documents": sum(f["documents"] for f in files), "sentences": sum(f["sentences"] for f in files)},
        "files": files,
    }
    atomic_write_json(out_dir / MANIFEST, manifest)
    return manifest
