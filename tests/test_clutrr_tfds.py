"""The CLUTRR tfds builder (array_record, no TensorFlow, no download) and the `jaxalign clutrr` commands."""
import json
import pathlib
import zipfile

import pytest
import tensorflow_datasets as tfds

from jaxalign import cli
from jaxalign.clutrr import generator, reader, relations, tfds_builder

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "clutrr"
requires_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"released CLUTRR data folder {DATA} is absent")
TINY = dict(seed=4, train_ks=(2, 3), test_ks=(2, 3), tasks=(1,), rows_per_file=5, train_rows_per_k=10)


def test_split_names():
    assert tfds_builder.split_name("1.2,1.3,1.4_train.csv") == "train"
    assert tfds_builder.split_name("4.10_test.csv") == "test_4_10"
    with pytest.raises(ValueError, match="not a CLUTRR file name"):
        tfds_builder.split_name("notes.csv")


def test_generated_config_builds_and_reads_back(tmp_path):
    sources = tfds_builder.build(tfds_builder.ClutrrConfig(name="tiny", **TINY), tmp_path / "tfds")
    assert {name: len(source) for name, source in sources.items()} == {"train": 20, "test_1_2": 5, "test_1_3": 5}
    # The same settings written as CSVs give the same rows.
    written = generator.generate_dataset(tmp_path / "csv", **{k: v for k, v in TINY.items()})
    expected = {row.id: row for row in reader.read_csv(written["1.3_test.csv"])}
    reopened = tfds.data_source("jaxalign_clutrr/tiny", data_dir=str(tmp_path / "tfds"))
    examples = [reopened["test_1_3"][i] for i in range(len(reopened["test_1_3"]))]
    assert sorted(example["id"].decode() for example in examples) == sorted(expected)
    for example in examples:
        row = expected[example["id"].decode()]
        assert relations.LABELS[example["target"]] == row.target and example["k"] == 3
        assert [relations.LABELS[i] for i in example["edge_types"]] == list(row.edge_types)
        assert example["story_edges"].tolist() == [list(edge) for edge in row.story_edges]
        assert [name.decode() for name in example["names"]] == list(row.names)
        assert example["story"].decode() == row.story


@requires_data
def test_released_config_from_a_manual_folder(tmp_path):
    folder = tmp_path / "manual" / "data_7c5b0e70"
    folder.mkdir(parents=True)
    with zipfile.ZipFile(DATA / "data_7c5b0e70.zip") as archive:  # two test files keep the test fast
        for name in ("1.2_test.csv", "4.3_test.csv"):
            (folder / name).write_bytes(archive.read(name))
    sources = tfds_builder.build("data_7c5b0e70", tmp_path / "tfds", manual_dir=tmp_path / "manual")
    assert {name: len(source) for name, source in sources.items()} == {"test_1_2": 38, "test_4_3": 100}
    targets = sorted(relations.LABELS[sources["test_1_2"][i]["target"]] for i in range(38))
    assert targets == sorted(row.target for row in reader.read_csv(folder / "1.2_test.csv"))


def test_released_config_without_the_files_says_where_to_put_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_089907f8.zip"):
        tfds_builder.build("data_089907f8", tmp_path / "tfds", manual_dir=tmp_path)


def test_cli_generate_then_solve(tmp_path, capsys):
    out = tmp_path / "set"
    assert cli.main(["clutrr", "generate", "--out-dir", str(out), "--train-ks", "2", "--test-ks", "3,5",
                     "--tasks", "2", "--rows-per-file", "6", "--seed", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["files"] == [
        "2.2_train.csv", "2.3_test.csv", "2.5_test.csv", "config.json"]
    assert cli.main(["clutrr", "solve", "--csv", str(out / "2.5_test.csv")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["rows"] == 6 and result["agree_unambiguous"] == result["unambiguous"]
    assert result["unambiguous"] + result["ambiguous"] == 6 and result["rows_skipped"] == 0


def test_cli_solve_reports_a_wrong_label_and_a_skipped_row(tmp_path, capsys):
    import dataclasses
    rows = generator.generate(4, [2], 1, seed=0)
    gender = rows[0].genders[rows[0].query_edge[1]][1]
    other = "sibling" if rows[0].target_relation != "sibling" else "child"
    rows[0] = dataclasses.replace(rows[0], target=relations.gendered_label(other, gender))  # valid but wrong
    rows[1] = dataclasses.replace(rows[1], story_edges=rows[1].story_edges[::-1])  # path order broken
    path = tmp_path / "1.2_test.csv"
    reader.write_csv(rows, path)
    assert cli.main(["clutrr", "solve", "--csv", str(path), "--skip-bad"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert (result["rows"], result["rows_skipped"], result["unambiguous"], result["agree_unambiguous"]) == (3, 1, 3, 2)
    assert rows[0].id in result["disagreements"][0] and rows[1].id in result["skipped"][0]
