"""The demo's own frozen towers: a short pretraining of a tiny SigLIP-style ViT and a tiny Llama-family LM.

Pretrained towers cannot be downloaded in the demo, so it makes its own on the easy-vqa training split, once,
and caches them as Hugging Face folders (the same format a user brings for real towers):

1. **Tokenizer.** A word-level tokenizer trained on the easy-vqa training text (questions, answers, captions),
   the caption prompt and the fixed text of every chat template, with the ChatML tokens as special tokens.
2. **Vision tower.** A tiny SigLIP ViT (32 px, patch 8, 16 patch tokens) trained with the sigmoid contrastive
   loss of SigLIP against a tiny text encoder (a sum of token embeddings) on image-caption pairs. easy-vqa has
   only 24 distinct captions ("a red circle"), so each batch of images is contrasted with all of them plus the
   partial captions "a red shape" and "a circle", and a pair is positive when the caption is true of the image
   (a standard SigLIP batch would call two images with the same caption negatives and fight the data). The text
   encoder is thrown away; only the vision tower is kept.
3. **Language model.** A tiny Llama-family LM trained with next-token loss on the text-only conversations of the
   training questions and captions, rendered with the demo's chat template (so it knows the template and the
   answer priors, but has never seen an image).

The result folder (`<cache>/demo_towers/<fingerprint>/`) holds `vision/` (config.json + model.safetensors,
loadable by `jaxalign.io.hf_vision.load` and transformers' SiglipVisionModel), `lm/` (config.json,
model.safetensors and the tokenizer files) and `manifest.json` (settings, losses, zero-shot accuracy, seconds).
The fingerprint hashes every setting, so a changed setting pretrains anew and an unchanged one is reused.

Public API:
  TowerPretrainConfig (settings), obtain_towers(config, cache_root=None) -> PretrainedTowers,
  default_cache_root() -> str
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxalign.data import easy_vqa
from jaxalign.data.chat_templates import TEMPLATES, encode_conversation, get_template
from jaxalign.data.image_ops import SIGLIP_MEAN, SIGLIP_STD, preprocess_image
from jaxalign.data.tokenizer import DEFAULT_SPECIAL_TOKENS, Tokenizer, train_word_level_tokenizer
from jaxalign.io import hf_lm, hf_vision
from jaxalign.models import decoder, vit
from jaxalign.programs import startup
from jaxalign.train.optimizer import adamw, warmup_cosine_schedule

CACHE_ENV = startup.CACHE_ENV
FORMAT_VERSION = 2  # bump when the pretraining code changes what it produces for the same settings
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


@dataclasses.dataclass(frozen=True)
class TowerPretrainConfig:
    """Sizes and schedule of the demo's tower pretraining (every field enters the cache fingerprint).

    Attributes:
      image_size, patch_size, vision_width, vision_mlp, vision_layers, vision_heads: the ViT.
      lm_width, lm_mlp, lm_layers, lm_heads, lm_kv_heads: the LM.
      vision_steps, vision_batch, vision_lr: contrastive pretraining of the ViT.
      vision_temperature, vision_bias: initial temperature and bias of the sigmoid loss (SigLIP uses 10 and -10
        for batches of thousands; with 35 captions per image a smaller negative bias fits).
      lm_steps, lm_batch, lm_lr: next-token pretraining of the LM.
      context_share: share of the training questions also seen with their image's caption written before the
        question ("a red circle\nwhat color is the shape?" -> "red"), so that the LM has read descriptions in
        its prompt before, as real LMs have. Off by default: with 0.5 the demo's oracle still did not help (one
        seed, bench/RESULTS.md), so it is kept as a setting to study, not as the default.
      lm_tied_embeddings: the LM head reuses the input embeddings (as Qwen2-0.5B's does), which makes copying a
        token from the prompt a shorter path; off by default: it did not let the demo's oracle help sooner (one
        seed, bench/RESULTS.md).
      template: the chat template the LM text is rendered with (the one the demo's VLM uses).
      seed: seeds initialisation and batch order.
    """

    image_size: int = 32
    patch_size: int = 8
    vision_width: int = 64
    vision_mlp: int = 128
    vision_layers: int = 3
    vision_heads: int = 4
    lm_width: int = 64
    lm_mlp: int = 192
    lm_layers: int = 2
    lm_heads: int = 4
    lm_kv_heads: int = 2
    lm_tied_embeddings: bool = False
    vision_steps: int = 500
    vision_batch: int = 64
    vision_lr: float = 3e-3
    vision_temperature: float = 10.0
    vision_bias: float = -5.0
    lm_steps: int = 300
    lm_batch: int = 64
    lm_lr: float = 3e-3
    context_share: float = 0.0
    template: str = "qwen2"
    seed: int = 0

    def vision_config(self) -> vit.VisionConfig:
        return vit.VisionConfig(image_size=self.image_size, patch_size=self.patch_size, hidden_size=self.vision_width,
                                intermediate_size=self.vision_mlp, num_layers=self.vision_layers,
                                num_heads=self.vision_heads, variant="siglip", use_head=True)

    def fingerprint(self) -> str:
        """16 hex digits naming these settings, the easy-vqa package, JAX's version and the source of the code that
        trains the towers (`_code_digest`): towers made by other code are never reused, since a change in the
        last bits of the towers moves the demo's single-run cells by as much as a change of seed does."""
        content = {"format": FORMAT_VERSION, "settings": dataclasses.asdict(self),
                   "easy_vqa": _package_version("easy-vqa"), "jax": _package_version("jax"), "code": _code_digest()}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class PretrainedTowers:
    """Where the towers are and how they were made.

    Attributes:
      folder: the cache folder; `vision_folder` and `lm_folder` (which also holds the tokenizer) are inside it.
      manifest: the content of manifest.json (settings, metrics, seconds).
      reused: True when the folder was already in the cache and nothing was trained.
    """

    folder: str
    vision_folder: str
    lm_folder: str
    manifest: dict
    reused: bool


def default_cache_root() -> str:
    """$JAXALIGN_CACHE, else ~/.cache/jaxalign."""
    return startup.cache_root()


# The modules whose code decides the towers' numbers, bit for bit.
_TOWER_CODE = ("jaxalign.programs.pretrain_towers", "jaxalign.models.layers", "jaxalign.models.attention",
               "jaxalign.models.vit", "jaxalign.models.decoder", "jaxalign.train.optimizer",
               "jaxalign.train.losses", "jaxalign.data.tokenizer", "jaxalign.data.image_ops",
               "jaxalign.data.chat_templates", "jaxalign.data.easy_vqa", "jaxalign.io.hf_lm", "jaxalign.io.hf_vision")


def _code_digest() -> str:
    """SHA-256 of the source of `_TOWER_CODE` (read from the installed files)."""
    import importlib.util

    digest = hashlib.sha256()
    for name in _TOWER_CODE:
        with open(importlib.util.find_spec(name).origin, "rb") as source:
            digest.update(name.encode() + b"\0" + source.read())
    return digest.hexdigest()


def _package_version(name: str) -> str:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # not installed as a distribution: the fingerprint still works, only less specific
        return "unknown"


# ------------------------------------------------------------------------------------------------ tokenizer
def _template_texts() -> list[str]:
    """The fixed text of every registered template, so that any of them tokenises without unknown words."""
    texts = []
    for template in TEMPLATES.values():
        for field in ("system_message", "system_format", "user_prefix", "user_suffix", "assistant_prefix",
                      "assistant_suffix", "turn_separator"):
            texts.append(getattr(template, field).replace("{system}", " ").replace("{bos}", " ")
                         .replace("{eos}", " "))
    return texts


def build_tokenizer(questions: list[tuple[str, str, int]], captions: list[str]) -> Tokenizer:
    """A word-level tokenizer over the easy-vqa text, the caption prompt and the templates' own words, with the
    ChatML tokens as special tokens and <|im_end|> as its EOS (the demo's stage-2 template is 'qwen2')."""
    texts = [f"{question} {answer}" for question, answer, _ in questions] + captions
    texts += [easy_vqa.CAPTION_PROMPT] + _template_texts()
    # The end of an assistant turn in ChatML is <|im_end|>, so it is the EOS (as in Qwen2-Instruct): generation
    # then stops at the end of the answer.
    return train_word_level_tokenizer(texts, special_tokens=(*DEFAULT_SPECIAL_TOKENS, *CHATML_TOKENS),
                                      eos_token="<|im_end|>")


# ------------------------------------------------------------------------------------------- vision tower
@dataclasses.dataclass(frozen=True)
class CaptionSet:
    """Every caption the contrastive loss compares each image with, and which attributes each one asserts.

    Attributes:
      texts: "a red circle" (colour and shape), "a red shape" (colour only), "a circle" (shape only).
      colors, shapes: [C] index into easy_vqa.COLORS / SHAPES of the asserted value, -1 when not asserted.
    """

    texts: tuple[str, ...]
    colors: np.ndarray
    shapes: np.ndarray

    @classmethod
    def build(cls) -> "CaptionSet":
        colors, shapes = easy_vqa.COLORS, easy_vqa.SHAPES
        full = [(c, s) for c in range(len(colors)) for s in range(len(shapes))]
        entries = ([(easy_vqa.caption_of(colors[c], shapes[s]), c, s) for c, s in full]
                   + [(f"a {color} shape", c, -1) for c, color in enumerate(colors)]
                   + [(f"a {shape}", -1, s) for s, shape in enumerate(shapes)])
        return cls(tuple(text for text, _, _ in entries), np.asarray([c for _, c, _ in entries], np.int32),
                   np.asarray([s for _, _, s in entries], np.int32))

    @property
    def num_full(self) -> int:
        """The first `num_full` captions name both attributes (the zero-shot classes)."""
        return int(np.sum((self.colors >= 0) & (self.shapes >= 0)))

    def positives(self, image_colors: jax.Array, image_shapes: jax.Array) -> jax.Array:
        """[B, C] True where caption c is true of image b (each asserted attribute matches)."""
        colors, shapes = jnp.asarray(self.colors)[None, :], jnp.asarray(self.shapes)[None, :]
        return (((colors < 0) | (colors == image_colors[:, None]))
                & ((shapes < 0) | (shapes == image_shapes[:, None])))


def _encode_text(embedding: jax.Array, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Caption ids [C, T] with mask [C, T] -> L2-normalised sums of token embeddings [C, E] (the tiny text tower:
    with unit-variance embeddings every word, colour and shape alike, starts as an independent direction)."""
    summed = (jnp.take(embedding, ids, axis=0) * mask[..., None]).sum(1)
    return summed / jnp.linalg.norm(summed, axis=-1, keepdims=True)


def _encode_image(params: dict, cfg: vit.VisionConfig, pixels: jax.Array) -> jax.Array:
    pooled = vit.encode(params, cfg, pixels).pooled
    return pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)


def sigmoid_contrastive_loss(image_embeddings: jax.Array, text_embeddings: jax.Array, positives: jax.Array,
                             log_temperature: jax.Array, bias: jax.Array) -> jax.Array:
    """SigLIP's pairwise sigmoid loss of images [B, E] against texts [C, E]; `positives` [B, C] marks the true
    pairs (more than one per image is allowed).

    loss = -sum_bc log sigmoid(z_bc * (t * <x_b, y_c> + b)) / B with z_bc = +1 for positives, -1 otherwise.
    """
    logits = jnp.exp(log_temperature) * image_embeddings @ text_embeddings.T + bias
    signs = jnp.where(positives, 1.0, -1.0)
    return -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / image_embeddings.shape[0]


def _caption_ids(tokenizer: Tokenizer, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    encoded = [tokenizer.encode(caption) for caption in captions]
    width = max(len(ids) for ids in encoded)
    ids = np.zeros((len(captions), width), np.int32)
    mask = np.zeros((len(captions), width), np.float32)
    for row, row_ids in enumerate(encoded):
        ids[row, :len(row_ids)], mask[row, :len(row_ids)] = row_ids, 1.0
    return ids, mask


def _images(records: list[dict], image_size: int) -> np.ndarray:
    return np.stack([preprocess_image(record["image"], image_size, SIGLIP_MEAN, SIGLIP_STD, sample_id=record["id"])
                     for record in records])


def _attributes(records: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    return (np.asarray([easy_vqa.COLORS.index(record["color"]) for record in records], np.int32),
            np.asarray([easy_vqa.SHAPES.index(record["shape"]) for record in records], np.int32))


def pretrain_vision(config: TowerPretrainConfig, tokenizer: Tokenizer, train: list[dict], test: list[dict],
                    ) -> tuple[dict, dict]:
    """(ViT params, metrics) after `config.vision_steps` steps of sigmoid contrastive image-caption training.

    Each batch of images is contrasted with every caption of `CaptionSet` (24 full captions, 8 colour-only and 3
    shape-only ones). The partial captions matter: with full captions only, the loss is solved almost entirely by
    colour (8 values, one mean pixel away), and shape stayed near chance after 1,200 steps in our runs.

    Metrics: first and final loss, and the zero-shot accuracy of matching each test image to the nearest of the 24
    full captions (whole caption, colour only, shape only): a direct check that the features see both.
    """
    cfg = config.vision_config()
    captions = CaptionSet.build()
    caption_ids, caption_mask = (jnp.asarray(array) for array in _caption_ids(tokenizer, captions.texts))
    train_pixels, test_pixels = _images(train, cfg.image_size), _images(test, cfg.image_size)
    train_colors, train_shapes = _attributes(train)
    test_colors, test_shapes = _attributes(test)

    vision_key, text_key = jax.random.split(jax.random.key(config.seed))
    params = {"vision": vit.init(cfg, vision_key),
              "text": jax.random.normal(text_key, (tokenizer.vocab_size, cfg.hidden_size)),
              "log_temperature": jnp.log(config.vision_temperature), "bias": jnp.asarray(config.vision_bias)}
    optimizer = adamw(warmup_cosine_schedule(config.vision_lr, config.vision_steps, warmup_ratio=0.05),
                      weight_decay=1e-4)
    opt_state = optimizer.init(params)

    def loss_fn(params, pixels, colors, shapes):
        images = _encode_image(params["vision"], cfg, pixels)
        texts = _encode_text(params["text"], caption_ids, caption_mask)
        return sigmoid_contrastive_loss(images, texts, captions.positives(colors, shapes),
                                        params["log_temperature"], params["bias"])

    @jax.jit
    def step(params, opt_state, pixels, colors, shapes):
        loss, grads = jax.value_and_grad(loss_fn)(params, pixels, colors, shapes)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng([config.seed, 1])
    losses = []
    for _ in tqdm(range(config.vision_steps), desc="pretrain vision tower (SigLIP loss)", unit="step",
                  disable=None):
        rows = rng.choice(len(train_pixels), config.vision_batch, replace=False)
        params, opt_state, loss = step(params, opt_state, train_pixels[rows], train_colors[rows],
                                       train_shapes[rows])
        losses.append(loss)
    losses = [float(loss) for loss in losses]

    full = captions.num_full

    @jax.jit
    def predict(params, pixels):
        texts = _encode_text(params["text"], caption_ids[:full], caption_mask[:full])
        return jnp.argmax(_encode_image(params["vision"], cfg, pixels) @ texts.T, axis=-1)

    # Fixed-size chunks (the last one padded) keep this to one compiled program.
    chunk = 256
    padded = np.concatenate([test_pixels, np.zeros((-len(test_pixels) % chunk, *test_pixels.shape[1:]),
                                                   test_pixels.dtype)])
    predicted = np.concatenate([np.asarray(predict(params, padded[start:start + chunk]))
                                for start in range(0, len(padded), chunk)])[:len(test_pixels)]
    color_right = captions.colors[predicted] == test_colors
    shape_right = captions.shapes[predicted] == test_shapes
    metrics = {"first_loss": losses[0], "final_loss": float(np.mean(losses[-20:])),
               "zero_shot_caption_accuracy": float(np.mean(color_right & shape_right)),
               "zero_shot_color_accuracy": float(np.mean(color_right)),
               "zero_shot_shape_accuracy": float(np.mean(shape_right)),
               "train_images": len(train), "test_images": len(test)}
    return jax.device_get(params["vision"]), metrics


# ------------------------------------------------------------------------------------------------ the LM
def lm_texts(tokenizer: Tokenizer, template_name: str, questions: list[tuple[str, str, int]],
             captions: list[str], image_captions: dict[int, str] | None = None, context_share: float = 0.0,
             seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The text-only conversations the LM is pretrained on: every (question, answer) pair and caption, rendered
    with the chat template; and, for a seeded `context_share` of the questions whose image has a caption
    (`image_captions`: image id -> caption), the same question with the caption written before it.

    Returns:
      (ids [U, L] padded with the pad id, lengths [U], counts [U]) over the U distinct conversations; `counts`
      says how often each occurs in the data, and batches sample rows in proportion to it, so the LM learns the
      answer frequencies while each distinct text is tokenised once.
    """
    template = get_template(template_name)
    pairs = [(question, answer) for question, answer, _ in questions]
    pairs += [(easy_vqa.CAPTION_PROMPT, caption) for caption in captions]
    if context_share and image_captions:
        chosen = np.random.default_rng([seed, 3]).random(len(questions)) < context_share
        pairs += [(f"{image_captions[image_id]}\n{question}", answer)
                  for (question, answer, image_id), take in zip(questions, chosen) if take and image_id in image_captions]
    distinct: dict[tuple[str, str], int] = {}
    for pair in pairs:
        distinct[pair] = distinct.get(pair, 0) + 1
    encoded = [encode_conversation(tokenizer, template, [{"from": "human", "value": question},
                                                         {"from": "gpt", "value": answer}],
                                   sample_id=f"{question} -> {answer}").input_ids
               for question, answer in distinct]
    width = max(len(ids) for ids in encoded)
    ids = np.full((len(encoded), width), tokenizer.pad_id, np.int32)
    for row, row_ids in enumerate(encoded):
        ids[row, :len(row_ids)] = row_ids
    lengths = np.asarray([len(row) for row in encoded], np.int32)
    return ids, lengths, np.asarray(list(distinct.values()), np.int64)


def lm_config(config: TowerPretrainConfig, tokenizer: Tokenizer) -> decoder.DecoderConfig:
    return decoder.DecoderConfig(
        family="llama", vocab_size=tokenizer.vocab_size, hidden_size=config.lm_width,
        intermediate_size=config.lm_mlp, num_layers=config.lm_layers, num_heads=config.lm_heads,
        num_kv_heads=config.lm_kv_heads, tie_word_embeddings=config.lm_tied_embeddings, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)


def pretrain_lm(config: TowerPretrainConfig, tokenizer: Tokenizer, ids: np.ndarray, lengths: np.ndarray,
                counts: np.ndarray) -> tuple[decoder.DecoderConfig, dict, dict]:
    """(LM config, params, metrics) after `config.lm_steps` steps of next-token loss on the texts of `lm_texts`
    (rows drawn in proportion to `counts`)."""
    cfg = lm_config(config, tokenizer)
    params = decoder.init(cfg, jax.random.key(config.seed + 1))
    optimizer = adamw(warmup_cosine_schedule(config.lm_lr, config.lm_steps, warmup_ratio=0.05), weight_decay=1e-4)
    opt_state = optimizer.init(params)

    def loss_fn(params, batch_ids, batch_lengths):
        mask = jnp.arange(batch_ids.shape[1])[None, :] < batch_lengths[:, None]
        logits = decoder.forward(params, cfg, input_ids=batch_ids, attention_mask=mask).logits[:, :-1]
        targets, weights = batch_ids[:, 1:], mask[:, 1:].astype(jnp.float32)
        token_loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return jnp.sum(token_loss * weights) / jnp.sum(weights)

    @jax.jit
    def step(params, opt_state, batch_ids, batch_lengths):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch_ids, batch_lengths)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng([config.seed, 2])
    losses = []
    for _ in tqdm(range(config.lm_steps), desc="pretrain language model (next token)", unit="step", disable=None):
        rows = rng.choice(len(ids), config.lm_batch, p=counts / counts.sum())
        params, opt_state, loss = step(params, opt_state, ids[rows], lengths[rows])
        losses.append(loss)
    losses = [float(loss) for loss in losses]
    metrics = {"first_loss": losses[0], "final_loss": float(np.mean(losses[-20:])), "texts": int(counts.sum()),
               "distinct_texts": int(len(ids)),
               "vocab_size": tokenizer.vocab_size}
    return cfg, jax.device_get(params), metrics


# ---------------------------------------------------------------------------------------------- the cache
def _is_complete(folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, name)) for name in
               ("manifest.json", "vision/config.json", "vision/model.safetensors", "lm/config.json",
                "lm/model.safetensors", "lm/tokenizer.json"))


def obtain_towers(config: TowerPretrainConfig = TowerPretrainConfig(), cache_root: str | None = None,
                  verbose: bool = True) -> PretrainedTowers:
    """The cached towers for `config`, pretraining and caching them first when they are not there yet.

    Args:
      config: the pretraining settings; their fingerprint names the cache folder.
      cache_root: default `default_cache_root()`; towers go to `<cache_root>/demo_towers/<fingerprint>`.
      verbose: print what is happening (the progress bars show regardless when stderr is a terminal).
    """
    folder = os.path.join(cache_root or default_cache_root(), "demo_towers", config.fingerprint())
    if _is_complete(folder):
        with open(os.path.join(folder, "manifest.json")) as f:
            manifest = json.load(f)
        if verbose:
            print(f"towers: reusing the cached pretraining in {folder}", flush=True)
        return PretrainedTowers(folder, os.path.join(folder, "vision"), os.path.join(folder, "lm"), manifest, True)
    if verbose:
        print(f"towers: none cached for these settings; pretraining into {folder}", flush=True)
    start = time.perf_counter()
    questions = easy_vqa.read_questions("train")
    train_captions, report = easy_vqa.caption_records("train")
    test_captions, _ = easy_vqa.caption_records("test")
    if verbose:
        print(f"easy-vqa train captions: {report}".splitlines()[0], flush=True)
    tokenizer = build_tokenizer(questions, [record["caption"] for record in train_captions])
    vision_params, vision_metrics = pretrain_vision(config, tokenizer, train_captions, test_captions)
    vision_seconds = time.perf_counter() - start
    texts = lm_texts(tokenizer, config.template, questions, [record["caption"] for record in train_captions],
                     {int(record["image_id"]): record["caption"] for record in train_captions},
                     config.context_share, config.seed)
    lm_cfg, lm_params, lm_metrics = pretrain_lm(config, tokenizer, *texts)
    manifest = {"fingerprint": config.fingerprint(), "settings": dataclasses.asdict(config),
                "vision": vision_metrics, "lm": lm_metrics,
                "seconds": {"vision": round(vision_seconds, 1), "total": round(time.perf_counter() - start, 1)},
                "data": "easy-vqa train split (questions and derived captions); zero-shot check on the test split"}

    # Written under a temporary name and renamed, so an interrupted run never leaves a half folder that a later
    # run would take for a finished one.
    partial = f"{folder}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    hf_vision.export(os.path.join(partial, "vision"), config.vision_config(), vision_params)
    hf_lm.export(os.path.join(partial, "lm"), lm_cfg, lm_params)
    tokenizer.save_folder(os.path.join(partial, "lm"))
    with open(os.path.join(partial, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    os.replace(partial, folder)
    if verbose:
        print(f"towers: vision zero-shot caption accuracy {vision_metrics['zero_shot_caption_accuracy']:.3f} "
              f"(colour {vision_metrics['zero_shot_color_accuracy']:.3f}, shape "
              f"{vision_metrics['zero_shot_shape_accuracy']:.3f}); LM loss {lm_metrics['first_loss']:.2f} -> "
              f"{lm_metrics['final_loss']:.2f}; {manifest['seconds']['total']} s", flush=True)
    return PretrainedTowers(folder, os.path.join(folder, "vision"), os.path.join(folder, "lm"), manifest, False)
