"""Specification of jaxalign.data.easy_vqa: the real tfds build, question types, derived captions."""
import collections
import json

import numpy as np
import pytest

from jaxalign.data import easy_vqa
from jaxalign.data.image_ops import decode_image


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The full build of both configs (both splits), once for this module."""
    directory = str(tmp_path_factory.mktemp("tfds"))
    for config in ("questions", "captions"):
        easy_vqa.load_easy_vqa(config, "train", data_dir=directory)
    return directory


@pytest.fixture(scope="module")
def test_split(data_dir):
    """Every record of the built test split, by id (tfds returns records in its own order)."""
    source = easy_vqa.load_easy_vqa("questions", "test", data_dir=data_dir)
    return {record["id"].decode(): record for record in source.__getitems__(list(range(len(source))))}


def test_full_build_has_every_question_of_both_splits(data_dir, test_split):
    train = easy_vqa.load_easy_vqa("questions", "train", data_dir=data_dir)
    assert len(train) == 38575 and len(test_split) == 9673
    assert sorted(int(record["question_index"]) for record in test_split.values()) == list(range(9673))
    rows = easy_vqa.read_questions("train")
    for record in train.__getitems__(list(range(0, 38575, 997))):  # a spread of train records against the file
        question, answer, image_id = rows[record["question_index"]]
        assert (record["question"].decode(), record["answer"].decode(), record["image_id"]) == (
            question, answer, image_id)


def test_a_known_question_has_its_answer_type_caption_and_conversation(test_split):
    record = test_split["test-000000"]  # test/questions.json starts ["what is the red shape?", "triangle", 0]
    assert record["question"] == b"what is the red shape?"
    assert record["answer"] == b"triangle"
    assert record["question_type"] == b"shape"
    assert record["image_id"] == 0
    assert record["caption"] == b"a red triangle"
    assert json.loads(record["conversations"]) == [
        {"from": "human", "value": "<image>\nwhat is the red shape?"}, {"from": "gpt", "value": "triangle"}]
    assert test_split["test-000003"]["question_type"] == b"yes_no_shape"  # "does the image contain a circle?"
    assert test_split["test-000001"]["question_type"] == b"color"  # "what is the color of the triangle?"
    pixels = np.asarray(decode_image(record["image"]))
    assert pixels.shape == (64, 64, 3)
    red, green, blue = np.moveaxis(pixels.astype(int), -1, 0)
    assert ((red > 200) & (green < 80) & (blue < 80)).sum() >= 40  # the image really shows a red shape
    assert ((blue > 200) & (red < 80) & (green < 80)).sum() == 0
    with open(f"{easy_vqa.package_data_dir()}/test/images/0.png", "rb") as f:
        assert record["image"] == f.read()


def test_every_question_has_a_type_and_yes_no_answers_only_on_yes_no_types(test_split):
    counts = collections.Counter()
    for record in test_split.values():
        kind = record["question_type"].decode()
        counts[kind] += 1
        assert (record["answer"] in (b"yes", b"no")) == kind.startswith("yes_no")
    assert counts == {"yes_no_color": 5201, "yes_no_shape": 1935, "color": 1280, "shape": 1257}


@pytest.mark.parametrize("question, answer, kind, facts", [
    ("what color is the triangle?", "red", "color", {("shape", "triangle", True), ("color", "red", True)}),
    ("what is the color of the shape?", "teal", "color", {("color", "teal", True)}),
    ("what is the gray shape?", "circle", "shape", {("color", "gray", True), ("shape", "circle", True)}),
    ("what shape is present?", "rectangle", "shape", {("shape", "rectangle", True)}),
    ("is there not a blue shape in the image?", "yes", "yes_no_color", {("color", "blue", False)}),
    ("is no circle present?", "no", "yes_no_shape", {("shape", "circle", True)}),
    ("does the image contain a triangle?", "no", "yes_no_shape", {("shape", "triangle", False)}),
])
def test_parse_question(question, answer, kind, facts):
    parsed = easy_vqa.parse_question(question, answer)
    assert parsed.question_type == kind == easy_vqa.question_type(question)
    assert set(parsed.facts) == facts


def test_unknown_wording_and_mismatched_answers_are_errors():
    with pytest.raises(ValueError, match="'how many shapes are there\\?' matches none of the easy-vqa"):
        easy_vqa.parse_question("how many shapes are there?", "one", sample_id=3)
    with pytest.raises(ValueError, match="yes / no question but the answer is 'red'"):
        easy_vqa.parse_question("is there a red shape?", "red")


def test_captions_are_derived_from_assertions_or_elimination_and_others_are_reported():
    questions = [("what is the red shape?", "circle", 1),
                 ("is there a circle?", "yes", 2)]  # image 2: shape known, colour unknown
    questions += [(f"is there a {color} shape?", "no", 3) for color in easy_vqa.COLORS if color != "green"]
    questions += [("what shape is present?", "triangle", 3),
                  ("what color is the shape?", "red", 4), ("is there a red shape?", "no", 4),
                  ("what is the blue shape?", "circle", 4)]
    attributes, report = easy_vqa.derive_image_attributes(questions)
    assert attributes == {1: ("red", "circle"), 3: ("green", "triangle")}  # image 3 by elimination
    assert report.total == 4 and sorted(report.undetermined) == [2, 4]
    assert report.undetermined[2].startswith("color: no question settles it")
    assert "both asserted and ruled out" in report.undetermined[4]
    assert "contradictory answers ['blue', 'red']" in report.undetermined[4]
    assert "captioned 2 of 4 images; 2 undetermined" in str(report)


def test_caption_config_has_one_example_per_determined_image(data_dir, test_split):
    captions = easy_vqa.load_easy_vqa("captions", "test", data_dir=data_dir)
    attributes, report = easy_vqa.derive_image_attributes(easy_vqa.read_questions("test"))
    assert len(captions) == len(attributes) == 1000 - len(report.undetermined)
    assert len(attributes) > 850  # most images are determined by their questions
    records = {int(record["image_id"]): record for record in captions}
    assert sorted(records) == sorted(attributes)
    image_id = min(records)
    color, shape = attributes[image_id]
    assert records[image_id]["caption"] == f"a {color} {shape}".encode()
    assert json.loads(records[image_id]["conversations"])[1] == {"from": "gpt", "value": f"a {color} {shape}"}
    # every question of a captioned image agrees with its caption
    for record in test_split.values():
        if int(record["image_id"]) == image_id:
            assert record["caption"] == records[image_id]["caption"]
            for attribute, value, present in easy_vqa.parse_question(record["question"].decode(),
                                                                     record["answer"].decode()).facts:
                actual = color if attribute == "color" else shape
                assert (value == actual) == present


def test_default_data_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(easy_vqa.DATA_DIR_ENV, str(tmp_path))
    assert easy_vqa.default_data_dir() == str(tmp_path)
    monkeypatch.delenv(easy_vqa.DATA_DIR_ENV)
    assert easy_vqa.default_data_dir().endswith(".cache/jaxalign/tfds")
