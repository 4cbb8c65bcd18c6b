"""Specification of jaxalign.data.chat_templates and .batching: ids, sentinels, labels, truncation, skips, padding."""
import dataclasses

import numpy as np
import pytest
import tokenizers
from tokenizers import processors

from jaxalign.data.batching import SkipReport, encode_many, pad_batch
from jaxalign.data.chat_templates import (
    IGNORE_LABEL, IMAGE_TOKEN_ID, RETRIEVAL_TOKEN_ID, TEMPLATES, MaskingError, TokenizedExample,
    encode_conversation, encode_prompt, get_template)
from jaxalign.data.tokenizer import Tokenizer, train_byte_level_bpe_tokenizer, train_word_level_tokenizer

CORPUS = ["What color is the circle?", "The circle is red.", "Be brief.", "And the square? It is blue.",
          "USER: ASSISTANT: [INST] <<SYS>> <</SYS>> [/INST] system user assistant", "A red circle."] * 4
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
IGN = IGNORE_LABEL
IMG = IMAGE_TOKEN_ID
RAG = RETRIEVAL_TOKEN_ID

QUESTION = [{"from": "system", "value": "Be brief."},
            {"from": "human", "value": "What color is the circle?\n<image>"},
            {"from": "gpt", "value": "Red."}]
CAPTION = [{"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "A red circle."}]


def _with_bos(tokenizer: Tokenizer) -> Tokenizer:
    """The same vocabulary with a Llama-like post-processor that puts <s> in front of every encoding."""
    backend = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())
    bos_id = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos_id)])
    return Tokenizer(backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def plain_tokenizer():
    return train_word_level_tokenizer(CORPUS, SPECIALS)


@pytest.fixture(scope="module")
def bos_tokenizer(plain_tokenizer):
    return _with_bos(plain_tokenizer)


@pytest.fixture(scope="module")
def bpe_tokenizer():
    corpus = CORPUS + ["ASSISTANT: Red. ASSISTANT: Red circle", " red red red Red Red"] * 4
    return train_byte_level_bpe_tokenizer(corpus, SPECIALS, vocab_size=360)


def words(tokenizer, *tokens):
    """Ids of the given tokens, looked up in the vocabulary one by one (the expected values, built by hand)."""
    ids = [tokenizer.token_to_id(token) for token in tokens]
    assert None not in ids, f"test vocabulary lacks one of {tokens}"
    return ids


# ------------------------------------------------------------------------------------ exact encodings
@pytest.mark.parametrize("with_bos", [False, True])
def test_phi_exact_ids_and_labels(plain_tokenizer, bos_tokenizer, with_bos):
    tokenizer = bos_tokenizer if with_bos else plain_tokenizer
    example = encode_conversation(tokenizer, get_template("phi"), QUESTION)
    bos = [tokenizer.bos_id] if with_bos else []
    prompt = bos + words(tokenizer, "be", "brief", ".", "user", ":") + [IMG] + words(
        tokenizer, "what", "color", "is", "the", "circle", "?", "assistant", ":")
    answer = words(tokenizer, "red", ".") + [tokenizer.eos_id]
    assert example.input_ids == prompt + answer
    assert example.labels == [IGN] * len(prompt) + answer
    assert example.image_index == len(bos) + 5
    assert example.retrieval_index == -1
    assert example.text_start == example.image_index + 1
    assert example.num_answer_tokens == 3


def test_qwen2_exact_ids_and_labels(plain_tokenizer):
    t = plain_tokenizer
    example = encode_conversation(t, get_template("qwen2"), QUESTION, insert_retrieval=True)
    start, end = words(t, "<|im_start|>", "<|im_end|>")
    prompt = ([start] + words(t, "system", "be", "brief", ".") + [end, start] + words(t, "user") + [IMG, RAG]
              + words(t, "what", "color", "is", "the", "circle", "?") + [end, start] + words(t, "assistant"))
    answer = words(t, "red", ".") + [end]
    assert example.input_ids == prompt + answer
    assert example.labels == [IGN] * len(prompt) + answer
    assert (example.image_index, example.retrieval_index, example.text_start) == (8, 9, 10)


@pytest.mark.parametrize("with_bos", [False, True])
def test_llama2_exact_ids_and_labels_start_with_one_bos(plain_tokenizer, bos_tokenizer, with_bos):
    t = bos_tokenizer if with_bos else plain_tokenizer
    example = encode_conversation(t, get_template("llama2"), QUESTION)
    prompt = ([t.bos_id] + words(t, "[", "inst", "]", "<<", "sys", ">>", "be", "brief", ".", "<</", "sys", ">>")
              + [IMG] + words(t, "what", "color", "is", "the", "circle", "?", "[/", "inst", "]"))
    answer = words(t, "red", ".") + [t.eos_id]
    assert example.input_ids == prompt + answer
    assert example.labels == [IGN] * len(prompt) + answer
    assert example.input_ids.count(t.bos_id) == 1


def test_plain_keeps_only_the_image_and_the_caption(plain_tokenizer):
    t = plain_tokenizer
    example = encode_conversation(t, get_template("plain"), CAPTION, insert_retrieval=True)
    caption = words(t, "a", "red", "circle", ".")  # the word-level tokenizer drops the closing "\n"
    assert example.input_ids == [IMG, RAG] + caption
    assert example.labels == [IGN, IGN] + caption
    assert (example.image_index, example.retrieval_index, example.text_start) == (0, 1, 2)


def test_plain_with_byte_level_tokenizer_labels_the_newline(bpe_tokenizer):
    t = bpe_tokenizer
    example = encode_conversation(t, get_template("plain"), CAPTION)
    assert example.input_ids == [IMG] + t.encode("A red circle.\n")
    assert t.decode(example.labels) == "A red circle.\n"


def test_byte_level_ids_equal_the_whole_prompt_and_answer_tokens_carry_the_labels(bpe_tokenizer):
    t = bpe_tokenizer
    example = encode_conversation(t, get_template("phi"), QUESTION, insert_retrieval=True)
    after_markers = "\nWhat color is the circle? ASSISTANT: Red.</s>"
    assert example.input_ids == t.encode("Be brief. USER: ") + [IMG, RAG] + t.encode(after_markers)
    first_label = next(i for i, label in enumerate(example.labels) if label != IGN)
    prompt_text = t.decode(example.input_ids[example.retrieval_index + 1:first_label], skip_special_tokens=False)
    answer_text = t.decode(example.labels[first_label:], skip_special_tokens=False)
    assert prompt_text + answer_text == after_markers  # nothing lost, nothing counted twice
    assert answer_text.strip() == "Red.</s>"
    assert example.labels[first_label:] == example.input_ids[first_label:]


def test_text_start_follows_the_image_separator_like_the_official_offset(bpe_tokenizer):
    """Official Phi layout: image marker at 32, retrieval at 33, '\\n' at 34, text from 35."""
    t = bpe_tokenizer
    example = encode_conversation(t, get_template("phi"), QUESTION, insert_retrieval=True)
    assert example.retrieval_index == example.image_index + 1
    assert example.input_ids[example.retrieval_index + 1] == t.encode("\n")[0]
    assert example.text_start == example.retrieval_index + 2
    assert t.decode(example.input_ids[example.text_start:]).startswith("What color")


def test_text_start_without_image_is_the_first_human_text(plain_tokenizer):
    t = plain_tokenizer
    conversation = [{"from": "human", "value": "What color is the circle?"}, {"from": "gpt", "value": "Red."}]
    example = encode_conversation(t, get_template("phi"), conversation, insert_retrieval=True)
    assert example.image_index == example.retrieval_index == -1
    assert example.input_ids[example.text_start] == t.token_to_id("what")


# --------------------------------------------------------------------- sentinels and labels, all templates
@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("tokenizer_name", ["plain_tokenizer", "bos_tokenizer", "bpe_tokenizer"])
def test_markers_appear_once_and_labels_only_cover_answers(request, name, tokenizer_name):
    t = request.getfixturevalue(tokenizer_name)
    conversation = CAPTION if name == "plain" else QUESTION
    example = encode_conversation(t, get_template(name), conversation, insert_retrieval=True)
    assert example.input_ids.count(IMG) == 1 and example.input_ids.count(RAG) == 1
    assert example.input_ids[example.image_index] == IMG
    assert example.retrieval_index == example.image_index + 1
    if t.adds_bos or get_template(name).begin_with_bos:
        assert example.input_ids[0] == t.bos_id
        assert example.input_ids.count(t.bos_id) == 1
    else:
        assert t.bos_id not in example.input_ids
    for token_id, label in zip(example.input_ids, example.labels):
        assert label in (IGN, token_id)
    assert all(label == IGN for label in example.labels[:example.text_start])
    assert example.num_answer_tokens == sum(label != IGN for label in example.labels) > 0
    answer = "aredcircle." if name == "plain" else "red."
    assert "".join(t.decode(example.labels).lower().split()).startswith(answer)  # tokenizers differ in spaces


@pytest.mark.parametrize("name", ["phi", "qwen2", "llama2"])
def test_multi_turn_masks_every_human_turn(plain_tokenizer, name):
    t = plain_tokenizer
    conversation = QUESTION + [{"from": "human", "value": "And the square?"}, {"from": "gpt", "value": "It is blue."}]
    example = encode_conversation(t, get_template(name), conversation)
    labelled = [label for label in example.labels if label != IGN]
    end_of_turn = t.token_to_id("<|im_end|>") if name == "qwen2" else t.eos_id
    assert labelled == words(t, "red", ".") + [end_of_turn] + words(t, "it", "is", "blue", ".") + [end_of_turn]
    square = example.input_ids.index(t.token_to_id("square"))
    assert example.labels[square] == IGN and example.labels[square - 1] == IGN  # "the square" of turn 2
    if name == "llama2":  # Llama-2 opens each later [INST] with a BOS of its own
        assert example.input_ids.count(t.bos_id) == 2


def test_leading_system_turn_replaces_the_default_system_message(plain_tokenizer):
    without = encode_conversation(plain_tokenizer, get_template("phi"), QUESTION[1:])
    assert len(without.input_ids) > len(encode_conversation(plain_tokenizer, get_template("phi"), QUESTION).input_ids)
    default_system = plain_tokenizer.encode(get_template("phi").system_message + " USER: ")
    assert without.input_ids[:without.image_index] == default_system


# ------------------------------------------------------------------------------------------ truncation
def test_truncation_inside_the_answer_keeps_the_start(plain_tokenizer):
    full = encode_conversation(plain_tokenizer, get_template("phi"), QUESTION)
    cut = encode_conversation(plain_tokenizer, get_template("phi"), QUESTION, max_length=len(full) - 2)
    assert cut.input_ids == full.input_ids[:-2]
    assert cut.labels == full.labels[:-2]
    assert cut.num_answer_tokens == 1


def test_truncation_counts_the_expanded_image_tokens(plain_tokenizer):
    full = encode_conversation(plain_tokenizer, get_template("phi"), QUESTION)
    assert encode_conversation(plain_tokenizer, get_template("phi"), QUESTION, max_length=len(full) + 9,
                               image_length=10).input_ids == full.input_ids
    cut = encode_conversation(plain_tokenizer, get_template("phi"), QUESTION, max_length=len(full) + 8,
                              image_length=10)
    assert cut.input_ids == full.input_ids[:-1]


def test_truncation_that_leaves_no_answer_is_a_masking_error(plain_tokenizer):
    full = encode_conversation(plain_tokenizer, get_template("phi"), QUESTION)
    with pytest.raises(MaskingError) as error:
        encode_conversation(plain_tokenizer, get_template("phi"), QUESTION, max_length=len(full) - 3,
                            sample_id="s1")
    assert (error.value.sample_id, error.value.reason) == ("s1", "truncated")


def test_truncation_through_the_image_marker_is_a_masking_error(plain_tokenizer):
    with pytest.raises(MaskingError, match="cuts the image / retrieval marker") as error:
        encode_conversation(plain_tokenizer, get_template("phi"), QUESTION, max_length=6, insert_retrieval=True)
    assert error.value.reason == "truncated"


# -------------------------------------------------------------------------------------- masking errors
BAD_CONVERSATIONS = {
    "empty_conversation": [],
    "malformed_turn": [{"from": "human"}],
    "unknown_speaker": [{"from": "bot", "value": "hi"}],
    "no_assistant_turn": [{"from": "human", "value": "<image> What color?"}],
    "empty_answer": [{"from": "human", "value": "What color?"}, {"from": "gpt", "value": "  "}],
    "turn_order": [{"from": "gpt", "value": "Red."}, {"from": "human", "value": "What color?"}],
    "placeholder": [{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "Red."}],
}


@pytest.mark.parametrize("reason", sorted(BAD_CONVERSATIONS))
def test_bad_conversations_raise_masking_error_with_the_reason(plain_tokenizer, reason):
    with pytest.raises(MaskingError) as error:
        encode_conversation(plain_tokenizer, get_template("phi"), BAD_CONVERSATIONS[reason], sample_id=7)
    assert (error.value.sample_id, error.value.reason) == (7, reason)
    assert "sample 7" in str(error.value)


@pytest.mark.parametrize("conversation", [
    [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}, {"from": "gpt", "value": "c"}],
    [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"}],
])
def test_turns_out_of_order(plain_tokenizer, conversation):
    with pytest.raises(MaskingError) as error:
        encode_conversation(plain_tokenizer, get_template("qwen2"), conversation)
    assert error.value.reason == "turn_order"


def test_written_retrieval_marker_and_image_in_answer_are_rejected(plain_tokenizer):
    for conversation in ([{"from": "human", "value": "<image><rag>"}, {"from": "gpt", "value": "Red."}],
                         [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "<image>"}]):
        with pytest.raises(MaskingError) as error:
            encode_conversation(plain_tokenizer, get_template("phi"), conversation)
        assert error.value.reason == "placeholder"


def test_plain_needs_one_image_turn_and_one_answer(plain_tokenizer):
    with pytest.raises(MaskingError, match="needs '<image>'"):
        encode_conversation(plain_tokenizer, get_template("plain"), BAD_CONVERSATIONS["empty_answer"][:1] + [
            {"from": "gpt", "value": "red"}])
    with pytest.raises(MaskingError, match="exactly one human turn"):
        encode_conversation(plain_tokenizer, get_template("plain"), CAPTION + CAPTION)


def test_template_tokens_missing_from_the_tokenizer_is_a_clear_error():
    tokenizer = train_word_level_tokenizer(CORPUS)  # no <|im_start|> / <|im_end|>
    with pytest.raises(ValueError, match=r"template 'qwen2' needs the tokens \['<\|im_start\|>', '<\|im_end\|>'\]"):
        encode_conversation(tokenizer, get_template("qwen2"), QUESTION)


def test_unknown_template_name():
    with pytest.raises(ValueError, match="unknown chat template 'vicuna'"):
        get_template("vicuna")


# ------------------------------------------------------------------------------- many samples, reports
def test_encode_many_counts_and_lists_skipped_samples(plain_tokenizer):
    samples = [
        {"id": "good-1", "conversations": QUESTION},
        {"id": "no-answer", "conversations": BAD_CONVERSATIONS["no_assistant_turn"]},
        {"id": "good-2", "conversations": CAPTION},
        {"id": "empty-1", "conversations": BAD_CONVERSATIONS["empty_answer"]},
        {"id": "missing"},
        {"id": "empty-2", "conversations": BAD_CONVERSATIONS["empty_answer"]},
    ]
    examples, report = encode_many(plain_tokenizer, get_template("phi"), samples)
    assert [example.sample_id for example in examples] == ["good-1", "good-2"]
    assert report.counts == {"empty_answer": 2, "empty_conversation": 1, "no_assistant_turn": 1}
    assert report.skipped["empty_answer"] == ["empty-1", "empty-2"]
    assert (report.total, report.kept, report.num_skipped) == (6, 2, 4)
    text = str(report)
    assert text.startswith("encoded 2 of 6 samples; skipped 4")
    assert "empty_answer: 2 (ids: 'empty-1', 'empty-2')" in text
    merged = report.merge(report)
    assert merged.counts["empty_answer"] == 4 and merged.total == 12


def test_encode_many_fail_fast_raises_the_first_error(plain_tokenizer):
    samples = [{"id": 1, "conversations": QUESTION}, {"id": 2, "conversations": []}]
    with pytest.raises(MaskingError) as error:
        encode_many(plain_tokenizer, get_template("phi"), samples, fail_fast=True)
    assert error.value.sample_id == 2


def test_skip_report_lists_at_most_ten_ids():
    report = SkipReport(total=12)
    for index in range(12):
        report.add(MaskingError(index, "truncated"))
    assert str(report).endswith("truncated: 12 (ids: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 and 2 more)")


# ---------------------------------------------------------------------------------- generation prompts
def test_generation_prompt_ends_with_the_assistant_prefix(plain_tokenizer):
    t = plain_tokenizer
    example = encode_prompt(t, get_template("phi"), QUESTION[:2], insert_retrieval=True)
    training = encode_conversation(t, get_template("phi"), QUESTION, insert_retrieval=True)
    assert example.input_ids == training.input_ids[:-3]
    assert example.labels == [IGN] * len(example.input_ids)
    assert example.num_answer_tokens == 0
    with pytest.raises(MaskingError) as error:
        encode_prompt(t, get_template("phi"), QUESTION)
    assert error.value.reason == "turn_order"


# ------------------------------------------------------------------------------------------- padding
def _example(ids, labels, image_index, retrieval_index, text_start):
    return TokenizedExample(ids, labels, image_index, retrieval_index, text_start,
                            sum(label != IGN for label in labels))


def test_pad_batch_right_and_left():
    examples = [_example([5, IMG, RAG, 6, 7], [IGN, IGN, IGN, IGN, 7], 1, 2, 3),
                _example([8, 9, 10], [IGN, 9, 10], -1, -1, 0)]
    right = pad_batch(examples, 6, pad_id=0, side="right")
    np.testing.assert_array_equal(right["input_ids"], [[5, IMG, RAG, 6, 7, 0], [8, 9, 10, 0, 0, 0]])
    np.testing.assert_array_equal(right["labels"], [[IGN, IGN, IGN, IGN, 7, IGN], [IGN, 9, 10, IGN, IGN, IGN]])
    np.testing.assert_array_equal(right["attention_mask"], [[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(right["image_index"], [1, -1])
    np.testing.assert_array_equal(right["retrieval_index"], [2, -1])
    np.testing.assert_array_equal(right["text_start"], [3, 0])
    left = pad_batch(examples, 6, pad_id=0, side="left")
    np.testing.assert_array_equal(left["input_ids"], [[0, 5, IMG, RAG, 6, 7], [0, 0, 0, 8, 9, 10]])
    np.testing.assert_array_equal(left["labels"], [[IGN, IGN, IGN, IGN, IGN, 7], [IGN, IGN, IGN, IGN, 9, 10]])
    np.testing.assert_array_equal(left["attention_mask"], [[0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(left["image_index"], [2, -1])
    np.testing.assert_array_equal(left["retrieval_index"], [3, -1])
    np.testing.assert_array_equal(left["text_start"], [4, 3])
    assert all(array.dtype == np.int32 for array in left.values())
    assert pad_batch(examples, None, pad_id=1)["input_ids"].shape == (2, 5)


def test_pad_batch_rejects_examples_longer_than_max_length():
    with pytest.raises(ValueError, match="sample 'long' has 3 tokens, more than max_length 2"):
        pad_batch([dataclasses.replace(_example([1, 2, 3], [1, 2, 3], -1, -1, 0), sample_id="long")], 2, 0)
