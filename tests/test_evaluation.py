"""Validation during pre-training (issue 23): scores equal to a plain per-example loop, fixed examples whatever the
run's seeds, 2 ranks' sums equal to 1 rank's, evaluation outside the Sec. 4.1 step time and away from the training
random numbers, a resumed stage that repeats no evaluation and loses none, and a validation split prep never leaves
empty."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_prep.shard import shard_corpus, validation_documents
from earlybert_pretrain.config import DataConfig, EvalConfig, OptimizerConfig, PretrainConfig
from earlybert_pretrain.model.bert import BertConfig, BertForPreTraining
from earlybert_pretrain.pretrain.batches import ShardedCorpus
from earlybert_pretrain.pretrain.evaluation import EvalLength, Validation, ValidationHook
from earlybert_pretrain.train.stage import Runtime, Schedule, Stage, StageHook, StageSettings
from earlybert_pretrain.train.telemetry import TensorBoardLogger

pytest_plugins = ["data_fixtures"]
CPU = torch.device("cpu")
LENGTHS = [EvalLength(32, 5, 4), EvalLength(64, 10, 3)]  # a last micro-batch of 1 on 2 ranks at seq 64
NO_TENSORBOARD = TensorBoardLogger("", enabled=False)


def runtime(rank: int = 0, world_size: int = 1) -> Runtime:
    return Runtime(rank, world_size, CPU, "fp32")


def model_for(vocab_size: int, seed: int = 0) -> BertForPreTraining:
    """Dropout on (BERT's 0.1), as in training: evaluation must switch it off, and back on after."""
    torch.manual_seed(seed)
    return BertForPreTraining(BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=64, max_position_embeddings=64))


@pytest.fixture(scope="module")
def corpus(wiki_build) -> ShardedCorpus:
    return ShardedCorpus(wiki_build.shards, "validation")


def config(**changes) -> PretrainConfig:
    return dataclasses.replace(PretrainConfig(), eval=EvalConfig(batches=3), **changes)


def plain_loop(model: BertForPreTraining, batches: list[dict[str, torch.Tensor]]) -> dict:
    """The reference: one example at a time, logits at every position, log-softmax in float64."""
    loss, correct, masked, nsp_correct, sequences = 0.0, 0, 0, 0, 0
    model.eval()
    with torch.no_grad():
        for batch in batches:
            for row in range(len(batch["input_ids"])):
                example = {key: value[row:row + 1] for key, value in batch.items()}
                output = model(example["input_ids"], example["token_type_ids"], example["attention_mask"])
                logits = output.prediction_logits[0].double()
                for position, label in enumerate(example["labels"][0].tolist()):
                    if label != -100:
                        loss -= F.log_softmax(logits[position], -1)[label].item()
                        correct += int(logits[position].argmax().item() == label)
                        masked += 1
                nsp_correct += int(output.seq_relationship_logits[0].argmax().item()
                                   == example["next_sentence_label"].item())
                sequences += 1
    model.train()
    return {"mlm_loss": loss / masked, "mlm_accuracy": correct / masked, "nsp_accuracy": nsp_correct / sequences,
            "masked": masked, "sequences": sequences}


def test_scores_equal_a_plain_loop_over_the_model(corpus) -> None:
    model = model_for(corpus.vocab_size)
    validation = Validation.from_corpus(corpus, LENGTHS, config(), runtime())
    assert {seq_len: [len(batch["input_ids"]) for batch in batches]
            for seq_len, batches in validation.batches.items()} == {32: [4, 4, 4], 64: [3, 3, 3]}
    scores = validation.score(model)
    assert model.training  # dropout back on for the next training step
    pooled = plain_loop(model, [batch for batches in validation.batches.values() for batch in batches])
    for seq_len, batches in validation.batches.items():
        expected = plain_loop(model, batches)
        got = scores["by_seq_len"][str(seq_len)]
        assert (got["masked"], got["sequences"]) == (expected["masked"], expected["sequences"])
        assert got["mlm_loss"] == pytest.approx(expected["mlm_loss"], rel=1e-5)
        assert (got["mlm_accuracy"], got["nsp_accuracy"]) == (expected["mlm_accuracy"], expected["nsp_accuracy"])
    assert scores["masked"] == pooled["masked"] and scores["sequences"] == 12 + 9
    assert scores["mlm_loss"] == pytest.approx(pooled["mlm_loss"], rel=1e-5)
    assert scores["mlm_accuracy"] == pooled["mlm_accuracy"] and scores["nsp_accuracy"] == pooled["nsp_accuracy"]


def test_examples_do_not_depend_on_the_run_seeds_or_mode(corpus) -> None:
    one = Validation.from_corpus(corpus, LENGTHS, config(), runtime())
    other = Validation.from_corpus(corpus, LENGTHS, config(seed=7, mode="dense", data=DataConfig(seed=99)),
                                   runtime())
    reseeded = Validation.from_corpus(corpus, LENGTHS, dataclasses.replace(config(), eval=EvalConfig(batches=3,
                                                                                                    seed=5)),
                                      runtime())
    flat = [[value for batch in v.batches[32] for value in batch.values()] for v in (one, other, reseeded)]
    assert all(torch.equal(a, b) for a, b in zip(flat[0], flat[1]))
    assert not all(torch.equal(a, b) for a, b in zip(flat[0], flat[2]))  # eval.seed is what masks them


def test_two_ranks_sum_to_one_rank(corpus) -> None:
    model = model_for(corpus.vocab_size)
    whole = Validation.from_corpus(corpus, LENGTHS, config(), runtime()).local_sums(model)
    shares = [Validation.from_corpus(corpus, LENGTHS, config(), runtime(rank, 2)).local_sums(model)
              for rank in (0, 1)]
    for seq_len, sums in whole.items():
        added = shares[0][seq_len] + shares[1][seq_len]
        assert np.array_equal(added[1:], sums[1:])  # counts: correct, masked, NSP correct, sequences
        assert added[0] == pytest.approx(sums[0], rel=1e-6)  # summed cross-entropy
        assert shares[0][seq_len][3] > 0 and shares[1][seq_len][3] > 0  # each rank scored a share


def synthetic_validation(count: int, rows: int = 4, kind: type[Validation] = Validation) -> Validation:
    generator = torch.Generator().manual_seed(11)
    batches = []
    for _ in range(count):
        ids = torch.randint(5, 64, (rows, 16), generator=generator)
        labels = torch.full_like(ids, -100)
        labels[:, 3], labels[:, 9] = ids[:, 3], ids[:, 9]
        batches.append({"input_ids": ids, "token_type_ids": torch.zeros_like(ids),
                        "attention_mask": torch.ones_like(ids), "labels": labels,
                        "next_sentence_label": torch.randint(0, 2, (rows,), generator=generator)})
    return kind({16: batches}, runtime())


def open_batches(start: int):
    index = start
    while True:
        generator = torch.Generator().manual_seed(index)
        ids = torch.randint(5, 64, (2, 16), generator=generator)
        labels = torch.full_like(ids, -100)
        labels[:, 2], labels[:, 7] = ids[:, 2], ids[:, 7]
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
               "next_sentence_label": torch.randint(0, 2, (2,), generator=generator)}
        index += 1


def settings(checkpoint_dir=None) -> StageSettings:
    """Accumulation 2 (batch 4 in micro-batches of 2), dropout on in the model."""
    return StageSettings(name="phase1", seed=3, global_batch_size=4, micro_batch_size=2, optimizer=OptimizerConfig(),
                         lr=2e-2, schedule=Schedule(total_steps=6, warmup=0.2), grad_clip=1.0,
                         checkpoint_dir=checkpoint_dir, checkpoint_every=2)


def train(steps: int, hooks: list[StageHook], checkpoint_dir=None, resume: bool = False) -> Stage:
    with Stage.build(model_for(64), settings(checkpoint_dir), runtime()) as stage:
        if resume:
            assert stage.resume(hooks)
        stage.run(open_batches, steps, hooks)
        for hook in hooks:
            if isinstance(hook, ValidationHook):
                hook.finish(stage)
        return stage


EVAL_CPU_SECONDS = 3.0  # per evaluation: far above the noise of 6 training steps' CPU time on a loaded machine


class CostlyValidation(Validation):
    """Scores as Validation does, then spends EVAL_CPU_SECONDS of this thread's CPU time: counted into the step time,
    two such evaluations would add 6 s, which no load on the machine can hide or fake."""

    def score(self, module):
        scores = super().score(module)
        deadline = time.thread_time() + EVAL_CPU_SECONDS
        while time.thread_time() < deadline:
            pass
        return scores


def test_evaluation_is_outside_the_step_time_and_leaves_the_training_losses_alone(single_process_dist) -> None:
    plain = train(6, [])
    hook = ValidationHook(synthetic_validation(8, rows=16, kind=CostlyValidation), 3, NO_TENSORBOARD, step_offset=0)
    evaluated = train(6, [hook])
    assert evaluated.losses == plain.losses  # no training random number drawn (dropout on), bit for bit
    assert [record["step"] for record in hook.records] == [3, 6]  # the end was just scored
    assert evaluated.timer.total_seconds < plain.timer.total_seconds + EVAL_CPU_SECONDS  # 2 x 3 s counted in: fails
    assert hook.records[-1]["train_seconds"] == evaluated.timer.total_seconds


class Crashed(Exception):
    pass


class Crash(StageHook):
    def after_step(self, stage: Stage, step: int) -> bool:
        if step == 5:
            raise Crashed("after step 5, after the step-4 checkpoint")
        return False


def test_a_resumed_stage_repeats_no_evaluation_and_loses_none(single_process_dist, tmp_path) -> None:
    scores = ("mlm_loss", "mlm_accuracy", "nsp_accuracy")
    whole = ValidationHook(synthetic_validation(3), 2, NO_TENSORBOARD, step_offset=0)
    train(5, [whole])  # steps 2, 4 and the end, 5
    first = ValidationHook(synthetic_validation(3), 2, NO_TENSORBOARD, step_offset=0)
    with pytest.raises(Crashed):
        train(5, [first, Crash()], tmp_path)
    resumed = ValidationHook(synthetic_validation(3), 2, NO_TENSORBOARD, step_offset=0)
    train(5, [resumed], tmp_path, resume=True)
    assert [record["step"] for record in resumed.records] == [2, 4, 5]
    assert [[r[name] for name in scores] for r in resumed.records] == [[r[name] for name in scores]
                                                                        for r in whole.records]


def test_a_run_without_a_validation_split_says_so_once_and_skips(wiki_build, tmp_path, caplog) -> None:
    manifest = json.loads((wiki_build.shards / "manifest.json").read_text())
    manifest["splits"]["validation"] = []
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    cfg = dataclasses.replace(PretrainConfig(), data=DataConfig(shard_dir=str(tmp_path)))
    with caplog.at_level(logging.WARNING):
        assert Validation.open(cfg, runtime()) is None
    said = [record.message for record in caplog.records if "no validation split" in record.message]
    assert len(said) == 1 and str(tmp_path) in said[0]


def test_the_validation_rule_takes_the_lowest_keys_of_documents_that_make_examples() -> None:
    keys = np.array([0.9, 0.5, 0.3, 0.2, 0.8, 0.6])
    sentences = np.array([3, 2, 4, 1, 2, 5])
    assert validation_documents(keys, sentences, 0.25).tolist() == [False, False, False, True, False, False]
    # 0.1 selects no key: round(0.1 x 6) = 1 document, the lowest-keyed one with >= 2 sentences (not key 0.2)
    assert validation_documents(keys, sentences, 0.1).tolist() == [False, False, True, False, False, False]
    assert validation_documents(keys, sentences, 0.0).sum() == 0
    assert validation_documents(keys, sentences, 0.05).sum() == 1  # round(0.05 x 6) = 0, yet one document
    two = validation_documents(np.array([0.9, 0.8]), np.array([2, 2]), 0.01)
    assert two.tolist() == [False, True]  # one document is left to train


def test_prep_never_leaves_the_validation_split_empty(wiki_build, tmp_path) -> None:
    """2% of the 106-document sample: no document's hash falls below it, yet 2 documents are held out."""
    manifest = shard_corpus(wiki_build.sentences, wiki_build.vocab, tmp_path, num_shards=2, validation_fraction=0.02)
    held_out = manifest["splits"]["validation"]
    train_docs = sum(entry["documents"] for entry in manifest["splits"]["train"])
    assert sum(entry["documents"] for entry in held_out) == round(0.02 * (train_docs + 2)) == 2
    corpus = ShardedCorpus(tmp_path, "validation")
    assert len(corpus.sample_plan(128, 0.1, 1)) > 0  # it makes examples


@pytest.mark.slow
def test_two_launched_ranks_score_what_one_rank_does(wiki_build, corpus, tmp_path) -> None:
    """Two real ranks (gloo), each scoring its share; the gathered sums equal one in-process rank's score."""
    from test_multirank import launch

    codes, log = launch([str(wiki_build.shards), str(tmp_path / "scores.json")], program=(__file__,))
    assert codes == [0, 0], log[-3000:]
    two = json.loads((tmp_path / "scores.json").read_text())
    one = Validation.from_corpus(corpus, LENGTHS, config(), runtime()).score(model_for(corpus.vocab_size))
    for got, expected in [(two, one), *((two["by_seq_len"][n], one["by_seq_len"][n]) for n in ("32", "64"))]:
        assert got["mlm_loss"] == pytest.approx(expected["mlm_loss"], rel=1e-6)  # summed in another order
        assert {key: got[key] for key in ("mlm_accuracy", "nsp_accuracy", "masked", "sequences")} == {
            key: expected[key] for key in ("mlm_accuracy", "nsp_accuracy", "masked", "sequences")}


def score_on_launched_ranks(shards: str, out: str) -> None:
    """A launched rank: score its share; rank 0 writes the gathered score."""
    from earlybert_pretrain.train.engine import init_distributed

    rank, world_size, device = init_distributed()
    corpus = ShardedCorpus(shards, "validation")
    scores = Validation.from_corpus(corpus, LENGTHS, config(), Runtime(rank, world_size, device, "fp32")).score(
        model_for(corpus.vocab_size))
    if rank == 0:
        Path(out).write_text(json.dumps(scores))


if __name__ == "__main__":
    score_on_launched_ranks(*sys.argv[1:3])
