"""Decoder LMs (Llama / Qwen2 / Phi): parity with transformers, padding, KV cache, HF import / export, sharding."""
import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_fixtures_lm as fx
from jaxalign import sharding
from jaxalign.io import hf_folder, hf_lm
from jaxalign.io.hf_folder import CheckpointFormatError
from jaxalign.models import decoder, layers

FAMILIES = ("llama", "qwen2", "phi")
forward = jax.jit(decoder.forward, static_argnames=("cfg", "return_hidden", "compute_logits"))


def logits_of(params, cfg, ids, mask) -> np.ndarray:
    # Always with the hidden states too: one compilation per family and shape serves every test.
    return np.asarray(forward(params, cfg=cfg, input_ids=ids, attention_mask=mask, return_hidden=True).logits)


def random_params(cfg, seed: int) -> dict:
    """Parameters of `cfg` drawn with NumPy (norms and biases included), cheaper on CPU than compiling jax.random
    for every parameter shape."""
    rng = np.random.default_rng(seed)
    shapes = layers.shapes(decoder.param_specs(cfg))
    return jax.tree.map(lambda s: jnp.asarray(0.15 * rng.standard_normal(s.shape), jnp.float32), shapes)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def loaded(family):
    """(cfg, params, torch model) of the tiny `family` checkpoint, loaded through jaxalign."""
    folder, model = fx.hf_model(family)
    cfg, params = hf_lm.load(folder)
    return cfg, params, model


@pytest.mark.parametrize("padding", ["right", "left"])
def test_logits_match_transformers(loaded, padding):
    cfg, params, model = loaded
    ids, mask = fx.prompt_batch(padding)
    out = forward(params, cfg=cfg, input_ids=ids, attention_mask=mask, return_hidden=True)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out.logits)[real], fx.hf_logits(model, ids, mask)[real], atol=1e-4, rtol=0)
    # The separate LM head gives the same logits from the returned hidden states.
    np.testing.assert_allclose(decoder.hidden_states_to_logits(params, cfg, out.hidden), out.logits, atol=1e-5)


def test_left_and_right_padding_agree_on_real_tokens(loaded):
    cfg, params, _ = loaded
    right_ids, right_mask = fx.prompt_batch("right")
    left_ids, left_mask = fx.prompt_batch("left")
    real = fx.PROMPT - fx.PAD_SLOTS
    left_ids[1, fx.PAD_SLOTS:] = right_ids[1, :real]  # the same tokens, shifted to the right
    right = logits_of(params, cfg, right_ids, right_mask)
    left = logits_of(params, cfg, left_ids, left_mask)
    np.testing.assert_allclose(left[1, fx.PAD_SLOTS:], right[1, :real], atol=1e-5)


def test_export_round_trip_loads_in_transformers(loaded, tmp_path):
    import torch
    import transformers

    cfg, params, _ = loaded
    # Fresh parameters with non-trivial norms and biases, so the export of every tensor is checked.
    params = random_params(cfg, seed=7)
    hf_lm.export(str(tmp_path), cfg, params)

    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert type(model).__name__ == hf_lm.ARCHITECTURES[hf_lm.config_to_hf(cfg)["model_type"]]
    ids, mask = fx.prompt_batch("left")
    ours = logits_of(params, cfg, ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], fx.hf_logits(model, ids, mask)[real], atol=1e-4, rtol=0)

    cfg_again, params_again = hf_lm.load(str(tmp_path))
    assert cfg_again == cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params_again, params)


def test_kv_cache_prefill_then_decode_matches_full_forward():
    # One family suffices here: generation parity with transformers exercises the cache of every family.
    cfg, params = hf_lm.load(fx.hf_model("qwen2")[0])
    ids, mask = fx.prompt_batch("left")
    full = logits_of(params, cfg, ids, mask)
    prefill_length = fx.PROMPT - 2
    cache = decoder.init_cache(cfg, fx.BATCH, fx.PROMPT + 2)
    out = forward(params, cfg=cfg, input_ids=ids[:, :prefill_length], attention_mask=mask[:, :prefill_length],
                  cache=cache)
    steps = [np.asarray(out.logits)]
    cache = out.cache
    for t in range(prefill_length, fx.PROMPT):
        out = forward(params, cfg=cfg, input_ids=ids[:, t:t + 1], attention_mask=mask[:, t:t + 1], cache=cache)
        steps.append(np.asarray(out.logits))
        cache = out.cache
    incremental = np.concatenate(steps, axis=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(incremental[real], full[real], atol=1e-5)
    assert int(cache.index) == fx.PROMPT
    np.testing.assert_array_equal(np.asarray(cache.next_position), mask.sum(1))


def test_cache_overflow_is_a_clear_error():
    folder, _ = fx.hf_model("llama")
    cfg, params = hf_lm.load(folder)
    ids, mask = fx.prompt_batch("left")
    with pytest.raises(ValueError, match="KV cache holds 4 tokens"):
        decoder.forward(params, cfg, input_ids=ids, attention_mask=mask, cache=decoder.init_cache(cfg, fx.BATCH, 4))


def test_inputs_embeds_equals_input_ids():
    folder, _ = fx.hf_model("phi")
    cfg, params = hf_lm.load(folder)
    ids, mask = fx.prompt_batch("right")
    by_ids = logits_of(params, cfg, ids, mask)
    embeds = decoder.embed(params, cfg, ids)
    by_embeds = forward(params, cfg=cfg, inputs_embeds=embeds, attention_mask=mask, return_hidden=True).logits
    np.testing.assert_allclose(by_embeds, by_ids, atol=1e-6)


def test_exactly_one_of_ids_and_embeds():
    folder, _ = fx.hf_model("llama")
    cfg, params = hf_lm.load(folder)
    ids, _ = fx.prompt_batch("right")
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        decoder.forward(params, cfg, input_ids=ids, inputs_embeds=decoder.embed(params, cfg, ids))
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        decoder.forward(params, cfg)


def test_sharded_forward_equals_single_device(eight_devices):
    folder, _ = fx.hf_model("qwen2")
    cfg, params = hf_lm.load(folder)
    ids, mask = fx.prompt_batch("left")
    single = logits_of(params, cfg, ids, mask)
    mesh = sharding.make_mesh((1, 4, 2), eight_devices)
    sharded_params = sharding.shard_params(params, decoder.logical_axes(cfg), mesh)
    # The tensor axis really splits the attention heads and the fsdp axis the embedding width.
    assert sharded_params["layers"]["attention"]["query"]["kernel"].sharding.spec == jax.P(None, "fsdp", "tensor", None)
    with jax.set_mesh(mesh):
        sharded = logits_of(sharded_params, cfg, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(sharded, single, atol=1e-5)


def test_bfloat16_compute_is_close_to_float32():
    folder, _ = fx.hf_model("llama")
    cfg, params = hf_lm.load(folder)
    ids, mask = fx.prompt_batch("left")
    full = logits_of(params, cfg, ids, mask)
    half_cfg = dataclasses.replace(cfg, dtype="bfloat16")
    half = forward(params, cfg=half_cfg, input_ids=ids, attention_mask=mask, return_hidden=True)
    assert half.hidden.dtype == jnp.bfloat16
    real = mask.astype(bool)
    error = np.abs(np.asarray(half.logits) - full)[real]
    assert error.max() < 0.05 * np.abs(full).max(), error.max()
    assert (np.asarray(half.logits).argmax(-1)[real] == full.argmax(-1)[real]).mean() > 0.9


def test_param_specs_shapes_and_axes():
    cfg = decoder.DecoderConfig(family="phi", partial_rotary_factor=0.5, attention_bias=True, lm_head_bias=True)
    # eval_shape runs init without drawing numbers (compiling jax.random per shape is slow on CPU).
    params = jax.eval_shape(functools.partial(decoder.init, cfg), jax.random.key(0))
    axes = decoder.logical_axes(cfg)
    assert params["layers"]["attention"]["key"]["kernel"].shape == (2, 64, 2, 16)
    assert tuple(axes["layers"]["attention"]["key"]["kernel"]) == ("layers", "embed", "kv_heads", "head_dim")
    assert params["layers"]["attention"]["query"]["bias"].shape == (2, 4, 16)
    assert "mlp_norm" not in params["layers"] and "bias" in params["lm_head"] and "bias" in params["final_norm"]
    llama = decoder.DecoderConfig(tie_word_embeddings=True)
    llama_params = jax.eval_shape(functools.partial(decoder.init, llama), jax.random.key(0))
    assert "lm_head" not in llama_params and "bias" not in llama_params["final_norm"]
    assert set(llama_params["layers"]["mlp"]) == {"gate", "up", "down"}
    assert cfg.rotary_dim == 8 and llama.rotary_dim == 16


# ------------------------------------------------------------------------------------------- bad checkpoints


def test_unknown_model_type_names_it_and_the_supported_ones():
    with pytest.raises(CheckpointFormatError, match=r"'gpt2'.*llama, qwen2, mistral, phi"):
        hf_lm.config_from_hf({"model_type": "gpt2", "hidden_size": 32})


def test_unsupported_rope_scaling_is_rejected():
    hf = hf_lm.config_to_hf(hf_lm.load(fx.hf_model("llama")[0])[0])
    hf["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(CheckpointFormatError, match="'yarn'"):
        hf_lm.config_from_hf(hf)


def _copy_with(tmp_path, family, edit):
    folder, _ = fx.hf_model(family)
    tensors = hf_folder.read_tensors(folder)
    edit(tensors)
    hf_folder.write_folder(str(tmp_path), hf_folder.read_config(folder), tensors)
    return str(tmp_path)


def test_missing_tensor_names_it(tmp_path):
    folder = _copy_with(tmp_path, "qwen2", lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(CheckpointFormatError, match=r"'model\.layers\.1\.self_attn\.k_proj\.bias' is missing"):
        hf_lm.load(folder)


def test_wrong_tensor_shape_names_it(tmp_path):
    def shrink(tensors):
        tensors["model.layers.0.mlp.fc1.weight"] = tensors["model.layers.0.mlp.fc1.weight"][:10]

    with pytest.raises(CheckpointFormatError, match=r"'model\.layers\.0\.mlp\.fc1\.weight' has shape \(10, 32\)"):
        hf_lm.load(_copy_with(tmp_path, "phi", shrink))


def test_untied_config_without_lm_head_is_an_error(tmp_path):
    folder = _copy_with(tmp_path, "qwen2", lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointFormatError, match="'lm_head.weight' is missing"):
        hf_lm.load(folder)


def test_unexpected_tensors_are_reported(tmp_path):
    def add(tensors):
        tensors["model.layers.0.self_attn.q_norm.weight"] = np.ones(8, np.float32)

    with pytest.raises(CheckpointFormatError, match="q_norm"):
        hf_lm.load(_copy_with(tmp_path, "llama", add))


def test_missing_config_is_an_error(tmp_path):
    folder = _copy_with(tmp_path, "llama", lambda t: None)
    os.remove(os.path.join(folder, "config.json"))
    with pytest.raises(CheckpointFormatError, match="config.json"):
        hf_lm.load(folder)


def test_transformers4_style_config_reads_the_same():
    cfg = hf_lm.load(fx.hf_model("phi")[0])[0]
    hf = json.loads(json.dumps(hf_lm.config_to_hf(cfg)))
    del hf["rope_parameters"]  # transformers 4 wrote rope_theta / partial_rotary_factor at the top level
    assert hf_lm.config_from_hf(hf) == cfg


def test_mistral_reads_as_llama_family_and_sliding_window_is_refused():
    hf = hf_lm.config_to_hf(hf_lm.load(fx.hf_model("llama")[0])[0])
    hf.update(model_type="mistral", sliding_window=None)
    assert hf_lm.config_from_hf(hf) == hf_lm.load(fx.hf_model("llama")[0])[0]
    hf["sliding_window"] = 4096
    with pytest.raises(CheckpointFormatError, match="sliding_window=4096"):
        hf_lm.config_from_hf(hf)


# ------------------------------------------------------------------------------------------- rematerialisation

REMAT_LM = decoder.DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                 num_kv_heads=2, attention="einsum")


def _loss_of(cfg, ids, mask):
    def loss(params):
        logits = decoder.forward(params, cfg, input_ids=ids, attention_mask=mask).logits
        return jnp.sum(jnp.where(mask[:, :, None], jax.nn.log_softmax(logits), 0.0)[..., 3])
    return loss


@pytest.mark.parametrize("remat", ["save_dots", "nothing", "offload"])
def test_remat_policies_leave_gradients_unchanged(remat):
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 64, (2, 12)), jnp.int32)
    mask = jnp.asarray(np.arange(12)[None] >= np.array([[0], [3]]))  # the second row is left-padded
    params = random_params(REMAT_LM, 0)
    expected = jax.jit(jax.grad(_loss_of(REMAT_LM, ids, mask)))(params)
    actual = jax.jit(jax.grad(_loss_of(dataclasses.replace(REMAT_LM, remat=remat), ids, mask)))(params)
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, atol=1e-6, rtol=1e-6), actual, expected)


def test_remat_nothing_needs_less_backward_memory_than_none():
    """Compiled (not run) gradient programs on 1024 tokens: without remat the backward pass keeps every layer's
    activations, float32 attention probabilities included; with 'nothing' only the layer inputs."""
    ids, mask = jnp.zeros((1, 1024), jnp.int32), jnp.ones((1, 1024), bool)
    params = random_params(REMAT_LM, 0)
    temp = {remat: jax.jit(jax.grad(_loss_of(dataclasses.replace(REMAT_LM, remat=remat), ids, mask)))
            .lower(params).compile().memory_analysis().temp_size_in_bytes for remat in ("none", "nothing")}
    assert temp["nothing"] < 0.75 * temp["none"], temp
