"""CSV files written by the reference CLUTRR generator: every story edge labelled, `neice`, optional columns.

The fixtures in tests/fixtures/clutrr_generator/ are rows kept byte for byte from files written by
github.com/facebookresearch/clutrr (clutrr/generator.py `generate_rows`, saved by clutrr/main.py `Clutrr.store`
with pandas `to_csv`); that folder's README says how they were made and which code writes each column.
"""
import csv
import dataclasses
import io
import json
import pathlib

import pytest

from jaxalign import cli
from jaxalign.clutrr import reader, solver
from jaxalign.programs import clutrr_trainer

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "clutrr_generator"
TRAIN = FIXTURES / "1.2,2.2,3.2,4.2_train.csv"
TEST_FILES = ("1.3_test.csv", "2.3_test.csv", "2.4_test.csv", "3.3_test.csv", "4.3_test.csv")


def _records(path):
    with open(path, newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def _write_records(records, path, columns):
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
    return path


def test_supporting_row_keeps_path_labels_and_noise_labels_apart():
    row = reader.read_csv(FIXTURES / "2.3_test.csv")[0]
    assert (row.id, row.index, row.task_name, row.k) == ("b4ce292b-4327-4b91-a7a2-ba1fe77c7483", 0, "task_2.3", 3)
    assert row.story_edges == ((0, 1), (1, 2), (2, 3), (0, 4), (4, 1))
    assert row.edge_types == ("sister", "father", "father") and row.f_comb == "sister-father-father"
    assert row.noise_edges == ((0, 4), (4, 1)) and row.noise_edge_types == ("mother", "daughter")
    assert row.noise_labelled and row.query == ("Trinidad", "Walter") and row.target == "grandfather"
    assert row.genders[4] == ("Lisa", "female")  # the off-path person of the supporting facts
    assert row.text_query == "What is the family connection between [Trinidad] and [Walter] ? " and row.syn_story == ""


@pytest.mark.parametrize("name", ("1.2,2.2,3.2,4.2_train.csv",) + TEST_FILES)
def test_every_generator_row_reads_and_labels_each_noise_edge(name):
    records = _records(FIXTURES / name)
    rows = reader.read_csv(FIXTURES / name)
    assert [row.id for row in rows] == [record["id"] for record in records]
    for row in rows:
        assert len(row.edge_types) == row.k
        assert len(row.noise_edge_types) == len(row.noise_edges) == len(row.story_edges) - row.k
        assert row.noise_labelled == (row.noise_task != 1)


@pytest.mark.parametrize("name, shared_people", [("2.3_test.csv", {2, 3}), ("3.3_test.csv", {1}),
                                                 ("4.3_test.csv", {0})])
def test_noise_edges_are_the_facts_of_their_task(name, shared_people):
    """Supporting facts touch the path at two people or more, irrelevant at one, disconnected at none
    (clutrr/relations/builder.py `_test_supporting`, `_test_irrelevant`, `_test_disconnected`)."""
    for row in reader.read_csv(FIXTURES / name):
        path_people = {person for edge in row.path_edges for person in edge}
        noise_people = {person for edge in row.noise_edges for person in edge}
        assert len(path_people & noise_people) in shared_people, row.id


def test_generator_spelling_neice_reads_as_niece():
    """The reference relation store (clutrr/store/relations_store.yaml) spells the label 'neice'."""
    raw = {record["id"]: record for name in ("2.3_test.csv", "4.3_test.csv") for record in _records(FIXTURES / name)}
    answer = reader.read_csv(FIXTURES / "2.3_test.csv")[1]
    assert raw[answer.id]["target"] == "neice" and "'neice'" in raw[answer.id]["proof_state"]
    assert answer.target == "niece"
    labels = [fact[1] for step in answer.proof_state for conclusion, premises in step.items()
              for fact in (conclusion, *premises)]
    assert "niece" in labels and "neice" not in labels
    assert solver.proof_problems(answer) == [] and solver.solve_row(answer).label == "niece"
    noise = reader.read_csv(FIXTURES / "4.3_test.csv")[1]
    assert raw[noise.id]["edge_types"] == "['mother', 'son', 'aunt', 'neice']"
    assert noise.edge_types == ("mother", "son", "aunt") and noise.noise_edge_types == ("niece",)


def test_index_and_syn_story_columns_are_optional_and_extra_columns_ignored(tmp_path):
    records = _records(FIXTURES / "4.3_test.csv")
    for record in records:
        record["generator_seed"] = "7"
    columns = ["generator_seed"] + [column for column in reversed(reader.COLUMNS)
                                    if column not in ("", "syn_story", "text_query", "node_mapping")]
    path = _write_records(records, tmp_path / "4.3_test.csv", columns)
    original = reader.read_csv(FIXTURES / "4.3_test.csv")
    trimmed = reader.read_csv(path)
    assert [row.index for row in original] == [0, 6, 7, 8]
    assert [row.index for row in trimmed] == [0, 1, 2, 3]  # position in the file, as pandas would number it
    for before, after in zip(original, trimmed):
        assert (after.text_query, after.syn_story, after.node_mapping) == ("", "", {})
        assert (after.edge_types, after.noise_edge_types, after.story_edges, after.target) == (
            before.edge_types, before.noise_edge_types, before.story_edges, before.target)


def test_a_missing_required_column_is_still_named(tmp_path):
    records = _records(FIXTURES / "3.3_test.csv")
    columns = [column for column in records[0] if column != "story_edges"]
    path = _write_records(records, tmp_path / "3.3_test.csv", columns)
    with pytest.raises(reader.ClutrrFormatError, match="story_edges.*column missing"):
        reader.read_csv(path)


@pytest.mark.parametrize("edit, problem", [
    (lambda r: r.update(edge_types="['sister', 'father', 'father', 'mother']"), "4 labels for a path of k = 3"),
    (lambda r: r.update(edge_types="['sister', 'father', 'father', 'mother', 'son']"), "'son' of edge (4, 1)"),
    (lambda r: r.update(edge_types="['sister', 'father', 'father', 'mother', 'cousin']"), "unknown kinship"),
])
def test_a_malformed_generator_row_names_file_row_and_field(tmp_path, edit, problem):
    records = _records(FIXTURES / "2.3_test.csv")
    edit(records[0])
    path = _write_records(records, tmp_path / "2.3_test.csv", list(records[0]))
    with pytest.raises(reader.ClutrrFormatError) as caught:
        reader.read_csv(path)
    assert (caught.value.source, caught.value.row_id, caught.value.field) == (
        str(path), records[0]["id"], "edge_types")
    assert problem in str(caught.value)
    report = reader.ReadReport()
    assert len(reader.read_csv(path, skip_bad=True, report=report)) == 3 and report.rows_skipped == 1


def test_round_trip_keeps_noise_labels():
    rows = reader.read_csv(FIXTURES / "2.4_test.csv")
    written = io.StringIO()
    reader.write_rows(rows, written)
    again = reader.read_rows(io.StringIO(written.getvalue(), newline=""), "written")
    assert again == rows and "'father', 'daughter', 'father', 'sister']" in written.getvalue()


def test_trainer_readers_read_generator_files():
    train = clutrr_trainer.read_rows(str(TRAIN))
    assert [row.task_name for row in train] == ["task_1.2"] * 2 + ["task_2.2"] * 2 + ["task_3.2"] * 2 + [
        "task_4.2"] * 2
    files = clutrr_trainer.read_test_files([str(FIXTURES)])
    assert list(files) == list(TEST_FILES)
    assert {name: len(rows) for name, rows in files.items()} == {
        "1.3_test.csv": 3, "2.3_test.csv": 4, "2.4_test.csv": 2, "3.3_test.csv": 4, "4.3_test.csv": 4}


@pytest.mark.parametrize("name", ("1.2,2.2,3.2,4.2_train.csv", "2.3_test.csv", "3.3_test.csv"))
def test_solve_command_on_a_generator_file(name, capsys):
    status = cli.main(["clutrr", "solve", "--csv", str(FIXTURES / name)])
    output = json.loads(capsys.readouterr().out)
    assert status == 0
    assert {"csv", "rows", "unambiguous", "agree_unambiguous", "ambiguous", "unsolvable", "accuracy_unambiguous",
            "rows_skipped", "skipped", "disagreements", "rows_noise_labelled"} <= set(output)
    rows = reader.read_csv(FIXTURES / name)
    assert output["rows"] == len(rows) and output["rows_skipped"] == 0 and output["unsolvable"] == 0
    assert output["accuracy_unambiguous"] == 1.0 and output["agree_unambiguous"] == output["unambiguous"]
    assert output["rows_noise_labelled"] == sum(row.noise_task != 1 for row in rows)


def test_solve_command_names_the_bad_row_of_a_generator_file(tmp_path, capsys):
    records = _records(FIXTURES / "4.3_test.csv")
    records[1]["edge_types"] = "['mother', 'son']"  # neither k = 3 labels nor one per story edge (4)
    path = _write_records(records, tmp_path / "4.3_test.csv", list(records[0]))
    status = cli.main(["clutrr", "solve", "--csv", str(path), "--skip-bad"])
    output = json.loads(capsys.readouterr().out)
    assert status == 0 and output["rows"] == 3 and output["rows_skipped"] == 1
    assert str(path) in output["skipped"][0] and records[1]["id"] in output["skipped"][0]
    assert "'edge_types'" in output["skipped"][0]


# ------------------------------------------------------------------ the teacher with and without noise labels
CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "jaxalign" / "configs"


@pytest.fixture(scope="module")
def teacher_on_generator_files(tmp_path_factory):
    """A small GNN teacher trained on the generator's training file and tested on its test files (eval.json)."""
    workdir = str(tmp_path_factory.mktemp("generator_teacher"))
    argv = ["clutrr", "train-teacher", "--config", f"{CONFIGS / 'clutrr_teacher.py'}:quick,data_root=",
            "--workdir", workdir, f"--config.data.train={TRAIN}", f"--config.data.test=('{FIXTURES}',)",
            "--config.steps=40", "--config.batch_size=8", "--config.model.hidden=16", "--config.model.num_layers=2",
            "--config.lr=0.01", "--config.train.async_checkpoints=false"]
    assert cli.main(argv) == 0
    return workdir


def _teacher_predictions_by_hand(model, rows, noise_type=None):
    """(predicted, target) class ids [N] from the teacher's own forward pass on graphs built here: every story
    edge typed by the file's label, or each noise edge typed `noise_type` when given."""
    import numpy as np
    from jaxalign.distill import clutrr_batches
    from jaxalign.models import gnn

    graphs = [dataclasses.replace(row, edge_types=tuple(row.edge_types) + (
        tuple(row.noise_edge_types) if noise_type is None else (noise_type,) * len(row.noise_edges)))
        for row in rows]
    batch = clutrr_batches.graph_batch(graphs, model.labels, model.edge_types, model.config.max_nodes,
                                       model.config.max_edges)
    return np.asarray(gnn.apply(model.params, batch, model.config).logits.argmax(-1)), batch["label"]


def _accuracy_by_hand(model, rows, noise_type=None):
    predicted, target = _teacher_predictions_by_hand(model, rows, noise_type)
    return float((predicted == target).mean())


def test_teacher_eval_json_has_accuracy_with_noise_labels_and_with_them_unlabelled(teacher_on_generator_files):
    from jaxalign.distill import evaluate

    model = evaluate.load_model(teacher_on_generator_files)
    with open(pathlib.Path(teacher_on_generator_files) / "eval.json", encoding="utf-8") as stream:
        saved = json.load(stream)
    for name in TEST_FILES:
        rows = reader.read_csv(FIXTURES / name)
        report = saved["test"][name]
        assert report["rows_noise_labelled"] == sum(row.noise_task != 1 for row in rows)
        assert report["accuracy"] == pytest.approx(_accuracy_by_hand(model, rows))
        if name == "1.3_test.csv":    # clean: no noise edge, nothing to compare
            assert report["rows_noise_labelled"] == 0 and report["accuracy_noise_unlabelled"] is None
        else:
            assert report["rows_noise_labelled"] == len(rows)
            assert report["accuracy_noise_unlabelled"] == pytest.approx(
                _accuracy_by_hand(model, rows, noise_type="unlabelled"))
        assert saved["test_accuracy_noise_unlabelled"][name] == report["accuracy_noise_unlabelled"]


def test_eval_command_reports_a_teacher_with_noise_labels_and_with_them_unlabelled(teacher_on_generator_files,
                                                                                    tmp_path, capsys):
    """The teacher again, with its 'unlabelled' edge embedding pushed far from the others (minus ten times that of
    'son'), so that replacing the noise labels changes its predictions."""
    from jaxalign.distill import evaluate

    model = evaluate.load_model(teacher_on_generator_files)
    table = model.params["edge_embedding"]      # [2 * edge types, hidden]: each type, then its reverse
    for unlabelled in (model.edge_types.id("unlabelled"), model.edge_types.id("unlabelled") + len(model.edge_types)):
        table[unlabelled] = -10.0 * table[model.edge_types.id("son")]
    evaluate.save_model(str(tmp_path / "model"), model)

    noisy = [row for name in TEST_FILES[1:] for row in reader.read_csv(FIXTURES / name)]
    assert (_teacher_predictions_by_hand(model, noisy)[0]
            != _teacher_predictions_by_hand(model, noisy, noise_type="unlabelled")[0]).any()
    capsys.readouterr()
    argv = ["clutrr", "eval", "--checkpoint", str(tmp_path / "model")]
    assert cli.main(argv + [arg for name in TEST_FILES for arg in ("--csv", str(FIXTURES / name))]) == 0
    printed = json.loads(capsys.readouterr().out)["files"]
    for name in TEST_FILES:
        rows, report = reader.read_csv(FIXTURES / name), printed[str(FIXTURES / name)]
        assert report["accuracy"] == pytest.approx(_accuracy_by_hand(model, rows))
        if name == "1.3_test.csv":
            assert (report["rows_noise_labelled"], report["accuracy_noise_unlabelled"]) == (0, None)
        else:
            assert report["rows_noise_labelled"] == len(rows)
            assert report["accuracy_noise_unlabelled"] == pytest.approx(
                _accuracy_by_hand(model, rows, noise_type="unlabelled"))


def test_noise_label_report_is_for_teachers_only():
    from jaxalign.distill import clutrr_batches, evaluate
    from jaxalign.models import text_encoders

    student = evaluate.SavedModel("student", text_encoders.TextEncoderConfig(), {}, clutrr_batches.label_vocabulary())
    with pytest.raises(ValueError, match="student"):
        evaluate.noise_label_report(student, reader.read_csv(FIXTURES / "2.3_test.csv"))
