"""Config files and key=value overrides: paper defaults, every key and type checked, clear errors."""

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from earlybert_pretrain.config import PretrainConfig, SearchConfig, load_config
from earlybert_pretrain.errors import ConfigError
from earlybert_pretrain.finetune.config import FinetuneConfig, FinetuneSearchConfig, resolve_schedule
from earlybert_pretrain.finetune.tasks import get_task
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
    with pytest.raises(ConfigError, match=r"bad.yaml.model: BertConfig file 'missing-model.yaml' not found"):
        load_config(PretrainConfig, bad)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("pretrain_*.yaml")), ids=lambda p: p.name)
def test_pretrain_recipes_load(path):
    config = load_config(PretrainConfig, path)
    assert config.phase1.global_batch_size % config.phase1.micro_batch_size == 0
    assert config.phase2.global_batch_size % config.phase2.micro_batch_size == 0
    assert config.model.num_hidden_layers >= 1


@pytest.mark.parametrize("cls, override, allowed", [
    (PretrainConfig, "mode=fast", "'earlybert', 'dense', 'random', 'ticket', 'reduced'"),
    (PretrainConfig, "preset=google", "'paper', 'nvidia'"),
    (PretrainConfig, "reinit=zeros", "'rewind', 'random'"),
    (PretrainConfig, "search.stop=never", "'fixed', 'early-bird'"),
    (PretrainConfig, "search.ffn_scope=local", "'global', 'layerwise'"),
    (PretrainConfig, "engine.precision=fp8", "'auto', 'fp32', 'bf16', 'fp16'"),
    (PretrainConfig, "optimizer.name=sgd", "'lamb', 'adamw'"),
    (PretrainConfig, "optimizer.fused=cuda", "'auto', 'apex', 'deepspeed', 'torch'"),
    (FinetuneConfig, "mode=fast", "'dense', 'earlybert', 'random', 'ticket', 'reduced'"),
    (FinetuneConfig, "precision=1", "'auto', 'fp32', 'bf16', 'fp16'"),
    (FinetuneConfig, "search.stop=early_bird", "'fixed', 'early-bird'"),
])
def test_enumerations_are_refused_at_load_with_the_allowed_values(cls, override, allowed):
    key, _, value = override.partition("=")
    with pytest.raises(ConfigError, match=f"config.{key}: expected one of {allowed}, got "):
        load_config(cls, None, [override])


def test_enumerations_accept_their_values():
    config = load_config(PretrainConfig, None, ["mode=dense", "preset=nvidia", "engine.precision=bf16",
                                                "search.ffn_scope=layerwise", "optimizer.fused=torch"])
    assert (config.mode, config.preset, config.engine.precision) == ("dense", "nvidia", "bf16")
    assert (config.search.ffn_scope, config.optimizer.fused) == ("layerwise", "torch")


def test_none_is_the_paper_value_and_zero_means_zero():
    sst2, squad, base = get_task("sst2"), get_task("squad"), BertConfig()
    default = load_config(FinetuneConfig, None, [])
    assert default.search.heads_to_prune is None and default.lr is None and default.search.steps is None
    assert resolve_schedule(default, sst2) == (3.0, 2e-5) and resolve_schedule(default, squad) == (2.0, 3e-5)
    earlybert = load_config(FinetuneConfig, None, ["mode=earlybert"])
    assert resolve_schedule(earlybert, sst2) == (2.0, 4e-5) and resolve_schedule(earlybert, squad) == (2.0, 3e-5)
    assert default.search.heads_to_prune_for(base) == 4
    assert default.search.heads_to_prune_for(BertConfig(hidden_size=1024, num_attention_heads=16)) == 6
    zeros = load_config(FinetuneConfig, None, ["mode=earlybert", "lr=0", "epochs=0", "pruned_lr_scale=0",
                                               "search.heads_to_prune=0", "search.lr=0", "data.max_train_examples=0"])
    assert resolve_schedule(zeros, sst2) == (2.0, 0.0)
    assert zeros.search.heads_to_prune_for(base) == 0 and zeros.search.lr == 0 and zeros.data.max_train_examples == 0
    assert load_config(FinetuneConfig, None, ["pruned_epochs=0", "mode=random"]).pruned_epochs == 0
    # The same field, the same meaning, in pre-training: null asks for the paper's count there too.
    assert load_config(PretrainConfig, None, ["search.heads_to_prune=null"]).search.heads_to_prune_for(base) == 4
    assert load_config(PretrainConfig, None, ["search.heads_to_prune=0.25"]).search.heads_to_prune_for(base) == 0.25
    search = FinetuneSearchConfig()
    assert isinstance(search, SearchConfig) and (search.ffn_ratio, search.epochs) == (0.4, 0.2)
    assert search.planned_steps(steps_per_epoch=100) == 20 and FinetuneSearchConfig(steps=7).planned_steps(100) == 7
    with pytest.raises(ConfigError, match="search.steps: expected >= 1"):
        load_config(FinetuneConfig, None, ["model_dir=m", "search.steps=0"]).validate()


@dataclass
class _Holder:
    """Any field typed as a dataclass takes a file name, whatever the field is called."""

    geometry: BertConfig = field(default_factory=BertConfig)
    maybe: BertConfig | None = None
    name: str = "tiny.yaml"  # a str field keeps its string


def test_a_string_for_a_dataclass_field_names_a_yaml_file_by_type_not_by_key(tmp_path):
    (tmp_path / "mine.yaml").write_text("hidden_size: 64\nnum_hidden_layers: 3\nnum_attention_heads: 2\n")
    (tmp_path / "run.yaml").write_text("geometry: mine.yaml\nmaybe: tiny.yaml\n")
    holder = load_config(_Holder, tmp_path / "run.yaml", ["geometry.num_hidden_layers=1"])
    assert (holder.geometry.hidden_size, holder.geometry.num_hidden_layers) == (64, 1)  # beside the config first
    assert holder.maybe.hidden_size == 128 and holder.name == "tiny.yaml"  # then configs/; str fields untouched
    override = load_config(_Holder, None, ["geometry=bert-large.yaml", "geometry.num_hidden_layers=2"])
    assert (override.geometry.hidden_size, override.geometry.num_hidden_layers) == (1024, 2)
    finetune = load_config(FinetuneConfig, None, ["model_dir=tiny.yaml"])
    assert finetune.model_dir == "tiny.yaml"  # a str field named like a model is still a path
    with pytest.raises(ConfigError, match="config.geometry.hidden_size: expected an integer"):
        load_config(_Holder, None, ["geometry.hidden_size=wide"])
