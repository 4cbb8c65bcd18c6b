"""`jaxalign predict`: a run trained through the command line answers one question about one image file, shows the
neighbours its memory bank gave it, and turns bad input into one error line and exit code 2.

The run: tiny random towers, stage 2 on 1% of the easy-vqa questions (tfds data built from the `easy-vqa` package,
nothing downloaded), 20 steps on 8 fake CPU devices, retrieval on with k=2. The question and image are the first
easy-vqa test question and its PNG, written to a file.
"""
import contextlib
import dataclasses
import io
import json

import numpy as np
import pytest
from PIL import Image

from jaxalign import cli


@pytest.fixture(scope="module")
def trained(trained_run):
    """A tiny stage-2 run trained through `jaxalign train` (conftest.trained_run)."""
    return trained_run


@pytest.fixture(scope="module")
def question(tmp_path_factory):
    """(the first easy-vqa test record, its image written to a PNG file, its question)."""
    from jaxalign.data import easy_vqa

    record = easy_vqa.load_easy_vqa("questions", "test")[0]
    image = tmp_path_factory.mktemp("images") / "shape.png"
    image.write_bytes(bytes(record["image"]))
    return record, image, bytes(record["question"]).decode("utf-8")


@pytest.fixture(scope="module")
def predicted(trained, question):
    """(exit code, stdout) of `jaxalign predict --json` on the question and its image file."""
    _, image, text = question
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["predict", "--workdir", str(trained), "--image", str(image), "--question", text, "--json"])
    return code, out.getvalue()


@pytest.fixture(scope="module")
def eval_path(trained, question):
    """(run, params, batch): the run restored as `jaxalign eval` restores it, and the question's easy-vqa record as
    an evaluation generation batch (the record in row 0, the other rows padding)."""
    from jaxalign.configs.base import load_resolved_config
    from jaxalign.data import pipeline
    from jaxalign.programs import tinyalign_trainer as trainer

    record, _, _ = question
    config = load_resolved_config(trained)
    run, params, replaced = trainer.restore_run(config, str(trained))
    assert replaced, "the checkpoint restored no parameters"
    batch = next(iter(pipeline.make_eval_dataset([record], batch_size=config.eval.batch_size, for_generation=True,
                                                  **dict(run.data_options, verbose=False))))
    return run, params, batch


def test_predict_prints_the_answer_and_the_neighbours_as_json(predicted, question):
    code, output = predicted
    assert code == 0
    result = json.loads(output)
    _, image, text = question
    assert result["question"] == text and result["image"] == str(image)
    assert isinstance(result["answer"], str)
    assert len(result["neighbours"]) == 2
    assert all(set(neighbour) == {"id", "score", "value_id", "value"} for neighbour in result["neighbours"])
    scores = [neighbour["score"] for neighbour in result["neighbours"]]
    assert scores == sorted(scores, reverse=True)


def test_the_answer_is_what_the_evaluation_generates_for_that_question(predicted, question, eval_path):
    """The evaluator of `jaxalign eval`, given the question's easy-vqa record as its only test sample, generates
    the answer that predict printed for the question and the image file."""
    from jaxalign.programs import tinyalign_trainer as trainer

    record, _, _ = question
    run, params, _ = eval_path
    config = run.config.copy_and_resolve_references()
    config.eval.update(loss=False, vqa=True, retrieval_diagnostics=False, fraction=1.0)
    one_question = dataclasses.replace(run, config=config, sources={**run.sources, "eval": [record]})
    results = trainer.make_evaluator(one_question)(params, progress=False)
    (example,) = results["vqa_examples"]
    answer = json.loads(predicted[1])["answer"]
    assert answer and answer == example["prediction"].strip()


def test_the_neighbours_are_an_independent_search_of_the_run_bank(predicted, eval_path, trained):
    """The run's bank, loaded from its folder with `jaxalign.memory`, searched with the prompt's query made from
    the model's own functions, returns the ids, scores and value tokens that predict showed."""
    import jax

    from jaxalign import sharding
    from jaxalign.align import model as model_lib
    from jaxalign.memory import store

    run, params, batch = eval_path
    cfg = run.cfg
    inputs = jax.tree.map(np.asarray, model_lib.numpy_batch(batch))
    features = model_lib.image_features(params, cfg, inputs["pixels"])
    tokens = model_lib.image_tokens(params, cfg, features)
    embeddings = model_lib.text_embeddings(params, cfg, inputs["input_ids"])
    query = model_lib.retrieval_key(params, cfg, inputs, features, tokens, embeddings)[:1]
    bank = store.load_bank(trained / "memory", mesh=sharding.make_mesh((-1, 1, 1)))
    found = bank.search(np.asarray(query), cfg.k, with_values=True)
    neighbours = json.loads(predicted[1])["neighbours"]
    assert [n["id"] for n in neighbours] == np.asarray(found.ids)[0].tolist()
    assert [n["value_id"] for n in neighbours] == [n["id"] for n in neighbours]  # control 'real'
    np.testing.assert_allclose([n["score"] for n in neighbours], np.asarray(found.scores)[0], rtol=1e-4, atol=1e-5)
    values = [run.tokenizer.decode(row.tolist()).strip() for row in np.asarray(found.values["tokens"])[0]]
    assert [n["value"] for n in neighbours] == values
    assert all(values), "every neighbour's value is the text of an easy-vqa answer"


def test_the_table_shows_the_answer_then_one_row_per_neighbour(trained, question, capsys):
    _, image, text = question
    assert cli.main(["predict", "--workdir", str(trained), "--image", str(image), "--question", text]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("answer:") and lines[1] == f"question: {text}"
    header = next(index for index, line in enumerate(lines) if "bank id" in line)
    assert len(lines[header + 1:]) == 2


def test_a_run_without_retrieval_answers_with_no_neighbours(trained, question, capsys):
    _, image, text = question
    code = cli.main(["predict", "--workdir", str(trained), "--image", str(image), "--question", text, "--json",
                     "--config.retrieval.control=off"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["neighbours"] == [] and isinstance(result["answer"], str)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.fixture
def png(tmp_path):
    """A small PNG image file."""
    path = tmp_path / "square.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(path)
    return path


def _predict_error(capsys, *arguments):
    code = cli.main(["predict", *arguments])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def test_a_missing_image_is_one_error_line(tmp_path, capsys):
    missing = tmp_path / "nowhere.png"
    code, out, err = _predict_error(capsys, "--workdir", str(tmp_path), "--image", str(missing), "--question", "what?")
    assert code == 2 and out == ""
    assert err == f"jaxalign predict: error: --image {missing}: no such file"


def test_a_file_that_is_not_an_image_is_one_error_line(tmp_path, capsys):
    text_file = tmp_path / "notes.png"
    text_file.write_text("this is not a PNG")
    code, out, err = _predict_error(capsys, "--workdir", str(tmp_path), "--image", str(text_file), "--question",
                                    "what?")
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert err.startswith(f"jaxalign predict: error: --image {text_file}: not an image PIL can decode")


def test_an_empty_question_is_one_error_line(tmp_path, png, capsys):
    code, out, err = _predict_error(capsys, "--workdir", str(tmp_path), "--image", str(png), "--question", "  ")
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert err.startswith("jaxalign predict: error: --question is empty")


def test_a_workdir_without_a_trained_run_is_one_error_line(tmp_path, png, capsys):
    code, out, err = _predict_error(capsys, "--workdir", str(tmp_path), "--image", str(png), "--question", "what?")
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert err.startswith(f"jaxalign predict: error: --workdir {tmp_path}: no config.json there")


def test_a_workdir_whose_run_saved_no_checkpoint_is_one_error_line(tmp_path, png, capsys):
    (tmp_path / "config.json").write_text("{}")
    code, out, err = _predict_error(capsys, "--workdir", str(tmp_path), "--image", str(png), "--question", "what?")
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert err.startswith(f"jaxalign predict: error: --workdir {tmp_path}: no checkpoint in {tmp_path / 'checkpoints'}")
