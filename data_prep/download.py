"""`download`: fetch a pages-articles dump, resuming a partial file with HTTP Range, verified against the dump's
published checksum list (``<hex digest>  <file name>`` lines; md5, sha1 or sha256 told apart by length).

``http(s)://`` and ``file://`` URLs are fetched into ``out_dir`` (``file://`` honours the same resume logic, which
is what the tests exercise); a plain local path is used where it lies, verified when a checksum list is given.

Wikimedia keeps only the most recent dumps online, so a dated URL goes stale within months: ``date="latest"`` (the
default) resolves to the newest date in the dump index whose pages-articles job is done (its ``dumpstatus.json``).
"""

from __future__ import annotations

import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from data_prep.common import MANIFEST, PrepError, stage_done
from earlybert_pretrain.common.files import atomic_write_json, file_digest

STAGE = "download"
DUMP_URL_TEMPLATE = "https://dumps.wikimedia.org/enwiki/{date}/enwiki-{date}-pages-articles.xml.bz2"
CHECKSUM_URL_TEMPLATE = "https://dumps.wikimedia.org/enwiki/{date}/enwiki-{date}-sha1sums.txt"
DUMP_INDEX_URL = "https://dumps.wikimedia.org/enwiki/"
STATUS_URL_TEMPLATE = "https://dumps.wikimedia.org/enwiki/{date}/dumpstatus.json"
LATEST = "latest"
ARTICLES_JOB = "articlesdump"  # the job that writes pages-articles.xml.bz2
DATE_LINK = re.compile(r'href="(\d{8})/"')
HASH_BY_LENGTH = {32: "md5", 40: "sha1", 64: "sha256"}
BLOCK = 1 << 20


def _read_url(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.read()
    except (urllib.error.URLError, OSError) as exc:
        raise PrepError(f"{url}: cannot read ({exc})") from exc


def expected_digest(checksums: str, file_name: str) -> tuple[str, str]:
    """(algorithm, hex digest) of ``file_name`` in a checksum list given as a URL or a local path."""
    is_url = "://" in checksums
    text = (_read_url(checksums) if is_url else Path(checksums).read_bytes()).decode("utf-8", "replace")
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == file_name and len(parts[0]) in HASH_BY_LENGTH:
            return HASH_BY_LENGTH[len(parts[0])], parts[0].lower()
    raise PrepError(f"{checksums}: no checksum listed for {file_name}")


def _articles_done(status_url: str) -> bool:
    """Whether the dump's status page says its pages-articles job finished; a missing page means not (yet)."""
    try:
        status = json.loads(_read_url(status_url))
    except (PrepError, ValueError):
        return False
    return status.get("jobs", {}).get(ARTICLES_JOB, {}).get("status") == "done"


def resolve_latest_date(index_url: str = DUMP_INDEX_URL, status_template: str = STATUS_URL_TEMPLATE) -> str:
    """The newest dump date listed in the index page whose pages-articles file is complete."""
    dates = sorted(set(DATE_LINK.findall(_read_url(index_url).decode("utf-8", "replace"))), reverse=True)
    if not dates:
        raise PrepError(f"{index_url}: no dump dates (YYYYMMDD/ links) in the dump index")
    for date in dates:
        if _articles_done(status_template.format(date=date)):
            return date
    raise PrepError(f"{index_url}: none of the {len(dates)} listed dumps ({dates[-1]}..{dates[0]}) has a finished "
                    f"{ARTICLES_JOB} job")


def _open_from(url: str, offset: int) -> tuple[IO[bytes], int, int | None]:
    """Open ``url`` at byte ``offset``; returns (stream, offset actually granted, total size if known)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        path = Path(urllib.request.url2pathname(parsed.path))
        if not path.is_file():
            raise PrepError(f"{url}: file not found")
        handle = open(path, "rb")
        handle.seek(offset)
        return handle, offset, path.stat().st_size
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as exc:
        if exc.code == 416:  # the partial file already holds every byte
            return open(os.devnull, "rb"), offset, offset
        raise PrepError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise PrepError(f"{url}: cannot download ({exc})") from exc
    length = response.headers.get("Content-Length")
    if response.status == 206:
        total = response.headers.get("Content-Range", "").rpartition("/")[2]
        return response, offset, int(total) if total.isdigit() else None
    # 200: the server ignored the Range header, so the transfer restarts from byte 0.
    return response, 0, int(length) if length else None


def fetch(url: str, target: Path) -> Path:
    """Download ``url`` to ``target`` through ``target.part``, resuming the part file if one exists."""
    part = target.with_name(target.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    stream, granted, total = _open_from(url, offset)
    with stream, open(part, "ab" if granted else "wb") as out:
        progress = tqdm(total=total, initial=granted, unit="B", unit_scale=True, desc="download", disable=None)
        while block := stream.read(BLOCK):
            out.write(block)
            progress.update(len(block))
        progress.close()
    if total is not None and part.stat().st_size != total:
        raise PrepError(f"{url}: transfer stopped at {part.stat().st_size} of {total} bytes; rerun to resume")
    os.replace(part, target)
    return target


def download(
    out_dir: str | Path,
    url: str | None = None,
    date: str | None = None,
    checksums: str | None = None,
    url_template: str = DUMP_URL_TEMPLATE,
    checksum_template: str = CHECKSUM_URL_TEMPLATE,
    index_url: str = DUMP_INDEX_URL,
    status_template: str = STATUS_URL_TEMPLATE,
) -> Path:
    """Fetch and verify the dump; returns its local path. Give ``url`` (or a local path) or a dump ``date``
    (YYYYMMDD, or "latest" / None: the newest complete dump in ``index_url``)."""
    out_dir = Path(out_dir)
    if url is None:
        if date in (None, LATEST):
            date = resolve_latest_date(index_url, status_template)
            print(f"download: latest complete dump is {date}", file=sys.stderr)
        elif not re.fullmatch(r"\d{8}", date):
            raise PrepError(f"download: --date {date!r}, expected YYYYMMDD or {LATEST!r}")
        url = url_template.format(date=date)
        checksums = checksums or checksum_template.format(date=date)
    params: dict[str, Any] = {"url": url, "checksums": checksums}
    if "://" not in url:
        # A local path: used in place, never copied (a full dump is ~22 GB).
        local = Path(url)
        if not local.is_file():
            raise PrepError(f"{local}: dump file not found")
        if checksums:
            _verify(local, checksums)
        return local
    target = out_dir / Path(urllib.parse.urlparse(url).path).name
    if (done := stage_done(out_dir, STAGE, params)) and target.exists():
        return out_dir / done["files"][0]["name"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    if not target.exists():
        fetch(url, target)
    verified = _verify(target, checksums, downloaded=True) if checksums else None
    atomic_write_json(out_dir / MANIFEST, {
        "stage": STAGE, "params": params,
        "files": [{"name": target.name, "bytes": target.stat().st_size, "checksum": verified}],
    })
    return target


def _verify(path: Path, checksums: str, downloaded: bool = False) -> dict[str, str]:
    algorithm, expected = expected_digest(checksums, path.name)
    actual = file_digest(path, algorithm)
    if actual != expected:
        note = ""
        if downloaded:
            # A corrupt download must not be resumed from or mistaken for a good one next time.
            path.replace(path.with_name(path.name + ".corrupt"))
            note = f" (moved to {path.name}.corrupt)"
        raise PrepError(f"{path}: {algorithm} {actual} does not match {expected} listed in {checksums}{note}")
    return {"algorithm": algorithm, "digest": actual}
