"""Specification of jaxalign.data.pipeline: batch values, fractions, resume, host slices, skip reports, eval,
length buckets and length-grouped batching (jaxalign.data.length_buckets) and their padding accounting."""
import json

import numpy as np
import pytest

from jaxalign.data import easy_vqa
from jaxalign.data.batching import spliced_length
from jaxalign.data.chat_templates import IGNORE_LABEL, IMAGE_TOKEN_ID, RETRIEVAL_TOKEN_ID, get_template
from jaxalign.data.image_ops import SIGLIP_MEAN, SIGLIP_STD, preprocess_image
from jaxalign.data.length_buckets import (bucket_for, check_buckets, group_window, real_token_share,
                                          simulate_padding)
from jaxalign.data.length_stats import synthetic_mix665k_lengths
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


def test_state_restored_before_the_bad_end_of_a_pass_does_not_call_the_pass_unusable(records, tokenizer):
    # A pass of [good, good, too long]: restored after the two good ones, the report of the rest holds only the
    # bad sample, which is no reason to declare the whole pass unusable.
    data = _bad_records(records)[:2] + [_bad_records(records)[12]]
    iterator = dataset(data, tokenizer, batch_size=1, shuffle=False)
    take(iterator, 2)
    restored = dataset(data, tokenizer, batch_size=1, shuffle=False, start_state=dict(iterator.state))
    assert [int(batch["sample_index"][0]) for batch in take(restored, 2)] == [0, 1]
    assert restored.reports[0].counts == {"too_long": 1}


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


# -------------------------------------------------------------------------------- length buckets, grouping
BUCKETS = (42, 43, 44, 45, 46)  # the records' spliced lengths are 41..46; MAX_LENGTH (48) is the last bucket


def _spliced_lengths(batch, image_length=1, retrieval_length=1):
    return (batch["attention_mask"].sum(1) + (image_length - 1) * (batch["image_index"] >= 0)
            + (retrieval_length - 1) * (batch["retrieval_index"] >= 0))


def _assert_same_batches(expected, actual):
    assert len(expected) == len(actual)
    for a, b in zip(expected, actual):
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_check_buckets_sorts_appends_max_length_drops_larger_and_rejects_non_positive():
    assert check_buckets((1280, 1024), 2048) == (1024, 1280, 2048)
    assert check_buckets((), 2048) == ()
    assert check_buckets((512, 1024, 4096), 1000) == (512, 1000)  # a shorter max_length caps the buckets
    assert bucket_for(1025, (1024, 1280, 2048)) == 1280 and bucket_for(1024, (1024, 1280, 2048)) == 1024
    with pytest.raises(ValueError, match="length_buckets"):
        check_buckets((0, 1024), 2048)


def test_buckets_pad_each_batch_to_the_smallest_bucket_holding_its_longest_sample(records, tokenizer):
    plain = take(dataset(records, tokenizer, image_length=3), 6)
    bucketed = take(dataset(records, tokenizer, image_length=3, length_buckets=(44, 46)), 6)
    widths = set()
    for full, batch in zip(plain, bucketed):
        longest = _spliced_lengths(full, image_length=3).max()
        width = batch["input_ids"].shape[1]
        assert width == min(bucket for bucket in (44, 46, MAX_LENGTH) if bucket >= longest)
        widths.add(width)
        # the same rows; the columns cut off held only padding
        for name in ("input_ids", "labels", "attention_mask"):
            np.testing.assert_array_equal(batch[name], full[name][:, :width])
        assert not full["attention_mask"][:, width:].any()
        for name in ("pixels", "image_index", "retrieval_index", "text_start", "sample_index"):
            np.testing.assert_array_equal(batch[name], full[name])
    assert len(widths) > 1


def test_grouping_sorts_each_window_cuts_it_and_shuffles_the_batches(records, tokenizer):
    window = 5
    plain = take(dataset(records, tokenizer), window)  # the first 40 samples of the stream, in stream order
    grouped = take(dataset(records, tokenizer, group_by_length=window, length_buckets=BUCKETS), window)
    stream = np.concatenate([batch["sample_index"] for batch in plain])
    lengths = np.concatenate([_spliced_lengths(batch) for batch in plain])
    expected = stream[group_window(lengths, 8, seed=3, window_number=0)]
    np.testing.assert_array_equal(np.stack([batch["sample_index"] for batch in grouped]), expected)
    maxima = [int(_spliced_lengths(batch).max()) for batch in grouped]
    assert maxima != sorted(maxima)  # visited in shuffled order
    by_length = sorted(grouped, key=lambda b: (_spliced_lengths(b).min(), _spliced_lengths(b).max()))
    for low, high in zip(by_length, by_length[1:]):
        assert _spliced_lengths(low).max() <= _spliced_lengths(high).min()  # a sorted window cut into batches
    for batch in grouped:
        assert batch["input_ids"].shape[1] == bucket_for(int(_spliced_lengths(batch).max()), BUCKETS + (48,))


def test_grouping_reads_every_sample_once_per_pass_and_is_seeded(records, tokenizer):
    options = dict(group_by_length=5, length_buckets=BUCKETS)  # windows of 40 samples: 3 per pass of 120
    grouped = take(dataset(records, tokenizer, **options), 15)
    assert sorted(np.concatenate([batch["sample_index"] for batch in grouped])) == list(range(120))
    again = take(dataset(records, tokenizer, **options), 15)
    _assert_same_batches(grouped, again)
    other = take(dataset(records, tokenizer, seed=4, **options), 1)
    assert not np.array_equal(other[0]["sample_index"], grouped[0]["sample_index"])


def test_grouped_last_window_of_a_finite_run_keeps_only_full_batches(records, tokenizer):
    batches = list(dataset(records[:44], tokenizer, num_epochs=1, group_by_length=4, length_buckets=BUCKETS))
    assert len(batches) == 5  # a window of 4 batches, then 12 samples: one full batch, 4 samples dropped
    assert len(set(np.concatenate([batch["sample_index"] for batch in batches]))) == 40


@pytest.mark.parametrize("start_step", [3, 4, 9])  # inside a window, at a window boundary, in the next pass
def test_grouped_start_step_and_state_yield_the_uninterrupted_batches(records, tokenizer, start_step):
    bad = [dict(records[0], id="broken", image=b"not a png")]
    data = records[:37] + bad  # an image that fails when its batch is built, and an epoch boundary at step 4.75
    options = dict(group_by_length=4, length_buckets=BUCKETS)
    full = take(dataset(data, tokenizer, **options), 12)
    resumed = dataset(data, tokenizer, start_step=start_step, **options)
    assert resumed.state["step"] == start_step
    _assert_same_batches(full[start_step:], take(resumed, 12 - start_step))
    iterator = dataset(data, tokenizer, **options)
    take(iterator, start_step)
    restored = dataset(data, tokenizer, start_state=dict(iterator.state), **options)
    _assert_same_batches(full[start_step:], take(restored, 12 - start_step))


def test_grouped_sample_whose_image_fails_becomes_an_unlabelled_padding_row(records, tokenizer):
    data = records[:15] + [dict(records[0], id="broken", image=b"not a png")]
    iterator = dataset(data, tokenizer, group_by_length=2, num_epochs=1, shuffle=False)
    batches = list(iterator)
    rows = np.concatenate([batch["sample_index"] for batch in batches])
    assert sorted(rows) == [-1] + list(range(15))
    batch = batches[[-1 in b["sample_index"] for b in batches].index(True)]
    row = list(batch["sample_index"]).index(-1)
    assert (batch["labels"][row] == IGNORE_LABEL).all() and batch["attention_mask"][row].sum() == 1
    # found when its batch is built, after the text-only plan of the last window ended the pass: counted then
    assert iterator.report.skipped["corrupt_image"] == ["broken"] and iterator.reports[0].num_skipped == 0


def test_two_hosts_pad_every_step_to_the_same_agreed_bucket(records, tokenizer):
    options = dict(fraction=0.5, process_count=2, batch_size=4, group_by_length=3, length_buckets=BUCKETS)
    local = {host: take(dataset(records, tokenizer, process_index=host, agree_length=lambda length: length,
                                **options), 6) for host in (0, 1)}
    widths = {host: [batch["input_ids"].shape[1] for batch in batches] for host, batches in local.items()}
    agreed = [max(pair) for pair in zip(widths[0], widths[1])]
    assert widths[0] != widths[1]  # the hosts' own buckets differ at some step: agreement is needed
    for host in (0, 1):
        answers = iter(agreed)
        batches = take(dataset(records, tokenizer, process_index=host, agree_length=lambda length: next(answers),
                               **options), 6)
        assert [batch["input_ids"].shape[1] for batch in batches] == agreed
        for own, batch in zip(local[host], batches):  # the same rows, padded further
            width = own["input_ids"].shape[1]
            np.testing.assert_array_equal(batch["input_ids"][:, :width], own["input_ids"])
            np.testing.assert_array_equal(batch["sample_index"], own["sample_index"])
    with pytest.raises(ValueError, match="not a bucket"):
        next(dataset(records, tokenizer, process_index=0, agree_length=lambda length: 47, **options))


# ------------------------------------------------------------------------------------- padding accounting
def test_real_token_share_of_hand_made_lengths():
    lengths = [10, 40, 20, 30]
    # one window of both batches, sorted: [10, 20] -> bucket 24, [30, 40] -> bucket 48
    stats = simulate_padding(lengths, batch_size=2, buckets=(24, 48), window=2, seed=0)
    assert (stats.batches, stats.real_tokens, stats.computed_tokens) == (2, 100, 2 * 24 + 2 * 48)
    assert stats.share == pytest.approx(100 / 144) and stats.batches_per_length == {24: 1, 48: 1}
    assert real_token_share(lengths, 2, (), 0, seed=0, max_length=48) == pytest.approx(100 / 192)
    assert real_token_share(lengths[:3], 2, (24, 48), 2, seed=0) == real_token_share(lengths[:3], 2, (24, 48), 2, 0)


def test_pipeline_counts_real_and_computed_tokens_and_prints_them_at_each_pass_end(records, tokenizer, capsys):
    data = records[:40] + [dict(records[0], id="broken", image=b"not a png")]  # becomes a padding row: 1 token
    iterator = dataset(data, tokenizer, group_by_length=5, length_buckets=BUCKETS, verbose=True)
    batches = take(iterator, 6)
    real = sum(int(_spliced_lengths(batch).sum()) for batch in batches)
    computed = sum(batch["input_ids"].size for batch in batches)
    assert (iterator.padding.batches, iterator.padding.real_tokens, iterator.padding.computed_tokens) == (
        6, real, computed)
    assert sum(iterator.padding.batches_per_length.values()) == 6
    printed = capsys.readouterr().err  # pass 0 ends when the second window is planned, after 5 batches
    assert "data pass 0: encoded 40 of 41 samples; skipped 1\n" in printed
    assert "padding so far: real tokens" in printed and "in 5 batches" in printed


def test_simulation_matches_the_pipeline_on_the_same_lengths(records, tokenizer):
    iterator = dataset(records, tokenizer, num_epochs=1, group_by_length=4, length_buckets=BUCKETS)
    list(iterator)
    lengths = [spliced_length(iterator.spec, iterator.dataset[index].example) for index in range(len(records))]
    simulated = simulate_padding(lengths, 8, BUCKETS, 4, seed=3, max_length=MAX_LENGTH)
    assert iterator.padding.to_json() == simulated.to_json()


def test_qwen2_recipe_buckets_keep_most_computed_tokens_real_on_mix665k_like_lengths():
    from jaxalign.configs import tinyalign_qwen2
    config = tinyalign_qwen2.get_config("stage=2")
    lengths = synthetic_mix665k_lengths(20_000, seed=0)
    assert lengths.max() <= 2048 and 0.04 < (lengths < 729).mean() < 0.08  # text-only share
    for batch_size in (128, 256):
        assert real_token_share(lengths, batch_size, (), 0, seed=0, max_length=2048) < 0.5
        assert real_token_share(lengths, batch_size, config.data.length_buckets, config.data.group_by_length,
                                seed=0) >= 0.85


# ---------------------------------------------------------------------------------------- sample cache
class _CountingSource:
    """A data source that counts how often each record is read."""

    def __init__(self, records):
        self.records, self.reads = records, 0

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        self.reads += 1
        return self.records[index]


def test_cached_samples_give_the_same_batches_read_each_record_once_and_still_report_every_pass(records, tokenizer):
    data = _bad_records(records)  # 15 records, 4 bad: 11 usable per pass
    plain, cached_source = _CountingSource(data), _CountingSource(data)
    uncached = dataset(plain, tokenizer, batch_size=4)
    cached = dataset(cached_source, tokenizer, batch_size=4, cache_samples=True)
    for a, b in zip(take(uncached, 9), take(cached, 9)):  # 36 rows: three passes of 11 usable samples and more
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert cached_source.reads == len(data) and plain.reads > 2 * len(data)
    for report in cached.reports[:3]:  # a cached bad record is counted again in each pass it is met
        assert report.counts == {"corrupt_image": 1, "empty_answer": 1, "missing_image": 1, "too_long": 1}


def test_a_shared_cache_serves_later_runs_over_the_same_records_and_spec(records, tokenizer):
    """`share_cache_as`: a second run (another seed and fraction, as the demo's 40% runs) over the same named
    records and spec reads only the records the first did not; its batches equal an uncached run's; another spec
    (max_length) or another name gets a cache of its own."""
    from jaxalign.data import pipeline
    pipeline.clear_shared_samples()
    try:
        first_source = _CountingSource(records)
        take(dataset(first_source, tokenizer, batch_size=4, fraction=0.5, fraction_seed=1,
                     share_cache_as="test-records"), 20)  # 80 rows: every one of the 60 selected records
        assert first_source.reads == 60 and pipeline.shared_sample_count() == 60
        # The 20% subset of fraction seed 1 lies inside its 50% subset: nothing left to read.
        second_source, plain = _CountingSource(records), _CountingSource(records)
        shared = take(dataset(second_source, tokenizer, batch_size=4, seed=5, fraction=0.2, fraction_seed=1,
                              share_cache_as="test-records"), 8)
        uncached = take(dataset(plain, tokenizer, batch_size=4, seed=5, fraction=0.2, fraction_seed=1), 8)
        assert second_source.reads == 0 and plain.reads > 0
        for a, b in zip(uncached, shared):
            for name in a:
                np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        for other in (dict(share_cache_as="test-records", max_length=MAX_LENGTH + 8),
                      dict(share_cache_as="other-records")):
            source = _CountingSource(records)
            take(dataset(source, tokenizer, batch_size=4, fraction=0.2, fraction_seed=1, **other), 1)
            assert source.reads == 4, other
        assert pipeline.shared_sample_count() == 68
    finally:
        pipeline.clear_shared_samples()
