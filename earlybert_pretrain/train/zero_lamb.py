"""LAMB exact under ZeRO stage 1 and 2, and what the optimizer state costs per rank.

ZeRO 1/2 hand the optimizer one flat fp32 partition per param group, so a plain LAMB would take the trust ratio
||w|| / ||u|| over the partition instead of over each tensor (DeepSpeed issues #88, #490). Done here as apex's
DistributedFusedLAMB does it: after ``deepspeed.initialize`` we read DeepSpeed's map of the flat group buffer
(``round_robin_bit16_offsets`` / ``_meta``, partition size, this rank's partition) into a ``PartitionLayout``: which
slice of this rank's partition is a fragment of which tensor. Each step, every rank sums the squared norms of its
fragments per tensor, one all-reduce of that small vector over the data-parallel group gives every tensor's true
norms, and each fragment is scaled by its tensor's ratio. The rest of LAMB is elementwise, so it is exact already.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from earlybert_pretrain.train.optim import Lamb


@dataclass(frozen=True)
class PartitionLayout:
    """Where the tensors of one param group lie in this rank's flat partition (in DeepSpeed's buffer order)."""

    partition: torch.Tensor  # the flat fp32 partition LAMB steps (held, so its id stays this tensor's)
    starts: tuple[int, ...]  # per fragment: its offset in the partition
    lengths: tuple[int, ...]
    owners: torch.Tensor  # per fragment: index of its tensor in the group (long), the slot of its norms
    num_tensors: int
    process_group: object  # the data-parallel group the partitions are spread over

    def fragments(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat.narrow(0, start, length) for start, length in zip(self.starts, self.lengths)]

    def apply_trust_ratios(self, weight: torch.Tensor, update: torch.Tensor) -> None:
        """Scale ``update`` (flat, like the partition) in place by each tensor's ||w|| / ||u|| (1.0 where either is
        0). Every rank of the group must call this in the same step: it all-reduces once."""
        weights, updates = self.fragments(weight), self.fragments(update)
        # float64 for the few sums, so adding fragments from several ranks loses nothing against one fp32 norm.
        squares = torch.zeros(2, self.num_tensors, dtype=torch.float64, device=weight.device)
        if weights:
            for row, parts in ((0, weights), (1, updates)):
                norms = torch.stack(torch._foreach_norm(parts)).double()
                squares[row].index_add_(0, self.owners, norms * norms)
        dist.all_reduce(squares, group=self.process_group)
        weight_norms, update_norms = squares.sqrt().float()
        ratios = torch.where((weight_norms > 0) & (update_norms > 0), weight_norms / update_norms,
                             torch.ones_like(weight_norms))
        if updates:
            torch._foreach_mul_(updates, list(ratios[self.owners].unbind()))


def _fragments(offsets: list[int], sizes: list[int], start: int, end: int) -> list[tuple[int, int, int]]:
    """(offset in the partition, length, tensor index) for every tensor overlapping [start, end) of the buffer."""
    found = []
    for index, (offset, size) in enumerate(zip(offsets, sizes)):
        low, high = max(offset, start), min(offset + size, end)
        if low < high:
            found.append((low - start, high - low, index))
    return found


def _check_against_deepspeed(zero_optimizer, group: int, fragments: list[tuple[int, int, int]],
                             start: int) -> None:
    """Our map must agree with DeepSpeed's own (params_in_partition, first_offset): its internals may change."""
    tensors = zero_optimizer.round_robin_bit16_groups[group]
    ours = [tensors[index] for _, _, index in fragments]
    theirs = zero_optimizer.params_in_partition[group]
    first_offset = (start - zero_optimizer.round_robin_bit16_offsets[group][fragments[0][2]]) if fragments else 0
    if [id(t) for t in ours] != [id(t) for t in theirs] or first_offset != zero_optimizer.first_offset[group]:
        raise RuntimeError(f"ZeRO LAMB: param group {group}: the partition map read from DeepSpeed disagrees with its "
                           "params_in_partition / first_offset; this DeepSpeed version lays partitions out otherwise")


def partition_layouts(zero_optimizer) -> list[PartitionLayout]:
    """One ``PartitionLayout`` per param group of a ``DeepSpeedZeroOptimizer`` (stage 1 or 2), for this rank."""
    layouts = []
    for group, partition in enumerate(zero_optimizer.single_partition_of_fp32_groups):
        process_group = zero_optimizer.real_dp_process_group[group]
        size = int(zero_optimizer.partition_size[group])
        if partition.numel() != size:
            raise RuntimeError(f"ZeRO LAMB: param group {group}: partition holds {partition.numel()} elements, "
                               f"DeepSpeed's partition_size is {size}")
        start = dist.get_rank(group=process_group) * size
        sizes = [meta.numel() for meta in zero_optimizer.round_robin_bit16_meta[group]]
        fragments = _fragments(zero_optimizer.round_robin_bit16_offsets[group], sizes, start, start + size)
        _check_against_deepspeed(zero_optimizer, group, fragments, start)
        layouts.append(PartitionLayout(
            partition=partition, starts=tuple(f[0] for f in fragments), lengths=tuple(f[1] for f in fragments),
            owners=torch.tensor([f[2] for f in fragments], dtype=torch.long, device=partition.device),
            num_tensors=len(sizes), process_group=process_group))
    return layouts


def make_lamb_exact_under_zero(engine) -> bool:
    """Give our ``Lamb`` inside a ZeRO 1/2 engine its partition layouts; False when there is nothing to do (ZeRO 0,
    another optimizer)."""
    if engine.zero_optimization_stage() not in (1, 2):
        return False
    inner = engine.optimizer.optimizer
    if not isinstance(inner, Lamb):
        return False
    inner.partition_layouts = {id(layout.partition): layout for layout in partition_layouts(engine.optimizer)}
    return True


def optimized_parameter_count(engine) -> int:
    """How many model parameters the engine's optimizer updates: all ranks' partitions together under ZeRO 1/2
    (padding left out), so it equals the module's count whatever the stage."""
    optimizer = engine.optimizer
    if engine.zero_optimization_stage() in (1, 2):
        return sum(meta.numel() for metas in optimizer.round_robin_bit16_meta for meta in metas)
    return sum(p.numel() for group in optimizer.param_groups for p in group["params"])


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def optimizer_state_bytes(engine) -> dict[str, int]:
    """Bytes this rank holds for the optimizer: moments (LAMB's m, v) and fp32 master weights where they are copies
    besides the module's parameters (ZeRO partitions, bf16/fp16 masters). Moments exist after the first step."""
    optimizer = engine.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)  # ZeRO and mixed-precision wrappers hold ours inside
    moments = _tensor_bytes(value for state in inner.state.values() for value in state.values())
    module_storage = {p.data_ptr() for p in engine.module.parameters()}
    masters = _tensor_bytes(p for group in inner.param_groups for p in group["params"]
                            if p.data_ptr() not in module_storage)
    return {"moments": moments, "master_weights": masters, "total": moments + masters}
