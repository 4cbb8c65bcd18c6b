"""Tiny stand-ins for the real-scale TinyAlign inputs: Hugging Face snapshot folders (SigLIP, Qwen2, Phi) with
random weights and a byte-level BPE tokenizer of the matching kind, and a LLaVA-format data folder.

Layouts follow the real ones, so the real configs (`tinyalign_qwen2.py`, `tinyalign_phi2_faithful.py`) run on them
unchanged apart from sizes:
- vision: `config.json` + `model.safetensors` of a full `SiglipModel` (what `google/siglip-so400m-patch14-384`
  ships: text and vision towers) or of a bare `SiglipVisionModel`;
- LM: `config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json` with the special tokens of
  the real model (Qwen2-Instruct: EOS `<|im_end|>`, pad `<|endoftext|>`, no BOS; Phi-2: BOS = EOS =
  `<|endoftext|>`, no pad), an embedding table a little larger than the tokenizer (as Qwen2's 151,936 rows for
  151,646 tokens);
- data: `blip_laion_cc_sbu_558k.json` + `images/00000/*.png` (LLaVA-Pretrain), `llava_v1_5_mix665k.json` +
  `coco/train2017/*.png` (LLaVA-v1.5 mix, with a two-turn conversation per image and one text-only sample) and
  `eval.json` (one short answer per question).
"""
from __future__ import annotations

import json
import os

from PIL import Image, ImageDraw

from jaxalign.data import chat_templates
from jaxalign.data.tokenizer import Tokenizer, train_byte_level_bpe_tokenizer

IMAGE_SIZE, PATCH_SIZE = 32, 8
COLORS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
SHAPES = ("circle", "square")
VQA_SUFFIX = "\nAnswer the question using a single word or phrase."
PRETRAIN_JSON, MIX_JSON, EVAL_JSON = "blip_laion_cc_sbu_558k.json", "llava_v1_5_mix665k.json", "eval.json"
EVAL_COUNT = 6


def _shape_image(path: str, color: str, shape: str) -> None:
    image = Image.new("RGB", (48, 40), (255, 255, 255))  # not square: the resize to 32 x 32 is exercised
    draw = ImageDraw.Draw(image)
    (draw.ellipse if shape == "circle" else draw.rectangle)((8, 6, 40, 34), fill=COLORS[color])
    image.save(path)


def write_llava_folder(root: str) -> dict[str, int]:
    """Writes the LLaVA-format folder; returns the number of samples in each JSON file."""
    pairs = [(color, shape) for color in COLORS for shape in SHAPES]
    os.makedirs(os.path.join(root, "images", "00000"), exist_ok=True)
    os.makedirs(os.path.join(root, "coco", "train2017"), exist_ok=True)
    pretrain, mix, evaluation = [], [], []
    for index, (color, shape) in enumerate(pairs):
        name = f"{index:09d}.png"
        _shape_image(os.path.join(root, "images", "00000", name), color, shape)
        _shape_image(os.path.join(root, "coco", "train2017", name), color, shape)
        # LLaVA-Pretrain puts the marker at either end of the instruction.
        instruction = ("<image>\nDescribe the image concisely." if index % 2 else
                       "Give a brief description of the image.\n<image>")
        pretrain.append({"id": f"{index:09d}", "image": f"00000/{name}", "conversations": [
            {"from": "human", "value": instruction}, {"from": "gpt", "value": f"a {color} {shape} on white"}]})
        mix.append({"id": f"coco-{index}", "image": f"coco/train2017/{name}", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the shape?" + VQA_SUFFIX},
            {"from": "gpt", "value": color.capitalize()},
            {"from": "human", "value": "What shape is it?" + VQA_SUFFIX},
            {"from": "gpt", "value": shape.capitalize()}]})
        kind, question, answer = (("color", "What color is the shape?", color) if index % 2 == 0
                                  else ("shape", "What shape is it?", shape))
        if len(evaluation) < EVAL_COUNT:
            evaluation.append({"id": f"eval-{index}-{kind}", "image": f"coco/train2017/{name}", "conversations": [
                {"from": "human", "value": f"<image>\n{question}{VQA_SUFFIX}"}, {"from": "gpt", "value": answer}]})
    mix.append({"id": "sharegpt-0", "conversations": [  # text-only, as ShareGPT samples in the real mix
        {"from": "human", "value": "How many sides does a square have?"}, {"from": "gpt", "value": "Four."}]})
    files = {PRETRAIN_JSON: pretrain, MIX_JSON: mix, EVAL_JSON: evaluation}
    for name, content in files.items():
        with open(os.path.join(root, name), "w", encoding="utf-8") as file:
            json.dump(content, file)
    return {name: len(content) for name, content in files.items()}


def corpus(llava_root: str) -> list[str]:
    """Every text of the LLaVA folder and of the chat templates (the tokenizers are trained on it)."""
    texts = [" ".join((t.system_message, t.system_format, t.user_prefix, t.user_suffix, t.assistant_prefix))
             for t in chat_templates.TEMPLATES.values()]
    for name in (PRETRAIN_JSON, MIX_JSON, EVAL_JSON):
        with open(os.path.join(llava_root, name), encoding="utf-8") as file:
            texts += [turn["value"] for sample in json.load(file) for turn in sample["conversations"]]
    return texts


# Special tokens of the real models' tokenizers (tokenizer_config.json), None where the model has none.
SPECIALS = {
    "qwen2": dict(tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), bos=None, eos="<|im_end|>",
                  pad="<|endoftext|>"),
    "phi": dict(tokens=("<|endoftext|>",), bos="<|endoftext|>", eos="<|endoftext|>", pad=None),
}


def save_tokenizer(folder: str, family: str, texts: list[str]) -> Tokenizer:
    """A byte-level BPE tokenizer (the kind Qwen2 and Phi-2 use) with `family`'s special tokens, saved in the
    Hugging Face layout in `folder` and read back the way a run reads it."""
    special = SPECIALS[family]
    first = special["tokens"][0]
    tokenizer = train_byte_level_bpe_tokenizer(texts, special_tokens=special["tokens"], vocab_size=480,
                                               bos_token=special["bos"] or first, eos_token=special["eos"],
                                               pad_token=special["pad"] or first)
    tokenizer.bos_token, tokenizer.pad_token = special["bos"], special["pad"]
    tokenizer.save_folder(folder)
    return Tokenizer.from_folder(folder)


def save_siglip(folder: str, full_model: bool, seed: int = 0) -> None:
    """A tiny random SigLIP (image 32, patch 8: 16 patches) as a full `SiglipModel` or a `SiglipVisionModel`."""
    import torch
    import transformers

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    torch.manual_seed(seed)
    if full_model:
        config = transformers.SiglipConfig(
            vision_config=vision, text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=1, num_attention_heads=4,
                                                   max_position_embeddings=16, pad_token_id=1, bos_token_id=1,
                                                   eos_token_id=2))
        model = transformers.SiglipModel(config)
    else:
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**vision))
    model.eval().save_pretrained(folder, safe_serialization=True)


def save_causal_lm(folder: str, family: str, texts: list[str], seed: int = 0) -> Tokenizer:
    """A tiny random Qwen2ForCausalLM ('qwen2', tied embeddings as Qwen2-0.5B) or PhiForCausalLM ('phi', partial
    rotary as Phi-2) with its tokenizer in `folder`; returns the tokenizer."""
    import torch
    import transformers

    tokenizer = save_tokenizer(folder, family, texts)
    vocab = tokenizer.vocab_size + 16   # spare embedding rows, as the real checkpoints have
    ids = dict(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    sizes = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=512, **ids)
    if family == "qwen2":
        config = transformers.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **sizes)
    else:
        config = transformers.PhiConfig(partial_rotary_factor=0.5, tie_word_embeddings=False, **sizes)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval().save_pretrained(folder, safe_serialization=True)
    return tokenizer
