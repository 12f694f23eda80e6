"""EarlyBERT pre-training system: slimming search, ticket drawing and efficient training of pruned BERT."""

__version__ = "0.1.0"
