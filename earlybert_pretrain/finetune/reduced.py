"""BERT-Reduced for fine-tuning (paper Table 7, Appendix A): dense fine-tuning for as many steps as a finished
EarlyBERT fine-tuning run cost, its linear schedule decaying to 0 over those steps.

* ``match_time``: the run's ``time.total_seconds`` (Sec. 4.1 protocol, its search included) over the dense
  per-step time of a dense run's metrics.json (``dense_metrics``, or the one the EarlyBERT run was compared to).
* ``match_flops``: training FLOPs from the geometry (``model.bert.flops_per_token``), each step counted as
  ``batch_size x max_seq_length`` tokens (its batch size, this run's sequence length): the run's search steps on
  the dense model (with the MLM head on 15% of the positions when it searched on MLM) plus its fine-tuning steps
  on its pruned geometry, over the dense model's FLOPs per step.

A run is named by its folder (or its metrics.json); the chosen count is the nearest whole number of steps.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from earlybert_pretrain.errors import ConfigError
from earlybert_pretrain.model.bert import BertConfig, flops_per_token

PRUNED_MODES = ("earlybert", "random", "ticket")
MLM_MASKED_FRACTION = 0.15


@dataclass(frozen=True)
class StepMatch:
    matched: str  # "time" | "flops"
    run: str  # the matched run's metrics.json
    target: float  # its seconds or FLOPs
    per_step: float  # the dense cost of one step, same unit
    steps: int

    def to_dict(self) -> dict:
        return {**asdict(self), "cost": self.steps * self.per_step}


def read_metrics(path: str, field: str) -> tuple[Path, dict]:
    """A finished fine-tuning run's metrics.json, from its folder or the file itself; ``field`` names the setting."""
    given = Path(path)
    if not given.exists():
        raise ConfigError(f"{field}: {path}: no such run folder")
    file = given / "metrics.json" if given.is_dir() else given
    if not file.is_file():
        raise ConfigError(f"{field}: {path}: no metrics.json there (the run has not finished)")
    try:
        metrics = json.loads(file.read_text())
        finished = isinstance(metrics, dict) and {"mode", "task"} <= metrics.keys() and isinstance(
            metrics.get("time"), dict) and "total_seconds" in metrics["time"]
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{field}: {file} is not a metrics.json of a fine-tuning run ({err})") from None
    if not finished:
        raise ConfigError(f"{field}: {file} is not a metrics.json of a finished fine-tuning run")
    return file, metrics


def pruned_run(path: str, field: str, task: str) -> tuple[Path, dict]:
    file, metrics = read_metrics(path, field)
    if metrics["mode"] not in PRUNED_MODES or metrics["task"] != task:
        raise ConfigError(f"{field}: {file} is a {metrics['mode']!r} run on {metrics['task']!r}; expected a "
                          f"{' / '.join(PRUNED_MODES)} run on {task!r}")
    return file, metrics


def _nearest_steps(target: float, per_step: float, field: str) -> int:
    steps = round(target / per_step)
    if steps < 1:
        raise ConfigError(f"{field}: the matched run's budget buys {target / per_step:.2f} dense steps (fewer than 1)")
    return steps


def compared_dense_run(path: str, task: str) -> str:
    """The dense metrics.json the matched run was itself compared to (its ``time.vs_dense``)."""
    file, metrics = pruned_run(path, "match_time", task)
    compared = metrics["time"].get("vs_dense", {}).get("dense_metrics")
    if not compared:
        raise ConfigError(f"match_time: {file} was not compared to a dense run; give dense_metrics=PATH "
                          "(--dense-metrics) for the dense per-step time")
    return compared


def match_time(path: str, dense_time: dict, task: str) -> StepMatch:
    """Steps whose dense time equals the run's; ``dense_time`` is a dense metrics.json's ``time``."""
    file, metrics = pruned_run(path, "match_time", task)
    per_step = float(dense_time["finetune"]["mean_step_seconds"])
    target = float(metrics["time"]["total_seconds"])
    return StepMatch("time", str(file), target, per_step, _nearest_steps(target, per_step, "match_time"))


def step_flops(model: BertConfig, batch_size: int, seq_len: int, masked_fraction: float = 0.0) -> float:
    """Training FLOPs of one step: ``batch_size`` sequences of ``seq_len`` positions."""
    return batch_size * seq_len * flops_per_token(model, seq_len, masked_fraction)


def run_flops(file: Path, metrics: dict, dense: BertConfig, seq_len: int) -> float:
    """The run's search on the dense model plus its fine-tuning on its pruned geometry (metrics' model_geometry)."""
    try:
        time, geometry, config = metrics["time"], metrics["model_geometry"], metrics["config"]
        pruned = replace(dense, heads_per_layer=geometry["heads_per_layer"], ffn_per_layer=geometry["ffn_per_layer"])
        batch = int(config["batch_size"])
        masked = MLM_MASKED_FRACTION if config["search"].get("objective") == "mlm" else 0.0
        search = time["search"]["steps"] * step_flops(dense, batch, seq_len, masked) if "search" in time else 0.0
        return search + time["finetune"]["steps"] * step_flops(pruned, batch, seq_len)
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"match_flops: {file} lacks {err}; give a finished fine-tuning run") from None


def match_flops(path: str, task: str, dense: BertConfig, batch_size: int, seq_len: int) -> StepMatch:
    """Steps whose dense FLOPs (this run's model, batch and sequence length) equal the run's."""
    file, metrics = pruned_run(path, "match_flops", task)
    dense = replace(dense, slimming=False)
    target = run_flops(file, metrics, dense, seq_len)
    per_step = step_flops(dense, batch_size, seq_len)
    return StepMatch("flops", str(file), target, per_step, _nearest_steps(target, per_step, "match_flops"))
