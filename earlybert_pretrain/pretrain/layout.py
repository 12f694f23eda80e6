"""A pre-training run's folder, named in one place: every file a stage writes or a later stage reads.

    run.json             the config and argv of the run (a resume must match it)
    progress.json        finished stages, each with its StageResult record: the resume point
    timing.json          per-stage step time by the Sec. 4.1 protocol
    checkpoints/         DeepSpeed checkpoints of the running stage (train/checkpoint.py)
      plans/             sample plans, one .npy + .json per (seq len, short_seq_prob, seed): built by rank 0,
                         memory-mapped by every rank (pretrain/sample_plan.py); under checkpoints/, the one
                         folder every rank is checked to share
    tensorboard/         event files (rank 0)
    theta0/              θ0: the initial weights (HF folder), what re-initialisation rewinds to
    search/              mask_history.json and heatmap.png (Figure 1)
    ticket.json          the drawn (or given / random) ticket; ticket_report.json beside it
    phase1_model/        phase 1's weights, fp32 (HF folder)
    final_model/         phase 2's weights, fp32 (HF folder + vocab.txt + ticket.json)
    report.json / report.txt / report.png
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @property
    def run_file(self) -> Path:
        return self.root / "run.json"

    @property
    def progress(self) -> Path:
        return self.root / "progress.json"

    @property
    def timing(self) -> Path:
        return self.root / "timing.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def plans(self) -> Path:
        return self.checkpoints / "plans"

    @property
    def theta0(self) -> Path:
        return self.root / "theta0"

    @property
    def search(self) -> Path:
        return self.root / "search"

    @property
    def mask_history(self) -> Path:
        return self.search / "mask_history.json"

    @property
    def heatmap(self) -> Path:
        return self.search / "heatmap.png"

    @property
    def ticket(self) -> Path:
        return self.root / "ticket.json"

    @property
    def ticket_report(self) -> Path:
        return self.root / "ticket_report.json"

    @property
    def phase1_model(self) -> Path:
        return self.root / "phase1_model"

    @property
    def final_model(self) -> Path:
        return self.root / "final_model"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def report_txt(self) -> Path:
        return self.root / "report.txt"

    @property
    def report_png(self) -> Path:
        return self.root / "report.png"

    def owned(self) -> list[str]:
        """Every entry a run writes at the top of its folder: what --overwrite removes, and nothing else."""
        return ["run.json", "progress.json", "timing.json", "checkpoints", "tensorboard", "theta0", "search",
                "ticket.json", "ticket_report.json", "phase1_model", "final_model", "report.json", "report.txt",
                "report.png"]

    def model_folder(self, phase: str) -> Path:
        """Where a phase leaves its weights: phase1 -> phase1_model/, phase2 -> final_model/."""
        return self.phase1_model if phase == "phase1" else self.final_model
