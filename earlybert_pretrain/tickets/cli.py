"""``earlybert-ticket``: inspect tickets drawn by the search stage.

    earlybert-ticket report t.json [--config FILE] [--json]
    earlybert-ticket distance a.json b.json
    earlybert-ticket heatmap (history.json | t1.json t2.json ...) --output heatmap.png
    earlybert-ticket export MODEL_DIR OUT_DIR --format padded|compact [--overwrite]
    earlybert-ticket apply HF_BERT_DIR TICKET.json OUT_DIR --format padded|compact [--overwrite]

``--config`` is a model YAML (``configs/bert-base.yaml``), a pre-training YAML with a ``model`` section, or an
HF-format model folder / its config.json; without it the report uses the geometry recorded in the ticket.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from earlybert_pretrain.common.oserrors import user_filesystem_errors
from earlybert_pretrain.config import PretrainConfig, load_config, read_yaml
from earlybert_pretrain.errors import UserError
from earlybert_pretrain.model.bert import BertConfig
from earlybert_pretrain.model.export import FORMATS, apply_ticket, export_model
from earlybert_pretrain.model.hf import read_config
from earlybert_pretrain.tickets.distance import mask_distance
from earlybert_pretrain.tickets.history import HISTORY_FORMAT, MaskHistory
from earlybert_pretrain.tickets.report import render_report, ticket_report
from earlybert_pretrain.tickets.ticket import Ticket


def load_model_config(path: str) -> BertConfig:
    """A BertConfig from a model YAML, a pre-training YAML (its ``model`` section) or an HF folder / config.json."""
    location = Path(path)
    if location.is_dir():
        return read_config(location)
    if location.suffix == ".json":
        return read_config(location.parent)
    if "model" in read_yaml(location):  # a pre-training recipe: its model section, or the model file it names
        return load_config(PretrainConfig, location).model
    return load_config(BertConfig, location)


def _report(args: argparse.Namespace) -> None:
    ticket = Ticket.load(args.ticket)
    report = ticket_report(ticket, load_model_config(args.config) if args.config else None)
    print(json.dumps(report, indent=2) if args.json else render_report(report))


def _distance(args: argparse.Namespace) -> None:
    distance = mask_distance(Ticket.load(args.a), Ticket.load(args.b))
    print("  ".join(f"{kind}={value:.4f}" for kind, value in distance.items()))


def _json_format(path: str) -> object:
    """The file's "format" field, or None when it is unreadable (the real loader then says what is wrong)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8")).get("format")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None


def _history_from(paths: list[str]) -> MaskHistory:
    """One mask-history file, or ticket files ordered by their recorded step (file order when unrecorded)."""
    if len(paths) == 1 and _json_format(paths[0]) == HISTORY_FORMAT:
        return MaskHistory.load(paths[0])
    tickets = [Ticket.load(path) for path in paths]
    history = MaskHistory()
    steps = [ticket.step if ticket.step is not None else index for index, ticket in enumerate(tickets)]
    for step, ticket in sorted(zip(steps, tickets), key=lambda pair: pair[0]):
        history.add(step, ticket)
    return history


def _heatmap(args: argparse.Namespace) -> None:
    history = _history_from(args.inputs)
    history.save_heatmap(args.output, kinds=tuple(args.kinds))
    print(f"wrote {args.output} ({len(history)} masks, steps {history.steps[0]}..{history.steps[-1]})")


def _export(args: argparse.Namespace) -> None:
    print(f"wrote {export_model(args.model_dir, args.out_dir, args.format, args.overwrite)} ({args.format})")


def _apply(args: argparse.Namespace) -> None:
    ticket = Ticket.load(args.ticket)
    print(f"wrote {apply_ticket(args.model_dir, ticket, args.out_dir, args.format, args.overwrite)} "
          f"({args.format}, ticket {ticket.digest()[:12]})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="earlybert-ticket", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser("report", help="per-layer kept units, parameters, FLOPs and predicted speed-up")
    report.add_argument("ticket")
    report.add_argument("--config", help="model YAML, pre-training YAML or HF model folder / config.json")
    report.add_argument("--json", action="store_true", help="print the report as JSON")
    report.set_defaults(run=_report)
    distance = commands.add_parser("distance", help="normalised Hamming distance between two tickets' masks")
    distance.add_argument("a")
    distance.add_argument("b")
    distance.set_defaults(run=_distance)
    heatmap = commands.add_parser("heatmap", help="Figure-1 heatmap of pairwise mask distances (PNG)")
    heatmap.add_argument("inputs", nargs="+", help="a mask-history JSON, or several ticket JSONs")
    heatmap.add_argument("--output", "-o", required=True, help="PNG file to write")
    heatmap.add_argument("--kinds", nargs="+", default=["head", "ffn"], choices=["head", "ffn", "combined"])
    heatmap.set_defaults(run=_heatmap)
    export = commands.add_parser("export", help="our HF folder -> a folder stock transformers loads (padded: plain "
                                 "BERT, zero-padded; compact: real sizes, trust_remote_code)")
    export.add_argument("model_dir")
    apply = commands.add_parser("apply", help="any HF BERT folder pruned by a ticket -> a padded or compact folder")
    apply.add_argument("model_dir")
    apply.add_argument("ticket")
    for command in (export, apply):
        command.add_argument("out_dir")
        command.add_argument("--format", required=True, choices=FORMATS)
        command.add_argument("--overwrite", action="store_true",
                             help="replace OUT_DIR when it holds an earlier export (and nothing else)")
    export.set_defaults(run=_export)
    apply.set_defaults(run=_apply)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with user_filesystem_errors(getattr(args, "output", None) or getattr(args, "out_dir", None)):
            args.run(args)
    except UserError as err:  # anything else is a bug: it keeps its traceback
        print(f"earlybert-ticket {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
