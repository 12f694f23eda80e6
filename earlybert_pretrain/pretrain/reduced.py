"""BERT-Reduced (paper Table 7, Appendix A): dense BERT trained for fewer steps, as many as a finished EarlyBERT run
cost, so the two are compared at equal time or equal FLOPs.

The step count ``N`` keeps the preset's split (``phase1 = round(N * share)``, the rest phase 2) and is the ``N``
whose cost is closest to the EarlyBERT run's; its schedule decays over those ``N`` steps (the recipe builds each
phase's schedule from its own step count).

* ``--match-time RUN``: RUN's ``total_seconds`` (Sec. 4.1 protocol: the search, the draw and both pruned phases)
  against the dense per-step times of phase 1 and phase 2. Those are read from a finished dense run's report
  (``--compare-to DENSE_RUN``, or the dense run RUN itself was compared to), not measured here: a reduced run
  measured before its own steps are fixed would need a second, throw-away timing stage, and the dense report
  already holds the same protocol's per-step times on this hardware.
* ``--match-flops RUN``: training FLOPs from the geometry alone (``model.bert.flops_per_token``), every position of
  a phase's sequence length counted: RUN's search steps on the dense model plus its phases on the pruned geometry
  of RUN/ticket.json, against the dense model's FLOPs per step of each phase in this config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from earlybert_pretrain.common.files import read_json
from earlybert_pretrain.config import PhaseConfig, PretrainConfig, config_to_dict
from earlybert_pretrain.errors import RunError
from earlybert_pretrain.model.bert import BertConfig, flops_per_token
from earlybert_pretrain.tickets.ticket import GEOMETRY_FIELDS, Ticket

PHASES = ("phase1", "phase2")
PRUNED_MODES = ("earlybert", "random", "ticket")


@dataclass(frozen=True)
class StepMatch:
    """What a reduced run matched: ``target`` (seconds or FLOPs) of ``run``, at ``per_step`` dense cost per phase."""

    matched: str  # "time" | "flops"
    run: str
    target: float
    per_step: dict[str, float]
    steps: dict[str, int]  # the reduced run's phase1 / phase2 steps
    cost: float  # what those steps cost, in the target's unit

    @property
    def total_steps(self) -> int:
        return sum(self.steps.values())

    def to_dict(self) -> dict:
        return {**asdict(self), "total_steps": self.total_steps}


def split_steps(total: int, share: float) -> dict[str, int]:
    """The preset's split of ``total`` steps into phase 1 (``share`` of them) and phase 2."""
    phase1 = round(total * share)
    return {"phase1": phase1, "phase2": total - phase1}


def steps_for_budget(budget: float, per_step: dict[str, float], share: float) -> dict[str, int]:
    """The phase steps whose cost is closest to ``budget``: the continuous solution, then its neighbours checked
    with the rounded split (so the match is within one step)."""
    mean = share * per_step["phase1"] + (1.0 - share) * per_step["phase2"]
    estimate = round(budget / mean)
    candidates = [split_steps(total, share) for total in range(max(2, estimate - 1), estimate + 2)]
    candidates = [steps for steps in candidates if min(steps.values()) >= 1]
    if not candidates:
        raise RunError(f"mode=reduced: the matched run's budget ({budget:.4g}) buys {budget / mean:.2f} dense steps, "
                       "too few for both phases")
    return min(candidates, key=lambda steps: abs(cost_of(steps, per_step) - budget))


def cost_of(steps: dict[str, int], per_step: dict[str, float]) -> float:
    return sum(steps[name] * per_step[name] for name in PHASES)


def finished_report(run_dir: Path, flag: str) -> dict:
    """report.json of a finished pre-training run, named by ``flag`` in every error."""
    if not run_dir.is_dir():
        raise RunError(f"{flag} {run_dir}: no such run folder")
    path = run_dir / "report.json"
    if not path.is_file():
        raise RunError(f"{flag} {run_dir}: no report.json there (the run has not finished)")
    report = read_json(path, "run report", RunError)
    if not isinstance(report, dict) or not isinstance(report.get("stages"), dict):
        raise RunError(f"{flag} {path}: not a pre-training run's report (no stages)")
    return report


def _number(report: dict, keys: tuple[str, ...], where: str) -> float:
    value = report
    try:
        for key in keys:
            value = value[key]
        return float(value)
    except (KeyError, TypeError, ValueError):
        raise RunError(f"{where}: missing or bad {'.'.join(keys)}; give a finished run's folder") from None


def pruned_run(run_dir: Path, flag: str) -> dict:
    """The EarlyBERT (or random / ticket) run a reduced run is matched to."""
    report = finished_report(run_dir, flag)
    if report.get("mode") not in PRUNED_MODES:
        raise RunError(f"{flag} {run_dir}: a {report.get('mode')!r} run; give a finished "
                       f"{' / '.join(PRUNED_MODES)} run")
    return report


def dense_step_seconds(dense_dir: Path, flag: str) -> dict[str, float]:
    report = finished_report(dense_dir, flag)
    if report.get("mode") != "dense":
        raise RunError(f"{flag} {dense_dir}: a {report.get('mode')!r} run; the per-step times must be a dense run's")
    where = f"{flag} {dense_dir / 'report.json'}"
    return {name: _number(report, ("stages", name, "mean_step_seconds"), where) for name in PHASES}


def match_time(run_dir: Path, compare_to: list[Path], share: float) -> StepMatch:
    """Steps whose dense time equals ``run_dir``'s total time, at the per-step times of the first dense run in
    ``compare_to`` (else of the dense run ``run_dir`` was itself compared to)."""
    report = pruned_run(run_dir, "--match-time")
    target = _number(report, ("total_seconds",), f"--match-time {run_dir / 'report.json'}")
    dense_dir = next((run for run in compare_to if finished_report(run, "--compare-to").get("mode") == "dense"),
                     compare_to[0] if compare_to else None)
    if dense_dir is None and isinstance(report.get("compare_to"), dict) and report["compare_to"].get("dense_run"):
        dense_dir = Path(report["compare_to"]["dense_run"])
    if dense_dir is None:
        raise RunError(f"--match-time {run_dir}: needs the dense per-step times; pass --compare-to DENSE_RUN")
    per_step = dense_step_seconds(dense_dir, "--compare-to")
    steps = steps_for_budget(target, per_step, share)
    return StepMatch("time", str(run_dir), target, per_step, steps, cost_of(steps, per_step))


def phase_flops(model: BertConfig, phase: dict) -> float:
    """Training FLOPs of one optimizer step of a phase (every position of its sequence length)."""
    seq_len = int(phase["seq_len"])
    return phase["global_batch_size"] * seq_len * flops_per_token(model, seq_len)


def run_config(run_dir: Path) -> dict:
    """The config a finished run recorded in its run.json."""
    if not (run_dir / "run.json").is_file():
        raise RunError(f"--match-flops {run_dir}: no run.json there; give a pre-training run's folder")
    return read_json(run_dir / "run.json", "run record", RunError).get("config", {})


def run_flops(run_dir: Path, report: dict, config: dict) -> float:
    """FLOPs of a finished pruned run: its search on the dense model, its phases on the ticket's geometry."""
    where = f"--match-flops {run_dir}"
    try:
        dense = BertConfig.from_dict({**config["model"], "slimming": False})
        pruned = Ticket.load(run_dir / "ticket.json").pruned_config(dense)
        phases = {name: config[name] for name in PHASES}
    except (KeyError, TypeError) as err:
        raise RunError(f"{where}: run.json lacks {err}; give a finished pre-training run's folder") from None
    steps = {name: _number(report, ("stages", name, "steps"), where) for name in PHASES}
    search_steps = _number(report, ("stages", "search", "steps"), where) if "search" in report["stages"] else 0.0
    return (search_steps * phase_flops(dense, phases["phase1"])
            + sum(steps[name] * phase_flops(pruned, phases[name]) for name in PHASES))


def match_flops(run_dir: Path, cfg: PretrainConfig, share: float) -> StepMatch:
    """Steps whose dense FLOPs (this config's model and phases) equal ``run_dir``'s FLOPs."""
    report, config = pruned_run(run_dir, "--match-flops"), run_config(run_dir)
    ours = config_to_dict(cfg)["model"]
    differing = [key for key in GEOMETRY_FIELDS if config.get("model", {}).get(key) != ours[key]]
    if differing:
        raise RunError(f"--match-flops {run_dir}: its model differs from this config's ({', '.join(differing)})")
    target = run_flops(run_dir, report, config)
    phases: dict[str, PhaseConfig] = {"phase1": cfg.phase1, "phase2": cfg.phase2}
    per_step = {name: phase_flops(cfg.model, asdict(phase)) for name, phase in phases.items()}
    steps = steps_for_budget(target, per_step, share)
    return StepMatch("flops", str(run_dir), target, per_step, steps, cost_of(steps, per_step))
