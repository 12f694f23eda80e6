"""The special tokens of BERT's WordPiece vocab and the label that losses ignore, defined once.

``data_prep`` writes the specials first, in this order (so [PAD] is id 0, BERT's ``pad_token_id``); the batch builder,
the model and the tests look them up by name.
"""

from __future__ import annotations

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
IGNORE_INDEX = -100  # the label of positions without an MLM target (torch's cross_entropy default ignore_index)
