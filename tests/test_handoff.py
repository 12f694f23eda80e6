"""The phase hand-off (issue 10, item 3): phase 2 continues from phase 1's fp32 weights and LAMB moments with its own
lr schedule restarted (NVIDIA's recipe); ``with_optimizer=False`` (``phase2.reset_optimizer=true``) keeps only the
weights; a hand-off of another geometry is refused before anything is loaded, its files untouched."""

import pytest
import torch
from test_precision import open_batches, settings, tiny_model

from earlybert_pretrain.common.files import sha256_file
from earlybert_pretrain.errors import RunError
from earlybert_pretrain.train.stage import Runtime, Schedule, Stage, StageSettings

CPU = torch.device("cpu")
GEOMETRY = {"heads_per_layer": [4, 4], "ffn_per_layer": [48, 48]}


def phase(name: str, lr: float, checkpoint_dir) -> StageSettings:
    return StageSettings(**{**vars(settings(name, checkpoint_dir)), "lr": lr,
                            "schedule": Schedule(total_steps=10, warmup=0.2)})


def moments(stage: Stage) -> list[torch.Tensor]:
    optimizer = stage.engine.optimizer
    return [value.clone() for p in stage.module.parameters() for key, value in sorted(optimizer.state[p].items())
            if key in ("exp_avg", "exp_avg_sq")]


@pytest.fixture
def phase1_end(single_process_dist, tmp_path):
    with Stage.build(tiny_model(), phase("phase1", 6e-3, tmp_path), Runtime(0, 1, CPU, "fp32")) as stage:
        stage.run(open_batches, 3)
        stage.save_handoff("phase1_end", GEOMETRY)
        return tmp_path, {name: p.detach().clone() for name, p in stage.module.named_parameters()}, moments(stage)


@pytest.mark.parametrize("with_optimizer", [True, False])
def test_phase2_continues_from_the_weights_and_moments_with_its_own_schedule(phase1_end, with_optimizer):
    checkpoints, weights, saved_moments = phase1_end
    with Stage.build(tiny_model(), phase("phase2", 4e-3, checkpoints), Runtime(0, 1, CPU, "fp32")) as stage:
        stage.load_handoff("phase1_end", GEOMETRY, with_optimizer=with_optimizer)
        assert all(torch.equal(weights[name], p) for name, p in stage.module.named_parameters())
        continued = moments(stage)
        if with_optimizer:
            assert len(continued) == len(saved_moments) > 0
            assert all(torch.equal(a, b) for a, b in zip(continued, saved_moments))
        else:
            assert continued == []
        # step 1 of phase 2's own warmup (2 of 10 steps): 4e-3 * 1/2, not phase 1's lr after its step 3
        assert stage.engine.get_lr()[0] == pytest.approx(4e-3 * 0.5)
        assert stage.step == 0
        stage.run(open_batches, 1)
        assert stage.engine.get_lr()[0] == pytest.approx(4e-3 * 0.8 ** 0.5)  # step 2: the poly decay


def test_a_handoff_of_another_geometry_is_refused_before_loading(phase1_end):
    checkpoints = phase1_end[0]
    files = {path: sha256_file(path) for path in checkpoints.rglob("*") if path.is_file()}
    other = {**GEOMETRY, "ffn_per_layer": [48, 30]}
    with Stage.build(tiny_model(), phase("phase2", 4e-3, checkpoints), Runtime(0, 1, CPU, "fp32")) as stage:
        before = {name: p.detach().clone() for name, p in stage.module.named_parameters()}
        with pytest.raises(RunError, match=rf"^{checkpoints}: the 'phase1_end' checkpoint holds a model of geometry "
                                           r".*48, 48.*this run builds .*48, 30.*--overwrite"):
            stage.load_handoff("phase1_end", other)
        assert all(torch.equal(before[name], p) for name, p in stage.module.named_parameters())
    assert {path: sha256_file(path) for path in checkpoints.rglob("*") if path.is_file()} == files
