"""Articles from a `datasets` source instead of a dump: a local parquet/jsonl/json/csv of ``{title, text}`` rows,
or a hub name (``wikimedia/wikipedia`` with ``--dataset-config 20231101.en``) where the network allows.

Writes the same chunks and manifest as `extract` (stage "extract"), so every later stage is unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_prep.common import MANIFEST, PrepError, begin_stage, stage_done
from data_prep.extract import chunk_name, count_lines, write_jsonl
from earlybert_pretrain.common.files import atomic_write_json, sha256_file

LOCAL_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def _load(source: str, config: str | None, split: str) -> Any:
    import datasets  # heavy import, only for this source

    path = Path(source)
    try:
        if path.suffix in LOCAL_FORMATS:
            if not path.is_file():
                raise PrepError(f"{path}: dataset file not found")
            return datasets.load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")
        return datasets.load_dataset(source, config, split=split)
    except PrepError:
        raise
    except Exception as exc:  # datasets raises many types (offline mode, missing config, bad file)
        raise PrepError(f"{source}: cannot load as a datasets source ({type(exc).__name__}: {exc})") from exc


def articles_from_dataset(
    source: str, out_dir: str | Path, config: str | None = None, split: str = "train", docs_per_chunk: int = 2_000
) -> dict[str, Any]:
    """Write ``{id, title, text}`` chunks from a datasets source; returns the (extract-stage) manifest."""
    out_dir = Path(out_dir)
    local = Path(source)
    params = {"dataset": source, "config": config, "split": split, "docs_per_chunk": docs_per_chunk,
              "sha256": sha256_file(local) if local.is_file() else None}
    if done := stage_done(out_dir, "extract", params):
        return done
    dataset = _load(source, config, split)
    missing = {"text"} - set(dataset.column_names)
    if missing:
        raise PrepError(f"{source}: needs a 'text' column (has {', '.join(dataset.column_names)})")
    begin_stage(out_dir, params, ["wiki_*.jsonl"])
    n_chunks = (len(dataset) + docs_per_chunk - 1) // docs_per_chunk
    for chunk in tqdm(range(n_chunks), desc="dataset", unit=" chunks", disable=None):
        if (out_dir / chunk_name(0, chunk)).exists():
            continue
        rows = dataset[chunk * docs_per_chunk : (chunk + 1) * docs_per_chunk]
        ids = rows.get("id") or [str(chunk * docs_per_chunk + i) for i in range(len(rows["text"]))]
        titles = rows.get("title") or [""] * len(rows["text"])
        docs = [{"id": str(i), "title": t or "", "text": x.strip()} for i, t, x in zip(ids, titles, rows["text"])
                if x and x.strip()]
        write_jsonl(out_dir / chunk_name(0, chunk), docs)
    paths = [out_dir / chunk_name(0, chunk) for chunk in range(n_chunks)]
    files = [{"name": p.name, "documents": count_lines(p), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in paths]
    documents = sum(f["documents"] for f in files)
    if documents == 0:
        raise PrepError(f"{source}: no rows with text")
    manifest = {"stage": "extract", "params": params, "stats": {"articles": len(dataset), "documents": documents},
                "files": files}
    atomic_write_json(out_dir / MANIFEST, manifest)
    return manifest
