"""The four CLIs print a UserError as one line (exit 2) and let every other exception through with its traceback."""

import subprocess
import sys

import pytest
import yaml

import data_prep.cli
import data_prep.vocab
import earlybert_pretrain.finetune.cli
import earlybert_pretrain.pretrain.cli
import earlybert_pretrain.tickets.cli
from earlybert_pretrain.common.tokens import SPECIAL_TOKENS
from earlybert_pretrain.errors import ConfigError, DataError, ModelFolderError, RunError, TicketError, UserError
from earlybert_pretrain.model.bert import BertConfig
from earlybert_pretrain.tickets.draw import random_ticket
from earlybert_pretrain.tickets.ticket import Ticket


def boom(*args, **kwargs):
    raise ValueError("boom")


def assert_one_line(capsys, prog: str, *fragments: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith(f"{prog}: error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and all(fragment in err for fragment in fragments), err


def test_every_user_error_is_a_value_error_of_one_family():
    for kind in (ConfigError, RunError, TicketError, DataError, ModelFolderError):
        assert issubclass(kind, UserError) and issubclass(kind, ValueError)


def test_pretrain_cli(tmp_path, capsys, monkeypatch):
    assert earlybert_pretrain.pretrain.cli.main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert_one_line(capsys, "earlybert-pretrain", "nope.yaml: config file not found")
    assert earlybert_pretrain.pretrain.cli.main(["mode=fast"]) == 2
    assert_one_line(capsys, "earlybert-pretrain", "config.mode", "'earlybert'", "'dense'")
    monkeypatch.setattr(yaml, "safe_load", boom)  # a bug in a library the loader calls: not the user's to fix
    with pytest.raises(ValueError, match="boom"):
        earlybert_pretrain.pretrain.cli.main(["phase1.lr=1e-3"])


def test_finetune_cli(tmp_path, capsys, monkeypatch):
    assert earlybert_pretrain.finetune.cli.main(["--task", "sst2", "serch.lr=1"]) == 2
    assert_one_line(capsys, "earlybert-finetune", "unknown key 'serch'", "did you mean 'search'")
    assert earlybert_pretrain.finetune.cli.main(["precision=fp8"]) == 2
    assert_one_line(capsys, "earlybert-finetune", "config.precision", "'bf16'")
    monkeypatch.setattr(yaml, "safe_load", boom)
    with pytest.raises(ValueError, match="boom"):
        earlybert_pretrain.finetune.cli.main(["--task", "sst2", "lr=1e-3"])


def test_ticket_cli(tmp_path, capsys, monkeypatch):
    (tmp_path / "bad.json").write_text("{not json")
    assert earlybert_pretrain.tickets.cli.main(["report", str(tmp_path / "bad.json")]) == 2
    assert_one_line(capsys, "earlybert-ticket report", "bad.json: not valid JSON")
    path = tmp_path / "t.json"
    random_ticket(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
                  heads_to_prune=1, ffn_ratio=0.5, seed=0).save(path)
    assert earlybert_pretrain.tickets.cli.main(["report", str(path)]) == 0
    monkeypatch.setattr(Ticket, "from_dict", boom)  # deep inside Ticket.load
    with pytest.raises(ValueError, match="boom"):
        earlybert_pretrain.tickets.cli.main(["report", str(path)])


def test_prep_cli(tmp_path, capsys, monkeypatch):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\nthe\n")
    assert data_prep.cli.main(["vocab", "--vocab-file", str(vocab), "--output", str(tmp_path / "v")]) == 2
    assert_one_line(capsys, "earlybert-prep", "vocab.txt: vocab lacks the special token(s) [UNK]")
    vocab.write_text("".join(f"{token}\n" for token in [*SPECIAL_TOKENS, "the"]))
    monkeypatch.setattr(data_prep.vocab, "BertWordPieceTokenizer", boom)  # the tokenizers library fails
    with pytest.raises(ValueError, match="boom"):
        data_prep.cli.main(["vocab", "--vocab-file", str(vocab), "--output", str(tmp_path / "v")])


def test_console_exit_codes(tmp_path):
    """Through the interpreter: a user error exits 2 with one line; a bug exits 1 with its traceback."""
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    user = subprocess.run([sys.executable, "-m", "earlybert_pretrain.tickets.cli", "report", str(bad)],
                          capture_output=True, text=True)
    assert user.returncode == 2 and len(user.stderr.strip().splitlines()) == 1, user.stderr
    bug = subprocess.run([sys.executable, "-c",
                          "import sys; from earlybert_pretrain.tickets import cli, ticket\n"
                          "def boom(*a, **k): raise ValueError('boom')\n"
                          "ticket.Ticket.from_dict = boom\n"
                          f"sys.exit(cli.main(['report', {str(bad)!r}]))"],
                         capture_output=True, text=True)
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "ValueError: boom" in bug.stderr, bug.stderr
