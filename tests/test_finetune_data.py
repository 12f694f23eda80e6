"""Loading task files, tokenising, SQuAD windows and answer extraction (the full postprocessing on gold spans)."""

import json
from pathlib import Path

import numpy as np
import pytest
from finetune_fixtures import write_jsonl, write_tsv
from minilm import require_minilm

from earlybert_pretrain.finetune.data import load_task_data
from earlybert_pretrain.finetune.features import MissingTokenizerError, encode_classification, load_tokenizer
from earlybert_pretrain.finetune.metrics import squad_scores
from earlybert_pretrain.finetune.squad import SquadSettings, _windows, build_features, extract_answers
from earlybert_pretrain.finetune.tasks import get_task

MNLI_HEADER = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
               "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]


def _mnli_rows(labels):
    return [[i, 0, 0, "fiction", "(x)", "(y)", "(x)", "(y)", f"premise {i} \"quoted", f"hypothesis {i}", label, label]
            for i, label in enumerate(labels)]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(require_minilm())


def test_glue_tsv_folder_mnli_matched_and_mismatched(tmp_path):
    write_tsv(tmp_path / "train.tsv", MNLI_HEADER, _mnli_rows(["entailment", "neutral", "contradiction"]))
    write_tsv(tmp_path / "dev_matched.tsv", MNLI_HEADER, _mnli_rows(["neutral", "neutral"]))
    write_tsv(tmp_path / "dev_mismatched.tsv", MNLI_HEADER, _mnli_rows(["contradiction"]))
    data = load_task_data(get_task("mnli"), data_dir=str(tmp_path))
    assert list(data.train["label"]) == [0, 1, 2]
    assert list(data.train["premise"])[0] == 'premise 0 "quoted'  # GLUE TSVs are read without quote handling
    assert list(data.evaluation) == ["validation_matched", "validation_mismatched"]
    assert list(data.evaluation["validation_matched"]["label"]) == [1, 1]
    assert list(data.evaluation["validation_mismatched"]["label"]) == [2]


def test_headerless_cola_and_named_columns(tmp_path):
    (tmp_path / "train.tsv").write_text("gj04\t1\t\tThe cat sat.\ngj04\t0\t*\tCat the sat.\n")
    (tmp_path / "dev.tsv").write_text("gj04\t1\t\tA dog ran.\n")
    data = load_task_data(get_task("cola"), data_dir=str(tmp_path))
    assert list(data.train["sentence"]) == ["The cat sat.", "Cat the sat."] and list(data.train["label"]) == [1, 0]
    (tmp_path / "pairs.csv").write_text("left,right,score\na b,a c,4.5\nx,y,0.0\n")
    stsb = load_task_data(get_task("stsb"), train_file=str(tmp_path / "pairs.csv"),
                          validation_files=[str(tmp_path / "pairs.csv")], text_columns=["left", "right"],
                          label_column="score")
    assert list(stsb.train["sentence1"]) == ["a b", "x"] and list(stsb.train["label"]) == [4.5, 0.0]


def test_bad_labels_and_missing_columns_are_refused(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"sentence": "a", "label": 1}, {"sentence": "b", "label": 7}])
    with pytest.raises(ValueError, match=r"bad.jsonl: 1 label\(s\) outside the task's set.*\[7\]"):
        load_task_data(get_task("sst2"), train_file=str(bad), validation_files=[str(bad)])
    nolabel = write_jsonl(tmp_path / "nolabel.jsonl", [{"text": "a", "label": 1}])
    with pytest.raises(ValueError, match=r"nolabel.jsonl: missing column\(s\) \['sentence'\].*\['text', 'label'\]"):
        load_task_data(get_task("sst2"), train_file=str(nolabel), validation_files=[str(nolabel)])
    with pytest.raises(ValueError, match="evaluates on 2 split"):
        load_task_data(get_task("mnli"), train_file=str(bad), validation_files=[str(bad)])
    with pytest.raises(ValueError, match="missing.tsv: data file not found"):
        load_task_data(get_task("sst2"), train_file=str(tmp_path / "missing.tsv"), validation_files=[str(bad)])


def test_model_folder_without_tokenizer(tmp_path):
    with pytest.raises(MissingTokenizerError, match="no tokenizer; expected tokenizer.json or vocab.txt"):
        load_tokenizer(tmp_path)


def test_classification_encoding_pairs_and_truncation(tokenizer):
    import datasets

    task = get_task("rte")
    examples = datasets.Dataset.from_dict({"sentence1": ["the cat sat on the mat " * 20], "sentence2": ["a cat"],
                                           "label": [0]})
    encoded = encode_classification(examples, task, tokenizer, max_seq_length=16)
    ids, types = encoded[0]["input_ids"], encoded[0]["token_type_ids"]
    assert len(ids) == 16 and ids[0] == tokenizer.cls_token_id and ids.count(tokenizer.sep_token_id) == 2
    assert types[-3:] == [1, 1, 1] and types[0] == 0  # the second sentence kept whole: longest-first truncation


SQUAD_ARTICLES = [
    ("The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It was built in 1889 for the World's Fair. "
     "Gustave Eiffel's company designed and built it. " * 3
     + "Locally it is nicknamed La dame de fer, the iron lady.",
     [("q1", "When was the tower built?", "1889"), ("q2", "What is its nickname?", "the iron lady"),
      ("q3", "Where is the tower?", "Paris, France")]),
    ("The Seine flows through Paris before it reaches the English Channel at Le Havre.",
     [("q4", "Where does the Seine reach the sea?", "Le Havre")]),
]


def _squad_file(path: Path, bad_answer: bool = False) -> Path:
    data = []
    for context, questions in SQUAD_ARTICLES:
        qas = []
        for qid, question, answer in questions:
            start = context.rfind(answer)  # the last occurrence: forces a late window for the repeated text
            qas.append({"id": qid, "question": question, "answers": [{"text": answer, "answer_start": start}]})
        data.append({"title": "t", "paragraphs": [{"context": context, "qas": qas}]})
    if bad_answer:
        data[1]["paragraphs"][0]["qas"][0]["answers"][0]["text"] = "Marseille"
    path.write_text(json.dumps({"version": "1.1", "data": data}))
    return path


def test_squad_windows_cover_every_token_with_the_stride():
    for num_tokens, window, stride in [(10, 4, 2), (100, 30, 12), (5, 10, 3), (31, 10, 10)]:
        spans = _windows(num_tokens, window, stride)
        covered = sorted({p for start, length in spans for p in range(start, start + length)})
        assert covered == list(range(num_tokens))
        assert all(b[0] - a[0] == stride for a, b in zip(spans, spans[1:]))
        assert spans[-1][0] + spans[-1][1] == num_tokens and all(length <= window for _, length in spans)


def test_squad_gold_spans_score_100_through_full_postprocessing(tmp_path, tokenizer):
    task = get_task("squad")
    path = _squad_file(tmp_path / "dev-v1.1.json")
    data = load_task_data(task, train_file=str(path), validation_files=[str(path)])
    examples = data.evaluation["validation"]
    settings = SquadSettings(max_seq_length=48, doc_stride=16, max_query_length=12)
    features = build_features(examples, tokenizer, settings, training=False)
    assert len(features) > len(examples)  # the long context is split into several windows
    start_logits, end_logits = [], []
    answers = list(examples["answers"])
    for feature in features:
        offsets = feature["offsets"]
        answer = answers[feature["example_index"]]
        char_start = answer["answer_start"][0]
        char_end = char_start + len(answer["text"][0])
        starts, ends = np.zeros(len(offsets)), np.zeros(len(offsets))
        for position, offset in enumerate(offsets):
            if offset is not None and offset[0] == char_start:
                starts[position] = 10.0
            if offset is not None and offset[1] == char_end:
                ends[position] = 10.0
        start_logits.append(starts)
        end_logits.append(ends)
    predictions = extract_answers(examples, features, start_logits, end_logits, settings)
    assert predictions == {"q1": "1889", "q2": "the iron lady", "q3": "Paris, France", "q4": "Le Havre"}
    references = {qid: a["text"] for qid, a in zip(list(examples["id"]), answers)}
    assert squad_scores(predictions, references) == {"exact_match": 100.0, "f1": 100.0}


def test_squad_training_positions_point_at_the_answer(tmp_path, tokenizer):
    path = _squad_file(tmp_path / "train.json", bad_answer=True)
    data = load_task_data(get_task("squad"), train_file=str(path), validation_files=[str(path)])
    assert data.skipped == {"train/answer_not_in_context": 1, "validation/answer_not_in_context": 1}
    settings = SquadSettings(max_seq_length=48, doc_stride=16, max_query_length=12)
    features = build_features(data.train, tokenizer, settings, training=True)
    assert sorted(set(features["example_index"])) == [0, 1, 2]  # q4's answer is not in its context: left out
    answers = {0: "1889", 1: "the iron lady", 2: "Paris, France"}
    inside = {0: 0, 1: 0, 2: 0}
    for feature in features:
        start, end = feature["start_position"], feature["end_position"]
        if start == 0:
            assert end == 0  # the answer is not in this window: points at [CLS]
            continue
        inside[feature["example_index"]] += 1
        text = tokenizer.decode(feature["input_ids"][start:end + 1])
        assert text == answers[feature["example_index"]].lower()
    assert all(count >= 1 for count in inside.values())


def test_mrpc_bom_header_and_short_rows_are_counted(tmp_path):
    header = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    (tmp_path / "train.tsv").write_text(header + "1\t1\t2\tHe said.\tHe says.\n0\t3\t4\tA cut line\n"
                                        "0\t5\t6\tIt rained.\tThe sun shone.\n", encoding="utf-8")
    (tmp_path / "dev.tsv").write_text(header + "1\t1\t2\tHe said.\tHe says.\n", encoding="utf-8")
    data = load_task_data(get_task("mrpc"), data_dir=str(tmp_path))
    assert list(data.train["sentence1"]) == ["He said.", "It rained."] and list(data.train["label"]) == [1, 0]
    assert data.skipped == {"train/malformed_tsv_rows": 1}
    floats = write_jsonl(tmp_path / "floats.jsonl", [{"sentence1": "a", "sentence2": "b", "label": 1.0}])
    assert list(load_task_data(get_task("mrpc"), train_file=str(floats),
                               validation_files=[str(floats)]).train["label"]) == [1]


def test_no_local_data_offline_names_the_missing_settings():
    # conftest sets HF_DATASETS_OFFLINE=1: the hub copy cannot load, and the error says which settings would do.
    with pytest.raises(ValueError, match=r"task 'rte': no local data given \(data.data_dir"):
        load_task_data(get_task("rte"))
