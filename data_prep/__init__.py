"""Wikipedia dump -> clean articles -> sentences -> WordPiece vocab -> memory-mappable token shards.

Each stage is a module with one entry function and writes a ``manifest.json`` last, so a stage whose manifest
matches its parameters is skipped (idempotent) and a stage without one resumes from the files it already renamed
into place (resumable). ``earlybert-prep`` (``data_prep.cli``) chains them.
"""

from data_prep.common import PrepError

__all__ = ["PrepError"]
