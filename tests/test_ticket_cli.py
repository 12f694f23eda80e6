"""The earlybert-ticket command line: report, distance, heatmap, and clear errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from earlybert_pretrain.model.bert import BertConfig, BertModel, flops_per_token
from earlybert_pretrain.model.hf import save_pretrained
from earlybert_pretrain.tickets.cli import main
from earlybert_pretrain.tickets.distance import mask_distance
from earlybert_pretrain.tickets.draw import draw_ticket, random_ticket
from earlybert_pretrain.tickets.history import MaskHistory
from earlybert_pretrain.tickets.ticket import Ticket

REPO = Path(__file__).resolve().parent.parent


def bert_base_ticket(path: Path) -> Ticket:
    """A 4-heads / 30%-FFN global ticket of BERT-base drawn from made-up coefficients."""
    generator = torch.Generator().manual_seed(0)
    coefficients = {"head": [torch.rand(12, generator=generator) for _ in range(12)],
                    "ffn": [torch.rand(3072, generator=generator) * (1 - 0.04 * layer) for layer in range(12)]}
    ticket = draw_ticket(coefficients, heads_to_prune=4, ffn_ratio=0.3, config=BertConfig(), step=400)
    ticket.save(path)
    return ticket


def test_report_as_a_module(tmp_path):
    ticket = bert_base_ticket(tmp_path / "t.json")
    result = subprocess.run([sys.executable, "-m", "earlybert_pretrain.tickets.cli", "report",
                             str(tmp_path / "t.json")],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    dense, pruned = BertConfig(), ticket.pruned_config(BertConfig())
    for seq_len in (128, 512):
        ratio = flops_per_token(pruned, seq_len) / flops_per_token(dense, seq_len)
        assert any(line.startswith(str(seq_len)) and line.endswith(f"{ratio:.3f}")
                   for line in result.stdout.splitlines()), result.stdout
    assert ticket.digest()[:12] in result.stdout and "8 / 12" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "earlybert_pretrain.tickets.cli", "report", str(tmp_path / "no.json")],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 2 and "no.json: ticket file not found" in bad.stderr


def test_report_json_with_configs(tmp_path, capsys):
    bert_base_ticket(tmp_path / "t.json")
    assert main(["report", str(tmp_path / "t.json"), "--json"]) == 0
    from_geometry = json.loads(capsys.readouterr().out)
    assert main(["report", str(tmp_path / "t.json"), "--config", str(REPO / "configs/bert-base.yaml"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == from_geometry
    (tmp_path / "pretrain.yaml").write_text("model:\n  hidden_size: 768\n  vocab_size: 30528\n")
    assert main(["report", str(tmp_path / "t.json"), "--config", str(tmp_path / "pretrain.yaml"), "--json"]) == 0
    padded_vocab = json.loads(capsys.readouterr().out)
    assert padded_vocab["parameters"]["total"]["dense"] == from_geometry["parameters"]["total"]["dense"] + 6 * 769
    # The wrong model is refused with the field that differs.
    assert main(["report", str(tmp_path / "t.json"), "--config", str(REPO / "configs/bert-large.yaml")]) == 2
    assert "drawn for num_hidden_layers=12, but the model has num_hidden_layers=24" in capsys.readouterr().err


def test_report_with_an_hf_folder(tmp_path, capsys):
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=16)
    save_pretrained(BertModel(config), tmp_path / "model")
    random_ticket(config, heads_to_prune=1, ffn_ratio=0.5, seed=0).save(tmp_path / "t.json")
    assert main(["report", str(tmp_path / "t.json"), "--config", str(tmp_path / "model")]) == 0
    assert "1 / 2" in capsys.readouterr().out


def test_distance_and_heatmap(tmp_path, capsys):
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=24, max_position_embeddings=16)
    tickets = [random_ticket(config, heads_to_prune=1, ffn_ratio=0.3, seed=seed) for seed in range(3)]
    paths = []
    for step, ticket in zip((30, 10, 20), tickets):
        ticket.step = step
        ticket.save(tmp_path / f"t{step}.json")
        paths.append(str(tmp_path / f"t{step}.json"))
    assert main(["distance", paths[0], paths[1]]) == 0
    expected = mask_distance(tickets[0], tickets[1])
    assert capsys.readouterr().out.split() == [f"{kind}={value:.4f}" for kind, value in expected.items()]

    assert main(["heatmap", *paths, "--output", str(tmp_path / "from_tickets.png")]) == 0
    assert "3 masks, steps 10..30" in capsys.readouterr().out
    assert (tmp_path / "from_tickets.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = MaskHistory()
    for step, ticket in enumerate(tickets):
        history.add(step, ticket)
    history.save(tmp_path / "history.json")
    assert main(["heatmap", str(tmp_path / "history.json"), "-o", str(tmp_path / "h.png"), "--kinds", "combined"]) == 0
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors_are_one_clear_line(tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["distance", str(tmp_path / "bad.json"), str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert "bad.json: not valid JSON" in err and "Traceback" not in err
    (tmp_path / "history.json").write_text(json.dumps({"format": "earlybert-mask-history", "version": 1,
                                                       "steps": [5], "tickets": [{"format": "other"}]}))
    assert main(["heatmap", str(tmp_path / "history.json"), "-o", str(tmp_path / "h.png")]) == 2
    assert "history.json: tickets[0]: not an EarlyBERT ticket" in capsys.readouterr().err
    assert not (tmp_path / "h.png").exists()
    with pytest.raises(SystemExit):
        main(["heatmap", str(tmp_path / "bad.json")])  # --output is required: argparse exits with usage


def test_a_ticket_that_is_not_what_it_claims_is_one_line_naming_the_field(tmp_path, capsys):
    """Deep nesting (a RecursionError in the parser) and a geometry value of the wrong type, in every command that
    reads a ticket; the string "128" once passed and made check_fits say "drawn for hidden_size=128, but the model
    has hidden_size=128"."""
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    good = tmp_path / "good.json"
    bert_base_ticket(good)
    values = json.loads(good.read_text())
    values["source_geometry"]["hidden_size"] = "768"
    (tmp_path / "string.json").write_text(json.dumps(values))
    for bad, expected in (("deep.json", "JSON nested too deeply"),
                          ("string.json", "ticket field source_geometry.hidden_size: expected an integer, got '768'")):
        for argv in (["report", str(tmp_path / bad), "--config", str(REPO / "configs" / "bert-base.yaml")],
                     ["distance", str(good), str(tmp_path / bad)],
                     ["heatmap", str(tmp_path / bad), str(good), "-o", str(tmp_path / "h.png")]):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and f"{tmp_path / bad}: " in err and expected in err, (argv, err)
    assert not (tmp_path / "h.png").exists()
