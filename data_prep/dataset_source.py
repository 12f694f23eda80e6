"""Articles from a `datasets` source instead of a dump: a local parquet/jsonl/json/csv of ``{title, text}`` rows,
or a hub name (``wikimedia/wikipedia`` with ``--dataset-config 20231101.en``) where the network allows.

Writes the same chunks and manifest as `extract` (stage "extract"), so every later stage is unchanged.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_prep.common import MANIFEST, PrepError, begin_stage, stage_done
from data_prep.extract import chunk_name, count_lines, write_jsonl
from earlybert_pretrain.common.files import atomic_write_json, sha256_file

DATASETS_FORMATS = {".parquet": "parquet", ".json": "json", ".csv": "csv"}  # read by `datasets`
OUTPUTS = ["wiki_*.jsonl"]
ROW_BATCH = 1000


def _load(source: str, config: str | None, split: str) -> Any:
    import datasets  # heavy import, only for this source

    datasets.disable_progress_bars()  # stderr carries one line per error, not progress bars and logged tracebacks
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    path = Path(source)
    try:
        if path.suffix in DATASETS_FORMATS:
            return datasets.load_dataset(DATASETS_FORMATS[path.suffix], data_files=str(path), split="train")
        return datasets.load_dataset(source, config, split=split)
    except Exception as exc:  # datasets raises many types (offline mode, missing config, bad file)
        raise PrepError(f"{source}: cannot load as a datasets source ({type(exc).__name__}: {exc})") from exc


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """(``file:line``, row) of a JSON-lines file, read line by line (our reader: errors name the line)."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            where = f"{path}:{number}"
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise PrepError(f"{where}: not UTF-8 (byte {exc.start}: {exc.reason})") from None
            except json.JSONDecodeError as exc:
                raise PrepError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno})") from None
            if not isinstance(row, dict):
                raise PrepError(f"{where}: expected a JSON object with a 'text' field, got {type(row).__name__}")
            yield where, row


def _dataset_rows(source: str, config: str | None, split: str) -> Iterator[tuple[str, dict]]:
    dataset = _load(source, config, split)
    if "text" not in dataset.column_names:
        raise PrepError(f"{source}: needs a 'text' column (has {', '.join(dataset.column_names)})")
    for start in range(0, len(dataset), ROW_BATCH):
        batch = dataset[start : start + ROW_BATCH]
        for offset, values in enumerate(zip(*batch.values())):
            yield f"{source}: row {start + offset}", dict(zip(batch, values))


def _articles(rows: Iterator[tuple[str, dict]]) -> Iterator[dict[str, str] | None]:
    """Each row as ``{id, title, text}``, None for a row without text; a ``text`` or ``title`` that is not a string
    raises PrepError naming the row."""
    for index, (where, row) in enumerate(rows):
        if "text" not in row:
            raise PrepError(f"{where}: no 'text' field (has {', '.join(map(str, row)) or 'none'})")
        for field in ("text", "title"):
            if row.get(field) is not None and not isinstance(row[field], str):
                raise PrepError(f"{where}: '{field}' must be a string, got {type(row[field]).__name__}")
        text = (row["text"] or "").strip()
        row_id = row.get("id")
        yield {"id": str(index if row_id is None else row_id), "title": row.get("title") or "", "text": text} \
            if text else None


def _write_chunks(articles: Iterator[dict[str, str] | None], out_dir: Path, docs_per_chunk: int) -> tuple[int, int]:
    """Write every ``docs_per_chunk`` rows as one chunk (kept when a resumed run finds it); (chunks, rows)."""
    chunks = rows = 0
    pending: list[dict[str, str] | None] = []
    for article in tqdm(articles, desc="dataset", unit=" rows", disable=None):
        pending.append(article)
        rows += 1
        if len(pending) == docs_per_chunk:
            _write_chunk(out_dir / chunk_name(0, chunks), pending)
            chunks, pending = chunks + 1, []
    if pending:
        _write_chunk(out_dir / chunk_name(0, chunks), pending)
        chunks += 1
    return chunks, rows


def _write_chunk(path: Path, articles: list[dict[str, str] | None]) -> None:
    if not path.exists():
        write_jsonl(path, [article for article in articles if article is not None])


def _discard_outputs(out_dir: Path) -> None:
    """A bad row ends the stage: its chunks are of no use to a rerun (a fixed input has another sha256)."""
    for pattern in [*OUTPUTS, "params.json"]:
        for path in out_dir.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def articles_from_dataset(
    source: str, out_dir: str | Path, config: str | None = None, split: str = "train", docs_per_chunk: int = 2_000
) -> dict[str, Any]:
    """Write ``{id, title, text}`` chunks from a datasets source; returns the (extract-stage) manifest.

    A local ``.jsonl`` is read here, line by line; parquet, csv, ``.json`` and hub names go through `datasets`.
    """
    out_dir = Path(out_dir)
    local = Path(source)
    if docs_per_chunk < 1:
        raise PrepError(f"--docs-per-chunk must be >= 1 (got {docs_per_chunk})")
    if local.suffix in (".jsonl", *DATASETS_FORMATS) and not local.is_file():
        raise PrepError(f"{local}: dataset file not found")
    params = {"dataset": source, "config": config, "split": split, "docs_per_chunk": docs_per_chunk,
              "sha256": sha256_file(local) if local.is_file() else None}
    if done := stage_done(out_dir, "extract", params):
        return done
    rows = _jsonl_rows(local) if local.suffix == ".jsonl" else _dataset_rows(source, config, split)
    begin_stage(out_dir, params, OUTPUTS)
    try:
        n_chunks, n_rows = _write_chunks(_articles(rows), out_dir, docs_per_chunk)
    except PrepError:
        _discard_outputs(out_dir)
        raise
    paths = [out_dir / chunk_name(0, chunk) for chunk in range(n_chunks)]
    files = [{"name": p.name, "documents": count_lines(p), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in paths]
    documents = sum(f["documents"] for f in files)
    if documents == 0:
        _discard_outputs(out_dir)
        raise PrepError(f"{source}: no rows with text")
    manifest = {"stage": "extract", "params": params, "stats": {"articles": n_rows, "documents": documents},
                "files": files}
    atomic_write_json(out_dir / MANIFEST, manifest)
    return manifest
