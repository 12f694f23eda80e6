"""The run report: each stage's steps, time (the paper's protocol, Sec. 4.1), tokens and losses, the ticket, and the
time saved against a dense run; written as report.json and report.txt beside the run's other outputs."""

from __future__ import annotations

import json
from pathlib import Path

from earlybert_pretrain.common.files import atomic_write_json, atomic_write_text

STAGES = ("search", "draw", "phase1", "phase2")


def stage_seconds(progress: dict) -> float:
    """Training time by the paper's protocol (Sec. 4.1): the summed step times of every stage, search included,
    plus the draw (model builds are reported per stage, not counted: the dense run builds a model too)."""
    return sum(entry.get("timing", {}).get("total_seconds", 0.0) for entry in progress.values())


def stage_summary(entry: dict) -> dict:
    timing, losses = entry.get("timing", {}), entry.get("losses") or [None]
    return {"steps": entry.get("steps"), "seconds": timing.get("total_seconds"),
            "mean_step_seconds": timing.get("mean_step_seconds"), "tokens": timing.get("tokens"),
            "first_loss": losses[0], "final_loss": losses[-1]}


def write_run_report(out: Path, mode: str, progress: dict, compare_to: Path | None) -> dict:
    """report.json and report.txt in ``out``: each stage's steps, time, tokens and losses, the ticket, and the time
    saved against the dense run in ``compare_to`` (its report.json)."""
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
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.txt", render_run_report(report))
    return report


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
    lines.append(f"final model (HF format): {report['final_model']}")
    return "\n".join(lines) + "\n"
