"""Specification of jaxalign.data.llava: LLaVA-format folders as tfds data sets, with a report of bad samples."""
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from jaxalign.data.chat_templates import get_template
from jaxalign.data.image_ops import SIGLIP_MEAN, SIGLIP_STD
from jaxalign.data.llava import LlavaConfig, prepare_llava, read_build_report
from jaxalign.data.pipeline import make_vqa_dataset
from jaxalign.data.tokenizer import train_word_level_tokenizer


def turns(question, answer):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def save_image(path, color, size=(12, 8), image_format="JPEG"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path, format=image_format)


PRETRAIN_SAMPLES = [
    {"id": "red", "image": "00000/red.jpg", "conversations": turns("<image>\nRender a clear description.",
                                                                    "a red square")},
    {"id": "blue", "image": "00000/blue.png", "conversations": turns("Describe it.\n<image>", "a blue square")},
    {"id": "lost", "image": "00001/lost.jpg", "conversations": turns("<image>\nDescribe.", "a lost square")},
    {"id": "broken", "image": "00001/broken.jpg", "conversations": turns("<image>\nDescribe.", "noise")},
    {"id": "silent", "image": "00000/red.jpg", "conversations": []},
    {"id": "blank", "image": "00000/red.jpg", "conversations": turns(" ", "")},
    {"id": "chat", "conversations": turns("Say hello.", "hello")},  # text-only: kept, with no image
]


@pytest.fixture(scope="module")
def pretrain(tmp_path_factory):
    """A LLaVA-Pretrain-shaped folder (blip_laion_cc_sbu_558k.json + images/) built with the `pretrain` config."""
    root = tmp_path_factory.mktemp("llava")
    manual = root / "LLaVA-Pretrain"
    save_image(str(manual / "images/00000/red.jpg"), (255, 0, 0))
    save_image(str(manual / "images/00000/blue.png"), (0, 0, 255), image_format="PNG")
    os.makedirs(manual / "images/00001")
    (manual / "images/00001/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (manual / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(PRETRAIN_SAMPLES))
    data_dir = str(root / "tfds")
    builder, report = prepare_llava("pretrain", str(manual), data_dir)
    source = tfds.data_source("jaxalign_llava/pretrain", data_dir=data_dir, split="train")
    return {"manual": str(manual), "data_dir": data_dir, "builder": builder, "report": report, "source": source}


def test_report_counts_and_lists_bad_samples_by_reason(pretrain):
    report = pretrain["report"]
    assert report.counts == {"corrupt_image": 1, "empty_conversation": 2, "missing_image": 1}
    assert report.skipped["missing_image"] == ["lost"] and report.skipped["corrupt_image"] == ["broken"]
    assert report.skipped["empty_conversation"] == ["silent", "blank"]
    assert (report.total, report.kept) == (7, 3)
    assert str(report).startswith("kept 3 of 7 samples; skipped 4")


def test_report_is_saved_and_returned_again_for_a_built_data_set(pretrain):
    saved = read_build_report(pretrain["builder"].data_dir)
    assert saved.counts == pretrain["report"].counts and saved.skipped == pretrain["report"].skipped
    _, again = prepare_llava("pretrain", pretrain["manual"], pretrain["data_dir"])
    assert again.skipped == pretrain["report"].skipped


def test_records_hold_image_bytes_conversations_and_json_positions(pretrain):
    records = {record["id"].decode(): record for record in pretrain["source"]}
    assert sorted(records) == ["blue", "chat", "red"]
    red = records["red"]
    assert red["json_index"] == 0 and red["has_image"] and red["image_path"] == b"00000/red.jpg"
    with open(os.path.join(pretrain["manual"], "images/00000/red.jpg"), "rb") as f:
        assert red["image"] == f.read()  # the file's own bytes, not re-encoded
    assert json.loads(red["conversations"]) == PRETRAIN_SAMPLES[0]["conversations"]
    chat = records["chat"]
    assert chat["json_index"] == 6 and not chat["has_image"] and chat["image"] == b""


def test_fail_fast_stops_at_the_first_bad_sample(pretrain, tmp_path):
    with pytest.raises(ValueError, match="sample 'lost': missing_image: .*00001/lost.jpg does not exist"):
        prepare_llava("pretrain", pretrain["manual"], str(tmp_path / "tfds"), fail_fast=True)


def test_mix665k_layout_and_a_custom_json_file(tmp_path):
    manual = tmp_path / "mix"
    save_image(str(manual / "coco/train2017/000000000009.jpg"), (0, 255, 0))
    samples = [{"id": "000000000009", "image": "coco/train2017/000000000009.jpg",
                "conversations": turns("<image>\nWhat color?", "Green.") + turns("Sure?", "Yes.")},
               {"id": "gqa-missing", "image": "gqa/images/1.jpg", "conversations": turns("<image>\nQ?", "A.")}]
    (manual / "llava_v1_5_mix665k.json").write_text(json.dumps(samples))
    (manual / "mine.json").write_text(json.dumps(samples[:1]))
    _, report = prepare_llava("mix665k", str(manual), str(tmp_path / "tfds"))
    assert report.counts == {"missing_image": 1} and report.skipped["missing_image"] == ["gqa-missing"]
    _, custom = prepare_llava(LlavaConfig(name="mine", json_file="mine.json"), str(manual), str(tmp_path / "tfds"))
    assert (custom.total, custom.kept) == (1, 1)
    source = tfds.data_source("jaxalign_llava/mine", data_dir=str(tmp_path / "tfds"), split="train")
    assert len(json.loads(source[0]["conversations"])) == 4


def test_missing_json_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="blip_laion_cc_sbu_558k.json: the LLaVA JSON file is missing"):
        prepare_llava("pretrain", str(tmp_path), str(tmp_path / "tfds"))


def test_pipeline_reads_the_built_source(pretrain):
    source = pretrain["source"]
    texts = [turn["value"] for sample in PRETRAIN_SAMPLES for turn in sample["conversations"]]
    tokenizer = train_word_level_tokenizer(texts)
    batches = make_vqa_dataset(source, tokenizer, get_template("plain"), 4, SIGLIP_MEAN, SIGLIP_STD, 16,
                               batch_size=3, seed=0, process_index=0, process_count=1, verbose=False)
    batch = next(batches)
    # "plain" needs an image: the text-only sample is skipped by the pipeline and counted there
    assert batches.reports[0].skipped == {"placeholder": ["chat"]}
    ids = [source[int(index)]["id"].decode() for index in batch["sample_index"]]
    assert sorted(ids[:2]) == ["blue", "red"]
    for row, sample_id in enumerate(ids):
        expected = {"red": [1.0, -1.0, -1.0], "blue": [-1.0, -1.0, 1.0]}[sample_id]
        np.testing.assert_allclose(batch["pixels"][row], np.broadcast_to(expected, (4, 4, 3)), atol=0.02)
        caption = "a red square" if sample_id == "red" else "a blue square"
        labels = batch["labels"][row]
        assert tokenizer.decode(labels[labels >= 0]) == caption


def test_text_only_samples_get_blank_pixels_and_no_image_index(pretrain):
    source = pretrain["source"]
    tokenizer = train_word_level_tokenizer(["say hello describe it a blue square red render clear description"])
    batch = next(make_vqa_dataset(source, tokenizer, get_template("phi"), 4, SIGLIP_MEAN, SIGLIP_STD, 64,
                                  batch_size=3, seed=0, shuffle=False, process_index=0, process_count=1,
                                  verbose=False))
    ids = [source[int(index)]["id"].decode() for index in batch["sample_index"]]
    row = ids.index("chat")
    assert batch["image_index"][row] == -1 and not batch["pixels"][row].any()
    assert (batch["image_index"][[r for r in range(3) if r != row]] >= 0).all()
