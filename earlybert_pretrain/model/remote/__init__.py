"""Modeling code shipped inside a "compact" export (``model/export.py`` copies these files into the folder).

They depend on torch and transformers only, so ``AutoModel.from_pretrained(folder, trust_remote_code=True)`` loads
the pruned model without this package; nothing in the package imports them (transformers is not a model/ import).
"""
