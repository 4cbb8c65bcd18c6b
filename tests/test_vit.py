"""Vision towers (jaxalign.models.vit) and their Hugging Face import / export (jaxalign.io.hf_vision).

Tiny random transformers models are built here (no download), saved as safetensors snapshots and read back by
jaxalign; both run on the same deterministic pixels.
"""
from __future__ import annotations

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import sharding
from jaxalign.io import hf_vision
from jaxalign.io.hf_folder import CheckpointFormatError
from jaxalign.models import vit

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
            patch_size=8)
PARITY_TOLERANCE = 1e-4
ROUND_TRIP_TOLERANCE = 1e-5


def _pixels(seed: int = 0, batch: int = 2) -> np.ndarray:
    """Deterministic normalised pixels [batch, 32, 32, 3] (channels last, as jaxalign takes them)."""
    return np.random.RandomState(seed).randn(batch, 32, 32, 3).astype(np.float32)


def _run_torch(model, pixels: np.ndarray):
    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2), output_hidden_states=True)


@functools.partial(jax.jit, static_argnames=("cfg", "layer", "drop_class_token"))
def _encode(params, pixels, cfg, layer=-1, drop_class_token=False):
    return vit.encode(params, cfg, pixels, layer=layer, drop_class_token=drop_class_token)


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


class Tower:
    """A tiny transformers tower, its snapshot folder, its outputs, and what jaxalign loaded from the folder."""

    def __init__(self, model, folder: str, pixels: np.ndarray | None = None):
        self.model = model.eval()
        self.folder = folder
        model.save_pretrained(folder, safe_serialization=True)
        self.cfg, self.params = hf_vision.load(folder)
        self.reference = _run_torch(self.model, _pixels() if pixels is None else pixels)


@pytest.fixture(scope="module")
def towers(tmp_path_factory) -> dict[str, Tower]:
    """The three tiny towers, each built once per module (seeded, so every run sees the same weights)."""
    factories = {
        "siglip": lambda: transformers.SiglipVisionModel(
            transformers.SiglipVisionConfig(**TINY, vision_use_head=True)),
        "siglip_no_head": lambda: transformers.SiglipVisionModel(
            transformers.SiglipVisionConfig(**TINY, vision_use_head=False)),
        "clip": lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY)),
    }
    root = tmp_path_factory.mktemp("hf_vision")
    built = {}
    for name, factory in factories.items():
        torch.manual_seed(0)
        built[name] = Tower(factory(), str(root / name))
    return built


VARIANTS = ("siglip", "siglip_no_head", "clip")


# ------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("name", VARIANTS)
def test_last_hidden_state_and_pooled_match_transformers(towers, name):
    tower = towers[name]
    out = _encode(tower.params, _pixels(), tower.cfg)
    assert out.hidden_states.shape == tuple(tower.reference.last_hidden_state.shape)
    assert _max_diff(out.hidden_states, tower.reference.last_hidden_state) <= PARITY_TOLERANCE
    if tower.reference.pooler_output is None:
        assert out.pooled is None
    else:
        assert _max_diff(out.pooled, tower.reference.pooler_output) <= PARITY_TOLERANCE


@pytest.mark.parametrize("name", VARIANTS)
def test_second_to_last_layer_matches_hidden_states_minus_two(towers, name):
    tower = towers[name]
    out = _encode(tower.params, _pixels(), tower.cfg, layer=-2)
    assert _max_diff(out.hidden_states, tower.reference.hidden_states[-2]) <= PARITY_TOLERANCE
    assert out.pooled is None  # the last layer did not run


def test_layer_indexes_follow_transformers_hidden_states(towers):
    tower = towers["clip"]  # hidden_states[0] is CLIP's pre-layernormed embeddings
    for layer in (0, 1, -4):
        out = _encode(tower.params, _pixels(), tower.cfg, layer=layer)
        assert _max_diff(out.hidden_states, tower.reference.hidden_states[layer]) <= PARITY_TOLERANCE


def test_siglip_last_layer_without_post_layernorm_by_positive_index(towers):
    tower = towers["siglip"]
    raw = _encode(tower.params, _pixels(), tower.cfg, layer=tower.cfg.num_layers)
    assert _max_diff(raw.hidden_states, tower.reference.hidden_states[-1]) <= PARITY_TOLERANCE
    assert _max_diff(raw.hidden_states, tower.reference.last_hidden_state) > 0.1  # -1 is post-layernormed


def test_intermediate_layer_runs_only_the_layers_it_needs(towers):
    tower = towers["siglip"]
    jaxpr = jax.make_jaxpr(lambda p, x: vit.encode(p, tower.cfg, x, layer=-3))(tower.params, _pixels())
    scan_lengths = [eqn.params["length"] for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "scan"]
    assert scan_lengths == [1]  # hidden_states[-3] of a 3-layer tower is the output of layer 1


def test_out_of_range_layer_is_rejected(towers):
    tower = towers["clip"]
    with pytest.raises(ValueError, match="layer=4 is out of range"):
        vit.encode(tower.params, tower.cfg, _pixels(), layer=4)


def test_drop_class_token_drops_exactly_token_zero_for_clip(towers):
    tower = towers["clip"]
    full = _encode(tower.params, _pixels(), tower.cfg, layer=-2)
    dropped = _encode(tower.params, _pixels(), tower.cfg, layer=-2, drop_class_token=True)
    assert dropped.hidden_states.shape == (2, tower.cfg.num_patches, 32)
    np.testing.assert_array_equal(np.asarray(dropped.hidden_states), np.asarray(full.hidden_states)[:, 1:])


def test_drop_class_token_keeps_every_siglip_token(towers):
    tower = towers["siglip"]
    full = _encode(tower.params, _pixels(), tower.cfg)
    dropped = _encode(tower.params, _pixels(), tower.cfg, drop_class_token=True)
    np.testing.assert_array_equal(np.asarray(dropped.hidden_states), np.asarray(full.hidden_states))


def test_full_clip_model_gives_tower_and_projection(tmp_path):
    torch.manual_seed(1)
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=64, max_position_embeddings=8),
        vision_config=dict(TINY, num_hidden_layers=2), projection_dim=8)
    model = transformers.CLIPModel(config).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    cfg, params = hf_vision.load(str(tmp_path))
    assert (cfg.variant, cfg.num_layers, cfg.projection_dim) == ("clip", 2, 8)
    pixels = _pixels(seed=3)
    with torch.no_grad():
        image_embeds = model.get_image_features(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
    image_embeds = getattr(image_embeds, "pooler_output", image_embeds)
    out = _encode(params, pixels, cfg)
    assert out.projected.shape == (2, 8)
    assert _max_diff(out.projected, image_embeds) <= PARITY_TOLERANCE


def test_full_siglip_config_reads_vision_config_with_defaults():
    cfg = hf_vision.config_from_hf({"model_type": "siglip", "text_config": {"hidden_size": 8},
                                    "vision_config": {"patch_size": 14, "image_size": 224}})
    assert (cfg.variant, cfg.patch_size, cfg.image_size, cfg.hidden_size, cfg.num_layers) == ("siglip", 14, 224, 768,
                                                                                              12)
    assert cfg.use_head and cfg.hidden_act == "gelu_pytorch_tanh" and cfg.layer_norm_eps == 1e-6


# ------------------------------------------------------------------------------------------ uneven patch grids

# 30 / 8: a 3 x 3 grid covering the top-left 24 x 24 pixels, like SigLIP so400m's 384 / 14 (27 x 27, 378 pixels).
UNEVEN = dict(TINY, num_hidden_layers=2, image_size=30, patch_size=8)


def _uneven_pixels(seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randn(2, 30, 30, 3).astype(np.float32)


@pytest.fixture(scope="module")
def uneven_towers(tmp_path_factory) -> dict[str, Tower]:
    """A SigLIP (with head) and a CLIP tower of image 30, patch 8, and their transformers outputs."""
    factories = {
        "siglip": lambda: transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**UNEVEN)),
        "clip": lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**UNEVEN)),
    }
    root = tmp_path_factory.mktemp("hf_vision_uneven")
    built = {}
    for name, factory in factories.items():
        torch.manual_seed(0)
        built[name] = Tower(factory(), str(root / name), _uneven_pixels())
    return built


def test_patch_grid_drops_the_remainder_as_transformers_does():
    cfg = vit.VisionConfig(image_size=384, patch_size=14, hidden_size=8, intermediate_size=8, num_layers=1,
                           num_heads=2)
    assert (cfg.grid_size, cfg.num_patches, cfg.num_tokens) == (27, 729, 729)
    clip = vit.VisionConfig(**{**cfg.__dict__, "variant": "clip", "use_head": False})
    assert vit.param_specs(clip)["embeddings"]["position"].shape == (730, 8)  # the class token's row too


@pytest.mark.parametrize("patch_size", [0, -4, 33])
def test_patch_size_outside_one_to_image_size_is_rejected(patch_size):
    with pytest.raises(ValueError, match=f"patch_size={patch_size} must be between 1 and image_size=32"):
        vit.VisionConfig(image_size=32, patch_size=patch_size)


@pytest.mark.parametrize("name", ["siglip", "clip"])
def test_uneven_patch_grid_matches_transformers(uneven_towers, name):
    tower = uneven_towers[name]
    assert tower.cfg.num_patches == 9 and tower.params["embeddings"]["position"].shape[0] == tower.cfg.num_tokens
    last = _encode(tower.params, _uneven_pixels(), tower.cfg)
    second_to_last = _encode(tower.params, _uneven_pixels(), tower.cfg, layer=-2)
    assert last.hidden_states.shape == tuple(tower.reference.last_hidden_state.shape)
    assert _max_diff(last.hidden_states, tower.reference.last_hidden_state) <= PARITY_TOLERANCE
    assert _max_diff(second_to_last.hidden_states, tower.reference.hidden_states[-2]) <= PARITY_TOLERANCE
    assert _max_diff(last.pooled, tower.reference.pooler_output) <= PARITY_TOLERANCE
    # The last 6 rows and columns are never read: changing them changes nothing.
    edited = _uneven_pixels().copy()
    edited[:, 24:], edited[:, :, 24:] = 100.0, -100.0
    np.testing.assert_array_equal(np.asarray(_encode(tower.params, edited, tower.cfg).hidden_states),
                                  np.asarray(last.hidden_states))


@pytest.mark.parametrize("name", ["siglip", "clip"])
def test_hf_verify_accepts_an_uneven_patch_grid(uneven_towers, name, capsys):
    from jaxalign import cli

    code = cli.main(["hf-verify", uneven_towers[name].folder])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and report["ok"] is True, report
    assert report["kind"] == "vision" and report["max_abs_diff"] <= PARITY_TOLERANCE


# ------------------------------------------------------------------------------------------ export


@pytest.mark.parametrize("name", VARIANTS)
def test_export_round_trip_loads_in_transformers(towers, name, tmp_path):
    tower = towers[name]
    hf_vision.export(str(tmp_path), tower.cfg, tower.params)
    model_class = type(tower.model)
    reloaded, info = model_class.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ours = _encode(tower.params, _pixels(), tower.cfg)
    theirs = _run_torch(reloaded.eval(), _pixels())
    assert _max_diff(ours.hidden_states, theirs.last_hidden_state) <= ROUND_TRIP_TOLERANCE
    if ours.pooled is not None:
        assert _max_diff(ours.pooled, theirs.pooler_output) <= ROUND_TRIP_TOLERANCE
    cfg_again, params_again = hf_vision.load(str(tmp_path))
    assert cfg_again == tower.cfg
    jax.tree.map(np.testing.assert_array_equal, params_again, tower.params)


# ------------------------------------------------------------------------------------------ sharding, dtype


@pytest.mark.parametrize("name", ["siglip", "clip"])
def test_sharded_forward_equals_single_device(towers, name, eight_devices):
    tower = towers[name]
    mesh = sharding.make_mesh((1, 2, 4))
    sharded = sharding.shard_params(tower.params, vit.logical_axes(tower.cfg), mesh)
    query_spec = sharded["layers"]["attention"]["query"]["kernel"].sharding.spec
    assert tuple(query_spec) == (None, "fsdp", "tensor", None)  # [layers, embed, heads, head_dim]
    pixels = jax.device_put(_pixels(), sharding.batch_sharding(mesh, 4))
    out = jax.jit(lambda p, x: vit.encode(p, tower.cfg, x, layer=-2),
                  out_shardings=sharding.replicated(mesh))(sharded, pixels)
    single = _encode(tower.params, _pixels(), tower.cfg, layer=-2)
    assert _max_diff(out.hidden_states, single.hidden_states) <= 1e-5


def test_bfloat16_compute_is_close_to_float32(towers):
    tower = towers["siglip"]
    bf16_cfg = vit.VisionConfig(**{**tower.cfg.__dict__, "dtype": "bfloat16"})
    out = _encode(tower.params, _pixels(), bf16_cfg)
    assert out.hidden_states.dtype == jnp.bfloat16 and out.pooled.dtype == jnp.bfloat16
    reference = np.asarray(tower.reference.last_hidden_state)
    # Loose: bfloat16 keeps ~3 significant digits and errors grow through the layers.
    assert _max_diff(out.hidden_states, reference) <= 0.1 * float(np.abs(reference).max())
    assert _max_diff(out.hidden_states, reference) > 0  # the computation really ran in bfloat16


# ------------------------------------------------------------------------------------------ bad inputs


def _copy(tower: Tower, tmp_path) -> str:
    folder = str(tmp_path / "snapshot")
    shutil.copytree(tower.folder, folder)
    return folder


def test_missing_config_json_is_named(towers, tmp_path):
    folder = _copy(towers["clip"], tmp_path)
    os.remove(os.path.join(folder, "config.json"))
    with pytest.raises(CheckpointFormatError, match=r"config\.json: missing"):
        hf_vision.load(folder)


def test_missing_safetensors_is_named(towers, tmp_path):
    folder = _copy(towers["clip"], tmp_path)
    os.remove(os.path.join(folder, "model.safetensors"))
    with pytest.raises(CheckpointFormatError, match=r"no weights found; expected model\.safetensors"):
        hf_vision.load(folder)


def test_unknown_model_type_is_named_with_supported_list(towers, tmp_path):
    folder = _copy(towers["clip"], tmp_path)
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["model_type"] = "dinov2"
    with open(path, "w") as f:
        json.dump(config, f)
    with pytest.raises(CheckpointFormatError, match="'dinov2'") as error:
        hf_vision.load(folder)
    assert all(model_type in str(error.value) for model_type in hf_vision.MODEL_TYPES)


def test_wrong_tensor_shape_names_tensor_and_file(towers, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = _copy(towers["siglip"], tmp_path)
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    name = "encoder.layers.1.mlp.fc1.weight"
    tensors[name] = np.zeros((48, 32), np.float32)  # the config implies [64, 32]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointFormatError) as error:
        hf_vision.load(folder)
    message = str(error.value)
    assert name in message and path in message and "(48, 32)" in message and "(64, 32)" in message


def test_head_tensors_the_config_does_not_expect_are_reported(towers):
    tower = towers["siglip"]
    tensors = hf_vision.params_to_hf(tower.params, tower.cfg)
    no_head = vit.VisionConfig(**{**tower.cfg.__dict__, "use_head": False})
    with pytest.raises(CheckpointFormatError, match=r"do not fit the config .*vision_model\.head\."):
        hf_vision.params_from_hf(tensors, no_head, "model.safetensors")


# ------------------------------------------------------------------------------------------ helpers


def test_config_round_trips_through_hf_dict(towers):
    for name in VARIANTS:
        cfg = towers[name].cfg
        assert hf_vision.config_from_hf(json.loads(json.dumps(hf_vision.config_to_hf(cfg)))) == cfg


def test_init_and_logical_axes_describe_the_same_tree():
    cfg = vit.VisionConfig(**{**vit.VisionConfig().__dict__, "hidden_size": 16, "intermediate_size": 32,
                              "num_layers": 2, "num_heads": 2, "image_size": 16, "patch_size": 8,
                              "variant": "clip", "use_head": False, "projection_dim": 4})
    # rbg keys compile far faster than threefry on CPU; one jit keeps init to one compilation.
    params = jax.jit(functools.partial(vit.init, cfg))(jax.random.key(0, impl="rbg"))
    np.testing.assert_array_equal(np.asarray(params["post_norm"]["scale"]), np.ones(16))
    np.testing.assert_array_equal(np.asarray(params["layers"]["mlp"]["fc1"]["bias"]), np.zeros((2, 32)))
    assert 0.01 < float(np.std(np.asarray(params["layers"]["mlp"]["fc1"]["kernel"]))) < 0.03
    axes = vit.logical_axes(cfg)
    assert jax.tree.structure(params) == jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, jax.P))
    jax.tree.map(lambda p, a: None if p.ndim == len(a) else pytest.fail(f"{p.shape} vs {a}"), params, axes,
                 is_leaf=lambda x: isinstance(x, jax.P))
    out = _encode(params, jnp.zeros((1, 16, 16, 3)), cfg)
    assert out.hidden_states.shape == (1, 5, 16) and out.projected.shape == (1, 4)
    assert bool(jnp.isfinite(out.projected).all())


def test_preprocess_normalises_and_resizes():
    siglip = vit.VisionConfig(image_size=16, patch_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                              num_heads=2)
    images = np.full((1, 48, 32, 3), 255, np.uint8)
    images[..., 1] = 0
    pixels = vit.preprocess(jnp.asarray(images), siglip)
    assert pixels.shape == (1, 16, 16, 3) and pixels.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(pixels[..., 0]), 1.0, atol=1e-6)   # (1 - 0.5) / 0.5
    np.testing.assert_allclose(np.asarray(pixels[..., 1]), -1.0, atol=1e-6)  # (0 - 0.5) / 0.5
    clip = vit.VisionConfig(**{**siglip.__dict__, "variant": "clip", "use_head": False})
    clip_pixels = vit.preprocess(jnp.asarray(images), clip)
    np.testing.assert_allclose(np.asarray(clip_pixels[0, 0, 0]),
                               (np.array([1.0, 0.0, 1.0]) - vit.CLIP_MEAN) / vit.CLIP_STD, rtol=1e-5)
