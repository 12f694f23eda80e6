"""Physical pruning: apply a ticket to a model and get a new, smaller plain BERT (paper Sec. 3.2, Eq. 1-3).

For every layer the Q/K/V output rows of dropped heads and the matching W_O input columns are removed, and the W1
rows / bias entries of dropped FFN neurons and the matching W2 columns. Surviving slimming coefficients are folded
into the weights they multiply: c_h scales head h's context before W_O, so it scales W_O's columns of that head;
c_f scales neuron f's activation before W2, so it scales W2's column f. The result computes exactly what the dense
model computes with the dropped units' coefficients set to 0, has no coefficients left (``config.slimming=False``),
and saves / loads as an ordinary HF-format folder that records the per-layer geometry.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from earlybert_pretrain.model.bert import BertConfig, BertLayer, BertPreTrainedModel

if TYPE_CHECKING:
    from earlybert_pretrain.tickets.ticket import Ticket


def _linear_from(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    """A new Linear holding ``weight`` / ``bias`` with ``like``'s dtype, device and requires_grad."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    linear.weight.requires_grad_(like.weight.requires_grad)
    if bias is not None:
        linear.bias.requires_grad_(like.bias.requires_grad)
    return linear


def _keep_rows(linear: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    bias = linear.bias.index_select(0, rows) if linear.bias is not None else None
    return _linear_from(linear.weight.index_select(0, rows), bias, linear)


def _keep_scaled_columns(linear: nn.Linear, columns: torch.Tensor, scale: torch.Tensor) -> nn.Linear:
    """Keep ``columns`` of the weight, each multiplied by its ``scale`` (computed in float32, then cast back)."""
    weight = linear.weight.index_select(1, columns)
    weight = (weight.float() * scale.float().to(weight.device)).to(weight.dtype)
    return _linear_from(weight, linear.bias, linear)


def _coefficients_or_ones(coefficients: torch.Tensor | None, size: int, device: torch.device) -> torch.Tensor:
    if coefficients is None:
        return torch.ones(size, device=device)
    return coefficients.detach()


@torch.no_grad()
def _prune_layer(layer: BertLayer, heads_kept: list[int], ffn_kept: list[int]) -> None:
    attention, intermediate = layer.attention.self, layer.intermediate
    device = attention.query.weight.device
    head_size = attention.head_size
    heads = torch.tensor(heads_kept, dtype=torch.long, device=device)
    head_rows = (heads[:, None] * head_size + torch.arange(head_size, device=device)).reshape(-1)
    head_scale = _coefficients_or_ones(attention.head_coefficients, attention.num_heads, device)[heads]
    for name in ("query", "key", "value"):
        setattr(attention, name, _keep_rows(getattr(attention, name), head_rows))
    layer.attention.output.dense = _keep_scaled_columns(
        layer.attention.output.dense, head_rows, head_scale.repeat_interleave(head_size))
    attention.num_heads = len(heads_kept)
    attention.head_coefficients = None

    neurons = torch.tensor(ffn_kept, dtype=torch.long, device=device)
    width = intermediate.dense.out_features
    neuron_scale = _coefficients_or_ones(intermediate.neuron_coefficients, width, device)[neurons]
    intermediate.dense = _keep_rows(intermediate.dense, neurons)
    layer.output.dense = _keep_scaled_columns(layer.output.dense, neurons, neuron_scale)
    intermediate.neuron_coefficients = None


def _module_geometry(model: BertPreTrainedModel) -> tuple[list[int], list[int]]:
    layers = model.encoder_layers()
    return ([layer.attention.self.num_heads for layer in layers],
            [layer.intermediate.dense.out_features for layer in layers])


def prune(model: BertPreTrainedModel, ticket: Ticket) -> BertPreTrainedModel:
    """A NEW model of the same class with only the ticket's heads and neurons; ``model`` is left untouched.

    Works on any weights of the ticket's source geometry (θ0, searched or pre-trained) and any
    ``BertPreTrainedModel`` (pre-training, bare ``BertModel``, fine-tuning heads). Raises TicketError when the ticket
    was drawn for another geometry.
    """
    ticket.check_fits(model.config)
    heads, widths = _module_geometry(model)
    if (heads, widths) != (model.config.heads_per_layer, model.config.ffn_per_layer):
        raise ValueError(f"the model's layers have {heads} heads and FFN widths {widths}, but its config says "
                         f"{model.config.heads_per_layer} / {model.config.ffn_per_layer}")
    pruned_values = ticket.pruned_config(model.config).to_dict()
    pruned = copy.deepcopy(model)
    for layer, heads_kept, ffn_kept in zip(pruned.encoder_layers(), ticket.heads_kept, ticket.ffn_kept):
        _prune_layer(layer, heads_kept, ffn_kept)
    # deepcopy keeps shared configs shared; update every copied config object in place so all holders agree.
    configs = {id(module.config): module.config for module in pruned.modules()
               if isinstance(getattr(module, "config", None), BertConfig)}
    for config in configs.values():
        for key, value in pruned_values.items():
            setattr(config, key, copy.copy(value))
        config.validate()
    return pruned
