"""CLUTRR training on a data set written by `jaxalign prepare-data clutrr` (`--config.data.prepared_dir`), through
the command line as a user runs it: the prepared rows are the CSV reader's rows, field by field and in file order,
and a teacher trained on them gives the numbers of one trained on the CSVs, without a CSV being parsed."""
import dataclasses
import io
import json
import os
import pathlib
import zipfile

import pytest

from jaxalign import cli
from jaxalign.clutrr import generator, prepared, reader
from jaxalign.programs import clutrr_trainer

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "clutrr_generator"
GENERATOR_TRAIN = "1.2,2.2,3.2,4.2_train.csv"
RELEASED = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "clutrr" / "data_089907f8.zip"
CONFIGS = os.path.join(os.path.dirname(__file__), "..", "jaxalign", "configs")
TEACHER = ["--config", os.path.join(CONFIGS, "clutrr_teacher.py:quick"), "--config.steps=6",
           "--config.model.hidden=16", "--config.model.num_layers=2", "--config.data.train_max_length=40",
           "--config.data.eval_max_length=64", "--config.batch_size=16", "--config.lr=0.01",
           "--config.train.async_checkpoints=false", "--config.data.valid_fraction=0.2", "--config.train.eval_every=3"]


def released_style_zip(folder: pathlib.Path) -> pathlib.Path:
    """data_tiny.zip in the layout of a released zip: a training member and test members, in the released format."""
    path = folder / "data_tiny.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for member, rows in (("1.2,1.3_train.csv", generator.generate(64, [2, 3], 1, seed=5)),
                             ("1.2_test.csv", generator.generate(12, [2], 1, seed=6, split="test")),
                             ("1.3_test.csv", generator.generate(10, [3], 1, seed=7, split="test"))):
            stream = io.StringIO()
            reader.write_rows(rows, stream)
            archive.writestr(f"data_tiny/{member}", stream.getvalue())
    return path


def released_rows_zip(folder: pathlib.Path) -> pathlib.Path:
    """The header and first rows of three members of the real released data_089907f8.zip."""
    path = folder / "data_089907f8.zip"
    with zipfile.ZipFile(RELEASED) as source, zipfile.ZipFile(path, "w") as archive:
        for member in ("1.2,1.3_train.csv", "1.3_test.csv", "1.10_test.csv"):
            rows = reader.read_rows(io.TextIOWrapper(source.open(member), encoding="utf-8", newline=""), member)
            stream = io.StringIO()
            reader.write_rows(rows[:15], stream)
            archive.writestr(member, stream.getvalue())
    return path


def prepare(capsys, train: str, tests: list[str], data_dir: pathlib.Path) -> dict:
    capsys.readouterr()
    test_args = ["--test", *tests] if tests else []
    assert cli.main(["prepare-data", "clutrr", "--train", train, *test_args, "--data-dir", str(data_dir),
                     "--examples-per-shard", "5", "--format", "json"]) == 0
    [result] = json.loads(capsys.readouterr().out)["datasets"]
    return result


def csv_files(kind: str, folder: pathlib.Path) -> tuple[str, list[str], dict[str, list[reader.ClutrrRow]]]:
    """(train spec, test specs, {file name: rows the CSV reader gives}) of one kind of CLUTRR files."""
    if kind == "generator":
        tests = sorted(name for name in os.listdir(FIXTURES) if name.endswith("_test.csv"))
        expected = {name: reader.read_csv(FIXTURES / name) for name in [GENERATOR_TRAIN, *tests]}
        return str(FIXTURES / GENERATOR_TRAIN), [str(FIXTURES)], expected
    if kind == "released":
        if not RELEASED.exists():
            pytest.skip(f"released CLUTRR data {RELEASED} is absent")
        path = released_rows_zip(folder)
    else:
        path = released_style_zip(folder)
    expected = reader.read_zip(path)
    train = next(name for name in expected if name.endswith("_train.csv"))
    return f"{path}:{train}", [str(path)], expected


@pytest.mark.parametrize("kind", ["generator", "released_style", "released"])
def test_prepared_rows_are_the_csv_readers_rows_field_by_field(kind, tmp_path, capsys):
    train, tests, expected = csv_files(kind, tmp_path)
    result = prepare(capsys, train, tests, tmp_path / "tfds")
    assert result["train_with"] == [f"--config.data.prepared_dir={result['dataset_dir']}"]

    data = prepared.open_prepared(result["dataset_dir"])
    got = {data.train.file_name: list(data.train), **{name: list(rows) for name, rows in data.tests.items()}}
    assert list(got) == [next(iter(expected))] + sorted(list(expected)[1:], key=reader.file_order)
    for name, rows in expected.items():
        assert len(got[name]) == len(rows), name
        for want, have in zip(rows, got[name]):   # same rows, in file order
            for field in dataclasses.fields(reader.ClutrrRow):
                mine, theirs = getattr(have, field.name), getattr(want, field.name)
                assert mine == theirs and repr(mine) == repr(theirs), (name, want.id, field.name)
    if kind == "generator":   # the reference generator labels noise edges; released files leave text_query empty
        assert any(row.noise_edge_types for rows in got.values() for row in rows)
        assert all(row.text_query for rows in got.values() for row in rows)


def test_prepared_rows_are_read_one_by_one_in_file_order(tmp_path, capsys):
    result = prepare(capsys, str(FIXTURES / GENERATOR_TRAIN), [], tmp_path / "tfds")
    rows = prepared.open_prepared(result["dataset_dir"]).train
    expected = reader.read_csv(FIXTURES / GENERATOR_TRAIN)
    assert rows[3] == expected[3] and rows[-1] == expected[-1] and rows[2:5] == expected[2:5]
    assert list(rows.take([6, 0])) == [expected[6], expected[0]]


def test_a_folder_that_is_not_a_prepared_data_set_is_a_clear_error(tmp_path, capsys):
    result = prepare(capsys, str(FIXTURES / GENERATOR_TRAIN), [], tmp_path / "tfds")
    with pytest.raises(FileNotFoundError, match="prepare-data clutrr") as error:
        prepared.open_prepared(tmp_path / "tfds")          # the data directory, not the data set's folder
    assert result["dataset_dir"] in str(error.value)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        prepared.open_prepared(tmp_path / "nowhere")


def run_teacher(capsys, workdir: pathlib.Path, *data: str) -> dict:
    capsys.readouterr()
    assert cli.main(["clutrr", "train-teacher", *TEACHER, "--workdir", str(workdir), *data]) == 0
    json.loads(capsys.readouterr().out)
    return json.loads((workdir / "eval.json").read_text())


def test_teacher_trained_on_prepared_data_parses_no_csv_and_matches_a_run_on_the_csvs(tmp_path, capsys,
                                                                                     monkeypatch):
    zip_path = released_style_zip(tmp_path)
    train, tests = f"{zip_path}:1.2,1.3_train.csv", [str(zip_path)]
    from_csv = run_teacher(capsys, tmp_path / "from_csv", f"--config.data.train={train}",
                           f"--config.data.test=('{zip_path}',)")
    result = prepare(capsys, train, tests, tmp_path / "tfds")

    def no_csv(*args, **kwargs):
        raise AssertionError("a CSV was parsed although data.prepared_dir is set")

    for name in ("read_csv", "read_zip", "read_rows", "parse_row"):
        monkeypatch.setattr(reader, name, no_csv)
    monkeypatch.setattr(clutrr_trainer, "read_rows", no_csv)
    # data.train / data.test name nothing readable: the prepared data set is all the run reads.
    from_prepared = run_teacher(capsys, tmp_path / "from_prepared", *result["train_with"],
                                "--config.data.train=/nowhere/1.2_train.csv", "--config.data.test=('/nowhere',)")

    assert from_prepared["steps"] == from_csv["steps"] == 6
    assert from_prepared["valid_rows"] == from_csv["valid_rows"] == 13
    assert from_prepared["validation"] == from_csv["validation"]
    assert from_prepared["final_metrics"] == from_csv["final_metrics"]
    assert list(from_prepared["test"]) == list(from_csv["test"]) == ["1.2_test.csv", "1.3_test.csv"]
    assert from_prepared["test"] == from_csv["test"]


def test_validation_file_with_prepared_data_is_refused(tmp_path, capsys):
    result = prepare(capsys, str(FIXTURES / GENERATOR_TRAIN), [], tmp_path / "tfds")
    config = clutrr_trainer.ml_collections.ConfigDict(
        {"data": {"prepared_dir": result["dataset_dir"], "valid": "v.csv", "valid_fraction": 0.0}})
    with pytest.raises(ValueError, match="data.valid_fraction instead"):
        clutrr_trainer.split_validation(config, clutrr_trainer.training_rows(config))
