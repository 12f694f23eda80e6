"""The run report: each stage's steps, time (the paper's protocol, Sec. 4.1), tokens and losses, the ticket, and the
time saved against a dense run; written as report.json and report.txt beside the run's other outputs, with
report.png: the loss against steps and against time, each stage its own line, the ``--compare-to`` runs (dense,
reduced ...) drawn in the same axes."""

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


def stage_summary(entry: dict) -> dict:
    timing, losses = entry.get("timing", {}), entry.get("losses") or [None]
    return {"steps": entry.get("steps"), "seconds": timing.get("total_seconds"),
            "mean_step_seconds": timing.get("mean_step_seconds"), "tokens": timing.get("tokens"),
            "first_loss": losses[0], "final_loss": losses[-1]}


def write_run_report(out: Path, mode: str, progress: dict,
                     compare_to: Path | Sequence[Path] | None) -> dict:
    """report.json, report.txt and report.png in ``out``: each stage's steps, time, tokens and losses, the ticket,
    and the time saved against the dense run in ``compare_to`` (its report.json; with several runs, the first);
    the plot draws every ``compare_to`` run beside this one."""
    if compare_to is None:
        others = []
    elif isinstance(compare_to, (str, os.PathLike)):
        others = [Path(compare_to)]
    else:
        others = [Path(run) for run in compare_to]
    compare_to = others[0] if others else None
    curves = [(f"{mode} (this run)", progress)] + [run_curves(run) for run in others]  # read before writing
    report = {"mode": mode, "output_dir": str(out), "total_seconds": stage_seconds(progress),
              "stages": {name: stage_summary(progress[name]) for name in STAGES if name in progress},
              "final_model": str(out / "final_model")}
    report["tokens"] = sum(stage["tokens"] or 0 for stage in report["stages"].values())
    if (out / "ticket_report.json").is_file():
        ticket = json.loads((out / "ticket_report.json").read_text())
        report["ticket"] = {"digest": ticket["digest"], "method": ticket["method"], "step": ticket["step"],
                            "parameter_ratio": ticket["parameters"]["total"]["ratio"]}
        if (out / "search" / "heatmap.png").is_file():
            report["heatmap"] = str(out / "search" / "heatmap.png")
    if compare_to is not None:
        dense = json.loads((compare_to / "report.json").read_text())
        report["compare_to"] = {
            "dense_run": str(compare_to), "dense_seconds": dense["total_seconds"],
            "time_ratio": report["total_seconds"] / dense["total_seconds"],
            "time_saved": 1.0 - report["total_seconds"] / dense["total_seconds"],
            "step_time_ratio": {name: report["stages"][name]["mean_step_seconds"] / dense["stages"][name][
                "mean_step_seconds"] for name in ("phase1", "phase2")}}
    report["plot"] = str(write_loss_plot(out / PLOT_NAME, curves))
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.txt", render_run_report(report))
    return report


@dataclass
class LossSeries:
    """One stage's losses placed on the run's whole schedule: steps and seconds count from the run's start."""

    stage: str
    steps: list[int]
    seconds: list[float]
    losses: list[float]


def loss_series(progress: dict) -> list[LossSeries]:
    """Per trained stage, each step's loss at its step number and time in the whole run (the stages in order).

    Time is the Sec. 4.1 protocol's: every stage's summed step time, the draw included (it has no losses, so it
    only shifts what follows). Within a stage each step is placed at the stage's mean step time, as the progress
    record keeps the sum, not each step's time."""
    series, step_offset, time_offset = [], 0, 0.0
    for name in STAGES:
        if name not in progress:
            continue
        entry = progress[name]
        losses, seconds = list(entry.get("losses") or []), float(entry.get("timing", {}).get("total_seconds", 0.0))
        if losses:
            per_step = seconds / len(losses)
            series.append(LossSeries(name, [step_offset + i + 1 for i in range(len(losses))],
                                     [time_offset + per_step * (i + 1) for i in range(len(losses))], losses))
        step_offset += len(losses)
        time_offset += seconds
    return series


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

    figure = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(figure)
    by_step, by_time = figure.subplots(1, 2)
    colours = [f"C{index}" for index in range(len(runs))]
    for (_, progress), colour in zip(runs, colours):
        for series in loss_series(progress):
            style = {"linestyle": STAGE_STYLES.get(series.stage, "-"), "color": colour, "linewidth": 1.2,
                     "marker": "o" if len(series.losses) == 1 else None, "markersize": 3}  # one step: a dot
            by_step.plot(series.steps, series.losses, **style)
            by_time.plot(series.seconds, series.losses, **style)
    for axes, xlabel in ((by_step, "optimizer step (all stages)"), (by_time, "training time, s (Sec. 4.1 protocol)")):
        axes.set_xlabel(xlabel)
        axes.set_ylabel("training loss (MLM + NSP)")
        axes.grid(alpha=0.3)
    by_step.legend([Line2D([], [], color=colour) for colour in colours], [label for label, _ in runs],
                   loc="upper right", fontsize=8)
    by_time.legend([Line2D([], [], color="k", linestyle=style) for style in STAGE_STYLES.values()],
                   list(STAGE_STYLES), loc="upper right", fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as temp:
        figure.savefig(temp, format="png")
    return path


def render_run_report(report: dict) -> str:
    lines = [f"EarlyBERT pre-training report ({report['mode']}): {report['output_dir']}",
             "stage     steps   seconds   first loss  final loss"]
    for name, stage in report["stages"].items():
        if stage["steps"] is not None:
            lines.append(f"{name:<8} {stage['steps']:>6} {stage['seconds']:>9.1f}   {stage['first_loss']:>10.4f}"
                         f"  {stage['final_loss']:>10.4f}")
    lines.append(f"total time (Sec. 4.1 protocol): {report['total_seconds']:.1f} s")
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
    if "plot" in report:
        lines.append(f"loss curves: {report['plot']}")
    lines.append(f"final model (HF format): {report['final_model']}")
    return "\n".join(lines) + "\n"
