"""What a ticket keeps and saves: per-layer counts, parameters and training FLOPs, pruned vs dense."""

from __future__ import annotations

from earlybert_pretrain.model.bert import BertConfig, flops_per_token, parameter_counts
from earlybert_pretrain.tickets.ticket import REPORT_SEQ_LENS, Ticket


def ticket_report(ticket: Ticket, config: BertConfig | None = None) -> dict:
    """Per-layer kept units, parameters and training FLOPs per token, pruned vs dense.

    The predicted step-time ratio is the training-FLOP ratio at that sequence length (``modeling.flops_per_token``:
    matmuls only, sparse MLM head). Without ``config`` the source config is rebuilt from the ticket's geometry.
    """
    dense = BertConfig.from_dict({**(config or ticket.source_config()).to_dict(), "slimming": False})
    pruned = ticket.pruned_config(dense)
    dense_params, pruned_params = parameter_counts(dense), parameter_counts(pruned)
    report = {
        "digest": ticket.digest(), "method": ticket.method, "step": ticket.step, "ffn_scope": ticket.ffn_scope,
        "layers": [{"layer": layer, "heads_kept": len(heads), "heads_total": dense.heads_per_layer[layer],
                    "ffn_kept": len(ffn), "ffn_total": dense.ffn_per_layer[layer]}
                   for layer, (heads, ffn) in enumerate(zip(ticket.heads_kept, ticket.ffn_kept))],
        "ffn_layers_kept_best_unit": ticket.ffn_layers_kept_best_unit,
        "parameters": {component: {"dense": dense_params[component], "pruned": pruned_params[component],
                                   "ratio": pruned_params[component] / dense_params[component]}
                       for component in ("attention", "ffn", "total")},
        "flops_per_token": {},
    }
    for seq_len in REPORT_SEQ_LENS:
        dense_flops, pruned_flops = flops_per_token(dense, seq_len), flops_per_token(pruned, seq_len)
        report["flops_per_token"][seq_len] = {"dense": dense_flops, "pruned": pruned_flops,
                                              "ratio": pruned_flops / dense_flops,
                                              "predicted_step_time_ratio": pruned_flops / dense_flops}
    return report


def render_report(report: dict) -> str:
    """The ``ticket_report`` dict as the text ``earlybert-ticket report`` prints."""
    lines = [f"ticket {report['digest'][:12]}  method={report['method']}  step={report['step']}  "
             f"ffn_scope={report['ffn_scope']}", "layer  heads kept  FFN neurons kept"]
    for row in report["layers"]:
        lines.append(f"{row['layer']:>5}  {row['heads_kept']:>5} / {row['heads_total']:<3}"
                     f"{row['ffn_kept']:>7} / {row['ffn_total']}")
    if report["ffn_layers_kept_best_unit"]:
        lines.append(f"note: global FFN pruning would have emptied layers {report['ffn_layers_kept_best_unit']}; "
                     f"each kept its best neuron")
    lines.append("parameters        dense       pruned   ratio")
    for component, row in report["parameters"].items():
        lines.append(f"{component:<10} {row['dense']:>12,} {row['pruned']:>12,}   {row['ratio']:.3f}")
    lines.append("seq   training GFLOP/token dense  pruned   FLOP ratio = predicted step-time ratio")
    for seq_len, row in report["flops_per_token"].items():
        lines.append(f"{seq_len:<5} {row['dense'] / 1e9:>26.4g} {row['pruned'] / 1e9:>7.4g}   {row['ratio']:.3f}")
    return "\n".join(lines)
