"""Specification of jaxalign.align.retrieval_diagnostics: retrieval precision, its chance level and the key ceiling."""
import json

import numpy as np
import pytest

from jaxalign.align import retrieval_diagnostics as diagnostics
from jaxalign.data import easy_vqa

# Bank of 4 rows (ids 0..3). Queries 0-1 ask for a colour, query 2 for a shape.
BANK = {"answer": np.array(["red", "blue", "red", "circle"])}
QUERY = {"answer": np.array(["red", "blue", "circle"]), "question_type": np.array(["color", "color", "shape"])}


def test_precision_counts_agreeing_slots_over_all_ranks():
    # query 0 (red):    rows 0 (red, agree), 2 (red, agree)
    # query 1 (blue):   rows 1 (blue, agree), 0 (red)
    # query 2 (circle): rows 3 (circle, agree), 1 (blue)
    # -> 4 of 6 slots agree; rank 1: 3/3, rank 2: 1/3; p@1 = 3/3, p@2 = 4/6.
    result = diagnostics.retrieval_precision(np.array([[0, 2], [1, 0], [3, 1]]), QUERY, BANK)
    answer = result["fields"]["answer"]
    assert (answer["agree"], answer["compared"], answer["unknown"]) == (4, 6, 0)
    assert answer["precision"] == pytest.approx(4 / 6)
    assert answer["by_rank"] == {"agree": [3, 1], "compared": [3, 3], "precision": [1.0, pytest.approx(1 / 3)]}
    assert answer["precision_at"] == [1.0, pytest.approx(4 / 6)]
    assert (result["queries"], result["k"], result["slots"], result["retrieved"], result["empty"]) == (3, 2, 6, 6, 0)
    assert result["by"] == "question_type" and list(result["fields"]) == ["answer"]  # the `by` field is no field


def test_precision_is_broken_down_by_question_type():
    # colour queries: query 0 (red) gets rows 2 (red, agree), 1 (blue) -> 1; query 1 (blue) gets rows 1, 1
    # (blue, agree twice) -> 2: 3 of 4. Shape query 2 (circle) gets rows 0, 2 (red, red) -> 0 of 2.
    result = diagnostics.retrieval_precision(np.array([[2, 1], [1, 1], [0, 2]]), QUERY, BANK)
    by_type = result["fields"]["answer"]["by_type"]
    assert set(by_type) == {"color", "shape"}
    color, shape = by_type["color"], by_type["shape"]
    assert (color["queries"], color["agree"], color["compared"], color["precision"]) == (2, 3, 4, 0.75)
    assert color["precision_at"] == [1.0, 0.75]                       # rank 1: red/red, blue/blue
    assert (shape["queries"], shape["agree"], shape["compared"], shape["precision"]) == (1, 0, 2, 0.0)
    # chance within a type uses only that type's queries: colour queries are red, blue (1/2 each), the bank is
    # red 2/4, blue 1/4, circle 1/4 -> 1/2 * 2/4 + 1/2 * 1/4 = 3/8; shape: circle 1 * 1/4.
    assert color["chance"] == pytest.approx(3 / 8) and shape["chance"] == pytest.approx(1 / 4)


def test_no_breakdown_without_the_by_field():
    result = diagnostics.retrieval_precision(np.array([[0], [1], [3]]), {"answer": QUERY["answer"]}, BANK)
    assert result["by"] is None and "by_type" not in result["fields"]["answer"]
    assert result["fields"]["answer"]["precision"] == 1.0


def test_empty_slots_are_reported_and_not_counted_as_disagreement():
    # query 0: rows 0 (agree), -1; query 1: -1, -1; query 2: row 3 (agree), -1 -> 2 of 2 compared, 4 empty.
    result = diagnostics.retrieval_precision(np.array([[0, -1], [-1, -1], [3, -1]]), QUERY, BANK)
    answer = result["fields"]["answer"]
    assert (result["retrieved"], result["empty"]) == (2, 4)
    assert (answer["agree"], answer["compared"], answer["precision"]) == (2, 2, 1.0)
    assert answer["by_rank"]["compared"] == [2, 0] and answer["by_rank"]["precision"] == [1.0, None]
    assert diagnostics.summary_line(result).endswith("; 4 of 6 slots empty")


def test_unknown_values_are_counted_apart_from_disagreement():
    # colour of query 1 and of bank row 2 unknown (''); bytes decode like str.
    query = {"color": np.array([b"red", b"", b"teal"])}
    bank = {"color": np.array(["red", "teal", "", "teal"], object)}
    # query 0: row 0 agree, row 2 unknown; query 1: both unknown; query 2: row 1 agree, row 0 (red) disagree.
    result = diagnostics.retrieval_precision(np.array([[0, 2], [1, 3], [1, 0]]), query, bank)
    color = result["fields"]["color"]
    assert (color["agree"], color["compared"], color["unknown"]) == (2, 3, 3)
    # chance over known values only: queries red, teal (1/2 each); bank red 1/3, teal 2/3 -> 1/6 + 2/6 = 1/2.
    assert color["chance"] == pytest.approx(0.5)


def test_chance_level_by_hand():
    # queries: red 3/4, blue 1/4; bank: red 1/5, blue 2/5, green 2/5 -> 3/4 * 1/5 + 1/4 * 2/5 = 3/20 + 2/20 = 1/4.
    query = {"answer": np.array(["red", "red", "red", "blue"])}
    bank = {"answer": np.array(["red", "blue", "blue", "green", "green"])}
    result = diagnostics.retrieval_precision(np.zeros((4, 1), int), query, bank)
    assert result["fields"]["answer"]["chance"] == pytest.approx(0.25)
    assert result["fields"]["answer"]["precision"] == 0.75  # all retrieve row 0 (red)


def test_bank_ids_map_ids_to_rows_and_unknown_ids_are_errors():
    bank = {"answer": np.array(["circle", "red"])}
    result = diagnostics.retrieval_precision(np.array([[17], [40]]), {"answer": np.array(["red", "red"])}, bank,
                                             bank_ids=np.array([40, 17]))
    assert result["fields"]["answer"]["agree"] == 1  # id 17 is row 1 (red), id 40 row 0 (circle)
    with pytest.raises(ValueError, match=r"retrieved id 5 \(query 1, rank 1\) is not a bank row"):
        diagnostics.retrieval_precision(np.array([[17], [5]]), {"answer": np.array(["red", "red"])}, bank,
                                        bank_ids=np.array([40, 17]))
    with pytest.raises(ValueError, match="retrieved id 4"):
        diagnostics.retrieval_precision(np.array([[4]]), {"answer": np.array(["red"])}, bank)


def test_mismatched_kinds_and_missing_fields_are_errors():
    with pytest.raises(ValueError, match="'image_id'.*both as text or both as numbers"):
        diagnostics.retrieval_precision(np.array([[0]]), {"image_id": np.array(["3"])}, {"image_id": np.array([3])})
    with pytest.raises(KeyError, match="'shape' is missing from the query arrays"):
        diagnostics.retrieval_precision(np.array([[0], [1], [2]]), QUERY, BANK, fields=["shape"])


def test_result_is_json_able():
    result = diagnostics.retrieval_precision(np.array([[0, -1], [1, 0], [3, 1]], np.int32), QUERY, BANK)
    assert json.loads(json.dumps(result)) == result


# ------------------------------------------------------------------------------------------- search
def brute_force_neighbours(keys, k, metric, groups=None):
    """The k best other rows of each row by a double loop (float64), ties to the lower row, -1 padded."""
    keys = np.asarray(keys, np.float64)
    if metric == "cosine":
        keys = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    rows = np.full((len(keys), k), -1)
    for i in range(len(keys)):
        candidates = []
        for j in range(len(keys)):
            if j == i or (groups is not None and groups[j] == groups[i]):
                continue
            score = -np.sum((keys[i] - keys[j]) ** 2) if metric == "l2" else keys[i] @ keys[j]
            candidates.append((-score, j))
        best = [j for _, j in sorted(candidates)[:k]]
        rows[i, :len(best)] = best
    return rows


@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
def test_nearest_rows_match_a_double_loop(metric):
    keys = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
    rows, scores = diagnostics.nearest_rows(keys, 3, metric, chunk_size=16)  # 16 does not divide 40
    np.testing.assert_array_equal(rows, brute_force_neighbours(keys, 3, metric))
    assert np.all(np.diff(scores, axis=1) <= 0)


def test_nearest_rows_skip_the_own_group_and_pad_when_too_few_rows_qualify():
    keys = np.random.default_rng(1).normal(size=(30, 5)).astype(np.float32)
    groups = np.array([f"image-{i // 3}" for i in range(27)] + ["big"] * 3)  # groups of 3 rows, as text
    rows, _ = diagnostics.nearest_rows(keys, 4, "cosine", groups)
    np.testing.assert_array_equal(rows, brute_force_neighbours(keys, 4, "cosine", groups))
    assert not np.any(groups[rows] == groups[:, None])
    # Only rows 0 and 1 are in different groups: each has one neighbour, the rest is -1 / -inf.
    line = np.array([[1.0, 0.0], [0.9, 0.0], [0.5, 0.0]])  # dot scores from row 0: row 1 0.9, row 2 0.5
    rows, scores = diagnostics.nearest_rows(line, 2, "dot", groups=np.array([0, 1, 1]))
    np.testing.assert_array_equal(rows, [[1, 2], [0, -1], [0, -1]])
    assert np.isneginf(scores[1:, 1]).all() and np.isfinite(scores[:, 0]).all()


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 200])
def test_chunking_gives_the_unchunked_search(chunk_size):
    rng = np.random.default_rng(2)
    keys = rng.normal(size=(64, 8)).astype(np.float32)
    groups = rng.integers(0, 20, size=64)
    whole_rows, whole_scores = diagnostics.nearest_rows(keys, 5, "cosine", groups, chunk_size=64)
    rows, scores = diagnostics.nearest_rows(keys, 5, "cosine", groups, chunk_size=chunk_size)
    np.testing.assert_array_equal(rows, whole_rows)
    np.testing.assert_allclose(scores, whole_scores, rtol=1e-6)


def test_nearest_rows_reject_k_beyond_the_other_rows():
    with pytest.raises(ValueError, match="at most 3 others"):
        diagnostics.nearest_rows(np.eye(4), 4)


def test_key_knn_precision_by_hand():
    # Keys on a line: rows 0, 1 near 0; rows 2, 3 near 10 (l2). Colours red red blue red.
    # k=1: 0->1 (red/red agree), 1->0 (agree), 2->3 (blue/red), 3->2 (red/blue): 2 of 4.
    keys = np.array([[0.0], [1.0], [10.0], [11.0]])
    attributes = {"color": np.array(["red", "red", "blue", "red"]), "image_id": np.array([0, 1, 2, 3])}
    result = diagnostics.key_knn_precision(keys, attributes, 1, "l2", groups="image_id")
    assert list(result["fields"]) == ["color"]  # the group field is not compared
    assert result["fields"]["color"]["precision"] == 0.5
    assert result["fields"]["color"]["chance"] == pytest.approx((3 / 4) ** 2 + (1 / 4) ** 2)
    assert result["search"] == {"rows": 4, "k": 1, "metric": "l2", "groups": "image_id"}
    # Rows 0, 1 on one image: 0 -> 2 (blue, disagree), 1 -> 2 (disagree), 2 -> 3, 3 -> 2 (disagree): 0 of 4.
    attributes["image_id"] = np.array([0, 0, 2, 3])
    assert diagnostics.key_knn_precision(keys, attributes, 1, "l2", groups="image_id")[
        "fields"]["color"]["precision"] == 0.0


def test_key_knn_precision_equals_retrieval_precision_of_the_brute_force_neighbours():
    rng = np.random.default_rng(3)
    keys = rng.normal(size=(50, 4)).astype(np.float32)
    attributes = {"answer": rng.choice(["yes", "no", "red"], size=50), "question_type": rng.choice(["a", "b"], 50)}
    groups = rng.integers(0, 10, size=50)
    for grouping in (None, groups):
        result = diagnostics.key_knn_precision(keys, attributes, 3, groups=grouping, chunk_size=9)
        expected = diagnostics.retrieval_precision(brute_force_neighbours(keys, 3, "cosine", grouping),
                                                   attributes, attributes)
        result.pop("search")
        assert result == expected


# ------------------------------------------------------------------------------------------ easy-vqa
@pytest.fixture(scope="module")
def test_records():
    return easy_vqa.question_records("test")  # plain reader of the installed package: no tfds build


def test_easy_vqa_attributes_of_real_records(test_records):
    # test/questions.json starts with ["what is the red shape?", "triangle", 0] (image 0: a red triangle),
    # then "what is the color of the triangle?" (a color question).
    attributes = diagnostics.easy_vqa_attributes(test_records[:4])
    assert set(attributes) == {"answer", "color", "shape", "question_type", "image_id"}
    assert attributes["answer"][0] == "triangle" and attributes["question_type"][0] == "shape"
    assert (attributes["color"][0], attributes["shape"][0], attributes["image_id"][0]) == ("red", "triangle", 0)
    assert attributes["question_type"][1] == "color"
    for name, values in attributes.items():
        assert len(values) == 4, name
    # An image its questions do not settle has an empty caption: unknown colour and shape.
    undetermined = next(record for record in test_records if record["caption"] == "")
    attributes = diagnostics.easy_vqa_attributes([undetermined])
    assert (attributes["color"][0], attributes["shape"][0]) == ("", "")


def test_easy_vqa_attributes_of_tfds_style_and_caption_records():
    tfds_record = {"id": b"test-000000", "image_id": np.int32(0), "answer": b"triangle",
                   "question_type": b"shape", "caption": b"a red triangle"}
    caption_record = {"id": "test-image-00007", "image_id": 7, "caption": "a teal circle", "color": "teal",
                      "shape": "circle"}
    attributes = diagnostics.easy_vqa_attributes([tfds_record, caption_record])
    assert attributes["color"].tolist() == ["red", "teal"] and attributes["shape"].tolist() == ["triangle", "circle"]
    assert attributes["answer"].tolist() == ["triangle", ""] and attributes["image_id"].tolist() == [0, 7]
    with pytest.raises(ValueError, match="'test-9'.*'a purple hexagon'"):
        diagnostics.easy_vqa_attributes([{"id": "test-9", "image_id": 1, "caption": "a purple hexagon"}])


def test_oracle_keys_on_real_easy_vqa_reach_full_colour_and_shape_precision(test_records):
    # Keys that are the one-hot colour and shape: every neighbour (on another image) has the same colour and
    # shape, so both precisions are 1, far above chance; the answer is not in the key, so it is not.
    records = [record for record in test_records if record["caption"]]
    attributes = diagnostics.easy_vqa_attributes(records)
    keys = np.concatenate([attributes["color"][:, None] == np.array(easy_vqa.COLORS),
                           attributes["shape"][:, None] == np.array(easy_vqa.SHAPES)], axis=1).astype(np.float32)
    result = diagnostics.key_knn_precision(keys, attributes, 3, groups="image_id",
                                           fields=diagnostics.EASY_VQA_FIELDS)
    fields = result["fields"]
    assert fields["color"]["precision"] == 1.0 and fields["shape"]["precision"] == 1.0
    colors = np.unique(attributes["color"], return_counts=True)[1] / len(records)
    assert fields["color"]["chance"] == pytest.approx(np.sum(colors ** 2))
    assert fields["answer"]["precision"] < 0.6
    assert set(fields["answer"]["by_type"]) == set(easy_vqa.QUESTION_TYPES)
    line = diagnostics.summary_line(result)
    assert line.startswith("answer ") and ", color 1.00 (" in line and ", shape 1.00 (" in line
    assert "(chance " in line.split(",")[0]
    table = diagnostics.format_table({"oracle": result})
    assert table.splitlines()[0].split() == ["result", "field", "p@1", "p@k", "chance", "compared", "unknown"]
    assert any(line.split()[:2] == ["oracle", "answer"] for line in table.splitlines())
    assert any("question_type=yes_no_color" in line for line in table.splitlines())
