"""Fine-tuning on GLUE and SQuAD v1.1 with EarlyBERT tickets, baselines and the paper's time protocol (Sec. 4.1-4.2).

Run it with ``earlybert-finetune`` (``cli.py``); ``trainer.run(FinetuneConfig)`` is the same thing from Python.
"""
