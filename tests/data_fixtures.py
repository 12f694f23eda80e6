"""The real-dump pipeline run once per test session, shared by tests/test_data_prep.py and tests/test_data.py.

Test modules load it with ``pytest_plugins = ["data_fixtures"]``, so the session fixture exists once and the
pipeline runs once per session.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from data_prep.common import PrepError
from data_prep.sample_dump import sample_dump

TEST_VOCAB_SIZE = 3000
TEST_SHARDS = 4
TEST_DOCS_PER_CHUNK = 20
TEST_VALIDATION_FRACTION = 0.05


@dataclass
class WikiBuild:
    dump: Path
    root: Path
    vocab_size: int = TEST_VOCAB_SIZE
    num_shards: int = TEST_SHARDS
    docs_per_chunk: int = TEST_DOCS_PER_CHUNK
    validation_fraction: float = TEST_VALIDATION_FRACTION

    @property
    def articles(self) -> Path:
        return self.root / "articles"

    @property
    def sentences(self) -> Path:
        return self.root / "sentences"

    @property
    def vocab(self) -> Path:
        return self.root / "vocab"

    @property
    def shards(self) -> Path:
        return self.root / "shards"


@pytest.fixture(scope="session")
def wiki_dump() -> Path:
    """The real dump where the demo finds it (``make install`` fetches it into the cache); tests never fetch."""
    try:
        return sample_dump(fetch=False)
    except PrepError as err:
        pytest.skip(f"real Wikipedia dump unavailable: {err}")


@pytest.fixture(scope="session")
def wiki_build(wiki_dump: Path, tmp_path_factory: pytest.TempPathFactory) -> WikiBuild:
    """extract -> sentences -> vocab -> shards on the real dump, through the CLI, with 2 workers."""
    from data_prep.cli import main

    root = tmp_path_factory.mktemp("wiki")
    code = main(["all", "--input", str(wiki_dump), "--output", str(root), "--workers", "2",
                 "--vocab-size", str(TEST_VOCAB_SIZE), "--num-shards", str(TEST_SHARDS),
                 "--validation-fraction", str(TEST_VALIDATION_FRACTION), "--docs-per-chunk", str(TEST_DOCS_PER_CHUNK)])
    assert code == 0
    return WikiBuild(wiki_dump, root)
