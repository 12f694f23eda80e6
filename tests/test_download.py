"""`earlybert-prep download`: "latest" resolved from the dump index (offline, on a saved index page), explicit dates
unchanged; and the Wikipedia-sample helper's look-up order and refusals."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from data_prep import sample_dump
from data_prep.cli import build_parser
from data_prep.common import PrepError
from data_prep.download import download, resolve_latest_date

pytest_plugins = ["data_fixtures"]  # wiki_dump: the real sample, for the fetch's success path

INDEX = Path(__file__).parent / "data" / "enwiki-dump-index.html"  # the dump index page, nginx autoindex format


def write_status(root: Path, date: str, articles: str) -> None:
    """A dumpstatus.json as Wikimedia writes it (jobs -> articlesdump -> status)."""
    (root / date).mkdir(parents=True, exist_ok=True)
    jobs = {"articlesdump": {"status": articles, "updated": "2025-11-08 16:55:01", "files": {}},
            "metacurrentdump": {"status": "done"}}
    (root / date / "dumpstatus.json").write_text(json.dumps({"jobs": jobs, "version": "0.8"}))


def test_latest_is_the_newest_date_whose_articles_job_is_done(tmp_path: Path) -> None:
    write_status(tmp_path, "20251101", "in-progress")  # newest listed, pages-articles not written yet
    write_status(tmp_path, "20251020", "done")
    write_status(tmp_path, "20251001", "done")
    template = tmp_path.as_uri() + "/{date}/dumpstatus.json"
    assert resolve_latest_date(INDEX.as_uri(), template) == "20251020"
    write_status(tmp_path, "20251101", "done")
    assert resolve_latest_date(INDEX.as_uri(), template) == "20251101"


def test_latest_without_a_finished_dump_or_dates_is_refused(tmp_path: Path) -> None:
    template = tmp_path.as_uri() + "/{date}/dumpstatus.json"  # no status pages at all
    with pytest.raises(PrepError, match=r"none of the 5 listed dumps \(20250901..20251101\) has a finished"):
        resolve_latest_date(INDEX.as_uri(), template)
    empty = tmp_path / "empty.html"
    empty.write_text("<html><pre><a href=\"../\">../</a></pre></html>")
    with pytest.raises(PrepError, match="no dump dates"):
        resolve_latest_date(empty.as_uri(), template)


def fake_dumps(root: Path, dates: list[str]) -> tuple[str, str]:
    """Per-date dump files and sha1sums lists under ``root``; returns the dump and checksum URL templates."""
    for date in dates:
        folder = root / "dumps" / date
        folder.mkdir(parents=True)
        name = f"enwiki-{date}-pages-articles.xml.bz2"
        content = f"dump of {date}".encode()
        (folder / name).write_bytes(content)
        (folder / f"enwiki-{date}-sha1sums.txt").write_text(f"{hashlib.sha1(content).hexdigest()}  {name}\n")
    base = (root / "dumps").as_uri()
    return base + "/{date}/enwiki-{date}-pages-articles.xml.bz2", base + "/{date}/enwiki-{date}-sha1sums.txt"


def test_download_defaults_to_latest_and_keeps_explicit_dates(tmp_path: Path) -> None:
    write_status(tmp_path / "status", "20251101", "in-progress")
    write_status(tmp_path / "status", "20251020", "done")
    dumps, sums = fake_dumps(tmp_path, ["20251001", "20251020"])
    where = {"url_template": dumps, "checksum_template": sums, "index_url": INDEX.as_uri(),
             "status_template": (tmp_path / "status").as_uri() + "/{date}/dumpstatus.json"}
    latest = download(tmp_path / "a", **where)
    assert latest.name == "enwiki-20251020-pages-articles.xml.bz2" and latest.read_bytes() == b"dump of 20251020"
    dated = download(tmp_path / "b", date="20251001", **where)
    assert dated.read_bytes() == b"dump of 20251001"
    with pytest.raises(PrepError, match=r"--date '2025-10-01', expected YYYYMMDD or 'latest'"):
        download(tmp_path / "c", date="2025-10-01", **where)
    assert build_parser().parse_args(["download", "--output", "x"]).date == "latest"


# ---------------------------------------------------------------- the Wikipedia sample


def isolate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No env var, no ../shared, an empty cache under ``tmp_path``; returns the cache folder."""
    monkeypatch.delenv(sample_dump.ENV_VAR, raising=False)
    monkeypatch.setattr(sample_dump, "SHARED_DIR", tmp_path / "no-shared")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "earlybert"


def test_sample_is_found_in_env_then_shared_then_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cache = isolate(monkeypatch, tmp_path)
    assert sample_dump.local_sample_dump() is None
    with pytest.raises(PrepError, match=r"not found in .*no-shared, .*cache/earlybert; run `python -m data_prep"):
        sample_dump.sample_dump(fetch=False)
    cache.mkdir(parents=True)
    (cache / sample_dump.SAMPLE_NAME).write_bytes(b"cached")
    assert sample_dump.sample_dump(fetch=False) == cache / sample_dump.SAMPLE_NAME
    shared = tmp_path / "no-shared"
    shared.mkdir()
    (shared / sample_dump.SAMPLE_NAME).write_bytes(b"shared")
    assert sample_dump.sample_dump(fetch=False) == shared / sample_dump.SAMPLE_NAME
    chosen = tmp_path / "mine.xml.bz2"
    chosen.write_bytes(b"mine")
    monkeypatch.setenv(sample_dump.ENV_VAR, str(chosen))
    assert sample_dump.sample_dump(fetch=False) == chosen
    monkeypatch.setenv(sample_dump.ENV_VAR, str(tmp_path / "missing.bz2"))
    with pytest.raises(PrepError, match=r"EARLYBERT_WIKI_DUMP=.*missing.bz2: file not found"):
        sample_dump.sample_dump()


def test_fetch_unzips_the_member_and_refuses_a_wrong_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                         wiki_dump: Path) -> None:
    """pip is replaced by a fake that writes a wheel holding ``member``; a wrong member is refused by its checksum."""
    cache = isolate(monkeypatch, tmp_path)
    calls, member = [], {"content": b"not the sample"}

    def fake_pip(command, **kwargs):
        calls.append(command)
        with zipfile.ZipFile(Path(command[command.index("-d") + 1]) / "gensim-4.4.0-cp311.whl", "w") as wheel:
            wheel.writestr(sample_dump.GENSIM_MEMBER, member["content"])
        return type("Done", (), {"returncode": 0, "stderr": ""})()

    monkeypatch.setattr(sample_dump.subprocess, "run", fake_pip)
    with pytest.raises(PrepError, match=r"has sha256 [0-9a-f]{64}, expected a53f4648"):
        sample_dump.sample_dump()
    assert calls[0][-1] == "gensim==4.4.0" and "--no-deps" in calls[0]
    assert list(cache.iterdir()) == []  # nothing half-written
    member["content"] = wiki_dump.read_bytes()
    assert sample_dump.sample_dump() == cache / sample_dump.SAMPLE_NAME
    assert (cache / sample_dump.SAMPLE_NAME).read_bytes() == wiki_dump.read_bytes()
    assert sorted(p.name for p in cache.iterdir()) == [sample_dump.SAMPLE_NAME]
