"""The real, shortened English Wikipedia dump the demo, the tests and the benchmarks run on: one place finds it.

Looked for, in order: ``$EARLYBERT_WIKI_DUMP``, ``../shared/data/wikipedia/`` beside the checkout, the cache
(``$XDG_CACHE_HOME/earlybert`` or ``~/.cache/earlybert``). On a fresh machine ``sample_dump()`` fetches it once from
PyPI: the same file ships inside the gensim 4.4.0 wheel (``pip download --no-deps``, then one member is unzipped).
``make install`` runs ``python -m data_prep.sample_dump`` so that the tests, which never touch the network, find it
in the cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from data_prep.common import PrepError
from earlybert_pretrain.common.files import sha256_file

SAMPLE_NAME = "enwiki-sample-pages-articles.xml.bz2"
SAMPLE_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
ENV_VAR = "EARLYBERT_WIKI_DUMP"
GENSIM_WHEEL = "gensim==4.4.0"
GENSIM_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
SHARED_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikipedia"
PIP_TIMEOUT_SECONDS = 600


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "earlybert"


def places() -> list[Path]:
    """Where the sample is looked for, in order (the environment variable first, when set)."""
    found = [Path(os.environ[ENV_VAR])] if os.environ.get(ENV_VAR) else []
    return found + [SHARED_DIR / SAMPLE_NAME, cache_dir() / SAMPLE_NAME]


def local_sample_dump() -> Path | None:
    """The sample where it already lies, or None; never touches the network."""
    if os.environ.get(ENV_VAR) and not Path(os.environ[ENV_VAR]).is_file():
        raise PrepError(f"{ENV_VAR}={os.environ[ENV_VAR]}: file not found")
    return next((path for path in places() if path.is_file()), None)


def fetch_sample_dump(cache: Path | None = None) -> Path:
    """Download the gensim 4.4.0 wheel from the package registry and unzip the sample into ``cache``."""
    cache = cache or cache_dir()
    target = cache / SAMPLE_NAME
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as download_dir:
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                   "-d", download_dir, GENSIM_WHEEL]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_SECONDS)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise PrepError(f"cannot fetch the Wikipedia sample: {' '.join(command)} failed ({err})") from None
        wheels = list(Path(download_dir).glob("gensim-*.whl"))
        if done.returncode or not wheels:
            reason = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise PrepError(f"cannot fetch the Wikipedia sample from the {GENSIM_WHEEL} wheel: {reason}")
        partial = Path(download_dir) / SAMPLE_NAME
        with zipfile.ZipFile(wheels[0]) as archive:
            partial.write_bytes(archive.read(GENSIM_MEMBER))
        if sha256_file(partial) != SAMPLE_SHA256:
            raise PrepError(f"{wheels[0].name}: {GENSIM_MEMBER} has sha256 {sha256_file(partial)}, expected "
                            f"{SAMPLE_SHA256}")
        partial.replace(target)
    return target


def sample_dump(fetch: bool = True) -> Path:
    """The sample dump: found locally, else (``fetch``) fetched into the cache; PrepError when it cannot be had."""
    local = local_sample_dump()
    if local is not None:
        return local
    if not fetch:
        raise PrepError(f"{SAMPLE_NAME} not found in {', '.join(str(p.parent) for p in places())}; "
                        f"run `python -m data_prep.sample_dump` (or `make install`) to fetch it from PyPI")
    print(f"fetching the Wikipedia sample from the {GENSIM_WHEEL} wheel on PyPI into {cache_dir()} ...",
          file=sys.stderr, flush=True)
    return fetch_sample_dump()


def main() -> int:
    try:
        print(sample_dump())
    except PrepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
