"""Loading Hugging Face snapshots straight into their sharded layout, in the dtype they are stored or computed in.

The reference for every shard is the whole-array loader (`load(folder)` without a mesh: every tensor read whole
and widened to float32), an independent path through the old layout conversions.
"""
import copy
import json
import os
import shutil
import types

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
import pytest

import hf_fixtures_lm as fx
import hf_fixtures_vlm as vlm_fx
from jaxalign import sharding
from jaxalign.programs import tinyalign_setup as setup
from jaxalign.io import hf_folder, hf_lm, hf_vision
from jaxalign.io.hf_folder import CheckpointFormatError
from jaxalign.models import decoder, vit

BF16, F32 = np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32)
MESHES = {"fsdp8": (1, 8, 1), "data2_fsdp4": (2, 4, 1), "fsdp2_tensor4": (1, 2, 4)}
MODULES = {"qwen2": hf_lm, "siglip": hf_vision, "clip": hf_vision}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[tuple[str, str], str]:
    """{(tower, stored dtype): snapshot folder}: a tiny Qwen2 (untied head, q/k/v biases), a tiny full SigLIP
    (MAP head with its packed in_proj, text tower alongside) and a tiny CLIP with projection (class token,
    pre-norm), each saved in float32 and in bfloat16; the bfloat16 Qwen2 in several safetensors shards."""
    import torch
    import transformers

    root = tmp_path_factory.mktemp("sharded_load")
    models = {"qwen2": copy.deepcopy(fx.hf_model("qwen2")[1])}
    vlm_fx.save_siglip(str(root / "siglip_seed"), full_model=True)
    models["siglip"] = transformers.SiglipModel.from_pretrained(str(root / "siglip_seed"))
    torch.manual_seed(3)
    models["clip"] = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=16))
    folders = {}
    for tower, model in models.items():
        fx.randomise_parameters(model)
        folders[tower, "float32"] = str(root / f"{tower}_float32")
        model.eval().save_pretrained(folders[tower, "float32"], safe_serialization=True)
        folders[tower, "bfloat16"] = str(root / f"{tower}_bfloat16")
        model.to(torch.bfloat16).save_pretrained(folders[tower, "bfloat16"], safe_serialization=True,
                                                 max_shard_size="40KB" if tower == "qwen2" else "50GB")
    assert os.path.isfile(os.path.join(folders["qwen2", "bfloat16"], hf_folder.INDEX_FILE))
    return folders


def _logical_axes(tower: str, cfg) -> dict:
    return decoder.logical_axes(cfg) if tower == "qwen2" else vit.logical_axes(cfg)


def _bits(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).view(np.uint16 if array.dtype.itemsize == 2 else np.uint32)


def _leaves(tree) -> dict[str, object]:
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ------------------------------------------------------------------------------------------ the slicing itself


class _ArrayReader:
    """A SnapshotReader stand-in over in-memory arrays that records what was read."""

    def __init__(self, tensors: dict[str, np.ndarray]):
        self.tensors, self.reads = tensors, []

    def read(self, name, index):
        self.reads.append((name, index))
        return self.tensors[name][index]


@pytest.mark.parametrize("hf_shape, perm, ours", [
    ((8, 8), (1, 0), lambda a: a.T.reshape(8, 4, 2)),                          # q/k/v kernel [E, H, D]
    ((8, 8), (1, 0), lambda a: a.T.reshape(4, 2, 8)),                          # output kernel [H, D, E]
    ((8,), (0,), lambda a: a.reshape(4, 2)),                                   # q/k/v bias [H, D]
    ((8, 3, 2, 2), (2, 3, 1, 0), lambda a: a.transpose(2, 3, 1, 0).reshape(12, 8)),  # patch conv
    ((1, 1, 8), (0, 1, 2), lambda a: a.reshape(8)),                            # SigLIP probe
    ((6, 4), (0, 1), lambda a: a.reshape(4, 6)),                               # a reshape that splits and merges
])
def test_read_recipe_returns_any_block_of_the_converted_tensor(hf_shape, perm, ours):
    rng = np.random.default_rng(0)
    tensor = rng.standard_normal(hf_shape).astype(np.float32)
    whole = ours(tensor)
    recipe = hf_folder.TensorRecipe(("t",), whole.shape, hf_shape, perm)
    reader = _ArrayReader({"t": tensor})
    for _ in range(50):
        starts = [int(rng.integers(0, d)) for d in whole.shape]
        index = tuple(slice(s, int(rng.integers(s + 1, d + 1))) for s, d in zip(starts, whole.shape))
        np.testing.assert_array_equal(hf_folder.read_recipe(reader, recipe, index), whole[index])


def test_read_recipe_reads_only_the_layers_and_heads_asked_for():
    rng = np.random.default_rng(1)
    layers = {f"l{i}": rng.standard_normal((3 * 8, 8)).astype(np.float32) for i in range(4)}  # packed [3E, E]
    recipe = hf_folder.TensorRecipe(tuple(layers), (4, 8, 4, 2), (8, 8), (1, 0), stacked=True, row_offset=8,
                                    stored_shape=(24, 8))   # the 'key' rows of each layer, heads of width 2
    reader = _ArrayReader(layers)
    block = hf_folder.read_recipe(reader, recipe, (slice(1, 3), slice(2, 6), slice(1, 3), slice(0, 2)))
    expected = np.stack([layers[f"l{i}"][8:16].T.reshape(8, 4, 2) for i in range(4)])[1:3, 2:6, 1:3]
    np.testing.assert_array_equal(block, expected)
    # Layers 1 and 2 only; of each, the rows of heads 1..2 of the key block and the 4 embedding columns asked for.
    assert reader.reads == [(name, (slice(10, 14), slice(2, 6))) for name in ("l1", "l2")]


# ------------------------------------------------------------------------------------------ sharded loading

CASES = [("qwen2", "float32", F32), ("qwen2", "float32", BF16), ("qwen2", "bfloat16", BF16),
         ("qwen2", "bfloat16", F32), ("siglip", "float32", BF16), ("siglip", "bfloat16", BF16),
         ("clip", "float32", F32), ("clip", "bfloat16", BF16)]


@pytest.mark.parametrize("mesh_name", MESHES)
@pytest.mark.parametrize("tower, stored, wanted", CASES)
def test_every_shard_equals_the_slice_of_the_whole_array_load(folders, eight_devices, tower, stored, wanted,
                                                              mesh_name):
    mesh = sharding.make_mesh(MESHES[mesh_name])
    folder = folders[tower, stored]
    cfg, params = MODULES[tower].load(folder, mesh=mesh, param_dtype=wanted)
    _, reference = MODULES[tower].load(folder)
    axes = _leaves(_logical_axes(tower, cfg))
    reference = _leaves(reference)
    loaded = _leaves(params)
    assert loaded.keys() == reference.keys()
    for name, array in loaded.items():
        whole = np.asarray(reference[name]).astype(wanted)
        expected_spec = sharding.logical_to_mesh_spec(axes[name], whole.shape, mesh)
        assert array.sharding == jax.sharding.NamedSharding(mesh, expected_spec), name
        assert (array.shape, array.dtype) == (whole.shape, wanted), name
        for shard in array.addressable_shards:
            np.testing.assert_array_equal(_bits(np.asarray(shard.data)), _bits(whole[shard.index]), err_msg=name)


def test_parameters_are_sharded_over_the_mesh_axes_of_their_logical_axes(folders, eight_devices):
    mesh = sharding.make_mesh(MESHES["fsdp2_tensor4"])
    _, params = hf_lm.load(folders["qwen2", "bfloat16"], dtype="bfloat16", mesh=mesh, param_dtype=None)
    P = jax.sharding.PartitionSpec
    assert params["layers"]["mlp"]["up"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    assert params["layers"]["attention"]["query"]["kernel"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert params["layers"]["attention"]["output"]["kernel"].sharding.spec == P(None, "tensor", None, "fsdp")
    # Two key / value heads do not divide over 4 'tensor' devices: replicated there, as shard_params does.
    assert params["layers"]["attention"]["key"]["kernel"].sharding.spec == P(None, "fsdp", None, None)
    assert params["embed"]["embedding"].dtype == jnp.bfloat16   # param_dtype None: the compute dtype
    shard = params["layers"]["mlp"]["up"]["kernel"].addressable_shards[0].data
    assert shard.shape == (2, 32 // 2, 64 // 4)


def _recording_reads(monkeypatch) -> list[tuple[str, int]]:
    """(tensor name, bytes) of every read from disk during the test."""
    reads = []
    original = hf_folder.SnapshotReader.read

    def read(self, name, index):
        block = original(self, name, index)
        reads.append((name, block.nbytes))
        return block

    monkeypatch.setattr(hf_folder.SnapshotReader, "read", read)
    return reads


@pytest.mark.parametrize("mesh_name", ["fsdp8", "data2_fsdp4"])
@pytest.mark.parametrize("tower", ["qwen2", "siglip"])
def test_each_device_reads_only_its_shard_once(folders, eight_devices, monkeypatch, tower, mesh_name):
    mesh = sharding.make_mesh(MESHES[mesh_name])
    folder = folders[tower, "bfloat16"]
    reads = _recording_reads(monkeypatch)
    cfg, params = MODULES[tower].load(folder, mesh=mesh, param_dtype=BF16)
    with hf_folder.SnapshotReader(folder) as reader:
        recipes = _leaves(MODULES[tower].param_recipes(reader, cfg))
        stored_bytes = {name: int(np.prod(reader.shape(name))) * 2 for name in reader}
    # Every read of a tensor is one shard of one layer: the region the parameter takes from it, divided by the
    # number of distinct shards of the parameter. A stacked tensor is never read whole, nor a whole layer of it
    # where the mesh shards that layer.
    expected_read = {}
    for name, recipe in recipes.items():
        spec = _leaves(params)[name].sharding.spec
        shards = int(np.prod([mesh.shape[axis] for entry in spec if entry
                              for axis in ((entry,) if isinstance(entry, str) else entry)]))
        for hf_name in recipe.names:
            expected_read[hf_name] = int(np.prod(recipe.hf_shape)) * 2 // shards
    assert sorted({name for name, _ in reads}) == sorted(expected_read)
    assert all(nbytes == expected_read[name] for name, nbytes in reads)
    assert any(expected_read[name] < stored_bytes[name] // 2 for name, _ in reads)  # fsdp really splits
    # Replicas along 'data' share one read: the whole process reads each byte of the tower once, and nothing else
    # (the full SigLIP's text tower is never touched).
    assert sum(nbytes for _, nbytes in reads) == sum(stored_bytes[name] for name in expected_read)
    assert not any(name.startswith("text_model.") for name, _ in reads)


# ------------------------------------------------------------------------------------------ bf16 vs float32

_decode = jax.jit(lambda params, ids, cfg: decoder.forward(params, cfg, input_ids=ids).logits, static_argnums=2)
_encode = jax.jit(lambda params, pixels, cfg: vit.encode(params, cfg, pixels), static_argnums=2)


def test_bf16_loaded_sharded_models_match_float32_within_bf16_tolerance(folders, eight_devices):
    mesh = sharding.make_mesh(MESHES["fsdp8"])
    ids = np.asarray(fx.prompt_batch("right")[0])
    cfg32, lm32 = hf_lm.load(folders["qwen2", "float32"], mesh=mesh)
    cfg16, lm16 = hf_lm.load(folders["qwen2", "bfloat16"], dtype="bfloat16", param_dtype=None, mesh=mesh)
    assert {leaf.dtype for leaf in jax.tree.leaves(lm16)} == {BF16}
    logits32, logits16 = np.asarray(_decode(lm32, ids, cfg32)), np.asarray(_decode(lm16, ids, cfg16), np.float32)
    scale = float(np.abs(logits32).max())
    np.testing.assert_allclose(logits16, logits32, atol=0.05 * scale, rtol=0)
    assert np.mean(logits16.argmax(-1) == logits32.argmax(-1)) > 0.8

    pixels = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    vcfg32, vit32 = hf_vision.load(folders["siglip", "float32"], mesh=mesh)
    vcfg16, vit16 = hf_vision.load(folders["siglip", "bfloat16"], dtype="bfloat16", mesh=mesh)
    assert {leaf.dtype for leaf in jax.tree.leaves(vit16)} == {BF16}
    out32, out16 = _encode(vit32, pixels, vcfg32), _encode(vit16, pixels, vcfg16)
    for a, b in ((out32.hidden_states, out16.hidden_states), (out32.pooled, out16.pooled)):
        a, b = np.asarray(a), np.asarray(b, np.float32)
        np.testing.assert_allclose(b, a, atol=0.05 * float(np.abs(a).max()), rtol=0)


# ------------------------------------------------------------------------------------------ errors, run set-up


def _edited_copy(tmp_path, folder: str, edit) -> str:
    copied = str(tmp_path / "edited")
    shutil.copytree(folder, copied)
    with open(os.path.join(copied, "config.json")) as f:
        config = json.load(f)
    edit(config)
    with open(os.path.join(copied, "config.json"), "w") as f:
        json.dump(config, f)
    return copied


def test_sharded_load_names_a_missing_tensor(folders, eight_devices, tmp_path):
    folder = _edited_copy(tmp_path, folders["qwen2", "bfloat16"], lambda c: c.update(num_hidden_layers=3))
    with pytest.raises(CheckpointFormatError, match="model.layers.2.* is missing"):
        hf_lm.load(folder, mesh=sharding.make_mesh(MESHES["fsdp8"]))


def test_sharded_load_refuses_tower_tensors_the_config_has_no_place_for(folders, eight_devices, tmp_path):
    folder = _edited_copy(tmp_path, folders["siglip", "float32"],
                          lambda c: c["vision_config"].update(num_hidden_layers=2))
    with pytest.raises(CheckpointFormatError, match="do not fit the config"):
        hf_vision.load(folder, mesh=sharding.make_mesh(MESHES["fsdp8"]))


@pytest.mark.parametrize("stage, trainable, lm_dtype", [(1, (), BF16), (2, (), F32), (2, ("connector",), BF16),
                                                        (1, ("connector", "lm"), F32)])
def test_load_towers_keeps_frozen_towers_in_the_compute_dtype(folders, eight_devices, stage, trainable, lm_dtype):
    config = ml_collections.ConfigDict({
        "stage": stage, "train": {"trainable": trainable},
        "model": {"source": "hf", "dtype": "bfloat16", "vision_folder": folders["siglip", "float32"],
                  "lm_folder": folders["qwen2", "bfloat16"]}})
    mesh = sharding.make_mesh(MESHES["fsdp8"])
    tokenizer = types.SimpleNamespace(vocab_size=fx.VOCAB)
    _, vision_params, _, lm_params = setup.load_towers(config, tokenizer, mesh)
    assert {leaf.dtype for leaf in jax.tree.leaves(vision_params)} == {BF16}
    assert {leaf.dtype for leaf in jax.tree.leaves(lm_params)} == {lm_dtype}
    assert vision_params["layers"]["mlp"]["fc1"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(
        None, "fsdp", None)
    # Without a mesh: the same values and dtypes on one device (what `jaxalign hf-verify` and tests use).
    _, single_vision, _, single_lm = setup.load_towers(config, tokenizer)
    for sharded, single in ((vision_params, single_vision), (lm_params, single_lm)):
        for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(_bits(np.asarray(a)), _bits(np.asarray(b)))
