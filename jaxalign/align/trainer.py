"""TinyAlign training stages and evaluation: `train_and_evaluate(config, workdir) -> results`.

One linear run, read top to bottom (big_vision style): logging, mesh, input, model, memory bank, optimizer,
update step, training loop (resume, checkpoints, metrics, NaN stop: `jaxalign.train.loop`), evaluation.
The config files are `jaxalign/configs/tinyalign_*.py`; their docstrings hold the commands.

Stages differ only by config: stage 1 (captions) trains the connector and the retrieval connector, stage 2
(instructions / questions) also trains the LM; the vision tower is always frozen. A stage-2 run starts from the
final checkpoint of a stage-1 workdir (`config.model.init_from`).

Files of a run (`workdir/`): config.json (resolved config), tokenizer/ (tiny runs: the trained word-level
tokenizer), memory/ (the bank and its manifest, reused when the fingerprint matches), checkpoints/,
metrics.jsonl, tensorboard/, results.json.

Public API:
  train_and_evaluate(config, workdir) -> results dict (also written to workdir/results.json)
  evaluate_checkpoint(config, workdir) -> results dict of the latest checkpoint (no training)
  make_evaluator(run) -> evaluate(params, progress=None) -> {loss, perplexity, num_tokens, vqa, vqa_accuracy}
  data_sources(config) -> {'train', 'eval', 'memory', 'build_reports'}
  load_tokenizer(config, workdir, sources) -> Tokenizer;  load_towers(config, tokenizer)
  model_config(config, vision_cfg, lm_cfg) -> TinyAlignConfig
  freeze_rules(trainable, transform) -> [(regex, transform | None)]
  read_checkpoint_params(workdir) -> {'connector/dense_0/kernel': array, ...};  overwrite_params(params, saved, source)
  stop_token_ids(tokenizer, template) -> ids that end a generated answer

Known limit: with several processes, VQA accuracy is tallied per host (each host scores its own slice); the loss
and perplexity are global.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from jaxalign import sharding
from jaxalign.align import loss as loss_lib
from jaxalign.align import memory_keys
from jaxalign.align import model as model_lib
from jaxalign.align import value_encoders
from jaxalign.align.controls import RetrievalControl
from jaxalign.align.query import QueryConfig
from jaxalign.data import chat_templates, image_ops, pipeline
from jaxalign.data.batching import SkipReport
from jaxalign.data.tokenizer import Tokenizer, train_word_level_tokenizer
from jaxalign.evaluate import lm_loss, vqa
from jaxalign.models import connector, decoder, generate, vit
from jaxalign.train import loop, optimizer as opt_lib
from jaxalign.train.state import create_train_state, state_shardings
from jaxalign.train.step import make_train_step

log = logging.getLogger(__name__)
ConfigDict = ml_collections.ConfigDict
STAGE_TRAINABLE = {1: ("connector", "retrieval_connector"), 2: ("connector", "retrieval_connector", "lm")}


# ================================================================================================ input
def _llava_source(data: ConfigDict, json_file: str, name: str, image_root: str):
    import tensorflow_datasets as tfds
    from jaxalign.data import llava

    config = llava.LlavaConfig(name=name, json_file=json_file, image_root=image_root)
    builder, report = llava.prepare_llava(config, manual_dir=data.manual_dir, data_dir=data.data_dir,
                                          fail_fast=data.fail_fast)
    source = tfds.data_source(f"{llava.LlavaDataset.name}/{name}", data_dir=data.data_dir, split="train")
    return source, report


def data_sources(config: ConfigDict) -> dict[str, Any]:
    """{'train', 'eval', 'memory' (sources; 'memory' is the bank's, the training source unless
    config.data.memory_config / memory_json names another), 'build_reports' (name -> SkipReport JSON)}."""
    data = config.data
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
    for folder in (os.path.join(workdir, "tokenizer"),
                   os.path.join(model.init_from, "tokenizer") if model.init_from else ""):
        if folder and os.path.isfile(os.path.join(folder, "tokenizer.json")):
            return Tokenizer.from_folder(folder)
    # Every template's marker tokens and words are in the vocabulary, so stage 2 can switch templates.
    specials = ("<pad>", "<unk>", "<s>", "</s>") + tuple(dict.fromkeys(
        token for template in chat_templates.TEMPLATES.values() for token in template.required_tokens))
    tokenizer = train_word_level_tokenizer(tokenizer_corpus(config, sources), special_tokens=specials)
    if jax.process_index() == 0:
        tokenizer.save_folder(os.path.join(workdir, "tokenizer"))
    return tokenizer


# ================================================================================================ model
def load_towers(config: ConfigDict, tokenizer: Tokenizer) -> tuple[vit.VisionConfig, dict, decoder.DecoderConfig, dict]:
    """(vision cfg, vision params, LM cfg, LM params): from Hugging Face folders or tiny random ones."""
    model = config.model
    if model.source == "hf":
        from jaxalign.io import hf_lm, hf_vision

        vision_cfg, vision_params = hf_vision.load(model.vision_folder, dtype=model.dtype)
        lm_cfg, lm_params = hf_lm.load(model.lm_folder, dtype=model.dtype)
        if tokenizer.vocab_size > lm_cfg.vocab_size:
            raise ValueError(f"the tokenizer of {model.lm_folder} has {tokenizer.vocab_size} ids but the LM only "
                             f"{lm_cfg.vocab_size} embedding rows")
        return vision_cfg, jax.tree.map(jnp.asarray, vision_params), lm_cfg, lm_params
    if model.source != "random":
        raise ValueError(f"config.model.source={model.source!r}; expected 'hf' or 'random'")
    vision_cfg = vit.VisionConfig(**model.random_vision.to_dict(), use_head=False, dtype=model.dtype)
    lm_cfg = decoder.DecoderConfig(**model.random_lm.to_dict(), vocab_size=tokenizer.vocab_size, dtype=model.dtype,
                                   eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    vision_key, lm_key = jax.random.split(jax.random.PRNGKey(model.random_seed))
    return vision_cfg, vit.init(vision_cfg, vision_key), lm_cfg, decoder.init(lm_cfg, lm_key)


def model_config(config: ConfigDict, vision_cfg: vit.VisionConfig, lm_cfg: decoder.DecoderConfig
                 ) -> model_lib.TinyAlignConfig:
    """The `TinyAlignConfig` of a run from its ConfigDict and the towers' configs."""
    model, retrieval = config.model, config.retrieval
    faithful = retrieval.mode == "faithful"
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
                          text_weight=retrieval.text_weight, text_start=retrieval.text_start),
        control=RetrievalControl(kind=retrieval.control, seed=retrieval.shuffle_seed,
                                 constant_row=retrieval.constant_row),
        value_kind=value_kind, value_length=value_length, k=retrieval.k,
        leave_one_out=retrieval.leave_one_out and not faithful, vision_layer=model.vision_layer,
        drop_first_vision_token=model.drop_first_vision_token, search_method=retrieval.search_method,
        max_length=model.max_length, loss_chunk_size=model.loss_chunk_size)


def _perceiver_config(config: ConfigDict, cfg: model_lib.TinyAlignConfig) -> value_encoders.PerceiverValueConfig:
    p = config.retrieval.perceiver
    return value_encoders.PerceiverValueConfig(
        num_latents=p.num_latents, latent_dim=p.latent_dim, num_self_layers=p.num_self_layers,
        image_size=cfg.vision.image_size, max_text_bytes=p.max_text_bytes, seed=p.seed)


def read_checkpoint_params(workdir: str) -> dict[str, np.ndarray]:
    """{'connector/dense_0/kernel': array, ...}: the params saved in the latest checkpoint of a run (only its
    trainable ones: frozen towers are never saved)."""
    directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
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


# ================================================================================================ helpers
def freeze_rules(trainable: tuple[str, ...], transform) -> list:
    """Freeze rules: the listed top-level parts train with `transform`, everything else is frozen."""
    unknown = set(trainable) - {"connector", "retrieval_connector", "lm", "vision"}
    if unknown:
        raise ValueError(f"config.train.trainable has unknown parts {sorted(unknown)}; use connector, "
                         "retrieval_connector, lm")
    if "vision" in trainable:
        raise ValueError("the vision tower stays frozen in TinyAlign (its features key the memory bank)")
    return [(f"({'|'.join(trainable)})/.*", transform), (".*", None)]


def _device_batch(batch: dict, mesh) -> dict:
    return sharding.global_batch(model_lib.numpy_batch(batch), mesh)


def _host_rows(array: jax.Array, mesh) -> np.ndarray:
    """This host's rows of a batch-sharded global array."""
    if getattr(array, "is_fully_addressable", True):
        return np.asarray(array)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.global_array_to_host_local_array(
        array, mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))


@dataclasses.dataclass
class _Run:
    """Everything `train_and_evaluate` and `evaluate_checkpoint` share."""

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


def _setup(config: ConfigDict, workdir: str) -> _Run:
    # --- mesh --------------------------------------------------------------------------------------------------
    mesh = sharding.make_mesh(tuple(config.mesh))
    log.info("mesh %s over %d devices", dict(mesh.shape), mesh.size)

    # --- input -------------------------------------------------------------------------------------------------
    sources = data_sources(config)
    template = chat_templates.get_template(config.data.template)
    tokenizer = load_tokenizer(config, workdir, sources)

    # --- model -------------------------------------------------------------------------------------------------
    vision_cfg, vision_params, lm_cfg, lm_params = load_towers(config, tokenizer)
    cfg = model_config(config, vision_cfg, lm_cfg)
    if cfg.leave_one_out and sources["memory"] is not sources["train"]:
        # Bank ids index another data set, so a training sample has no entry of its own to leave out.
        cfg = dataclasses.replace(cfg, leave_one_out=False)
    params = {"vision": vision_params, "lm": lm_params,
              **model_lib.init_connectors(cfg, jax.random.PRNGKey(config.seed),
                                          identity_retrieval=config.model.identity_retrieval_init)}
    init_info = {"init_from": config.model.init_from, "replaced": 0}
    if config.model.init_from:
        params, replaced = overwrite_params(params, read_checkpoint_params(config.model.init_from),
                                            config.model.init_from)
        init_info["replaced"] = len(replaced)
        log.info("initialised %d parameters from %s", len(replaced), config.model.init_from)
    param_axes = model_lib.logical_axes(cfg)
    params = sharding.shard_params(params, param_axes, mesh)
    mean, std = image_ops.NORMALISATION[vision_cfg.variant]
    data_options = dict(tokenizer=tokenizer, template=template, image_size=vision_cfg.image_size, mean=mean, std=std,
                        max_length=cfg.max_length, insert_retrieval=cfg.retrieval and config.data.insert_retrieval,
                        image_length=cfg.num_image_tokens, retrieval_length=max(cfg.num_retrieved_tokens, 1),
                        truncate=config.data.truncate, pad_to_square=config.data.pad_to_square,
                        fail_fast=config.data.fail_fast)

    # --- memory bank -------------------------------------------------------------------------------------------
    memory, memory_info = None, {}
    if cfg.retrieval:
        memory, memory_info = _memory(config, workdir, mesh, cfg, params, sources, data_options)
    return _Run(config, workdir, mesh, tokenizer, template, sources, cfg, params, param_axes, memory, memory_info,
                data_options, init_info)


def _memory(config, workdir, mesh, cfg, params, sources, data_options):
    """Loads the run's bank when its fingerprint matches, else builds it from the training data (the same
    fraction the run trains on) with the frozen encoders, and saves it with its manifest."""
    retrieval, data = config.retrieval, config.data
    directory = retrieval.memory_dir or os.path.join(workdir, "memory")
    if sources["memory"] is sources["train"]:
        name = data.train_config if data.kind == "easy_vqa" else data.train_json
        source_name = f"{data.kind}:{name}:fraction={data.fraction}:seed={data.fraction_seed}"
    else:
        source_name = f"{data.kind}:{data.memory_config if data.kind == 'easy_vqa' else data.memory_json}"
    source_name += f":template={data.template}"
    fingerprint = memory_keys.memory_fingerprint(params, cfg, source_name)
    perceiver_cfg = _perceiver_config(config, cfg) if cfg.value_kind == "latents" else None

    def build():
        perceiver_params = (value_encoders.init_perceiver_values(perceiver_cfg) if perceiver_cfg else None)
        own_source = sources["memory"] is sources["train"]
        batches = pipeline.make_eval_dataset(sources["memory"], batch_size=retrieval.build_batch_size,
                                             fraction=data.fraction if own_source else 1.0,
                                             fraction_seed=data.fraction_seed,
                                             for_generation=False, verbose=False, **data_options)
        encode = model_lib.make_bank_encoder(cfg, perceiver_cfg)
        host_batches = memory_keys.memory_batches(
            batches, data_options["tokenizer"], cfg.value_kind, cfg.value_length,
            perceiver_cfg.max_text_bytes if perceiver_cfg else 0)
        return memory_keys.build_bank(functools.partial(encode, params, perceiver_params), host_batches, mesh,
                                      total=len(batches))

    bank, info = memory_keys.load_or_build_bank(directory, fingerprint, build, mesh,
                                                extra={"source": source_name, "mode": cfg.query.mode})
    memory = memory_keys.RetrievalMemory.create(
        bank, cfg.control.seed if cfg.control.kind == "shuffled" else None)
    return memory, info


def stop_token_ids(tokenizer: Tokenizer, template: chat_templates.ChatTemplate) -> list[int]:
    """Ids that end a generated answer: the tokenizer's EOS and the template's end-of-turn token when it is a
    single token (Qwen2's <|im_end|> differs from the base model's EOS)."""
    ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    suffix = template.assistant_suffix.replace(chat_templates.EOS_MARKER, "").strip()
    if suffix and tokenizer.token_to_id(suffix) is not None:
        ids.append(tokenizer.token_to_id(suffix))
    return sorted(set(ids))


def make_evaluator(run: _Run):
    """`evaluate(params, progress) -> results`: eval loss / perplexity and, when the config asks, VQA accuracy
    per question type. The jitted functions are made once, so periodic evaluations compile nothing new."""
    config, cfg, mesh = run.config, run.cfg, run.mesh
    options = dict(run.data_options, fraction=config.eval.fraction, fraction_seed=config.data.fraction_seed,
                   verbose=False)
    loss_step = jax.jit(lambda p, b, m: loss_lib.make_loss_fn(cfg, m, train=False)(p, b, None)[1])
    prefill = jax.jit(lambda p, b, m: model_lib.build_lm_inputs(p, cfg, b, m, False, "left")[0])
    stop_ids = stop_token_ids(run.tokenizer, run.template)
    max_batches = config.eval.max_batches or None

    def evaluate(params: dict, progress: bool | None = None) -> dict[str, Any]:
        results: dict[str, Any] = {}
        show = progress is not False
        if config.eval.loss:
            batches = pipeline.make_eval_dataset(run.sources["eval"], batch_size=config.eval.batch_size, **options)
            results.update(lm_loss.evaluate_loss(lambda b: loss_step(params, b, run.memory), batches,
                                                 to_device=lambda b: _device_batch(b, mesh),
                                                 max_batches=max_batches, progress=show))
        if config.eval.vqa:
            def generate_fn(batch):
                spliced = prefill(params, _device_batch(batch, mesh), run.memory)
                out = generate.generate(params["lm"], cfg.lm, inputs_embeds=spliced.inputs_embeds,
                                        attention_mask=spliced.attention_mask,
                                        max_new_tokens=config.eval.max_new_tokens, eos_id=stop_ids,
                                        pad_id=run.tokenizer.pad_id)
                return _host_rows(out.tokens, mesh)

            batches = pipeline.make_eval_dataset(run.sources["eval"], batch_size=config.eval.batch_size,
                                                 for_generation=True, **options)
            accuracy, examples = vqa.evaluate_vqa(
                generate_fn, batches, run.tokenizer,
                max_examples=max_batches * config.eval.batch_size if max_batches else None, progress=show)
            results["vqa"] = accuracy
            results["vqa_accuracy"] = accuracy["accuracy"]
            results["vqa_examples"] = examples
        return results

    return evaluate


# ================================================================================================ main
def train_and_evaluate(config: ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) one TinyAlign stage and evaluates it; returns the results dict (see module docstring).

    The dict holds: stage, control, mode, k, fraction, steps, train_loss_first / _last, loss_history,
    seconds_per_step, compile_seconds, eval (loss, perplexity, vqa), memory (path, reused, count, key_dim),
    data (tfds build reports and the skip reports of the training passes, with sample ids).
    """
    # --- logging -----------------------------------------------------------------------------------------------
    os.makedirs(workdir, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    log.info("TinyAlign stage %d (control %s, mode %s) in %s", config.stage, config.retrieval.control,
             config.retrieval.mode, workdir)

    # --- mesh, input, model, memory bank -------------------------------------------------------------------------
    run = _setup(config, workdir)
    cfg, mesh = run.cfg, run.mesh

    # --- optimizer: freeze rules of the stage, AdamW with warm-up and cosine decay ------------------------------
    train = config.train
    global_batch_size = train.batch_size
    if global_batch_size % jax.process_count():
        raise ValueError(f"config.train.batch_size={global_batch_size} must divide over "
                         f"{jax.process_count()} processes")
    selected = len(pipeline.select_fraction(len(run.sources["train"]), config.data.fraction,
                                            config.data.fraction_seed))
    total_steps = train.total_steps or max(1, int(train.num_epochs * selected // global_batch_size))
    schedule = opt_lib.warmup_cosine_schedule(train.learning_rate, total_steps, warmup_ratio=train.warmup_ratio,
                                              end_ratio=train.end_lr_ratio)
    adamw = opt_lib.adamw(schedule, weight_decay=train.weight_decay, clip_norm=train.clip_norm or None)
    trainable = tuple(train.trainable) if train.trainable else STAGE_TRAINABLE[config.stage]
    rules = freeze_rules(trainable, adamw)
    optimizer = opt_lib.build_optimizer(run.params, rules)
    mask = opt_lib.trainable_mask(run.params, rules)
    state = create_train_state(run.params, optimizer, jax.random.PRNGKey(config.seed + 1))
    shardings = state_shardings(state, run.param_axes, mesh)
    state = jax.device_put(state, shardings)

    # --- update step: one jit over (state, batch, memory), the bank searched inside -----------------------------
    def step_with_memory(state, batch, memory):
        step = make_train_step(loss_lib.make_loss_fn(cfg, memory, train=True), optimizer, mask,
                               accum_steps=train.accum_steps, learning_rate_fn=schedule)
        return step(state, batch)

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    memory_shardings = jax.tree.map(lambda leaf: leaf.sharding, run.memory)
    jitted = jax.jit(step_with_memory, in_shardings=(shardings, sharding.batch_sharding(mesh, 1), memory_shardings),
                     out_shardings=(shardings, replicated), donate_argnums=0)
    step_times: list[float] = []

    def train_step(state, batch):
        start = time.perf_counter()
        new_state, metrics = jitted(state, batch, run.memory)
        jax.block_until_ready(metrics["loss"])
        step_times.append(time.perf_counter() - start)
        return new_state, metrics

    # --- input iterator, resumable at any step ------------------------------------------------------------------
    iterators: list[pipeline.TrainBatches] = []

    def batch_iterator_factory(start_step: int):
        iterator = pipeline.make_vqa_dataset(
            run.sources["train"], batch_size=global_batch_size // jax.process_count(), seed=config.seed,
            fraction=config.data.fraction, fraction_seed=config.data.fraction_seed, start_step=start_step,
            **run.data_options)
        iterators.append(iterator)
        return (_device_batch(batch, mesh) for batch in iterator)

    # --- training loop ------------------------------------------------------------------------------------------
    evaluate = make_evaluator(run)
    eval_fn = None
    if train.eval_every:
        def eval_fn(current):
            return {name: value for name, value in evaluate(current.params, progress=False).items()
                    if isinstance(value, float)}
    result = loop.train(state=state, train_step=train_step, batch_iterator_factory=batch_iterator_factory,
                        total_steps=total_steps, workdir=workdir, log_every=train.log_every,
                        checkpoint_every=train.checkpoint_every, keep=train.keep_checkpoints, config=config,
                        eval_fn=eval_fn, eval_every=train.eval_every or None, checkpoint_trainable_mask=mask,
                        examples_per_step=global_batch_size, progress=config.progress)

    # --- evaluation ---------------------------------------------------------------------------------------------
    evaluation = evaluate(result.state.params, progress=config.progress) if config.eval.at_end else {}
    losses = [record["loss"] for record in result.history if "loss" in record]
    skipped = SkipReport()
    for iterator in iterators:
        for report in iterator.reports + [iterator.report]:
            skipped = skipped.merge(report)
    results = {
        "workdir": workdir, "stage": config.stage, "control": cfg.control.kind, "mode": cfg.query.mode,
        "k": cfg.k, "fraction": config.data.fraction, "steps": int(result.state.step), "total_steps": total_steps,
        "trainable": list(trainable), "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "loss_history": [(r["step"], r["loss"]) for r in result.history if "loss" in r],
        "seconds_per_step": float(np.median(step_times[1:])) if len(step_times) > 1 else None,
        "compile_seconds": step_times[0] if step_times else None,
        "eval": evaluation, "memory": run.memory_info, "init": run.init_info,
        "data": {"build_reports": run.sources["build_reports"], "train_skipped": skipped.to_json()},
    }
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as file:
            json.dump(results, file, indent=1, default=str)
    return results


def evaluate_checkpoint(config: ConfigDict, workdir: str) -> dict[str, Any]:
    """Evaluates the latest checkpoint of `workdir` (loss, perplexity, VQA accuracy) without training."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    run = _setup(config, workdir)
    params, replaced = overwrite_params(run.params, read_checkpoint_params(workdir), workdir)
    params = sharding.shard_params(params, run.param_axes, run.mesh)
    evaluation = make_evaluator(run)(params, progress=config.progress)
    return {"workdir": workdir, "restored_params": len(replaced), "eval": evaluation, "memory": run.memory_info}
