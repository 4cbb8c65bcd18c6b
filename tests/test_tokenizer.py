"""Specification of jaxalign.data.tokenizer: loading, special tokens, BOS detection, round trips."""
import json
import os

import numpy as np
import pytest

from jaxalign.data.tokenizer import Tokenizer, train_byte_level_bpe_tokenizer, train_word_level_tokenizer

CORPUS = ["What color is the circle?", "The circle is red.", "Is there a blue triangle in the image?",
          "No, there is a green square."] * 4


@pytest.fixture(scope="module")
def word_tokenizer():
    return train_word_level_tokenizer(CORPUS)


@pytest.fixture(scope="module")
def word_tokenizer_with_bos():
    return train_word_level_tokenizer(CORPUS, add_bos=True)


@pytest.fixture(scope="module")
def bpe_tokenizer():
    return train_byte_level_bpe_tokenizer(CORPUS, vocab_size=320)


def test_word_level_encode_uses_the_vocabulary_word_by_word(word_tokenizer):
    expected = [word_tokenizer.token_to_id(word) for word in ["the", "circle", "is", "red", "."]]
    assert word_tokenizer.encode("The circle is red.") == expected
    assert None not in expected


def test_unknown_word_maps_to_unk(word_tokenizer):
    assert word_tokenizer.encode("purple") == [word_tokenizer.token_to_id("<unk>")]


def test_special_ids_are_the_configured_tokens(word_tokenizer):
    assert word_tokenizer.bos_id == word_tokenizer.token_to_id("<s>")
    assert word_tokenizer.eos_id == word_tokenizer.token_to_id("</s>")
    assert word_tokenizer.pad_id == word_tokenizer.token_to_id("<pad>")
    assert len({word_tokenizer.bos_id, word_tokenizer.eos_id, word_tokenizer.pad_id}) == 3


def test_pad_falls_back_to_eos(word_tokenizer):
    no_pad = Tokenizer(word_tokenizer.backend, bos_token="<s>", eos_token="</s>")
    assert no_pad.pad_token is None
    assert no_pad.pad_id == word_tokenizer.eos_id


def test_vocab_size_counts_words_and_special_tokens(word_tokenizer):
    words = {"what", "color", "is", "the", "circle", "?", "red", ".", "there", "a", "blue", "triangle", "in",
             "image", "no", ",", "green", "square"}
    assert word_tokenizer.vocab_size == len(words) + 4


def test_bos_detection(word_tokenizer, word_tokenizer_with_bos):
    assert not word_tokenizer.adds_bos
    assert word_tokenizer.special_prefix_ids == []
    assert word_tokenizer_with_bos.adds_bos
    assert word_tokenizer_with_bos.special_prefix_ids == [word_tokenizer_with_bos.bos_id]
    assert word_tokenizer_with_bos.special_suffix_ids == []
    plain = word_tokenizer_with_bos.encode("the circle")
    assert word_tokenizer_with_bos.encode("the circle", add_special_tokens=True) == [
        word_tokenizer_with_bos.bos_id] + plain


def test_decode_round_trip_word_level(word_tokenizer):
    assert word_tokenizer.decode(word_tokenizer.encode("Is there a blue triangle in the image ?")) == (
        "is there a blue triangle in the image ?")


def test_decode_round_trip_byte_level_is_exact(bpe_tokenizer):
    text = "No, there is a green square.\nWhat color is the circle?"
    assert bpe_tokenizer.decode(bpe_tokenizer.encode(text)) == text


def test_decode_skips_special_and_negative_ids(word_tokenizer):
    ids = [word_tokenizer.bos_id, -200, word_tokenizer.token_to_id("red"), -100, word_tokenizer.eos_id]
    assert word_tokenizer.decode(ids) == "red"
    assert word_tokenizer.decode(ids, skip_special_tokens=False) == "<s> red </s>"


def test_batch_decode_accepts_arrays(word_tokenizer):
    rows = np.array([word_tokenizer.encode("the circle"), word_tokenizer.encode("is red")])
    assert word_tokenizer.batch_decode(rows) == ["the circle", "is red"]


def test_encode_with_offsets_gives_character_spans(bpe_tokenizer):
    text = "The circle is red."
    ids, offsets = bpe_tokenizer.encode_with_offsets(text)
    assert ids == bpe_tokenizer.encode(text)
    assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
    assert "".join(text[start:end] for start, end in offsets) == text


def test_save_folder_and_from_folder_round_trip(tmp_path, word_tokenizer_with_bos):
    folder = str(tmp_path / "snapshot")
    word_tokenizer_with_bos.save_folder(folder)
    loaded = Tokenizer.from_folder(folder)
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<s>", "</s>", "<pad>")
    assert loaded.adds_bos
    assert loaded.encode("what color is the circle?") == word_tokenizer_with_bos.encode("what color is the circle?")


def test_from_file_takes_special_tokens_by_name(tmp_path, word_tokenizer):
    path = str(tmp_path / "tokenizer.json")
    word_tokenizer.save(path)
    loaded = Tokenizer.from_file(path, eos_token="</s>")
    assert loaded.eos_id == word_tokenizer.eos_id
    assert loaded.bos_id is None


def test_from_folder_reads_added_token_dicts_and_generation_config(tmp_path, word_tokenizer):
    folder = tmp_path / "snapshot"
    folder.mkdir()
    word_tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>", "special": True}, "pad_token": None}))
    (folder / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [word_tokenizer.eos_id, word_tokenizer.pad_id]}))
    loaded = Tokenizer.from_folder(str(folder))
    assert loaded.bos_token == "<s>"
    assert loaded.eos_token == "</s>"  # the first of the listed EOS ids
    assert loaded.pad_token is None and loaded.pad_id == loaded.eos_id


def test_from_folder_without_tokenizer_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer.json") as error:
        Tokenizer.from_folder(str(tmp_path))
    assert str(tmp_path) in str(error.value)


def test_from_folder_with_unknown_special_token_is_an_error(tmp_path, word_tokenizer):
    word_tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    with pytest.raises(ValueError, match=r"eos token '<\|endoftext\|>' is not in tokenizer.json"):
        Tokenizer.from_folder(str(tmp_path))


def test_malformed_tokenizer_file_is_an_error(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        Tokenizer.from_file(str(path))


def test_matches_transformers_fast_tokenizer(tmp_path, word_tokenizer_with_bos, bpe_tokenizer):
    import transformers
    text = "Is there a blue triangle in the image?\nNo, there is a green square."
    for name, tokenizer in (("word", word_tokenizer_with_bos), ("bpe", bpe_tokenizer)):
        folder = os.path.join(tmp_path, name)
        tokenizer.save_folder(folder)
        reference = transformers.AutoTokenizer.from_pretrained(folder)
        assert reference(text).input_ids == tokenizer.encode(text, add_special_tokens=True)
        assert reference(text, add_special_tokens=False).input_ids == tokenizer.encode(text)
        assert (reference.bos_token_id, reference.eos_token_id, reference.pad_token_id) == (
            tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
        ids = tokenizer.encode(text)
        assert reference.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids)
