"""Config files and key=value overrides: paper defaults, every key and type checked, clear errors."""

from pathlib import Path

import pytest

from earlybert_pretrain.config import ConfigError, PretrainConfig, load_config
from earlybert_pretrain.model.bert import BertConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_are_the_paper_recipe():
    config = PretrainConfig()
    assert config.total_steps == 8601
    assert (config.phase1.seq_len, config.phase1.global_batch_size, config.phase1.lr) == (128, 65536, 6e-3)
    assert (config.phase2.seq_len, config.phase2.global_batch_size, config.phase2.lr) == (512, 32768, 4e-3)
    assert (config.phase1.max_predictions, config.phase2.max_predictions) == (20, 80)
    assert (config.search.steps, config.search.lam, config.search.heads_to_prune) == (400, 1e-4, 4)
    assert (config.search.ffn_ratio, config.search.ffn_scope, config.pruned_step_fraction) == (0.3, "global", 0.8)
    assert config.engine.zero_stage == 0


@pytest.mark.parametrize("name, layers, hidden, heads", [("bert-base.yaml", 12, 768, 12),
                                                          ("bert-large.yaml", 24, 1024, 16),
                                                          ("tiny.yaml", 4, 128, 4)])
def test_model_files_load(name, layers, hidden, heads):
    model = load_config(BertConfig, CONFIGS / name)
    assert (model.num_hidden_layers, model.hidden_size, model.num_attention_heads) == (layers, hidden, heads)
    assert model.heads_per_layer == [heads] * layers


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: tiny.yaml\nphase1:\n  lr: 0.001\nsearch:\n  steps: 50\n")
    config = load_config(PretrainConfig, path, ["phase1.lr=2e-3", "model.num_hidden_layers=2", "search.stop=early-bird",
                                                "search.lam_ffn=null", "optimizer.betas=[0.9, 0.98]"])
    assert config.phase1.lr == 2e-3 and config.search.steps == 50 and config.search.stop == "early-bird"
    assert config.model.hidden_size == 128 and config.model.num_hidden_layers == 2
    assert config.model.heads_per_layer == [4, 4]
    assert config.optimizer.betas == [0.9, 0.98] and config.search.lam_ffn is None
    assert isinstance(config.phase1.lr, float)


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"config.phase1: unknown key 'lrr' for PhaseConfig; did you mean 'lr'\?"):
        load_config(PretrainConfig, None, ["phase1.lrr=1"])
    with pytest.raises(ConfigError, match="did you mean 'total_steps'"):
        load_config(PretrainConfig, None, ["total_step=10"])


@pytest.mark.parametrize("override, message", [
    ("phase1.micro_batch_size=1.5", "config.phase1.micro_batch_size: expected an integer"),
    ("engine.compile=maybe", "config.engine.compile: expected true or false"),
    ("model.heads_per_layer=[1,2]", "heads_per_layer has 2 entries"),
    ("phase1", "expected key=value"),
    ("phase1.lr=fast", "config.phase1.lr: expected a number"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PretrainConfig, None, [override])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(PretrainConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("phase1: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(PretrainConfig, bad)
    bad.write_text("model: missing-model.yaml\n")
    with pytest.raises(ConfigError, match="model file 'missing-model.yaml' not found"):
        load_config(PretrainConfig, bad)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("pretrain_*.yaml")), ids=lambda p: p.name)
def test_pretrain_recipes_load(path):
    config = load_config(PretrainConfig, path)
    assert config.phase1.global_batch_size % config.phase1.micro_batch_size == 0
    assert config.phase2.global_batch_size % config.phase2.micro_batch_size == 0
    assert config.model.num_hidden_layers >= 1
