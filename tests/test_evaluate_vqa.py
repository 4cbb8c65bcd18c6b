"""VQA answer normalisation, accuracy per question type, and loss / perplexity aggregation."""
import math

import numpy as np
import pytest

from jaxalign.data.tokenizer import train_word_level_tokenizer
from jaxalign.evaluate import lm_loss, vqa


@pytest.mark.parametrize("raw, expected", [
    ("The Red Circle.", "red circle"),
    ("  two  ", "2"),
    ("Yes!", "yes"),
    ("an apple, please", "apple please"),
    ("dont know", "don't know"),
    ("3.5", "3.5"),
    ("1,000", "1000"),
    ("a\nblue square", "blue square"),
])
def test_normalize_answer_follows_the_vqa_rules(raw, expected):
    assert vqa.normalize_answer(raw) == expected


def test_first_answer_keeps_the_first_line():
    assert vqa.first_answer("  red\nthe shape is red") == "red"
    assert vqa.first_answer("") == ""


def test_tally_counts_overall_and_per_question_type():
    tally = vqa.VqaTally()
    hits = tally.add(["Red", "circle", "no", "two"], ["red", "square", "no", "2"],
                     ["color", "shape", "yes_no_color", "count"])
    assert hits == [True, False, True, True]
    result = tally.result()
    assert result["accuracy"] == pytest.approx(0.75) and result["count"] == 4 and result["correct"] == 3
    assert result["per_type"]["shape"] == {"accuracy": 0.0, "correct": 0, "count": 1}
    assert result["per_type"]["color"]["accuracy"] == 1.0
    assert vqa.VqaTally().result() == {"accuracy": 0.0, "correct": 0, "count": 0, "per_type": {}}


def test_evaluate_vqa_on_a_hand_made_case_with_known_answers():
    tokenizer = train_word_level_tokenizer(["red blue circle square yes no"])
    ids = {word: tokenizer.token_to_id(word) for word in ("red", "blue", "circle", "square", "yes", "no")}
    eos, pad = tokenizer.eos_id, tokenizer.pad_id
    # The "model" answers with a fixed table; the third row pads the batch and must not be scored.
    answers = np.asarray([[ids["red"], eos, pad], [ids["square"], eos, pad], [ids["yes"], eos, pad]])
    batches = [
        {"valid": np.array([True, True, False]), "answer": np.array(["red", "circle", "yes"], dtype=object),
         "question_type": np.array(["color", "shape", "color"], dtype=object)},
        {"valid": np.array([True, True, True]), "answer": np.array(["red", "square", "no"], dtype=object),
         "question_type": np.array(["color", "shape", "yes_no"], dtype=object)},
    ]
    result, examples = vqa.evaluate_vqa(lambda batch: answers, batches, tokenizer, progress=False)
    assert result["count"] == 5 and result["correct"] == 3
    assert result["per_type"] == {"color": {"accuracy": 1.0, "correct": 2, "count": 2},
                                  "shape": {"accuracy": 0.5, "correct": 1, "count": 2},
                                  "yes_no": {"accuracy": 0.0, "correct": 0, "count": 1}}
    assert examples[1] == {"question_type": "shape", "reference": "circle", "prediction": "square",
                           "correct": False}
    limited, _ = vqa.evaluate_vqa(lambda batch: answers, batches, tokenizer, max_examples=3, progress=False)
    assert limited["count"] == 3


def test_loss_is_token_weighted_over_the_whole_set():
    steps = iter([{"loss_sum": 6.0, "num_tokens": 2.0}, {"loss_sum": 2.0, "num_tokens": 6.0},
                  {"loss_sum": 0.0, "num_tokens": 0.0}])
    result = lm_loss.evaluate_loss(lambda batch: next(steps), [0, 1, 2], progress=False)
    assert result["loss"] == pytest.approx(1.0)          # (6 + 2) / 8, not the mean of 3.0 and 0.33
    assert result["perplexity"] == pytest.approx(math.e)
    assert result["num_tokens"] == 8.0 and result["num_batches"] == 3
    empty = lm_loss.evaluate_loss(lambda batch: {"loss_sum": 0.0, "num_tokens": 0.0}, [0], progress=False)
    assert math.isnan(empty["loss"])
