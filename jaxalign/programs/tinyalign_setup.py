"""Assembling a TinyAlign run's parts from its config: data sources, tokenizer, towers, model config, the
parameters (with a previous stage's checkpoint written over them), the memory bank, and the freeze rules.

`trainer.py` reads top to bottom as the run itself; this module answers "where does each part come from":

  data_sources(config) -> {'train', 'eval', 'memory', 'build_reports'}
  train_records_name(config.data) -> a name for the training records (the process-wide sample cache's key)
  tokenizer_corpus(config, sources) -> texts a word-level tokenizer for random towers is trained on
  load_tokenizer(config, workdir, sources) -> Tokenizer
  load_towers(config, tokenizer, mesh) -> (vision cfg, vision params, LM cfg, LM params), sharded over mesh
  load_lm(config, tokenizer, mesh) -> (LM cfg, LM params): the LM alone (what an export of the LM needs)
  model_config(config, vision_cfg, lm_cfg) -> TinyAlignConfig;  perceiver_config(config, cfg)
  read_checkpoint_params(workdir) -> {'connector/dense_0/kernel': array, ...}
  overwrite_params(params, saved, source) -> (params, replaced names)
  trainable_parts(config) -> parts the run trains ('lora' in place of 'lm' with LoRA, `tinyalign_lora`)
  freeze_rules(trainable, transform) -> [(regex, transform | None)]
  stage_optimizer(train, total_steps) -> AdamW with warm-up and cosine decay, its horizon in the state
  stop_token_ids(tokenizer, template) -> ids that end a generated answer
  build_run(config, workdir) -> Run (mesh, tokenizer, template, sources, cfg, sharded params, memory, ...)
  build_memory(config, workdir, mesh, cfg, params, sources, data_options) -> (RetrievalMemory, info)
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxalign import paths, sharding
from jaxalign.align import memory_keys
from jaxalign.align import model as model_lib
from jaxalign.align import value_encoders
from jaxalign.align.controls import RetrievalControl
from jaxalign.align.query import QueryConfig
from jaxalign.data import chat_templates
from jaxalign.data.tokenizer import Tokenizer, train_word_level_tokenizer
from jaxalign.models import connector, decoder, vit
from jaxalign.programs import tinyalign_lora
from jaxalign.train import horizon_schedule
from jaxalign.train import lora as lora_lib
from jaxalign.train import optimizer as opt_lib

log = logging.getLogger(__name__)
ConfigDict = ml_collections.ConfigDict
# What a bank's token values are, in its fingerprint: banks whose values still end in end-of-turn tokens are rebuilt.
TOKEN_VALUE_FORMAT = {"values_without": "stop tokens"}
STAGE_TRAINABLE = {1: ("connector", "retrieval_connector"), 2: ("connector", "retrieval_connector", "lm")}


# ================================================================================================ input
def _llava_source(data: ConfigDict, json_file: str, name: str, image_root: str):
    import tensorflow_datasets as tfds
    from jaxalign.data import llava

    # tfds refuses a new config under a registered name ('pretrain', 'mix665k'): those names take the
    # registered config, which must then describe the same JSON file and image folder.
    try:
        config: Any = llava.llava_config(name, json_file, image_root)
    except ValueError as error:
        raise ValueError(f"config.data: {error} (config.data.train_name / eval_name / memory_name)") from None
    # A data set written by `jaxalign prepare-data` (or an earlier run) is only read here: tfds reuses a finished
    # data set folder and prepare_llava returns its saved report.
    builder, report = llava.prepare_llava(config, manual_dir=data.manual_dir, data_dir=data.data_dir,
                                          fail_fast=data.fail_fast)
    source = tfds.data_source(f"{llava.LlavaDataset.name}/{name}", data_dir=data.data_dir, split="train")
    return source, report


def data_sources(config: ConfigDict) -> dict[str, Any]:
    """{'train', 'eval', 'memory' (sources; 'memory' is the bank's, the training source unless
    config.data.memory_config / memory_json names another), 'build_reports' (name -> SkipReport JSON)}.

    The tfds builds run here on first use; tfds announces them on stdout, which is moved to stderr so that the
    commands' stdout stays one JSON summary. With several processes, process 0 opens (and if need be builds)
    them first and the others wait for it, so that no two processes build one data set into one folder.
    `jaxalign prepare-data --config <the run's config>` writes the same data sets beforehand (split over
    processes, resumable); a run then only reads them."""
    with contextlib.redirect_stdout(sys.stderr):
        if jax.process_count() == 1:
            return _open_sources(config.data)
        from jax.experimental import multihost_utils

        sources = _open_sources(config.data) if jax.process_index() == 0 else None
        multihost_utils.sync_global_devices("jaxalign: data sources built")
        return sources if sources is not None else _open_sources(config.data)


def train_records_name(data: ConfigDict) -> str:
    """A name for the training records `data_sources(config)['train']` reads, the same for every run that reads the
    same ones (what `pipeline.make_vqa_dataset(share_cache_as=...)` keys its process-wide cache by)."""
    if data.kind == "easy_vqa":
        from jaxalign.data import easy_vqa

        return f"easy_vqa/{data.train_config}/{data.train_split} in {data.data_dir or easy_vqa.default_data_dir()}"
    return f"{data.kind}/{data.train_name} from {data.manual_dir}/{data.train_json} in {data.data_dir}"


def _open_sources(data: ConfigDict) -> dict[str, Any]:
    if data.kind == "easy_vqa":
        from jaxalign.data import easy_vqa

        train = easy_vqa.load_easy_vqa(data.train_config, data.train_split, data.data_dir or None)
        memory = (easy_vqa.load_easy_vqa(data.memory_config, data.train_split, data.data_dir or None)
                  if data.memory_config else train)
        return {"train": train, "memory": memory,
                "eval": easy_vqa.load_easy_vqa(data.eval_config, data.eval_split, data.data_dir or None),
                "build_reports": {}}
    if data.kind == "llava":
        if not data.manual_dir or not data.data_dir:
            raise ValueError("config.data.kind='llava' needs config.data.manual_dir (the JSON and image folder) "
                             "and config.data.data_dir (where the tfds data set is written)")
        train, train_report = _llava_source(data, data.train_json, data.train_name, data.image_root)
        evaluation, eval_report = _llava_source(data, data.eval_json, data.eval_name, data.eval_image_root)
        reports = {data.train_name: train_report.to_json(), data.eval_name: eval_report.to_json()}
        memory = train
        if data.memory_json:
            memory, memory_report = _llava_source(data, data.memory_json, data.memory_name,
                                                  data.memory_image_root)
            reports[data.memory_name] = memory_report.to_json()
        return {"train": train, "eval": evaluation, "memory": memory, "build_reports": reports}
    raise ValueError(f"config.data.kind={data.kind!r}; expected 'easy_vqa' or 'llava'")


def _conversation_texts(conversations: Any) -> list[str]:
    if isinstance(conversations, (bytes, np.bytes_)):
        conversations = conversations.decode("utf-8")
    turns = json.loads(conversations) if isinstance(conversations, str) else conversations
    return [str(turn.get("value", "")).replace(chat_templates.IMAGE_PLACEHOLDER, " ") for turn in turns or []
            if isinstance(turn, dict)]


def tokenizer_corpus(config: ConfigDict, sources: dict) -> list[str]:
    """Texts a word-level tokenizer for random towers is trained on: every chat template's words, and the
    conversations of both stages' data (easy-vqa: captions and questions; llava: every JSON file of the manual
    directory), so that a stage-2 run can keep its stage-1 run's tokenizer."""
    from jaxalign.data import easy_vqa

    texts = [easy_vqa.CAPTION_PROMPT] + [
        " ".join((t.system_message, t.system_format, t.user_prefix, t.user_suffix, t.assistant_prefix))
        for t in chat_templates.TEMPLATES.values()]
    data = config.data
    if data.kind == "easy_vqa":
        for name in ("captions", "questions"):
            for record in (easy_vqa.caption_records(data.train_split)[0] if name == "captions"
                           else easy_vqa.question_records(data.train_split)):
                texts += _conversation_texts(record["conversations"])
    else:
        for name in sorted(os.listdir(data.manual_dir)):
            if name.endswith(".json"):
                with open(os.path.join(data.manual_dir, name), encoding="utf-8") as file:
                    samples = json.load(file)
                for sample in samples if isinstance(samples, list) else []:
                    if isinstance(sample, dict):
                        texts += _conversation_texts(sample.get("conversations"))
    for source in (sources["train"], sources["eval"]):
        texts += [text for index in range(len(source)) for text in _conversation_texts(source[index]["conversations"])]
    return texts


def load_tokenizer(config: ConfigDict, workdir: str, sources: dict) -> Tokenizer:
    """The LM's tokenizer (Hugging Face folder), or for random towers a word-level tokenizer trained on the data
    (saved in workdir/tokenizer and reused; a stage-2 run takes its stage-1 run's)."""
    model = config.model
    if model.source == "hf":
        return Tokenizer.from_folder(model.lm_folder)
    for folder in (epath.Path(workdir) / "tokenizer",
                   epath.Path(model.init_from) / "tokenizer" if model.init_from else None):
        if folder is not None and (folder / "tokenizer.json").exists():
            return Tokenizer.from_folder(os.fspath(folder))
    # Every template's marker tokens and words are in the vocabulary, so stage 2 can switch templates.
    specials = ("<pad>", "<unk>", "<s>", "</s>") + tuple(dict.fromkeys(
        token for template in chat_templates.TEMPLATES.values() for token in template.required_tokens))
    tokenizer = train_word_level_tokenizer(tokenizer_corpus(config, sources), special_tokens=specials)
    # Every process trains the same tokenizer from the same corpus, in memory; process 0 alone saves it. The
    # barrier keeps process 0 from writing the folder while a slower process still looks for it above (it would
    # find a half-written one), and the fingerprint check catches processes that trained different vocabularies.
    if jax.process_count() > 1:
        _check_same_on_every_process(tokenizer.backend.to_str(), "the word-level tokenizer")
    if jax.process_index() == 0:
        tokenizer.save_folder(os.fspath(epath.Path(workdir) / "tokenizer"))
    return tokenizer


def _check_same_on_every_process(text: str, what: str) -> None:
    """Raises unless every process holds the same `text` (compares SHA-256 digests; a barrier of all processes)."""
    import hashlib

    from jax.experimental import multihost_utils

    digest = np.frombuffer(hashlib.sha256(text.encode("utf-8")).digest(), np.uint8)
    digests = np.asarray(multihost_utils.process_allgather(digest))
    differing = [index for index, row in enumerate(digests) if not np.array_equal(row, digest)]
    if differing:
        raise RuntimeError(f"{what} of process {jax.process_index()} differs from that of process(es) {differing}: "
                           "they must be built from the same data (check that every host reads the same files)")


# ================================================================================================ model
def trainable_parts(config: ConfigDict) -> tuple[str, ...]:
    """The parts a run trains: `config.train.trainable`, or its stage's default; with LoRA
    (`config.model.lora.targets`) the adapters, 'lora', train in place of the LM, whose base weights stay frozen.

    Raises:
      ValueError: LoRA on a run that does not train the LM (stage 1's default): LoRA is how an LM trains.
    """
    parts = tuple(config.train.trainable) if config.train.trainable else STAGE_TRAINABLE[config.stage]
    if tinyalign_lora.lora_config(config) is None:
        return parts
    if "lm" not in parts:
        raise ValueError(f"config.model.lora.targets is set but this run trains {list(parts)}, not the LM: LoRA "
                         "replaces training the LM's full weights (stage 2, or config.train.trainable with 'lm'); "
                         "clear the targets or train the LM")
    return tuple(part for part in parts if part != "lm") + (tinyalign_lora.PART,)


def stored_dtypes(config: ConfigDict) -> dict[str, str]:
    """How a run stores each part of the model: frozen parts in the compute dtype (`config.model.dtype`), trained
    ones in float32 (their master weights). The vision tower is always frozen."""
    trainable = trainable_parts(config)
    return {"vision": config.model.dtype, "lm": "float32" if "lm" in trainable else config.model.dtype,
            "connector": "float32", "retrieval_connector": "float32"}


def load_towers(config: ConfigDict, tokenizer: Tokenizer, mesh: jax.sharding.Mesh | None = None
                ) -> tuple[vit.VisionConfig, dict, decoder.DecoderConfig, dict]:
    """(vision cfg, vision params, LM cfg, LM params): from Hugging Face folders or tiny random ones.

    Hugging Face towers are stored as they compute when frozen: the vision tower (always frozen) and the LM of a
    stage that does not train it are kept in `config.model.dtype` (a bfloat16 run holds no float32 copy); an LM
    that trains keeps float32 master weights. With a `mesh` they are read straight into their sharded layout,
    each device's shard alone; without one they are single-device arrays (same values and dtypes).
    """
    model = config.model
    if model.source == "hf":
        from jaxalign.io import hf_vision

        vision_cfg, vision_params = hf_vision.load(model.vision_folder, dtype=model.dtype, mesh=mesh,
                                                   param_dtype=stored_dtypes(config)["vision"])
        return (vision_cfg, jax.tree.map(jnp.asarray, vision_params)) + load_lm(config, tokenizer, mesh)
    if model.source != "random":
        raise ValueError(f"config.model.source={model.source!r}; expected 'hf' or 'random'")
    vision_cfg = vit.VisionConfig(**model.random_vision.to_dict(), use_head=False, dtype=model.dtype)
    vision_key, _ = jax.random.split(jax.random.PRNGKey(model.random_seed))
    return (vision_cfg, vit.init(vision_cfg, vision_key)) + load_lm(config, tokenizer, mesh)


def load_lm(config: ConfigDict, tokenizer: Tokenizer, mesh: jax.sharding.Mesh | None = None
            ) -> tuple[decoder.DecoderConfig, dict]:
    """(LM cfg, LM params) as `load_towers` loads them (Hugging Face folder, or the tiny random LM of
    `config.model.random_seed`), without the vision tower."""
    model = config.model
    if model.source == "hf":
        from jaxalign.io import hf_lm

        lm_cfg, lm_params = hf_lm.load(model.lm_folder, dtype=model.dtype, param_dtype=stored_dtypes(config)["lm"],
                                       mesh=mesh)
        if tokenizer.vocab_size > lm_cfg.vocab_size:
            raise ValueError(f"the tokenizer of {model.lm_folder} has {tokenizer.vocab_size} ids but the LM only "
                             f"{lm_cfg.vocab_size} embedding rows")
        return lm_cfg, lm_params
    if model.source != "random":
        raise ValueError(f"config.model.source={model.source!r}; expected 'hf' or 'random'")
    lm_cfg = decoder.DecoderConfig(**model.random_lm.to_dict(), vocab_size=tokenizer.vocab_size, dtype=model.dtype,
                                   eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    _, lm_key = jax.random.split(jax.random.PRNGKey(model.random_seed))
    return lm_cfg, decoder.init(lm_cfg, lm_key)


def model_config(config: ConfigDict, vision_cfg: vit.VisionConfig, lm_cfg: decoder.DecoderConfig
                 ) -> model_lib.TinyAlignConfig:
    """The `TinyAlignConfig` of a run from its ConfigDict and the towers' configs."""
    model, retrieval = config.model, config.retrieval
    faithful = retrieval.mode == "faithful"
    # Kernel and rematerialisation are the run's choice, not the checkpoint's.
    vision_cfg = dataclasses.replace(vision_cfg, attention=model.get("attention", "auto"),
                                     remat=model.get("vision_remat", "none"))
    lm_cfg = dataclasses.replace(lm_cfg, attention=model.get("attention", "auto"), remat=model.get("remat", "none"))
    value_kind = "latents" if faithful else "tokens"
    value_width = retrieval.perceiver.latent_dim if faithful else lm_cfg.hidden_size
    value_length = retrieval.perceiver.num_latents if faithful else retrieval.value_length
    dense = dict(dtype=model.dtype)
    resampler = dict(num_latents=model.resampler_latents, num_heads=model.resampler_heads) \
        if model.connector == "resampler" else {}
    return model_lib.TinyAlignConfig(
        vision=vision_cfg, lm=lm_cfg,
        connector=connector.ConnectorConfig(model.connector, vision_cfg.hidden_size, lm_cfg.hidden_size, **resampler,
                                            **dense),
        retrieval_connector=connector.ConnectorConfig(model.retrieval_connector, value_width, lm_cfg.hidden_size,
                                                      **dense),
        query=QueryConfig(mode=retrieval.mode, image_weight=retrieval.image_weight,
                          text_weight=retrieval.text_weight, text_start=retrieval.text_start,
                          key_encoder=retrieval.get("key_encoder", "towers")),
        control=RetrievalControl(kind=retrieval.control, seed=retrieval.shuffle_seed,
                                 constant_row=retrieval.constant_row,
                                 shuffle_group=retrieval.get("shuffle_group", "auto")),
        value_kind=value_kind, value_length=value_length, k=retrieval.k,
        leave_one_out=retrieval.leave_one_out and not faithful, vision_layer=model.vision_layer,
        drop_first_vision_token=model.drop_first_vision_token, search_method=retrieval.search_method,
        max_length=model.max_length, loss_chunk_size=model.loss_chunk_size)


def perceiver_config(config: ConfigDict, cfg: model_lib.TinyAlignConfig) -> value_encoders.PerceiverValueConfig:
    """The seeded random Perceiver that makes faithful-mode values (`config.retrieval.perceiver`)."""
    p = config.retrieval.perceiver
    return value_encoders.PerceiverValueConfig(
        num_latents=p.num_latents, latent_dim=p.latent_dim, num_self_layers=p.num_self_layers,
        image_size=cfg.vision.image_size, max_text_bytes=p.max_text_bytes, seed=p.seed)


def read_checkpoint_params(workdir: str) -> dict[str, np.ndarray]:
    """{'connector/dense_0/kernel': array, ...}: the params saved in the latest checkpoint of a run (only its
    trainable ones: frozen towers are never saved)."""
    directory = paths.orbax_directory(epath.Path(workdir) / "checkpoints")
    manager = ocp.CheckpointManager(directory, item_names=("state", "extra"), item_handlers={
        "state": ocp.StandardCheckpointHandler(), "extra": ocp.JsonCheckpointHandler()})
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"{directory} holds no checkpoint to initialise from (config.model.init_from)")
    metadata = manager.item_metadata(step)["state"]
    replicated = jax.sharding.NamedSharding(sharding.make_mesh((-1, 1, 1)), jax.sharding.PartitionSpec())
    # The whole flat state is read (orbax restores a tree as saved); only its params are kept.
    target = {name: jax.ShapeDtypeStruct(tuple(meta.shape), meta.dtype, sharding=replicated)
              for name, meta in metadata.items()}
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    manager.close()
    return {name[len("params."):].replace(".", "/"): np.asarray(value) for name, value in restored.items()
            if name.startswith("params.")}


def overwrite_params(params: dict, saved: dict[str, np.ndarray], source: str) -> tuple[dict, list[str]]:
    """params with every leaf named in `saved` replaced (shapes checked); returns (params, replaced names)."""
    paths = opt_lib.param_paths(params)
    replaced = []

    def take(path: str, leaf):
        if path not in saved:
            return leaf
        if tuple(saved[path].shape) != tuple(leaf.shape):
            raise ValueError(f"{source}: parameter {path} has shape {saved[path].shape}, this model expects "
                             f"{leaf.shape}; init_from must come from a run with the same model")
        replaced.append(path)
        return jnp.asarray(saved[path], leaf.dtype)

    return jax.tree.map(take, paths, params), replaced


# ========================================================================================= training, generation
def freeze_rules(trainable: tuple[str, ...], transform) -> list:
    """Freeze rules: the listed top-level parts train with `transform`, everything else is frozen ('lora': the LoRA
    adapters, which `trainable_parts` puts in place of 'lm')."""
    unknown = set(trainable) - {"connector", "retrieval_connector", "lm", "vision", tinyalign_lora.PART}
    if unknown:
        raise ValueError(f"config.train.trainable has unknown parts {sorted(unknown)}; use connector, "
                         "retrieval_connector, lm (LoRA adapters train in place of lm when "
                         "config.model.lora.targets is set)")
    if "vision" in trainable:
        raise ValueError("the vision tower stays frozen in TinyAlign (its features key the memory bank)")
    return [(f"({'|'.join(trainable)})/.*", transform), (".*", None)]


def stage_optimizer(train: ConfigDict, total_steps: int):
    """The trained parts' transformation: AdamW with gradient clipping, linear warm-up and cosine decay over
    `total_steps` (`config.train`'s learning_rate, warmup_ratio, end_lr_ratio, weight_decay, clip_norm).

    The schedule's horizon is optimizer state, not a constant of the program (`horizon_schedule`): runs that differ
    only in length (the demo's 40% runs train 40% of the steps) share one compiled step."""
    return horizon_schedule.adamw(train.learning_rate, total_steps, warmup_ratio=train.warmup_ratio,
                                  end_ratio=train.end_lr_ratio, weight_decay=train.weight_decay,
                                  clip_norm=train.clip_norm or None)


def stop_token_ids(tokenizer: Tokenizer, template: chat_templates.ChatTemplate) -> list[int]:
    """Ids that end a generated answer: the tokenizer's EOS and the template's end-of-turn token when it is a
    single token (Qwen2's <|im_end|> differs from the base model's EOS)."""
    ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    suffix = template.assistant_suffix.replace(chat_templates.EOS_MARKER, "").strip()
    if suffix and tokenizer.token_to_id(suffix) is not None:
        ids.append(tokenizer.token_to_id(suffix))
    return sorted(set(ids))


# ================================================================================================ a run's parts
@dataclasses.dataclass
class Run:
    """Everything `train_and_evaluate` and `evaluate_checkpoint` share.

    `params` are sharded over `mesh` by `param_axes`; `memory` is None for a run without retrieval (its
    `memory_info` then empty); `data_options` are the keyword arguments of every `pipeline` dataset of the run;
    `init_info` is {'init_from', 'replaced': number of params taken from that checkpoint}. `lora` is the run's
    `LoraConfig` (None without LoRA); with one, `params` and `param_axes` hold the adapters as 'lora' (see
    `jaxalign.programs.tinyalign_lora`: run the model on `tinyalign_lora.model_params(params, run.lora)`).
    """

    config: ConfigDict
    workdir: str
    mesh: Any
    tokenizer: Tokenizer
    template: chat_templates.ChatTemplate
    sources: dict
    cfg: model_lib.TinyAlignConfig
    params: dict
    param_axes: dict
    memory: memory_keys.RetrievalMemory | None
    memory_info: dict
    data_options: dict
    init_info: dict
    lora: lora_lib.LoraConfig | None = None


def build_run(config: ConfigDict, workdir: str) -> Run:
    """The mesh, data sources, tokenizer, towers, model config, sharded params (a previous stage's trained ones
    written over the fresh connectors when `config.model.init_from` names its workdir), the pipeline options and
    the memory bank (loaded or built) of one run. With retrieval and a `config.retrieval.group_by`, the options
    hold `group_members` (`memory_keys.GroupMembers`), so that training batches carry each sample's group in the
    bank (`group_member_ids`, what leave_out 'group' excludes) and `memory_info['groups']` describes them."""
    # --- mesh --------------------------------------------------------------------------------------------------
    mesh = sharding.make_mesh(tuple(config.mesh))
    log.info("mesh %s over %d devices", dict(mesh.shape), mesh.size)

    # --- input -------------------------------------------------------------------------------------------------
    sources = data_sources(config)
    template = chat_templates.get_template(config.data.template)
    tokenizer = load_tokenizer(config, workdir, sources)

    # --- model -------------------------------------------------------------------------------------------------
    vision_cfg, vision_params, lm_cfg, lm_params = load_towers(config, tokenizer, mesh)  # already sharded
    cfg = model_config(config, vision_cfg, lm_cfg)
    # Leave-one-out (config.retrieval.leave_out; model_config turned it off for faithful mode or the older
    # leave_one_out=False). Bank ids of another data set name no training sample, so 'self' has nothing to leave
    # out there; 'group' compares images, which works across data sets.
    leave_out = config.retrieval.get("leave_out", "self")
    if leave_out not in ("none", "self", "group"):
        raise ValueError(f"config.retrieval.leave_out={leave_out!r}; expected 'none', 'self' or 'group'")
    if leave_out == "group" and not cfg.leave_one_out:
        raise ValueError("config.retrieval.leave_out='group' contradicts " + (
            "mode 'faithful' (the official recipe leaves nothing out)" if cfg.query.mode == "faithful"
            else "config.retrieval.leave_one_out=False (the older switch for leave_out='none')"))
    if leave_out == "group" and not config.retrieval.get("group_by", "image"):
        raise ValueError("config.retrieval.leave_out='group' needs config.retrieval.group_by (e.g. 'image')")
    if leave_out == "none" or (leave_out == "self" and sources["memory"] is not sources["train"]):
        cfg = dataclasses.replace(cfg, leave_one_out=False)
    cfg = dataclasses.replace(cfg, leave_out_group=cfg.leave_one_out and leave_out == "group")
    params = {"vision": vision_params, "lm": lm_params,
              **model_lib.init_connectors(cfg, jax.random.PRNGKey(config.seed),
                                          identity_retrieval=config.model.identity_retrieval_init)}
    param_axes = model_lib.logical_axes(cfg)
    # LoRA adapters (B = 0: the model is unchanged), before init_from so that a LoRA run's adapters carry over.
    lora = tinyalign_lora.lora_config(config)
    if lora is not None:
        params, param_axes = tinyalign_lora.add_adapters(params, param_axes, lora,
                                                         jax.random.fold_in(jax.random.PRNGKey(config.seed), 1))
        log.info("LoRA rank %d, alpha %g on %d kernels (%d adapter parameters)", lora.rank, lora.alpha,
                 len(lora_lib.target_paths(params, lora.targets)), tinyalign_lora.adapter_count(params))
    init_info = {"init_from": config.model.init_from, "replaced": 0}
    if config.model.init_from:
        params, replaced = overwrite_params(params, read_checkpoint_params(config.model.init_from),
                                            config.model.init_from)
        init_info["replaced"] = len(replaced)
        log.info("initialised %d parameters from %s", len(replaced), config.model.init_from)
    params = sharding.shard_params(params, param_axes, mesh)
    from jaxalign.data import image_ops

    mean, std = image_ops.NORMALISATION[vision_cfg.variant]
    data_options = dict(tokenizer=tokenizer, template=template, image_size=vision_cfg.image_size, mean=mean, std=std,
                        max_length=cfg.max_length, insert_retrieval=cfg.retrieval and config.data.insert_retrieval,
                        image_length=cfg.num_image_tokens, retrieval_length=max(cfg.num_retrieved_tokens, 1),
                        truncate=config.data.truncate, pad_to_square=config.data.pad_to_square,
                        fail_fast=config.data.fail_fast, length_buckets=tuple(config.data.length_buckets),
                        group_by_length=config.data.group_by_length)
    if config.data.length_buckets and cfg.retrieval and not data_options["insert_retrieval"]:
        # Without a <rag> sentinel the pipeline cannot count the retrieved tokens in a sample's length, so a
        # bucket could cut real tokens (answers) off the end of the spliced sequence.
        raise ValueError("config.data.length_buckets needs config.data.insert_retrieval=True when retrieval is on")

    # --- memory bank -------------------------------------------------------------------------------------------
    memory, memory_info = None, {}
    if cfg.retrieval:
        memory, memory_info = build_memory(config, workdir, mesh, cfg, params, sources, data_options)

    # --- leave-one-out groups: the bank ids of each training sample's group, a [B, G] field of its batches -----
    # Computed for every retrieval run with a group_by: 'group' excludes them, and every run reports how often a
    # sample retrieves its own group ('same_group_retrieved'). Evaluation batches never carry them.
    group_by = config.retrieval.get("group_by", "image")
    if memory is not None and group_by:
        import time

        from jaxalign.data import pipeline

        data, started = config.data, time.perf_counter()
        llava = data.kind == "llava"
        groups = memory_keys.source_group_members(
            sources["train"], pipeline.select_fraction(len(sources["train"]), data.fraction, data.fraction_seed),
            sources["memory"], memory.bank.host_ids(), group_by,
            train_image_root=data.image_root if llava else "",
            memory_image_root=(data.memory_image_root if data.memory_json else data.image_root) if llava else "")
        data_options["group_members"] = groups
        memory_info["groups"] = {"group_by": group_by, "leave_out": cfg.leave_out, "count": groups.num_groups,
                                 "largest": groups.width}
        log.info("leave-one-out groups by %s: %d groups in the bank, the largest of %d entries (%.1f s)", group_by,
                 groups.num_groups, groups.width, time.perf_counter() - started)
    return Run(config, workdir, mesh, tokenizer, template, sources, cfg, params, param_axes, memory, memory_info,
               data_options, init_info, lora)


def build_memory(config: ConfigDict, workdir: str, mesh: jax.sharding.Mesh, cfg: model_lib.TinyAlignConfig,
                 params: dict, sources: dict, data_options: dict) -> tuple[memory_keys.RetrievalMemory, dict]:
    """Loads the run's bank when its fingerprint matches, else builds it with the frozen encoders from the memory
    source (the training data unless config.data names another) and saves it with its manifest.

    The bank holds `config.retrieval.memory_fraction` of its source: 'same' is the fraction the run trains on
    (all of a separate memory source), a number is that fraction whatever the training fraction (the same
    seeded selection, so a 40% training subset lies inside a 100% bank, whose ids are the same source rows). The
    fraction is part of the fingerprint's source name, and of the returned info ('fraction'). The control's data
    comes with the bank (`memory_keys.control_memory`; info 'shuffle'); for 'oracle' this also sets
    `data_options['oracle_values']`, so every dataset of the run carries `oracle_value_ids` (info 'oracle')."""
    retrieval, data = config.retrieval, config.data
    directory = retrieval.memory_dir or os.fspath(epath.Path(workdir) / "memory")
    own_source = sources["memory"] is sources["train"]
    requested = retrieval.get("memory_fraction", "same")
    if requested == "same":
        fraction = float(data.fraction) if own_source else 1.0
    else:
        try:
            fraction = float(requested)
        except (TypeError, ValueError):
            fraction = None
        if fraction is None or not 0.0 < fraction <= 1.0:
            raise ValueError(f"config.retrieval.memory_fraction={requested!r}; expected 'same' or a number in "
                             "(0, 1] (the share of the memory source the bank holds)")
    if own_source:
        name = data.train_config if data.kind == "easy_vqa" else data.train_json
        source_name = f"{data.kind}:{name}:fraction={fraction}:seed={data.fraction_seed}"
    else:
        source_name = f"{data.kind}:{data.memory_config if data.kind == 'easy_vqa' else data.memory_json}"
        if fraction != 1.0:
            source_name += f":fraction={fraction}:seed={data.fraction_seed}"
    source_name += f":template={data.template}"
    perceiver_cfg = perceiver_config(config, cfg) if cfg.value_kind == "latents" else None
    # Faithful values come from the seeded Perceiver: its settings and initialisation scheme name the bank too.
    extra = ({"perceiver": dataclasses.asdict(perceiver_cfg), "perceiver_init": value_encoders.PERCEIVER_INIT}
             if perceiver_cfg else TOKEN_VALUE_FORMAT)
    # Token values are the text of an answer / caption without the template's end-of-turn and end-of-text tokens.
    stop_ids = stop_token_ids(data_options["tokenizer"], data_options["template"])
    fingerprint = memory_keys.memory_fingerprint(params, cfg, source_name, extra)
    skipped: dict = {}  # the build pass's skip report (a bank reused from disk was built earlier: none)

    def build():
        from jaxalign.data import pipeline  # the input pipeline (grain) is needed only to build a bank

        perceiver_params = (value_encoders.init_perceiver_values(perceiver_cfg) if perceiver_cfg else None)
        batches = pipeline.make_eval_dataset(sources["memory"], batch_size=retrieval.build_batch_size,
                                             fraction=fraction, fraction_seed=data.fraction_seed,
                                             for_generation=False, verbose=False, **data_options)
        encode = model_lib.make_bank_encoder(cfg, perceiver_cfg)
        host_batches = memory_keys.memory_batches(
            batches, data_options["tokenizer"], cfg.value_kind, cfg.value_length,
            perceiver_cfg.max_text_bytes if perceiver_cfg else 0, drop_ids=stop_ids)
        encode_batch = sharding.trace_in_mesh(functools.partial(encode, params, perceiver_params), mesh)
        bank = memory_keys.build_bank(encode_batch, host_batches, mesh, total=len(batches))
        # Every record the bank could not take is counted (this process's slice), never silently dropped.
        skipped.update(batches.report.to_json())
        if batches.report.counts:
            log.warning("memory bank build skipped records: %s", batches.report)
        return bank

    bank, info = memory_keys.load_or_build_bank(directory, fingerprint, build, mesh,
                                                extra={"source": source_name, "mode": cfg.query.mode})
    # Each process built its own rows: the report of the whole bank is the sum of theirs (the same on every process).
    from jaxalign.data.batching import SkipReport
    from jaxalign.programs import training

    reports = training.gather_json(skipped)
    info["build_skipped"] = None
    if any(reports):
        total = SkipReport()
        for report in reports:
            total = total.merge(SkipReport.from_json(report)) if report else total
        info["build_skipped"] = total.to_json()
    # The control's permutation ('shuffled': all rows; 'shuffle_within_group': within the rows' groups, read from
    # the memory source) and, for 'oracle', each batch's own value in the bank's token form (options of every
    # dataset of the run, training and evaluation; a question's caption for an easy-vqa captions bank).
    memory, control_info = memory_keys.control_memory(bank, cfg.control, sources["memory"])
    if cfg.control.kind == "oracle":
        caption_bank = data.kind == "easy_vqa" and not own_source and data.memory_config == "captions"
        oracle_source = "caption" if caption_bank and data.train_config != "captions" else "answer"
        data_options["oracle_values"] = memory_keys.oracle_values(cfg.value_length, oracle_source, stop_ids)
        control_info["oracle"] = {"value": oracle_source}
    return memory, {**info, "fraction": fraction, **control_info}
