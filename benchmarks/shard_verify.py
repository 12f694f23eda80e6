"""Cost of the loader's shard check per mode (data.verify): CPU-seconds to verify one synthetic shard of SIZE_MB,
as a ratio to a full sha256 of the same bytes. Run: .venv/bin/python benchmarks/shard_verify.py [SIZE_MB]"""

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from data_prep import indexed


def main(size_mb: int = 256) -> None:
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        tokens = np.random.default_rng(0).integers(0, 30_000, size=size_mb << 19, dtype="<u2")
        tokens.tofile(folder / "s.bin")
        sentences = len(tokens) // 64
        indexed.write_index(folder / "s.idx", tokens.dtype, np.full(sentences, 64), np.array([0, sentences]))
        entry = indexed.describe_shard(folder / "s.bin", folder / "s.idx")
        seconds = {}
        for mode in ("full", "sample", "sizes"):
            indexed._verified.clear()  # measure the first (only) check of the process
            start = time.process_time()
            indexed.verify_shard(folder, entry, mode)
            seconds[mode] = time.process_time() - start
        for mode, value in seconds.items():
            print(f"{mode:6s} {value * 1e3:8.1f} CPU-ms  ratio to full {value / seconds['full']:.4f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 256)
