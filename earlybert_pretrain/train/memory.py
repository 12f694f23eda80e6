"""What the model's training state costs per GPU, in bytes, as DeepSpeed 0.19.8 allocates it for our engine.

Our engine runs every precision as autocast over fp32 parameters (engine.py), so with P parameters and N data-parallel
ranks (read in deepspeed/runtime/engine.py and runtime/zero/stage_1_and_2.py):

* weights: 4P, the module's fp32 parameters, on every rank at every ZeRO stage;
* gradients: fp32 ``.grad``, 4P at ZeRO 0 and 1; ZeRO 2 reduces them bucket by bucket during the backward pass and
  keeps only its partition, 4P/N;
* optimizer state: LAMB's two fp32 moments, 8P at ZeRO 0; ZeRO 1/2 shard them (8P/N) and keep an fp32 master copy
  of the rank's partition beside the module's parameters (4P/N), so 12P/N (measured: benchmarks/zero_lamb.py);
* buckets, DeepSpeed's gradient-communication buffers. ZeRO 1/2: the reduce bucket, ``reduce_bucket_size`` fp32
  elements allocated whole at the first backward hook whatever the model's size (DeepSpeed's default 5e8 is 2 GB;
  ``overlap_comm``, off here, would double it), plus the all-gather of the updated partitions,
  ``allgather_bucket_size`` elements at most per call (a transient; NCCL's all_gather_into_tensor needs no copy,
  counted anyway). ZeRO 0: DeepSpeed flattens the gradients into one copy of up to 5e8 elements to all-reduce them
  at the end of the backward pass (engine.py ``MEMORY_OPT_ALLREDUCE_SIZE``, not configurable), on any world size.
  Transients are counted as if alive with the activations: a budget, not a measurement of the peak.

Activations, the CUDA context and the allocator's slack are the caller's (they depend on the micro-batch and kernels).
"""

from __future__ import annotations

import math

from earlybert_pretrain.config import EngineConfig

ZERO0_ALLREDUCE_ELEMENTS = 500_000_000  # deepspeed runtime/engine.py MEMORY_OPT_ALLREDUCE_SIZE (0.19.8)
FP32 = 4


def memory_budget(parameters: int, world_size: int, zero_stage: int,
                  reduce_bucket_size: int = EngineConfig.reduce_bucket_size,
                  allgather_bucket_size: int = EngineConfig.allgather_bucket_size) -> dict[str, int]:
    """Bytes per GPU for ``parameters`` trained on ``world_size`` ranks at ZeRO ``zero_stage`` (0, 1 or 2), bucket
    sizes in elements as ``engine.reduce_bucket_size`` / ``engine.allgather_bucket_size``: ``weights``,
    ``gradients``, ``optimizer_state`` and ``buckets`` (see the module docstring); their sum is the model's state."""
    if parameters < 1 or world_size < 1 or zero_stage not in (0, 1, 2):
        raise ValueError(f"memory_budget: parameters and world_size must be >= 1 and zero_stage 0, 1 or 2, got "
                         f"{parameters}, {world_size}, {zero_stage}")
    shard = math.ceil(parameters / world_size)
    if zero_stage == 0:
        buckets = FP32 * min(parameters, ZERO0_ALLREDUCE_ELEMENTS)
    else:
        buckets = FP32 * (reduce_bucket_size + min(allgather_bucket_size, parameters))
    return {"weights": FP32 * parameters,
            "gradients": FP32 * (shard if zero_stage == 2 else parameters),
            "optimizer_state": 2 * FP32 * parameters if zero_stage == 0 else 3 * FP32 * shard,
            "buckets": buckets}
