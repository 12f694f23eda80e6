"""`extract`: stream a pages-articles dump (``.xml.bz2`` or ``.xml``) into JSONL chunks of ``{id, title, text}``.

The dump is decompressed and parsed as a stream (``bz2`` + ``iterparse``), never written out whole. The parent
process parses XML and keeps namespace-0 pages that are not redirects; workers turn wikitext into plain text.
Chunk ``wiki_FFF_KKKKK.jsonl`` holds the kept pages ``[k * docs_per_chunk, (k + 1) * docs_per_chunk)`` of input file
``f`` in dump order, so a rerun knows which chunks exist (renamed into place when complete) and skips their pages'
cleaning. Several dump files (the split ``pages-articlesN.xml-p...`` set) are processed one file per worker.
"""

from __future__ import annotations

import bz2
import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_prep.common import MANIFEST, PrepError, begin_stage, ordered_parallel_map, stage_done
from data_prep.wikitext import wikitext_to_text
from earlybert_pretrain.common.files import atomic_path, atomic_write_json, sha256_file

STAGE = "extract"
PAGES_PER_TASK = 32
PAGE_COUNTS = ("pages", "redirects", "other_namespaces")  # what iter_pages counts


def chunk_name(file_index: int, index: int) -> str:
    return f"wiki_{file_index:03d}_{index:05d}.jsonl"


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def iter_pages(dump: Path, stats: dict[str, int]) -> Iterator[tuple[str, str, str]]:
    """Yield ``(id, title, wikitext)`` of namespace-0, non-redirect pages; count the rest into ``stats``."""
    opener = bz2.open if dump.name.endswith(".bz2") else open
    root = None
    try:
        with opener(dump, "rb") as stream:
            for event, elem in ET.iterparse(stream, events=("start", "end")):
                if root is None:
                    root = elem
                    if _local(elem.tag) != "mediawiki":
                        raise PrepError(f"{dump}: not a MediaWiki dump (root element <{_local(elem.tag)}>)")
                    continue
                if event != "end" or _local(elem.tag) != "page":
                    continue
                stats["pages"] += 1
                fields = {_local(child.tag): child for child in elem}
                namespace = fields["ns"].text if "ns" in fields else "0"
                if "redirect" in fields:
                    stats["redirects"] += 1
                elif namespace != "0":
                    stats["other_namespaces"] += 1
                else:
                    revision = fields.get("revision")
                    text_elem = None if revision is None else revision.find("{*}text")
                    yield (
                        (fields["id"].text or "").strip() if "id" in fields else "",
                        (fields["title"].text or "").strip() if "title" in fields else "",
                        (text_elem.text or "") if text_elem is not None else "",
                    )
                # Finished pages are dropped from the tree so memory stays flat over a 90 GB dump.
                root.clear()
    except ET.ParseError as exc:
        raise PrepError(f"{dump}: not a well-formed MediaWiki XML dump ({exc})") from exc
    except (EOFError, OSError) as exc:
        raise PrepError(f"{dump}: truncated or corrupt compressed dump ({exc})") from exc
    if root is None:
        raise PrepError(f"{dump}: empty file, not a MediaWiki dump")


def check_dump(dump: Path) -> None:
    """Read ``dump`` as ``iter_pages`` does up to its first article: a file that is not a (bz2) MediaWiki dump, or
    is cut short before one, fails here with ``iter_pages``' error, before the output folder is touched."""
    next(iter_pages(dump, dict.fromkeys(PAGE_COUNTS, 0)), None)


def clean_pages(pages: list[tuple[str, str, str]]) -> list[dict[str, str]]:
    """Worker task: wikitext -> plain text for a batch of pages (empty articles are dropped)."""
    docs = []
    for page_id, title, wikitext in pages:
        text = wikitext_to_text(wikitext)
        if text:
            docs.append({"id": page_id, "title": title, "text": text})
    return docs


def write_jsonl(path: Path, docs: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for doc in docs:
            handle.write(json.dumps(doc, ensure_ascii=False) + "\n")


def count_lines(path: Path) -> int:
    with open(path, "rb") as handle:
        return sum(1 for _ in handle)


def _tasks(
    pages: Iterator[tuple[str, str, str]], docs_per_chunk: int, done_chunks: set[int]
) -> Iterator[tuple[int, list[tuple[str, str, str]]]]:
    """Group pages into (chunk, batch) tasks, never mixing two chunks in one task; skip pages of done chunks."""
    batch: list[tuple[str, str, str]] = []
    chunk = 0
    for kept, page in enumerate(pages):
        page_chunk = kept // docs_per_chunk
        if page_chunk != chunk or len(batch) >= PAGES_PER_TASK:
            if batch:
                yield chunk, batch
            batch, chunk = [], page_chunk
        if page_chunk not in done_chunks:
            batch.append(page)
    if batch:
        yield chunk, batch


def _clean_task(task: tuple[int, list[tuple[str, str, str]]]) -> tuple[int, int, list[dict[str, str]]]:
    chunk, pages = task
    return chunk, len(pages), clean_pages(pages)


def _extract_stream(
    file_index: int, dump: Path, out_dir: Path, docs_per_chunk: int, workers: int
) -> tuple[dict[str, int], list[str]]:
    """Extract one dump file into its chunks; returns (page counts, chunk names in order)."""
    done_chunks = {int(p.stem.rsplit("_", 1)[1]) for p in out_dir.glob(f"wiki_{file_index:03d}_*.jsonl")}
    stats = dict.fromkeys(PAGE_COUNTS, 0)
    buffers: dict[int, list[dict[str, str]]] = {}
    progress = tqdm(desc=f"extract {dump.name}", unit=" pages", disable=None)
    tasks = _tasks(iter_pages(dump, stats), docs_per_chunk, done_chunks)
    last_chunk = -1
    for chunk, n_pages, docs in ordered_parallel_map(_clean_task, tasks, workers):
        # Results arrive in dump order, so reaching chunk k+1 means chunk k is complete.
        if chunk != last_chunk and last_chunk in buffers:
            write_jsonl(out_dir / chunk_name(file_index, last_chunk), buffers.pop(last_chunk))
        last_chunk = chunk
        if chunk not in done_chunks:
            buffers.setdefault(chunk, []).extend(docs)
        progress.update(n_pages)
    for chunk, docs in buffers.items():
        write_jsonl(out_dir / chunk_name(file_index, chunk), docs)
    progress.close()
    kept = stats["pages"] - stats["redirects"] - stats["other_namespaces"]
    return stats, [chunk_name(file_index, c) for c in range((kept + docs_per_chunk - 1) // docs_per_chunk)]


def _extract_file_task(task: tuple[int, Path, Path, int]) -> tuple[dict[str, int], list[str]]:
    file_index, dump, out_dir, docs_per_chunk = task
    return _extract_stream(file_index, dump, out_dir, docs_per_chunk, workers=1)


def extract(
    dumps: str | Path | list[str | Path], out_dir: str | Path, workers: int = 1, docs_per_chunk: int = 2_000
) -> dict[str, Any]:
    """Run the stage; returns its manifest. Skips the work when ``out_dir`` already holds a matching manifest.

    One dump file: this process parses, ``workers`` processes clean. Several files (the split
    ``pages-articlesN.xml-p...bz2`` set): each worker parses and cleans whole files, so parsing scales too.
    """
    paths = [Path(d) for d in (dumps if isinstance(dumps, list) else [dumps])]
    out_dir = Path(out_dir)
    if docs_per_chunk < 1:
        raise PrepError(f"--docs-per-chunk must be >= 1 (got {docs_per_chunk})")
    for dump in paths:
        if not dump.is_file():
            raise PrepError(f"{dump}: dump file not found")
    params = {"inputs": [[str(d.resolve()), d.stat().st_size] for d in paths], "docs_per_chunk": docs_per_chunk}
    if done := stage_done(out_dir, STAGE, params):
        return done
    for dump in paths:
        check_dump(dump)
    begin_stage(out_dir, params, ["wiki_*.jsonl"])
    if len(paths) == 1 or workers <= 1:
        results = [_extract_stream(i, dump, out_dir, docs_per_chunk, workers) for i, dump in enumerate(paths)]
    else:
        tasks = [(i, dump, out_dir, docs_per_chunk) for i, dump in enumerate(paths)]
        results = list(ordered_parallel_map(_extract_file_task, tasks, workers))
    stats = {key: sum(r[0][key] for r in results) for key in PAGE_COUNTS}
    kept = stats["pages"] - stats["redirects"] - stats["other_namespaces"]
    where = paths[0] if len(paths) == 1 else f"{len(paths)} dump files ({paths[0]}, ...)"
    if kept == 0:
        raise PrepError(f"{where}: no articles (namespace-0 pages that are not redirects) in the dump")
    files = []
    for name in (name for _, names in results for name in names):
        path = out_dir / name
        files.append({"name": name, "documents": count_lines(path), "bytes": path.stat().st_size,
                      "sha256": sha256_file(path)})
    if sum(f["documents"] for f in files) == 0:
        raise PrepError(f"{where}: no article has any text left after removing markup")
    manifest = {
        "stage": STAGE,
        "params": params,
        "stats": {**stats, "articles": kept, "documents": sum(f["documents"] for f in files)},
        "files": files,
    }
    atomic_write_json(out_dir / MANIFEST, manifest)
    return manifest
