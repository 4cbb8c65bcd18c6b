"""The TinyAlign training step at real size: memory and FLOPs from the compiled program, and speed on a GPU.

    JAX_PLATFORMS=cpu python bench/train_step.py --estimate          # any machine, no weights, a few minutes
    python bench/train_step.py --gpu                                  # one GPU, with the PyTorch peer beside it
    python bench/train_step.py --gpu --tiny                           # the GPU rows' code on tiny towers (CPU)

**--estimate** makes 8 fake CPU devices, builds the real shapes of `jaxalign/configs/tinyalign_qwen2.py`
(SigLIP-so400m-patch14-384 + Qwen2-0.5B, written out below: no Hugging Face folder is read and no weight is
allocated), lowers the trainer's own update step on abstract inputs (`jax.ShapeDtypeStruct`s carrying the
run's shardings, the memory bank included), compiles it and prints one JSON line per setting:

  stage, per_device_batch (micro-batch per device), devices, accum_steps, seq_len, attention, remat, recipe,
  peak_bytes / peak_gib (argument + temp bytes per device: `compiled.memory_analysis()`),
  flops_per_sample (matrix-product FLOPs of the compiled program, loop bodies times their trip counts, per
  sample of the global batch: `jaxalign.train.compiled_cost`), model_flops_per_sample (2 N T + 4 N_trainable T,
  each part with its own token count), flops_ratio, compile_seconds.

Exactly one row per stage has `recipe: true` (the config's own batch, accumulation, attention and remat); a
stage-2 row at micro-batch 16 with the same defaults, a stage-2 LoRA row at the recipe's micro-batch (`LORA`:
adapters of rank 128 on every LM projection, as LLaVA-1.5's LoRA recipe; the LM frozen in bfloat16; its
`overrides` say so, `lora_adapter_params` counts them) and any other explored setting have `recipe: false`.

**--gpu** times real-size steps on synthetic batches at the peer's shape (729 image + 256 text tokens, random
bfloat16 weights), with and without retrieval (k = 10 over a 558,128-row bank), and runs the PyTorch peer
`../shared/peers/torch_vlm_step.py` (eager and torch.compile) in the same command. Rows come in order of
importance: stage 2 at batch 16 and 32 with the compiled peer, the memory-bank search, then the rest. Each row:
ms_per_step, samples_per_s, mfu (model_flops_per_sample x samples/s / peak, PEAK_TFLOPS env, default 989 dense
bf16 for H100 / H200), mfu_peer_formula (the same with the peer's own FLOP count, for its approx_MFU), and the
peer's own line. The GPU machine has no tensorflow-datasets or grain, which this script does not need; it needs
ml_collections (carry a folder with it on PYTHONPATH if the machine lacks it).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER_STEP = ROOT.parent / "shared" / "peers" / "torch_vlm_step.py"
ESTIMATE_DEVICES = 8


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--estimate", action="store_true", help="compile on 8 fake CPU devices; memory and FLOPs")
    mode.add_argument("--gpu", action="store_true", help="time steps on this machine's accelerator")
    parser.add_argument("--stages", default="1,2", help="stages to estimate (default: %(default)s)")
    parser.add_argument("--explore", action="store_true",
                        help="--estimate: also einsum attention without remat (before this work) and each remat "
                        "policy, recipe: false")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny towers and sequences instead of the real shapes (checks the code quickly)")
    parser.add_argument("--steps", type=int, default=10, help="--gpu: timed steps per row (after 3 warm-up)")
    parser.add_argument("--rows", default="", help="--gpu: comma-separated row names to run (default: all)")
    parser.add_argument("--no-peer", action="store_true", help="--gpu: do not run the PyTorch peer")
    return parser.parse_args(argv)


args = parse_args() if __name__ == "__main__" else None
if args is not None and args.estimate:
    # Fake devices must be requested before jax starts.
    os.environ["JAX_PLATFORMS"] = "cpu"
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={ESTIMATE_DEVICES}".strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(ROOT))
from jaxalign import sharding  # noqa: E402
from jaxalign.align import memory_keys, update_step  # noqa: E402
from jaxalign.programs import tinyalign_lora  # noqa: E402
from jaxalign.programs import tinyalign_setup as setup  # noqa: E402
from jaxalign.align import model as model_lib  # noqa: E402
from jaxalign.configs import tinyalign_qwen2  # noqa: E402
from jaxalign.configs.tinyalign_common import lora_targets  # noqa: E402
from jaxalign.data.chat_templates import IMAGE_TOKEN_ID  # noqa: E402
from jaxalign.data.length_buckets import real_token_share  # noqa: E402
from jaxalign.data.length_stats import synthetic_mix665k_lengths  # noqa: E402
from jaxalign.memory import bank as bank_lib  # noqa: E402
from jaxalign.memory.bank import MemoryBank, padded_capacity  # noqa: E402
from jaxalign.models import decoder, layers, vit  # noqa: E402
from jaxalign.train import compiled_cost  # noqa: E402
from jaxalign.train import lora as lora_lib  # noqa: E402
from jaxalign.train import optimizer as opt_lib  # noqa: E402
from jaxalign.train.state import create_train_state, state_shardings  # noqa: E402

GIB = 1024 ** 3
# google/siglip-so400m-patch14-384 (vision_config) and Qwen/Qwen2-0.5B(-Instruct) config.json, written out.
SIGLIP_SO400M = dict(image_size=384, patch_size=14, hidden_size=1152, intermediate_size=4304, num_layers=27,
                     num_heads=16, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", variant="siglip",
                     use_head=True)
QWEN2_05B = dict(family="llama", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                 num_heads=14, num_kv_heads=2, rope_theta=1000000.0, norm_eps=1e-6, hidden_act="silu",
                 attention_bias=True, tie_word_embeddings=True, max_position_embeddings=32768,
                 bos_token_id=None, eos_token_id=151645, pad_token_id=151643)
TINY_VISION = dict(image_size=30, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                   variant="siglip", use_head=False)
TINY_LM = dict(family="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
               num_kv_heads=2, eos_token_id=1, pad_token_id=0)
TINY_LENGTH, TINY_BANK_ROWS = {"model.max_length": 128}, 1000
# Rows of the banks the recipe builds from its training data (LLaVA-Pretrain 558k, LLaVA-v1.5 mix 665k).
BANK_ROWS = {1: 558_128, 2: 665_298}
# The stage-2 LoRA row: LLaVA-1.5's LoRA setting (every LM projection, rank 128, alpha 256), as
# `tinyalign_qwen2.py:stage=2,lora=all` sets it.
LORA = {"model.lora.targets": lora_targets("all"), "model.lora.rank": 128, "model.lora.alpha": 256.0}


# ============================================================================================ the model's shapes
def real_config(stage: int, overrides: dict | None = None, vision: dict = SIGLIP_SO400M, lm: dict = QWEN2_05B):
    """(run ConfigDict, TinyAlignConfig) of the shipped recipe at `stage`, with `overrides` ('a.b': value)."""
    config = tinyalign_qwen2.get_config(f"stage={stage}")
    for dotted, value in (overrides or {}).items():
        node = config
        *parents, leaf = dotted.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    vision_cfg = vit.VisionConfig(**vision, dtype=config.model.dtype)
    lm_cfg = decoder.DecoderConfig(**lm, dtype=config.model.dtype)
    return config, setup.model_config(config, vision_cfg, lm_cfg)


def _spec_count(specs) -> int:
    return sum(int(np.prod(spec.shape)) for spec in jax.tree.leaves(specs, is_leaf=layers.is_spec))


def model_flops_per_sample(cfg: model_lib.TinyAlignConfig, trainable: tuple[str, ...], seq_len: int,
                           adapter_params: int = 0) -> float:
    """2 N T + 4 N_trainable T, each part with the tokens it sees (embedding lookups are not products).

    Vision: the layers that run (up to `vision_layer`) over the patches; connector: the patches; retrieval
    connector: the retrieved value tokens; LM: its blocks and the (tied) output head over `seq_len` positions;
    LoRA adapters (`adapter_params` of them, trained when 'lora' is in `trainable`): the LM's positions.
    """
    vision_specs = vit.param_specs(cfg.vision)
    depth = vit.resolve_layer(cfg.vision, cfg.vision_layer)
    vision = (_spec_count(vision_specs["embeddings"]["patch"])
              + _spec_count(vision_specs["layers"]) * depth // cfg.vision.num_layers)
    lm_specs = decoder.param_specs(cfg.lm)
    lm = _spec_count(lm_specs["layers"]) + _spec_count(lm_specs["final_norm"]) + cfg.lm.vocab_size * cfg.lm.hidden_size
    connector = _spec_count(model_lib.connector.param_specs(cfg.connector))
    retrieval = _spec_count(model_lib.connector.param_specs(cfg.retrieval_connector)) if cfg.retrieval else 0
    patches, retrieved = cfg.num_vision_tokens, cfg.num_retrieved_tokens
    parts = {"vision": (vision, patches), "connector": (connector, patches),
             "retrieval_connector": (retrieval, retrieved), "lm": (lm, seq_len), "lora": (adapter_params, seq_len)}
    total = sum(2.0 * n * t for n, t in parts.values())
    return total + sum(4.0 * parts[name][0] * parts[name][1] for name in trainable if name in parts)


def peer_formula_flops_per_sample(cfg: model_lib.TinyAlignConfig, stage: int, seq_len: int) -> float:
    """The peer's own MFU numerator (`torch_vlm_step.py`): vision forward, LM forward, and an LM backward of one
    (stage 1: input gradients) or two (stage 2: input and weight gradients) forward's worth; no connectors."""
    vision_specs = vit.param_specs(cfg.vision)
    vision = _spec_count(vision_specs["embeddings"]["patch"]) + _spec_count(vision_specs["layers"])
    lm_specs = decoder.param_specs(cfg.lm)
    lm = _spec_count(lm_specs["layers"]) + _spec_count(lm_specs["final_norm"]) + cfg.lm.vocab_size * cfg.lm.hidden_size
    return 2.0 * vision * cfg.num_vision_tokens + 2.0 * lm * seq_len * (1 + (2.0 if stage == 2 else 1.0))


# ============================================================================================ the update step
def abstract_params(cfg: model_lib.TinyAlignConfig, config) -> tuple[dict, dict]:
    """(params as `jax.ShapeDtypeStruct`s in the dtypes the run stores them, their logical axes); a LoRA config's
    adapters (float32) included as 'lora'."""
    dtypes = setup.stored_dtypes(config)
    shapes = jax.eval_shape(lambda: model_lib.init(cfg, jax.random.PRNGKey(0)))
    params = {part: jax.tree.map(lambda s, d=dtypes[part]: jax.ShapeDtypeStruct(s.shape, jnp.dtype(d)), tree)
              for part, tree in shapes.items()}
    axes = model_lib.logical_axes(cfg)
    lora = tinyalign_lora.lora_config(config)
    if lora is not None:
        specs = lora_lib.adapter_specs(params, axes, lora)
        params, axes = {**params, "lora": layers.shapes(specs)}, {**axes, "lora": layers.logical_axes(specs)}
    return params, axes


def abstract_memory(cfg: model_lib.TinyAlignConfig, rows: int, mesh) -> memory_keys.RetrievalMemory | None:
    """A bank of `rows` float32 keys and token values, row-sharded like a built one (no memory allocated)."""
    if not cfg.retrieval:
        return None
    capacity = padded_capacity(rows, mesh)

    def row_sharding(ndim: int) -> jax.sharding.NamedSharding:
        return bank_lib.row_sharding(mesh, ndim)
    bank = MemoryBank(keys=jax.ShapeDtypeStruct((capacity, cfg.key_dim), jnp.float32, sharding=row_sharding(2)),
                      ids=jax.ShapeDtypeStruct((capacity,), jnp.int32, sharding=row_sharding(1)),
                      values={"tokens": jax.ShapeDtypeStruct((capacity, cfg.value_length), jnp.int32,
                                                             sharding=row_sharding(2))},
                      metric="cosine", mesh=mesh)
    return memory_keys.RetrievalMemory(bank=bank, permutation=None, num_rows=rows)


def abstract_batch(cfg: model_lib.TinyAlignConfig, global_batch: int, seq_len: int, mesh) -> dict:
    batch_sharding = sharding.batch_sharding(mesh, 1)
    size = cfg.vision.image_size

    def leaf(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
    return {"pixels": leaf((global_batch, size, size, cfg.vision.num_channels), jnp.float32),
            "input_ids": leaf((global_batch, seq_len), jnp.int32), "labels": leaf((global_batch, seq_len), jnp.int32),
            "attention_mask": leaf((global_batch, seq_len), jnp.int32),
            **{name: leaf((global_batch,), jnp.int32)
               for name in ("image_index", "retrieval_index", "text_start", "sample_index")}}


def build_step(config, cfg, mesh, params, param_axes=None):
    """(update step, state shardings, abstract state, trainable parts, optimizer) for `params` (arrays or
    abstract) with logical axes `param_axes` (default: the model's, `model_lib.logical_axes`)."""
    train = config.train
    trainable = setup.trainable_parts(config)
    rules = setup.freeze_rules(trainable, setup.stage_optimizer(train, total_steps=1000))
    optimizer = opt_lib.build_optimizer(params, rules)
    mask = opt_lib.trainable_mask(params, rules)
    state = jax.eval_shape(lambda p: create_train_state(p, optimizer, jax.random.PRNGKey(0)), params)
    shardings = state_shardings(state, param_axes if param_axes is not None else model_lib.logical_axes(cfg), mesh)
    step = tinyalign_lora.make_update_step(cfg, tinyalign_lora.lora_config(config), optimizer, mask,
                                           train.accum_steps)
    return step, shardings, state, trainable, optimizer


# ============================================================================================ --estimate
def estimate_row(stage: int, per_device_batch: int, recipe: bool, overrides: dict | None = None,
                 tiny: bool = False) -> dict:
    vision, lm = (TINY_VISION, TINY_LM) if tiny else (SIGLIP_SO400M, QWEN2_05B)
    config, cfg = real_config(stage, {**(overrides or {}), **(TINY_LENGTH if tiny else {})}, vision, lm)
    mesh = sharding.make_mesh(tuple(config.mesh))
    devices, accum = mesh.size, config.train.accum_steps
    global_batch = per_device_batch * devices * accum
    seq_len = cfg.max_length
    params, param_axes = abstract_params(cfg, config)
    step, shardings, state, trainable, _ = build_step(config, cfg, mesh, params, param_axes)
    state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state, shardings)
    memory = abstract_memory(cfg, TINY_BANK_ROWS if tiny else BANK_ROWS[stage], mesh)
    batch = abstract_batch(cfg, global_batch, seq_len, mesh)
    jitted = update_step.jit_update_step(step, shardings, mesh, memory)
    start = time.perf_counter()
    compiled = jitted.lower(state, batch, memory).compile()
    seconds = time.perf_counter() - start
    cost = compiled_cost.program_cost(compiled)
    flops_per_sample = cost.matmul_flops * devices / global_batch
    adapters = tinyalign_lora.adapter_count(params)
    model_flops = model_flops_per_sample(cfg, trainable, seq_len, adapters)
    return {"stage": stage, "per_device_batch": per_device_batch, "devices": devices, "accum_steps": accum,
            "global_batch": global_batch, "seq_len": seq_len, "attention": _field(cfg, "attention"),
            "remat": _field(cfg, "remat"), "recipe": recipe, "peak_bytes": cost.peak_bytes,
            "argument_bytes": cost.argument_bytes, "peak_gib": round(cost.peak_bytes / GIB, 2),
            "argument_gib": round(cost.argument_bytes / GIB, 2),
            "temp_gib": round(cost.temp_bytes / GIB, 2), "flops_per_sample": flops_per_sample,
            "model_flops_per_sample": model_flops, "flops_ratio": round(flops_per_sample / model_flops, 3),
            "compile_seconds": round(seconds, 1), **({"overrides": overrides} if overrides else {}),
            **({"lora_adapter_params": adapters} if adapters else {})}


def _field(cfg: model_lib.TinyAlignConfig, name: str) -> str:
    """The LM's and the tower's setting of `name` ('attention' / 'remat'), or 'n/a' before they existed."""
    lm, vision = getattr(cfg.lm, name, "n/a"), getattr(cfg.vision, name, "n/a")
    return lm if lm == vision else f"lm={lm},vision={vision}"


def recipe_micro_batch(stage: int) -> int:
    config = tinyalign_qwen2.get_config(f"stage={stage}")
    mesh_devices = ESTIMATE_DEVICES
    return config.train.batch_size // (config.train.accum_steps * mesh_devices)


def padding_row(stage: int, global_batch: int, samples: int = 200_000) -> dict:
    """Real tokens / computed tokens of the recipe's buckets and grouping on synthetic mix665k-like lengths."""
    config, cfg = real_config(stage)
    lengths = synthetic_mix665k_lengths(samples, seed=0, image_length=cfg.num_image_tokens + cfg.num_retrieved_tokens,
                                        max_length=cfg.max_length)
    buckets, window = tuple(config.data.length_buckets), config.data.group_by_length
    share = real_token_share(lengths, global_batch, buckets, window, config.seed, cfg.max_length)
    padded = real_token_share(lengths, global_batch, (), 0, config.seed, cfg.max_length)
    return {"padding": "synthetic LLaVA-v1.5-mix665k-like lengths (jaxalign.data.length_stats)", "stage": stage,
            "samples": samples, "global_batch": global_batch, "buckets": list(buckets), "window_batches": window,
            "real_token_share": round(share, 3), "real_token_share_padded_to_max_length": round(padded, 3),
            "positions_per_image_sample": cfg.num_image_tokens + cfg.num_retrieved_tokens}


def run_estimate(stages: list[int], explore: bool, tiny: bool = False) -> None:
    if len(jax.devices()) != ESTIMATE_DEVICES:
        raise SystemExit(f"--estimate needs {ESTIMATE_DEVICES} fake CPU devices; run it as a script so that it "
                         "can set XLA_FLAGS before jax starts")
    settings = [(stage, recipe_micro_batch(stage), True, None) for stage in stages]
    if 2 in stages:
        settings.append((2, 16, False, None))
        # Tiny towers (width 64) take rank 8: a rank above a kernel's width would not be low-rank.
        settings.append((2, recipe_micro_batch(2), False,
                         LORA if not tiny else {**LORA, "model.lora.rank": 8, "model.lora.alpha": 16.0}))
    if explore:
        # The settings before this work (einsum attention keeping T x T probabilities, no remat), and every
        # remat policy with the automatic kernel, at the recipe's micro-batch.
        grid = [{"model.attention": "einsum", "model.remat": "none"}] + [
            {"model.attention": "auto", "model.remat": remat} for remat in ("none", "save_dots", "nothing")]
        settings += [(stage, recipe_micro_batch(stage), False, overrides) for stage in stages for overrides in grid]
        if 2 in stages:  # why stage 2 recomputes its layers: micro-batch 16 with the lighter policies
            settings += [(2, 16, False, {"model.remat": remat}) for remat in ("none", "save_dots")]
    for stage, micro_batch, recipe, overrides in settings:
        print(json.dumps(estimate_row(stage, micro_batch, recipe, overrides, tiny)), flush=True)
    if 2 in stages and not tiny:
        for global_batch in (128, 256):
            print(json.dumps(padding_row(2, global_batch)), flush=True)


# ============================================================================================ --gpu
def _random_params(cfg: model_lib.TinyAlignConfig, config, mesh):
    dtypes = setup.stored_dtypes(config)
    params = jax.jit(lambda key: model_lib.init(cfg, key, identity_retrieval=False))(jax.random.PRNGKey(0))
    params = {part: jax.tree.map(lambda x, d=dtypes[part]: x.astype(d), tree) for part, tree in params.items()}
    return sharding.shard_params(params, model_lib.logical_axes(cfg), mesh)


def _random_memory(cfg: model_lib.TinyAlignConfig, rows: int, mesh):
    keys = np.random.default_rng(0).standard_normal((rows, cfg.key_dim), np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    values = np.random.default_rng(1).integers(1, cfg.lm.vocab_size, (rows, cfg.value_length), dtype=np.int32)
    bank = MemoryBank.from_arrays(keys, {"tokens": values}, metric="cosine", mesh=mesh)
    return memory_keys.RetrievalMemory.create(bank)


def _synthetic_batch(cfg: model_lib.TinyAlignConfig, batch_size: int, text_tokens: int, rows: int) -> dict:
    """Random pixels, one image sentinel then `text_tokens - 1` text ids with the second half labelled."""
    rng = np.random.default_rng(2)
    size = cfg.vision.image_size
    seq_len = text_tokens + cfg.num_image_tokens + cfg.num_retrieved_tokens
    ids = rng.integers(1, cfg.lm.vocab_size, (batch_size, seq_len), dtype=np.int32)
    ids[:, 0] = IMAGE_TOKEN_ID
    ids[:, text_tokens:] = 0
    labels = np.where(np.arange(seq_len)[None] >= text_tokens // 2, ids, -100).astype(np.int32)
    labels[:, text_tokens:] = -100
    mask = (np.arange(seq_len)[None] < text_tokens).astype(np.int32).repeat(batch_size, 0)
    return {"pixels": rng.standard_normal((batch_size, size, size, 3), np.float32), "input_ids": ids,
            "labels": labels, "attention_mask": mask, "image_index": np.zeros(batch_size, np.int32),
            "retrieval_index": np.full(batch_size, -1, np.int32), "text_start": np.ones(batch_size, np.int32),
            "sample_index": rng.integers(0, rows, batch_size).astype(np.int32)}


def gpu_row(stage: int, batch_size: int, retrieval: bool, tiny: bool, steps: int) -> dict:
    text_tokens, k, rows = (256, 10, 558_128) if not tiny else (16, 2, 512)
    overrides = {"train.accum_steps": 1, "train.batch_size": batch_size, "retrieval.k": k,
                 "retrieval.control": "real" if retrieval else "off"}
    vision, lm = (TINY_VISION, TINY_LM) if tiny else (SIGLIP_SO400M, QWEN2_05B)
    config, cfg = real_config(stage, overrides, vision, lm)
    seq_len = text_tokens + cfg.num_image_tokens + cfg.num_retrieved_tokens
    cfg = dataclasses.replace(cfg, max_length=seq_len)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    params = _random_params(cfg, config, mesh)
    step, shardings, _, trainable, optimizer = build_step(config, cfg, mesh, params)
    memory = _random_memory(cfg, rows, mesh) if retrieval else None
    jitted = update_step.jit_update_step(step, shardings, mesh, memory)
    state = jax.device_put(create_train_state(params, optimizer, jax.random.PRNGKey(0)), shardings)
    batch = sharding.global_batch(_synthetic_batch(cfg, batch_size, text_tokens, rows), mesh)
    for _ in range(3):
        state, metrics = jitted(state, batch, memory)
    jax.block_until_ready(metrics["loss"])
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = jitted(state, batch, memory)
    jax.block_until_ready(metrics["loss"])
    seconds = (time.perf_counter() - start) / steps
    model_flops = model_flops_per_sample(cfg, trainable, seq_len)
    peak = float(os.environ.get("PEAK_TFLOPS", "989")) * 1e12
    return {"row": f"jaxalign stage {stage} b{batch_size}" + (" +retrieval" if retrieval else ""),
            "stage": stage, "batch": batch_size, "retrieval_k": k if retrieval else 0, "seq_len": seq_len,
            "ms_per_step": round(seconds * 1e3, 1), "samples_per_s": round(batch_size / seconds, 1),
            "mfu": round(model_flops * batch_size / seconds / peak, 3),
            "mfu_peer_formula": round(peer_formula_flops_per_sample(cfg, stage, seq_len) * batch_size / seconds / peak,
                                      3), "loss": float(metrics["loss"]),
            "device": jax.devices()[0].device_kind, "attention": _field(cfg, "attention"),
            "remat": _field(cfg, "remat")}


def peer_row(stage: int, batch_size: int, compiled: bool) -> dict:
    """One row of the PyTorch peer (its own process), or why it did not run."""
    name = {1: "pretrain", 2: "finetune"}[stage]
    command = [sys.executable, str(PEER_STEP), name, str(batch_size)] + (["compile"] if compiled else [])
    label = f"peer {name} b{batch_size} {'compiled' if compiled else 'eager'}"
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return {"row": label, "error": "timed out after 900 s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if lines:
        return {"row": label, **json.loads(lines[-1])}
    return {"row": label, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}


def memory_search_row() -> dict:
    """bench/retrieval.py at the target size, in its own process (its JSON lines are passed through)."""
    command = [sys.executable, str(ROOT / "bench" / "retrieval.py"), "--sizes", "4194304:512", "--dtype",
               "bfloat16", "--batch", "128", "--k", "10", "--device-check", "--no-numpy"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {"row": "memory-bank search 4194304x512 bf16, 128 queries, k=10", "lines": lines,
            **({} if lines else {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]})}


def run_gpu(tiny: bool, steps: int, rows: str, peer: bool) -> None:
    have_cuda_torch = peer and not tiny and PEER_STEP.exists()
    plan = [("s2b16", lambda: gpu_row(2, 16, False, tiny, steps)),
            ("peer_s2b16c", lambda: peer_row(2, 16, True) if have_cuda_torch else None),
            ("s2b32", lambda: gpu_row(2, 32, False, tiny, steps)),
            ("peer_s2b32c", lambda: peer_row(2, 32, True) if have_cuda_torch else None),
            ("search", lambda: memory_search_row() if not tiny else None),
            ("s2b16r", lambda: gpu_row(2, 16, True, tiny, steps)),
            ("s1b16", lambda: gpu_row(1, 16, False, tiny, steps)),
            ("peer_s1b16e", lambda: peer_row(1, 16, False) if have_cuda_torch else None),
            ("peer_s2b16e", lambda: peer_row(2, 16, False) if have_cuda_torch else None),
            ("s1b32", lambda: gpu_row(1, 32, False, tiny, steps)),
            ("s1b16r", lambda: gpu_row(1, 16, True, tiny, steps))]
    wanted = set(filter(None, rows.split(",")))
    for name, row in plan:
        if wanted and name not in wanted:
            continue
        try:
            result = row()
        except Exception as error:  # a row that fails (out of memory, say) is reported, the others still run
            result = {"row": name, "error": f"{type(error).__name__}: {str(error)[:300]}"}
        if result is not None:
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    if args.estimate:
        run_estimate([int(s) for s in args.stages.split(",")], args.explore, args.tiny)
    else:
        run_gpu(args.tiny, args.steps, args.rows, not args.no_peer)
