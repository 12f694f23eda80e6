"""Configuration: dataclasses with the paper's defaults, YAML files that override them, ``key=value`` on the CLI.

``load_config(PretrainConfig, "configs/pretrain_bert_base.yaml", ["phase1.lr=1e-3"])`` reads the YAML, applies the
dotted overrides and builds the nested dataclasses, checking every key and type in one place (``_coerce``): an
unknown key is refused with the closest known one suggested, a ``Literal`` field with its allowed values. Where a
field's type is a dataclass, a string names a YAML file of that dataclass's fields (looked up beside the config file,
then in ``configs/``): ``model: bert-base.yaml`` instead of spelling the model out. The rule follows the type, not the
key's name. ``None`` (YAML ``null``) is "the paper's value" only where a field's comment says so; 0 always means 0.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from earlybert_pretrain.errors import ConfigError
from earlybert_pretrain.model.bert import BertConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
T = TypeVar("T")

Precision = Literal["auto", "fp32", "bf16", "fp16"]  # auto: bf16 on GPUs that have it, fp16 on V100, fp32 on CPU
FfnScope = Literal["global", "layerwise"]
SearchStop = Literal["fixed", "early-bird"]


@dataclass
class DataConfig:
    shard_dir: str = "data/shards"  # the output of `earlybert-prep shard` (holds manifest.json)
    seed: int = 12345
    masked_lm_prob: float = 0.15
    short_seq_prob: float = 0.1
    whole_word_masking: bool = False
    # Shard check at load (data_prep.indexed.verify_shard): sizes + sampled blocks, every byte, or sizes only.
    verify: Literal["sample", "full", "sizes"] = "sample"
    # Processes building micro-batches ahead of the step (0: in the training process), each `prefetch` ahead, or
    # more so that together they hold a whole optimizer step (pretrain.batches.prefetched).
    num_workers: int = 4
    prefetch: int = 2


@dataclass
class PhaseConfig:
    """One LAMB phase (paper Sec. 4.1). ``warmup`` is a fraction of the phase's steps (NVIDIA's recipe)."""

    seq_len: int = 128
    global_batch_size: int = 65536
    micro_batch_size: int = 64
    lr: float = 6e-3
    warmup: float = 0.2843
    max_predictions: int = 20
    # Phase 2 continues from phase 1's fp32 weights and LAMB moments, restarting only the schedule (NVIDIA's
    # recipe); true starts it with a fresh optimizer from phase 1's weights instead.
    reset_optimizer: bool = False


@dataclass
class OptimizerConfig:
    name: Literal["lamb", "adamw"] = "lamb"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-6
    weight_decay: float = 0.01  # not on biases and LayerNorm
    decay_power: float = 0.5  # polynomial decay after warmup (NVIDIA's BERT recipe)
    grad_clip: float = 1.0
    fused: Literal["auto", "apex", "deepspeed", "torch"] = "auto"


@dataclass
class SearchConfig:
    """The slimming search and draw, as both recipes run it; defaults are pre-training's (paper Sec. 3.2 and 4.3:
    400 steps of phase 1, lambda 1e-4, 4 heads per layer / 30% FFN for BERT-base). Fine-tuning's defaults are in
    ``finetune.config.FinetuneSearchConfig``.

    ``heads_to_prune``: a whole number is the count of heads pruned in every layer (0 prunes none); a value in
    (0, 1) is the fraction of each layer's heads; ``None`` is the paper's count for the model's size (4 of 12 heads,
    6 of 16, a third otherwise; see ``heads_to_prune_for``).
    """

    steps: int | None = 400  # None: fine-tuning only, search for ``epochs`` of an epoch instead
    lam: float = 1e-4
    lam_ffn: float | None = None  # None: the same lambda for heads and FFN neurons (Eq. 4)
    heads_to_prune: float | None = 4
    ffn_ratio: float = 0.3
    ffn_scope: FfnScope = "global"
    # Round each layer's kept FFN width to a multiple of this (total kept within half a multiple of the ratio):
    # widths off a multiple of 8 ran ~15% slower per FLOP (benchmarks/pruned_vs_dense.py); 1 = exact widths.
    ffn_multiple_of: int = 8
    record_every: int = 10  # draw a ticket and feed the early-bird detector every this many steps
    stop: SearchStop = "fixed"  # early-bird: stop when the detector fires (then ``steps`` is the cap)
    early_bird_window: int = 5
    early_bird_eps: float = 0.1

    def heads_to_prune_for(self, model: BertConfig) -> float:
        """``heads_to_prune``, or when it is None the paper's count for ``model`` (Sec. 4.2: 4 of 12, 6 of 16)."""
        if self.heads_to_prune is not None:
            return self.heads_to_prune
        heads = model.num_attention_heads
        return {12: 4, 16: 6}.get(heads, max(1, round(heads / 3)))


@dataclass
class EngineConfig:
    precision: Precision = "auto"
    zero_stage: int = 0  # 0-2 (LAMB per-tensor exact under 1/2: train/zero_lamb.py); 3 refused with LAMB
    # ZeRO 1/2 buckets, in elements (fp32: 4 bytes each; budget in train/memory.py). DeepSpeed's 5e8 allocates 2 GB;
    # 5e7 (200 MB) still holds BERT's largest tensor (30,522 x 1,024 embeddings) and moves 200 MB per call
    reduce_bucket_size: int = 50_000_000
    allgather_bucket_size: int = 50_000_000
    compile: bool = False  # torch.compile the encoder
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10
    # Seconds a collective waits for a rank that stalled before every rank stops with one line naming it (a rank that
    # dies is noticed at once). Long enough for the longest wait on one rank: rank 0 writing and hashing a BERT-large
    # checkpoint with LAMB moments (~4 GB) to a busy shared disk, or building the sample plans of full Wikipedia; the
    # same as torch's gloo default, three times DeepSpeed's 10 minutes.
    collective_timeout_s: float = 1800.0


@dataclass
class EvalConfig:
    """Validation during pre-training (pretrain/evaluation.py): every ``every`` optimizer steps (0: only at the end
    of each stage) and at every stage's end, on ``batches`` micro-batches per sequence length of the validation
    split, masked with ``seed`` (not the run's), so every mode and seed is scored on the same examples."""

    every: int = 500
    batches: int = 16
    seed: int = 2021


@dataclass
class PretrainConfig:
    model: BertConfig = field(default_factory=BertConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    phase1: PhaseConfig = field(default_factory=PhaseConfig)
    phase2: PhaseConfig = field(default_factory=lambda: PhaseConfig(
        seq_len=512, global_batch_size=32768, micro_batch_size=16, lr=4e-3, warmup=0.128, max_predictions=80))
    # reduced: dense, total_steps set by the CLI's --match-time / --match-flops (pretrain/reduced.py)
    mode: Literal["earlybert", "dense", "random", "ticket", "reduced"] = "earlybert"
    ticket: str | None = None  # a ticket.json to train (mode "ticket")
    total_steps: int = 8601  # Sec. 4.1
    preset: Literal["paper", "nvidia"] = "paper"  # paper: 9/10 of the steps at seq 128; nvidia: 7,038 + 1,563
    pruned_step_fraction: float = 0.8  # Sec. 4.3: EarlyBERT trains 80% of the default steps in both phases
    reinit: Literal["rewind", "random"] = "rewind"  # rewind to the search's initial weights (theta_0), or random
    output_dir: str = "runs/earlybert"
    seed: int = 42


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(allowed) for allowed in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass a field of type ``tp`` holds (``X`` or ``X | None``), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        found = [option for option in typing.get_args(tp) if dataclasses.is_dataclass(option)]
        return found[0] if len(found) == 1 else None
    return None


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {' or '.join(_type_name(o) for o in options)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(tp) or (Any,)
        return [_coerce(item, item_type, f"{where}[{i}]") for i, item in enumerate(value)]
    if tp is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        if any(value == option and type(value) is type(option) for option in allowed):
            return value
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields or the name of a YAML file of "
                              f"them, got {value!r}")
        return build_dataclass(tp, value, where)
    if tp is float:
        # YAML 1.1 reads "2e-3" (no dot) as a string; accept any spelling Python's float() accepts.
        if isinstance(value, int | float | str) and not isinstance(value, bool):
            try:
                number = float(value)
            except ValueError:
                number = None
            if number is not None and not math.isfinite(number):  # inf / nan would train to NaN, not fail here
                raise ConfigError(f"{where}: expected a finite number, got {value!r}")
            if number is not None:
                return number
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is str and not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` checked against the annotation ``tp`` as the loader checks a config field (other records, e.g. a
    ticket, use it too); ConfigError naming ``where`` and the expected type."""
    return _coerce(value, tp, where)


def _unknown_key(cls: type, key: str, where: str) -> ConfigError:
    known = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
    return ConfigError(f"{where}: unknown key {key!r} for {cls.__name__}{hint}")


def build_dataclass(cls: type[T], values: dict, where: str = "config") -> T:
    """Build ``cls`` from a (nested) dict, refusing unknown keys and wrong types with the key's dotted path."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise _unknown_key(cls, key, where)
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``phase1.lr=1e-3`` -> (["phase1", "lr"], 0.001); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. phase1.lr=1e-3")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: cannot parse the value ({err})") from None
    return key.strip().split("."), value


def _read_named_file(name: str, cls: type, base_dir: Path, where: str) -> dict:
    for candidate in (base_dir / name, CONFIG_DIR / name, Path(name)):
        if candidate.is_file():
            return _expand_files(cls, read_yaml(candidate), candidate.parent, str(candidate))
    raise ConfigError(f"{where}: {cls.__name__} file {name!r} not found beside the config ({base_dir}) or in "
                      f"{CONFIG_DIR}")


def _expand_files(cls: type, values: dict, base_dir: Path, where: str) -> dict:
    """Replace each string given for a dataclass-typed field of ``cls`` (at any depth) by the YAML file it names."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        inner = _dataclass_in(hints[key]) if key in hints else None
        if inner is not None and isinstance(value, str):
            values[key] = _read_named_file(value, inner, base_dir, f"{where}.{key}")
        elif inner is not None and isinstance(value, dict):
            _expand_files(inner, value, base_dir, f"{where}.{key}")
    return values


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return values


def _set_dotted(values: dict, keys: list[str], value: Any, text: str) -> None:
    node = values
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {text!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Defaults, then the YAML file (if any), then ``key=value`` overrides; every key and type checked."""
    where = str(path) if path else "config"
    base_dir = Path(path).parent if path else CONFIG_DIR
    values = _expand_files(cls, read_yaml(path) if path else {}, base_dir, where)
    for text in overrides:
        keys, value = parse_override(text)
        _set_dotted(values, keys, value, text)
        _expand_files(cls, values, base_dir, where)  # a file named by this override, before the next one refines it
    return build_dataclass(cls, values, where)


def config_to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)
