"""The run report: each stage's steps, time (the paper's protocol, Sec. 4.1), tokens, losses and validation scores,
the ticket, and the time saved against a dense run; written as report.json and report.txt beside the run's other
outputs, with report.png: the loss against steps and against time, and the validation MLM accuracy against time,
each stage its own line, the ``--compare-to`` runs (dense, reduced ...) drawn in the same axes.

With a dense run to compare to, the report states the paper's quantity (Sec. 4, Table 7: quality per unit of time):
the Sec. 4.1 time at which this run's validation MLM accuracy first reached the dense run's final one, as a fraction
of the dense run's time, or that it never did (with both accuracies)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from earlybert_pretrain.common.files import atomic_path, atomic_write_json, atomic_write_text, read_json
from earlybert_pretrain.errors import RunError

STAGES = ("search", "draw", "phase1", "phase2")
PLOT_NAME = "report.png"
STAGE_STYLES = {"search": ":", "phase1": "-", "phase2": "--"}


def stage_seconds(progress: dict) -> float:
    """Training time by the paper's protocol (Sec. 4.1): the summed step times of every stage, search included,
    plus the draw (model builds are reported per stage, not counted: the dense run builds a model too)."""
    return sum(entry.get("timing", {}).get("total_seconds", 0.0) for entry in progress.values())


VALIDATION_METRICS = ("mlm_loss", "mlm_accuracy", "nsp_accuracy")


def final_validation(entry: dict) -> dict | None:
    """A stage's last evaluation (its end): step and metrics; None for a stage without evaluations."""
    records = entry.get("validation") or [None]
    last = records[-1]
    return None if last is None else {"step": last["step"], **{name: last[name] for name in VALIDATION_METRICS}}


def stage_summary(entry: dict) -> dict:
    timing, losses = entry.get("timing", {}), entry.get("losses") or [None]
    return {"steps": entry.get("steps"), "seconds": timing.get("total_seconds"),
            "mean_step_seconds": timing.get("mean_step_seconds"), "tokens": timing.get("tokens"),
            "tokens_per_second": timing.get("tokens_per_second"), "wall_seconds": timing.get("wall_seconds"),
            "data_wait_seconds": timing.get("data_wait_seconds"), "data_wait_share": timing.get("data_wait_share"),
            "first_loss": losses[0], "final_loss": losses[-1],
            "optimizer_state_bytes_per_rank": timing.get("optimizer_state_bytes", {}).get("total"),
            "validation": final_validation(entry), "evaluation_seconds": timing.get("evaluation_seconds")}


def write_run_report(out: Path, mode: str, progress: dict, compare_to: Path | Sequence[Path] | None,
                     reduced: dict | None = None) -> dict:
    """report.json, report.txt and report.png in ``out``: each stage's steps, time, tokens and losses, the ticket,
    the time saved against the first dense run in ``compare_to`` (its report.json), every run side by side, and for
    mode=reduced what its steps matched (``reduced``, a ``StepMatch`` record); the plot draws every ``compare_to``
    run beside this one."""
    if compare_to is None:
        others = []
    elif isinstance(compare_to, (str, os.PathLike)):
        others = [Path(compare_to)]
    else:
        others = [Path(run) for run in compare_to]
    curves = [(f"{mode} (this run)", progress)] + [run_curves(run) for run in others]  # read before writing
    other_reports = [json.loads((run / "report.json").read_text()) for run in others]
    dense_runs = [(run, other) for run, other in zip(others, other_reports) if other.get("mode") == "dense"]
    report = {"mode": mode, "output_dir": str(out), "total_seconds": stage_seconds(progress),
              "stages": {name: stage_summary(progress[name]) for name in STAGES if name in progress},
              "final_model": str(out / "final_model")}
    report["tokens"] = sum(stage["tokens"] or 0 for stage in report["stages"].values())
    scored = [(name, stage["validation"]) for name, stage in report["stages"].items() if stage.get("validation")]
    if scored:  # the last scored stage's end: the final model's validation scores
        report["validation"] = {"stage": scored[-1][0], **scored[-1][1]}
    if (out / "ticket_report.json").is_file():
        ticket = json.loads((out / "ticket_report.json").read_text())
        report["ticket"] = {"digest": ticket["digest"], "method": ticket["method"], "step": ticket["step"],
                            "parameter_ratio": ticket["parameters"]["total"]["ratio"]}
        if (out / "search" / "heatmap.png").is_file():
            report["heatmap"] = str(out / "search" / "heatmap.png")
    if dense_runs:  # the time saving is against the first dense run
        dense_dir, dense = dense_runs[0]
        report["compare_to"] = {
            "dense_run": str(dense_dir), "dense_seconds": dense["total_seconds"],
            "time_ratio": report["total_seconds"] / dense["total_seconds"],
            "time_saved": 1.0 - report["total_seconds"] / dense["total_seconds"],
            "step_time_ratio": {name: report["stages"][name]["mean_step_seconds"] / dense["stages"][name][
                "mean_step_seconds"] for name in ("phase1", "phase2")}}
        if "validation" in dense and "validation" in report:
            report["compare_to"]["time_to_dense_accuracy"] = time_to_accuracy(
                validation_series(progress), dense["validation"]["mlm_accuracy"], dense["total_seconds"])
    if others:
        report["side_by_side"] = [side_by_side(label, other) for (label, _), other in
                                  zip(curves, [report, *other_reports])]
    if reduced is not None:
        report["reduced"] = reduced
    report["plot"] = str(write_loss_plot(out / PLOT_NAME, curves))
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.txt", render_run_report(report))
    return report


def side_by_side(label: str, report: dict) -> dict:
    """One run's row in the comparison table: steps per stage, Sec. 4.1 time, the last trained stage's loss."""
    stages = report["stages"]
    trained = [stage for stage in stages.values() if stage.get("final_loss") is not None]
    return {"run": label, "mode": report["mode"], "total_seconds": report["total_seconds"],
            "steps": {name: stages[name]["steps"] for name in ("search", "phase1", "phase2") if name in stages},
            "final_loss": trained[-1]["final_loss"] if trained else None,
            "validation": report.get("validation")}


@dataclass
class LossSeries:
    """One stage's losses placed on the run's whole schedule: steps and seconds count from the run's start."""

    stage: str
    steps: list[int]
    seconds: list[float]
    losses: list[float]


def stage_offsets(progress: dict) -> list[tuple[str, dict, int, float]]:
    """(stage, record, steps before it, Sec. 4.1 seconds before it) for each recorded stage, in order; the draw
    trains no step but its time shifts what follows."""
    offsets, step_offset, time_offset = [], 0, 0.0
    for name in STAGES:
        if name in progress:
            entry = progress[name]
            offsets.append((name, entry, step_offset, time_offset))
            step_offset += len(entry.get("losses") or [])
            time_offset += float(entry.get("timing", {}).get("total_seconds", 0.0))
    return offsets


def loss_series(progress: dict) -> list[LossSeries]:
    """Per trained stage, each step's loss at its step number and time in the whole run (the stages in order).

    Time is the Sec. 4.1 protocol's: every stage's summed step time, the draw included (it has no losses, so it
    only shifts what follows). Within a stage each step is placed at the stage's mean step time, as the progress
    record keeps the sum, not each step's time."""
    series = []
    for name, entry, step_offset, time_offset in stage_offsets(progress):
        losses, seconds = list(entry.get("losses") or []), float(entry.get("timing", {}).get("total_seconds", 0.0))
        if losses:
            per_step = seconds / len(losses)
            series.append(LossSeries(name, [step_offset + i + 1 for i in range(len(losses))],
                                     [time_offset + per_step * (i + 1) for i in range(len(losses))], losses))
    return series


@dataclass
class ValidationPoint:
    """One evaluation placed on the run's whole schedule (Sec. 4.1 seconds from the run's start)."""

    stage: str
    step: int  # within its stage
    seconds: float
    mlm_accuracy: float


def validation_series(progress: dict) -> list[ValidationPoint]:
    """Every evaluation of the run in order, at the Sec. 4.1 time it was taken (the stage's step time so far,
    after every earlier stage's; evaluation time itself is outside the protocol)."""
    return [ValidationPoint(name, record["step"], time_offset + float(record["train_seconds"]),
                            float(record["mlm_accuracy"]))
            for name, entry, _, time_offset in stage_offsets(progress) for record in entry.get("validation") or []]


def time_to_accuracy(points: Sequence[ValidationPoint], target: float, dense_seconds: float) -> dict:
    """When ``points`` first reach the dense run's final validation MLM accuracy ``target``: the Sec. 4.1 time and
    its fraction of the dense run's time ``dense_seconds``; else reached is False, with both accuracies."""
    result = {"dense_accuracy": target, "dense_seconds": dense_seconds,
              "final_accuracy": points[-1].mlm_accuracy if points else None, "reached": False}
    for point in points:
        if point.mlm_accuracy >= target:
            return {**result, "reached": True, "stage": point.stage, "step": point.step, "seconds": point.seconds,
                    "fraction": point.seconds / dense_seconds}
    return result


def run_curves(run_dir: Path) -> tuple[str, dict]:
    """(label, progress) of another finished run: its mode from report.json, its losses from progress.json."""
    report = read_json(Path(run_dir) / "report.json", "run report", RunError)
    return f"{report['mode']} ({Path(run_dir).name})", read_json(Path(run_dir) / "progress.json", "run progress",
                                                                 RunError)


def write_loss_plot(path: Path, runs: list[tuple[str, dict]]) -> Path:
    """report.png: loss vs step (left) and vs time (right); one colour per run, one line style per stage."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    figure = Figure(figsize=(16, 4), dpi=100)
    FigureCanvasAgg(figure)
    by_step, by_time, accuracy = figure.subplots(1, 3)
    colours = [f"C{index}" for index in range(len(runs))]
    for (_, progress), colour in zip(runs, colours):
        for series in loss_series(progress):
            style = {"linestyle": STAGE_STYLES.get(series.stage, "-"), "color": colour, "linewidth": 1.2,
                     "marker": "o" if len(series.losses) == 1 else None, "markersize": 3}  # one step: a dot
            by_step.plot(series.steps, series.losses, **style)
            by_time.plot(series.seconds, series.losses, **style)
        points = validation_series(progress)
        for name in STAGE_STYLES:  # each stage's evaluations as a line with dots, the stage's line style
            mine = [point for point in points if point.stage == name]
            accuracy.plot([p.seconds for p in mine], [p.mlm_accuracy for p in mine], color=colour, marker="o",
                          markersize=3, linewidth=1.2, linestyle=STAGE_STYLES[name])
    for axes, xlabel in ((by_step, "optimizer step (all stages)"), (by_time, "training time, s (Sec. 4.1 protocol)")):
        axes.set_xlabel(xlabel)
        axes.set_ylabel("training loss (MLM + NSP)")
        axes.grid(alpha=0.3)
    accuracy.set_xlabel("training time, s (Sec. 4.1 protocol)")
    accuracy.set_ylabel("validation MLM accuracy")
    accuracy.grid(alpha=0.3)
    by_step.legend([Line2D([], [], color=colour) for colour in colours], [label for label, _ in runs],
                   loc="upper right", fontsize=8)
    by_time.legend([Line2D([], [], color="k", linestyle=style) for style in STAGE_STYLES.values()],
                   list(STAGE_STYLES), loc="upper right", fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as temp:
        figure.savefig(temp, format="png")
    return path


def _cell(value: float | None, spec: str) -> str:
    """A number in the stage table; a dash where a run recorded none (runs from before wall/data-wait timing)."""
    return format(value, spec) if value is not None else "-".rjust(int(spec.split(".")[0]))


def render_time_to_accuracy(result: dict) -> str:
    """The paper's quantity in one line: when this run first reached the dense run's final validation accuracy."""
    target = f"the dense run's final validation MLM accuracy {result['dense_accuracy']:.4f}"
    if result["reached"]:
        return (f"time to {target}: {result['seconds']:.1f} s = {result['fraction']:.3f} of the dense run's "
                f"{result['dense_seconds']:.1f} s ({result['stage']} step {result['step']})")
    final = "none" if result["final_accuracy"] is None else f"{result['final_accuracy']:.4f}"
    return f"did not reach {target} (this run's final: {final}; dense time {result['dense_seconds']:.1f} s)"


def render_run_report(report: dict) -> str:
    lines = [f"EarlyBERT pre-training report ({report['mode']}): {report['output_dir']}",
             "stage     steps   seconds   first loss  final loss    wall s  data wait    tokens/s"]
    for name, stage in report["stages"].items():
        if stage["steps"] is not None:
            timing = (f"{_cell(stage.get('wall_seconds'), '8.1f')}  {_cell(stage.get('data_wait_share'), '9.1%')}"
                      f"  {_cell(stage.get('tokens_per_second'), '10.0f')}")
            lines.append(f"{name:<8} {stage['steps']:>6} {stage['seconds']:>9.1f}   {stage['first_loss']:>10.4f}"
                         f"  {stage['final_loss']:>10.4f}  {timing}")
    lines.append(f"total time (Sec. 4.1 protocol): {report['total_seconds']:.1f} s")
    scored = {name: stage for name, stage in report["stages"].items() if stage.get("validation")}
    if scored:  # each stage's end; evaluation time is outside the Sec. 4.1 time
        lines.append("validation  stage      step   mlm loss  mlm accuracy  nsp accuracy   eval s")
        for name, stage in scored.items():
            scores = stage["validation"]
            lines.append(f"{'':<11} {name:<8} {scores['step']:>6} {scores['mlm_loss']:>10.4f} "
                         f"{scores['mlm_accuracy']:>13.4f} {scores['nsp_accuracy']:>13.4f}  "
                         f"{_cell(stage.get('evaluation_seconds'), '7.1f')}")
    state = [f"{name} {stage['optimizer_state_bytes_per_rank'] / 2**20:.2f} MiB" for name, stage in
             report["stages"].items() if stage.get("optimizer_state_bytes_per_rank")]
    if state:  # moments + fp32 masters this rank holds (ZeRO 1/2 shard them)
        lines.append("optimizer state per rank: " + ", ".join(state))
    if "ticket" in report:
        ticket = report["ticket"]
        lines.append(f"ticket {ticket['digest'][:12]} ({ticket['method']}, step {ticket['step']}): "
                     f"{ticket['parameter_ratio']:.1%} of the dense parameters")
    if "heatmap" in report:
        lines.append(f"mask-distance heatmap (Figure 1): {report['heatmap']}")
    if "compare_to" in report:
        compare = report["compare_to"]
        lines.append(f"vs dense run {compare['dense_run']}: time ratio {compare['time_ratio']:.3f} "
                     f"(saved {compare['time_saved']:.1%}); step-time ratio phase 1 "
                     f"{compare['step_time_ratio']['phase1']:.3f}, phase 2 {compare['step_time_ratio']['phase2']:.3f}")
        if "time_to_dense_accuracy" in compare:
            lines.append(render_time_to_accuracy(compare["time_to_dense_accuracy"]))
    if "reduced" in report:
        match = report["reduced"]
        unit = "s" if match["matched"] == "time" else "FLOPs"
        lines.append(f"reduced: {match['steps']['phase1']} + {match['steps']['phase2']} steps match the "
                     f"{match['matched']} of {match['run']} ({match['cost']:.4g} vs {match['target']:.4g} {unit})")
    if "side_by_side" in report:
        lines.append("side by side                    mode        search  phase1  phase2   seconds  final loss"
                     "  val mlm loss  val mlm acc  val nsp acc")
        for row in report["side_by_side"]:
            steps = [str(row["steps"].get(name, "-")) for name in ("search", "phase1", "phase2")]
            loss = "-" if row["final_loss"] is None else f"{row['final_loss']:.4f}"
            scores = row.get("validation") or {}
            validation = "  ".join(_cell(scores.get(name), spec) for name, spec in
                                   zip(VALIDATION_METRICS, ("12.4f", "11.4f", "11.4f")))
            lines.append(f"{row['run'][:31]:<31} {row['mode']:<10} {steps[0]:>7} {steps[1]:>7} {steps[2]:>7} "
                         f"{row['total_seconds']:>9.1f}  {loss:>10}  {validation}")
    if "plot" in report:
        lines.append(f"loss curves: {report['plot']}")
    lines.append(f"final model (HF format): {report['final_model']}")
    return "\n".join(lines) + "\n"
