"""Exports that stock transformers loads, on the real MiniLM checkpoint pruned by an uneven ticket: the padded folder in
plain transformers classes, the compact one through ``trust_remote_code`` in a fresh interpreter that cannot import
this package; both give our pruned model's outputs on real, padded sentences."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from minilm import MINILM, needs_minilm

from earlybert_pretrain.finetune.models import BertForQuestionAnswering, BertForSequenceClassification
from earlybert_pretrain.model.bert import BertConfig, BertForPreTraining, BertModel
from earlybert_pretrain.model.export import REMOTE_FILES, apply_ticket, export_model
from earlybert_pretrain.model.hf import load_pretrained, read_config, save_pretrained
from earlybert_pretrain.tickets.cli import main as ticket_main
from earlybert_pretrain.tickets.prune import prune
from earlybert_pretrain.tickets.ticket import Ticket, geometry_of

pytestmark = needs_minilm
SENTENCES = [
    "The lottery ticket hypothesis says that dense networks contain sparse subnetworks.",
    "Anarchism is a political philosophy that is skeptical of authority.",
    "Paris is the capital of France.",
]
TOLERANCE = 1e-5
OURS = {"BertModel": BertModel, "BertForPreTraining": BertForPreTraining,
        "BertForSequenceClassification": lambda config: BertForSequenceClassification(config, num_labels=3),
        "BertForQuestionAnswering": BertForQuestionAnswering}


def uneven_ticket(seed: int = 0) -> Ticket:
    """Random kept heads and neurons with a different count in every layer (never contiguous from 0)."""
    config = read_config(MINILM)
    generator = torch.Generator().manual_seed(seed)
    heads, ffn = [], []
    for layer in range(config.num_hidden_layers):
        heads.append(sorted(torch.randperm(12, generator=generator)[: 3 + layer].tolist()))
        ffn.append(sorted(torch.randperm(1536, generator=generator)[: 300 + 170 * layer].tolist()))
    return Ticket(heads, ffn, geometry_of(config), method="random", seed=seed)


def encoded() -> dict[str, torch.Tensor]:
    tokenizer = transformers.BertTokenizerFast.from_pretrained(MINILM)
    return dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))


def our_outputs(model, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors transformers' class of the same task returns, from our model."""
    with torch.no_grad():
        out = model.eval()(inputs["input_ids"], inputs["token_type_ids"], inputs["attention_mask"])
    if isinstance(model, BertModel):
        return {"last_hidden_state": out[0], "pooler_output": out[1]}
    if isinstance(model, BertForPreTraining):
        return {"prediction_logits": out.prediction_logits, "seq_relationship_logits": out.seq_relationship_logits}
    if isinstance(model, BertForQuestionAnswering):
        return {"start_logits": out.logits[..., 0], "end_logits": out.logits[..., 1]}
    return {"logits": out.logits}


def max_difference(expected: dict[str, torch.Tensor], got) -> float:
    return max((expected[name] - getattr(got, name)).abs().max().item() for name in expected)


@pytest.fixture(scope="module")
def pruned_folders(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Our pruned models of every task, saved as our HF folders, with their outputs on the real sentences."""
    root = tmp_path_factory.mktemp("export")
    ticket, inputs = uneven_ticket(), encoded()
    folders = {}
    for index, (architecture, build) in enumerate(OURS.items()):
        torch.manual_seed(index)  # the task heads the checkpoint lacks: random, but the same on both sides
        pruned = prune(load_pretrained(build, MINILM), ticket)
        folder = root / architecture
        pruned.save_pretrained(folder) if hasattr(pruned, "save_pretrained") else save_pretrained(pruned, folder)
        folders[architecture] = {"folder": folder, "expected": our_outputs(pruned, inputs)}
    return {"root": root, "ticket": ticket, "inputs": inputs, "folders": folders}


def test_padded_exports_load_in_plain_transformers_with_the_pruned_function(pruned_folders, caplog) -> None:
    inputs = pruned_folders["inputs"]
    for architecture, entry in pruned_folders["folders"].items():
        out = export_model(entry["folder"], pruned_folders["root"] / f"{architecture}-padded", "padded")
        config = json.loads((out / "config.json").read_text())
        assert config["model_type"] == "bert" and config["architectures"] == [architecture]
        assert "heads_per_layer" not in config and "ffn_per_layer" not in config and "auto_map" not in config
        assert config["earlybert_pruned_geometry"]["heads_per_layer"] == [3, 4, 5, 6, 7, 8]
        with caplog.at_level(logging.WARNING):
            caplog.clear()
            reference = getattr(transformers, architecture).from_pretrained(out).eval()
        # No load report at all: no mismatched, missing (re-initialised) or unexpected weights.
        assert "LOAD REPORT" not in caplog.text and "mismatch" not in caplog.text.lower(), caplog.text
        assert reference.config.intermediate_size == 1536 and reference.config.num_attention_heads == 12
        with torch.no_grad():
            assert max_difference(entry["expected"], reference(**inputs)) <= TOLERANCE, architecture


def test_padded_zeros_are_where_the_dropped_units_were(pruned_folders) -> None:
    """apply on the dense checkpoint keeps the kept units at their own places: the dense weights, dropped units 0."""
    ticket = pruned_folders["ticket"]
    out = apply_ticket(MINILM, ticket, pruned_folders["root"] / "applied-padded", "padded")
    dense = transformers.BertModel.from_pretrained(MINILM)
    padded = transformers.BertModel.from_pretrained(out)
    layer, dense_layer = padded.encoder.layer[1], dense.encoder.layer[1]
    rows = torch.zeros(12, dtype=torch.bool)
    rows[ticket.heads_kept[1]] = True
    rows = rows.repeat_interleave(32)
    assert torch.equal(layer.attention.self.query.weight[rows], dense_layer.attention.self.query.weight[rows])
    assert layer.attention.self.query.weight[~rows].abs().sum() == 0
    assert layer.attention.output.dense.weight[:, ~rows].abs().sum() == 0
    neurons = torch.zeros(1536, dtype=torch.bool)
    neurons[ticket.ffn_kept[1]] = True
    assert layer.intermediate.dense.bias[~neurons].abs().sum() == 0 and layer.output.dense.weight[:, ~neurons].abs(
    ).sum() == 0
    with torch.no_grad():
        expected = our_outputs(prune(load_pretrained(BertModel, MINILM), ticket), pruned_folders["inputs"])
        assert max_difference(expected, padded(**pruned_folders["inputs"])) <= TOLERANCE


REMOTE_CHECK = textwrap.dedent("""
    import importlib.abc, json, sys
    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "earlybert_pretrain":
                raise ImportError("earlybert_pretrain is blocked in this interpreter")
    sys.meta_path.insert(0, Blocker())
    try:
        import earlybert_pretrain  # noqa: F401
        sys.exit("earlybert_pretrain is importable")
    except ImportError:
        pass
    import torch, transformers
    jobs, inputs = json.load(open("jobs.json")), torch.load("inputs.pt")
    result = {}
    for folder, auto_class, expected_file in jobs:
        model = getattr(transformers, auto_class).from_pretrained(folder, trust_remote_code=True).eval()
        expected = torch.load(expected_file)
        with torch.no_grad():
            out = model(**inputs)
        layers = model.base_model.encoder.layer
        result[folder] = {
            "class": type(model).__name__,
            "difference": max((expected[k] - getattr(out, k)).abs().max().item() for k in expected),
            "heads": [layer.attention.self.query.out_features // 32 for layer in layers],
            "ffn": [layer.intermediate.dense.out_features for layer in layers],
            "parameters": sum(p.numel() for p in model.parameters())}
    print(json.dumps(result))
""")
AUTO_CLASSES = {"BertModel": "AutoModel", "BertForPreTraining": "AutoModelForPreTraining",
                "BertForSequenceClassification": "AutoModelForSequenceClassification",
                "BertForQuestionAnswering": "AutoModelForQuestionAnswering"}


@pytest.mark.slow  # a fresh interpreter importing transformers and building five models: ~20 s
def test_compact_exports_load_with_remote_code_without_this_package(pruned_folders, tmp_path) -> None:
    jobs, parameters = [], {}
    for architecture, entry in pruned_folders["folders"].items():
        out = export_model(entry["folder"], tmp_path / f"{architecture}-compact", "compact")
        assert sorted(p.name for p in out.iterdir()) == sorted(
            ["config.json", "model.safetensors", *REMOTE_FILES])
        torch.save(entry["expected"], tmp_path / f"{architecture}.pt")
        jobs.append([str(out), AUTO_CLASSES[architecture], str(tmp_path / f"{architecture}.pt")])
        parameters[str(out)] = sum(p.numel() for p in load_pretrained(OURS[architecture], entry["folder"]).parameters())
    # The dense checkpoint pruned straight into a compact folder (apply) loads the same way.
    applied = apply_ticket(MINILM, pruned_folders["ticket"], tmp_path / "applied-compact", "compact")
    jobs.append([str(applied), "AutoModel", str(tmp_path / "BertModel.pt")])
    parameters[str(applied)] = parameters[jobs[0][0]]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    torch.save(pruned_folders["inputs"], tmp_path / "inputs.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules"),
           "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-I", "-c", REMOTE_CHECK], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for folder, _, _ in jobs:
        loaded = result[folder]
        assert loaded["class"].startswith("EarlyBert"), loaded
        assert loaded["difference"] <= TOLERANCE, (folder, loaded)
        assert loaded["heads"] == [3, 4, 5, 6, 7, 8]
        assert loaded["ffn"] == [300 + 170 * layer for layer in range(6)]
        # The true size: not a parameter more than our pruned model (transformers' pre-training model adds the
        # decoder bias once more, tied, so count as it does).
        assert loaded["parameters"] == parameters[folder], (folder, loaded)


def test_apply_cli_refuses_a_ticket_of_another_geometry_and_a_used_output(pruned_folders, tmp_path, capsys) -> None:
    wrong = Ticket([[0]] * 6, [[0]] * 6, {**geometry_of(read_config(MINILM)), "hidden_size": 768})
    wrong.save(tmp_path / "wrong.json")
    out = tmp_path / "out"
    code = ticket_main(["apply", str(MINILM), str(tmp_path / "wrong.json"), str(out), "--format", "padded"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1
    assert "was drawn for hidden_size=768, but the model has hidden_size=384" in error
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["wrong.json"]
    # A pruned folder no longer has the ticket's source geometry either.
    pruned_folders["ticket"].save(tmp_path / "ticket.json")
    code = ticket_main(["apply", str(pruned_folders["folders"]["BertModel"]["folder"]), str(tmp_path / "ticket.json"),
                        str(out), "--format", "compact"])
    assert code == 2 and "was drawn for heads_per_layer=[12, 12, 12, 12, 12, 12]" in capsys.readouterr().err
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code = ticket_main(["apply", str(MINILM), str(tmp_path / "ticket.json"), str(out), "--format", "compact"])
    assert code == 2 and "already exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    # --overwrite replaces only a folder an export wrote: the user's notes stay, and so does the folder.
    code = ticket_main(["apply", str(MINILM), str(tmp_path / "ticket.json"), str(out), "--format", "compact",
                        "--overwrite"])
    assert code == 2 and "not a folder this command wrote (notes.txt)" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    (out / "notes.txt").unlink()
    for fmt in ("compact", "padded"):  # an export over an export; the padded one leaves no compact code behind
        code = ticket_main(["apply", str(MINILM), str(tmp_path / "ticket.json"), str(out), "--format", fmt,
                            "--overwrite"])
        assert code == 0 and read_config(out).heads_per_layer == ([3, 4, 5, 6, 7, 8] if fmt == "compact" else [12] * 6)
    assert (out / "vocab.txt").is_file() and not any((out / name).exists() for name in REMOTE_FILES)


def test_export_cli_round_trips_through_our_loader(pruned_folders, tmp_path) -> None:
    """A padded export is our folder too (uniform geometry, same function); a compact one keeps the real sizes."""
    source = pruned_folders["folders"]["BertForSequenceClassification"]
    for fmt in ("padded", "compact"):
        out = tmp_path / fmt
        assert ticket_main(["export", str(source["folder"]), str(out), "--format", fmt]) == 0
        model = BertForSequenceClassification.from_pretrained(out)
        assert model.num_labels == 3
        assert (set(model.config.heads_per_layer) == {12}) == (fmt == "padded")
        got = our_outputs(model, pruned_folders["inputs"])["logits"]
        assert (got - source["expected"]["logits"]).abs().max() <= TOLERANCE
    # A compact folder is an input too: compact -> padded loads in plain transformers.
    assert ticket_main(["export", str(tmp_path / "compact"), str(tmp_path / "again"), "--format", "padded"]) == 0
    reference = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        assert max_difference(source["expected"], reference(**pruned_folders["inputs"])) <= TOLERANCE


def test_slimming_coefficients_are_folded_into_the_export(tmp_path) -> None:
    """A searched model (coefficients != 1) exports as the function it computes: W_O / W2 columns scaled."""
    torch.manual_seed(3)
    model = BertForPreTraining(BertConfig(vocab_size=61, hidden_size=40, num_hidden_layers=3, num_attention_heads=5,
                                          intermediate_size=64, max_position_embeddings=32, heads_per_layer=[5, 2, 3],
                                          ffn_per_layer=[64, 9, 31], slimming=True)).eval()
    with torch.no_grad():
        for _, _, coefficients in model.slimming_coefficients():
            coefficients.uniform_(0.0, 2.0)
    save_pretrained(model, tmp_path / "searched")
    ids = torch.randint(1, 61, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        expected = model(ids, torch.zeros_like(ids), mask).prediction_logits
        out = export_model(tmp_path / "searched", tmp_path / "padded", "padded")
        reference = transformers.BertForPreTraining.from_pretrained(out).eval()
        assert (reference(input_ids=ids, attention_mask=mask).prediction_logits - expected).abs().max() <= TOLERANCE
        compact = load_pretrained(BertForPreTraining, export_model(tmp_path / "searched", tmp_path / "c", "compact"))
        assert not compact.config.slimming and compact.config.heads_per_layer == [5, 2, 3]
        assert (compact.eval()(ids, torch.zeros_like(ids), mask).prediction_logits - expected).abs().max() <= TOLERANCE



def _tree(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("where", ["the run folder holding the model", "a folder inside the model"])
def test_export_refuses_an_output_that_holds_or_lies_inside_its_input(pruned_folders, tmp_path, capsys,
                                                                      where) -> None:
    """`export run/final_model run --overwrite` once replaced a whole run (checkpoints, ticket, notes) with 4 files."""
    run = tmp_path / "run"
    model = run / "final_model"
    model.mkdir(parents=True)
    for path in pruned_folders["folders"]["BertModel"]["folder"].iterdir():
        (model / path.name).write_bytes(path.read_bytes())
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "step10.pt").write_bytes(b"weights")
    (run / "notes.txt").write_text("mine")
    out, relation = (run, "holds") if where.startswith("the run") else (model / "export", "lies inside")
    pruned_folders["ticket"].save(tmp_path / "ticket.json")
    before = _tree(tmp_path)
    for command in (["export", str(model)], ["apply", str(model), str(tmp_path / "ticket.json")]):
        code = ticket_main([*command, str(out), "--format", "padded", "--overwrite"])
        error = capsys.readouterr().err.strip()
        assert code == 2 and len(error.splitlines()) == 1, error
        assert f"{out}: the output folder {relation} the input folder {model}" in error
        assert _tree(tmp_path) == before
