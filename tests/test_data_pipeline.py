"""Specification of jaxalign.data.pipeline: batch values, fractions, resume, host slices, skip reports, eval."""
import json

import numpy as np
import pytest

from jaxalign.data import easy_vqa
from jaxalign.data.chat_templates import IGNORE_LABEL, IMAGE_TOKEN_ID, RETRIEVAL_TOKEN_ID, get_template
from jaxalign.data.image_ops import SIGLIP_MEAN, SIGLIP_STD, preprocess_image
from jaxalign.data.pipeline import host_slice, make_eval_dataset, make_vqa_dataset, select_fraction
from jaxalign.data.tokenizer import train_word_level_tokenizer

IMAGE_SIZE = 16
MAX_LENGTH = 48
TEMPLATE = get_template("phi")


@pytest.fixture(scope="module")
def records():
    """The first 120 real easy-vqa test questions (in-memory records, the same dicts the builder writes)."""
    return easy_vqa.question_records("test")[:120]


@pytest.fixture(scope="module")
def tokenizer(records):
    texts = [record["question"] + " " + record["answer"] for record in records]
    return train_word_level_tokenizer(texts + [TEMPLATE.system_message + " USER: ASSISTANT:"])


def dataset(records, tokenizer, **overrides):
    options = dict(image_size=IMAGE_SIZE, mean=SIGLIP_MEAN, std=SIGLIP_STD, max_length=MAX_LENGTH, batch_size=8,
                   seed=3, process_index=0, process_count=1, verbose=False)
    options.update(overrides)
    return make_vqa_dataset(records, tokenizer, TEMPLATE, **options)


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


# ---------------------------------------------------------------------------------------- batch values
def test_batch_shapes_and_dtypes(records, tokenizer):
    batch = next(dataset(records, tokenizer, insert_retrieval=True))
    assert batch["pixels"].shape == (8, IMAGE_SIZE, IMAGE_SIZE, 3) and batch["pixels"].dtype == np.float32
    for name in ("input_ids", "labels", "attention_mask"):
        assert batch[name].shape == (8, MAX_LENGTH) and batch[name].dtype == np.int32
    for name in ("image_index", "retrieval_index", "text_start", "sample_index"):
        assert batch[name].shape == (8,) and batch[name].dtype == np.int32
    np.testing.assert_array_equal(batch["retrieval_index"], batch["image_index"] + 1)
    rows = np.arange(8)
    assert (batch["input_ids"][rows, batch["image_index"]] == IMAGE_TOKEN_ID).all()
    assert (batch["input_ids"][rows, batch["retrieval_index"]] == RETRIEVAL_TOKEN_ID).all()


def test_rows_map_back_to_their_question_answer_and_image(records, tokenizer):
    batch = next(dataset(records, tokenizer))
    for row in range(8):
        record = records[batch["sample_index"][row]]
        length = batch["attention_mask"][row].sum()
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        # the human text after the image marker is this record's question, the labels are its answer + EOS
        question = tokenizer.decode(ids[batch["text_start"][row]:length])
        assert question.startswith(tokenizer.decode(tokenizer.encode(record["question"])))
        labelled = labels[labels != IGNORE_LABEL]
        np.testing.assert_array_equal(labelled, tokenizer.encode(record["answer"]) + [tokenizer.eos_id])
        assert (labels[:batch["text_start"][row]] == IGNORE_LABEL).all()  # prompt tokens carry no loss
        assert (labels[length:] == IGNORE_LABEL).all() and (ids[length:] == tokenizer.pad_id).all()
        expected_pixels = preprocess_image(record["image"], IMAGE_SIZE, SIGLIP_MEAN, SIGLIP_STD)
        np.testing.assert_array_equal(batch["pixels"][row], expected_pixels)


def test_same_seed_same_batches_other_seed_other_order(records, tokenizer):
    first = take(dataset(records, tokenizer), 3)
    again = take(dataset(records, tokenizer), 3)
    other = take(dataset(records, tokenizer, seed=4), 3)
    for a, b in zip(first, again):
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(first[0]["sample_index"], other[0]["sample_index"])


def test_one_epoch_visits_every_sample_once_and_epochs_reshuffle(records, tokenizer):
    batches = take(dataset(records, tokenizer), 30)  # 240 rows = two epochs of 120
    indexes = np.concatenate([batch["sample_index"] for batch in batches])
    assert sorted(indexes[:120]) == list(range(120)) and sorted(indexes[120:]) == list(range(120))
    assert not np.array_equal(indexes[:120], indexes[120:])


def test_num_epochs_stops_and_unshuffled_order_is_source_order(records, tokenizer):
    batches = list(dataset(records[:20], tokenizer, num_epochs=1, shuffle=False))
    assert len(batches) == 2  # 20 samples, batches of 8: the last 4 samples do not make a full batch
    np.testing.assert_array_equal(np.concatenate([b["sample_index"] for b in batches]), np.arange(16))


# --------------------------------------------------------------------------------------------- fractions
def test_fraction_is_reproducible_and_a_prefix_of_larger_fractions():
    forty = select_fraction(1000, 0.4, seed=7)
    assert len(forty) == 400 and len(set(forty)) == 400
    np.testing.assert_array_equal(forty, select_fraction(1000, 0.4, seed=7))
    np.testing.assert_array_equal(select_fraction(1000, 0.8, seed=7)[:400], forty)
    assert sorted(select_fraction(1000, 1.0, seed=7)) == list(range(1000))
    assert set(select_fraction(1000, 0.4, seed=8)) != set(forty)
    with pytest.raises(ValueError, match="fraction must be in"):
        select_fraction(10, 1.5, seed=0)


def test_dataset_reads_only_its_fraction(records, tokenizer):
    batches = take(dataset(records, tokenizer, fraction=0.4), 6)  # 48 rows = one pass over 48 samples
    seen = np.concatenate([batch["sample_index"] for batch in batches])
    assert sorted(seen) == sorted(select_fraction(120, 0.4, seed=3))


# ------------------------------------------------------------------------------------------------ resume
def test_start_step_yields_the_same_batches_as_an_uninterrupted_run(records, tokenizer):
    bad = [dict(records[0], id="broken", image=b"not a png")]
    data = records[:37] + bad  # a skipped sample and an epoch boundary inside the first 10 steps
    full = take(dataset(data, tokenizer), 12)
    resumed = dataset(data, tokenizer, start_step=7)
    assert resumed.state["step"] == 7
    for expected, batch in zip(full[7:], take(resumed, 5)):
        for name in expected:
            np.testing.assert_array_equal(batch[name], expected[name])


def test_state_restores_the_position_without_replay(records, tokenizer):
    iterator = dataset(records, tokenizer)
    take(iterator, 4)
    state = dict(iterator.state)
    expected = take(iterator, 2)
    restored = take(dataset(records, tokenizer, start_state=state), 2)
    for a, b in zip(expected, restored):
        np.testing.assert_array_equal(a["sample_index"], b["sample_index"])
        np.testing.assert_array_equal(a["pixels"], b["pixels"])


# ------------------------------------------------------------------------------------------- host slices
def test_two_hosts_read_disjoint_slices_that_cover_the_fraction(records, tokenizer):
    selected = np.sort(select_fraction(120, 0.5, seed=3))
    seen = []
    for process_index in (0, 1):
        part = host_slice(selected, process_index, 2)
        batches = take(dataset(records, tokenizer, fraction=0.5, process_index=process_index, process_count=2,
                               batch_size=6), 5)  # 30 rows = one pass over this host's 30 samples
        indexes = np.concatenate([batch["sample_index"] for batch in batches])
        assert sorted(indexes) == sorted(part)
        seen.append(set(indexes))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(selected)


def test_host_defaults_come_from_jax(records, tokenizer):
    import jax
    explicit = dataset(records, tokenizer)
    default = dataset(records, tokenizer, process_index=None, process_count=None)
    assert (jax.process_index(), jax.process_count()) == (0, 1)
    np.testing.assert_array_equal(default.host_indexes, explicit.host_indexes)


def test_host_slice_sizes_differ_by_at_most_one():
    parts = [host_slice(np.arange(10), index, 3) for index in range(3)]
    assert [len(part) for part in parts] == [4, 3, 3]
    assert sorted(np.concatenate(parts)) == list(range(10))
    with pytest.raises(ValueError, match="process_index 3"):
        host_slice(np.arange(10), 3, 3)


# ------------------------------------------------------------------------------------------ skip reports
def _bad_records(records):
    empty_answer = json.dumps([{"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": " "}])
    long_question = json.dumps([{"from": "human", "value": "<image>\n" + "what shape " * 40},
                                {"from": "gpt", "value": "circle"}])
    no_image = json.dumps([{"from": "human", "value": "what shape?"}, {"from": "gpt", "value": "circle"}])
    return records[:10] + [
        dict(records[0], id="corrupt", image=b"\x89PNG truncated"),
        dict(records[1], id="empty-answer", conversations=empty_answer),
        dict(records[2], id="long", conversations=long_question),
        dict(records[3], id="missing", image=b""),
        dict(records[4], id="text-only", image=b"", conversations=no_image),
    ]


def test_bad_samples_are_replaced_counted_and_listed_per_pass(records, tokenizer, capsys):
    data = _bad_records(records)  # 15 records, 4 bad: 11 usable
    iterator = dataset(data, tokenizer, batch_size=4, verbose=True)
    batches = take(iterator, 3)  # 12 rows: the 11 usable ones, then the first of the next pass
    assert all(batch["sample_index"].shape == (4,) for batch in batches)
    first_pass = np.concatenate([batch["sample_index"] for batch in batches])[:11]
    assert sorted(first_pass) == list(range(10)) + [14]
    report = iterator.reports[0]
    assert report.counts == {"corrupt_image": 1, "empty_answer": 1, "missing_image": 1, "too_long": 1}
    assert report.skipped["corrupt_image"] == ["corrupt"] and report.skipped["too_long"] == ["long"]
    assert (report.total, report.kept) == (15, 11)
    assert "data pass 0: encoded 11 of 15 samples; skipped 4" in capsys.readouterr().err
    text_only_row = list(np.concatenate([b["sample_index"] for b in batches])).index(14)
    batch, row = batches[text_only_row // 4], text_only_row % 4
    assert batch["image_index"][row] == -1 and not batch["pixels"][row].any()


def test_truncate_cuts_long_answers_and_fail_fast_raises(records, tokenizer):
    long_answer = json.dumps([{"from": "human", "value": "<image>\nwhat shape?"},
                              {"from": "gpt", "value": "circle " * 60}])
    data = _bad_records(records)[10:13] + [dict(records[5], id="long-answer", conversations=long_answer)]
    iterator = dataset(data, tokenizer, batch_size=1, truncate=True, shuffle=False)
    batch = next(iterator)
    assert batch["sample_index"].tolist() == [3]  # cut to max_length, kept; a cut question leaves no answer
    assert batch["attention_mask"].sum() == MAX_LENGTH and (batch["labels"][0, -5:] != IGNORE_LABEL).all()
    assert iterator.reports[0].counts == {"corrupt_image": 1, "empty_answer": 1, "truncated": 1}
    with pytest.raises(ValueError, match="sample 'corrupt': image cannot be decoded"):
        next(dataset(data, tokenizer, fail_fast=True, shuffle=False))


# -------------------------------------------------------------------------------------------- evaluation
def test_eval_yields_every_sample_once_with_a_padding_mask(records, tokenizer):
    data = _bad_records(records)  # 15 records, 4 bad
    seen, counts = [], []
    for process_index in (0, 1):
        evaluation = make_eval_dataset(data, tokenizer, TEMPLATE, IMAGE_SIZE, SIGLIP_MEAN, SIGLIP_STD, MAX_LENGTH,
                                       batch_size=3, process_index=process_index, process_count=2, verbose=False)
        batches = list(evaluation)
        counts.append(len(batches))
        for batch in batches:
            seen += list(batch["sample_index"][batch["valid"]])
            assert (batch["sample_index"][~batch["valid"]] == -1).all()
            assert (batch["attention_mask"][~batch["valid"]].sum(axis=1) == 1).all()
    assert counts == [3, 3]  # ceil(8 / 3) for both hosts, though host 0 has 8 samples and host 1 has 7
    assert sorted(seen) == list(range(10)) + [14]
    # host 1 reads records 8..14, four of them bad
    assert evaluation.report.counts == {"corrupt_image": 1, "empty_answer": 1, "missing_image": 1, "too_long": 1}


def test_generation_eval_rows_are_left_padded_prompts_with_reference_answers(records, tokenizer):
    evaluation = make_eval_dataset(records[:5], tokenizer, TEMPLATE, IMAGE_SIZE, SIGLIP_MEAN, SIGLIP_STD,
                                   MAX_LENGTH, batch_size=4, for_generation=True, process_index=0, process_count=1,
                                   verbose=False)
    batches = list(evaluation)
    assert len(batches) == 2 and batches[1]["valid"].tolist() == [True, False, False, False]
    batch = batches[0]
    assert list(batch["answer"]) == [record["answer"] for record in records[:4]]
    assert list(batch["question_type"]) == [record["question_type"] for record in records[:4]]
    assert (batch["labels"] == IGNORE_LABEL).all()
    assert (batch["attention_mask"][:, -1] == 1).all()  # every prompt ends at the last column
    assistant = tokenizer.encode("ASSISTANT:")
    np.testing.assert_array_equal(batch["input_ids"][:, -len(assistant):], [assistant] * 4)
