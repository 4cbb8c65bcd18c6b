"""The faithful value encoder against the official module, rebuilt from Hugging Face's Perceiver blocks.

`OfficialEncoder` is the official code's `PerceiverMultiModalEncoder` (its memory-bank script), with its
`PerceiverConfig` (32 x 96 latents, d_model 128, qk / v channels 96, 8 + 8 heads, vocabulary 30522), on an
8 x 8 image, 48 byte positions (512 officially) and 2 self-attention layers (8 officially). jaxalign's
parameters are copied into it and both encode the same images and captions; the official module encodes one
unpadded caption at a time, as its script does. The initialisation is checked against the distributions PyTorch
draws the official module from.
"""
import math

import jax
import numpy as np
import pytest

from jaxalign.align import value_encoders
from jaxalign.align.value_encoders import PerceiverValueConfig

torch = pytest.importorskip("torch")
modeling_perceiver = pytest.importorskip("transformers.models.perceiver.modeling_perceiver")
from transformers import PerceiverConfig, PerceiverTokenizer  # noqa: E402

IMAGE_SIZE, SELF_LAYERS, TEXT_BYTES, OFFICIAL_VOCAB = 8, 2, 48, 30522
CONFIG = PerceiverValueConfig(image_size=IMAGE_SIZE, num_self_layers=SELF_LAYERS, max_text_bytes=TEXT_BYTES)
CAPTIONS = ["a red circle", "a blue square on the left of a small green triangle", "x", "café au lait"]


class OfficialEncoder(torch.nn.Module):
    """The official `PerceiverMultiModalEncoder`: a plain module, so `PreTrainedModel._init_weights` never runs."""

    def __init__(self, config: PerceiverConfig):
        super().__init__()
        image = modeling_perceiver.PerceiverImagePreprocessor(
            config, prep_type="conv1x1", spatial_downsample=1, out_channels=256, position_encoding_type="trainable",
            concat_or_add_pos="concat", project_pos_dim=256,
            trainable_position_encoding_kwargs=dict(num_channels=256, index_dims=config.image_size ** 2))
        text = modeling_perceiver.PerceiverTextPreprocessor(config)
        self.preprocessor = modeling_perceiver.PerceiverMultimodalPreprocessor(
            modalities={"image": image, "text": text}, min_padding_size=4)
        self.embeddings = modeling_perceiver.PerceiverEmbeddings(config)
        self.encoder = modeling_perceiver.PerceiverEncoder(config, kv_dim=self.preprocessor.num_channels)

    def forward(self, inputs):
        processed_inputs, _, _ = self.preprocessor(inputs)
        latent = self.embeddings(processed_inputs.shape[0])
        return self.encoder(latent, inputs=processed_inputs)[0]


def official_encoder(seed: int = 0) -> OfficialEncoder:
    torch.manual_seed(seed)
    config = PerceiverConfig(num_latents=32, d_latents=96, d_model=128, num_self_attends_per_block=SELF_LAYERS,
                             num_blocks=1, num_self_attention_heads=8, num_cross_attention_heads=8, qk_channels=96,
                             v_channels=96, image_size=IMAGE_SIZE, vocab_size=OFFICIAL_VOCAB,
                             max_position_embeddings=TEXT_BYTES)
    return OfficialEncoder(config).eval()   # eval: the attention dropout (0.1) off, as the official script runs it


def official_layout(params: dict, cfg: PerceiverValueConfig) -> dict[str, np.ndarray]:
    """jaxalign's parameters under the official module's names and layouts (torch Linear weights are [out, in];
    heads split the channels as (head, channel in head))."""
    params = jax.tree.map(np.asarray, params)

    def linear(p: dict, heads_in: bool = False) -> dict:
        """Kernels [in, out], [in, heads, head_dim] (q, k, v) or, heads_in, [heads, head_dim, out] (output)."""
        kernel = p["kernel"]
        flat = kernel.reshape(-1, kernel.shape[-1]) if heads_in else kernel.reshape(kernel.shape[0], -1)
        return {"weight": flat.T, "bias": p["bias"].reshape(-1)}

    def layer(p: dict, prefix: str) -> dict:
        names = {"attention.self.layernorm1": {"weight": p["query_norm"]["scale"], "bias": p["query_norm"]["bias"]},
                 "attention.self.query": linear(p["query"]), "attention.self.key": linear(p["key"]),
                 "attention.self.value": linear(p["value"]), "attention.output.dense": linear(p["out"], heads_in=True),
                 "layernorm": {"weight": p["mlp_norm"]["scale"], "bias": p["mlp_norm"]["bias"]},
                 "mlp.dense1": linear(p["mlp_in"]), "mlp.dense2": linear(p["mlp_out"])}
        if "key_norm" in p:
            names["attention.self.layernorm2"] = {"weight": p["key_norm"]["scale"], "bias": p["key_norm"]["bias"]}
        return {f"{prefix}.{name}.{leaf}": value for name, leaves in names.items() for leaf, value in leaves.items()}

    image = "preprocessor.modalities.image"
    text = "preprocessor.modalities.text"
    state = {
        f"{image}.convnet_1x1.weight": params["image_projection"]["kernel"].T[:, :, None, None],
        f"{image}.convnet_1x1.bias": params["image_projection"]["bias"],
        f"{image}.position_embeddings.position_embeddings": params["image_positions"],
        f"{image}.positions_projection.weight": params["image_position_projection"]["kernel"].T,
        f"{image}.positions_projection.bias": params["image_position_projection"]["bias"],
        f"{text}.embeddings.weight": params["byte_embedding"],
        f"{text}.position_embeddings.weight": params["byte_positions"],
        "preprocessor.padding.image": params["image_padding"][None],
        "preprocessor.padding.text": params["text_padding"][None],
        "embeddings.latents": params["latents"],
        **layer(params["cross"], "encoder.cross_attention"),
    }
    for index in range(cfg.num_self_layers):
        state.update(layer(jax.tree.map(lambda leaf: leaf[index], params["self"]), f"encoder.self_attends.{index}"))
    return state


@pytest.fixture(scope="module")
def params():
    return value_encoders.init_perceiver_values(CONFIG)


def test_the_official_module_has_exactly_jaxalign_parameters(params):
    """Same architecture: every official parameter has a jaxalign counterpart of the same shape, and no more (the
    byte table aside: the official one has 30522 rows, of which only the 262 byte ids are ever read)."""
    official = official_encoder()
    mine = official_layout(params, CONFIG)
    theirs = {name: tuple(value.shape) for name, value in official.state_dict().items()}
    assert set(mine) == set(theirs)
    byte_table = "preprocessor.modalities.text.embeddings.weight"
    for name, value in mine.items():
        expected = (value_encoders.BYTE_VOCAB, theirs[name][1]) if name == byte_table else theirs[name]
        assert value.shape == expected, name
    assert official.preprocessor.num_channels == CONFIG.input_width == 516


def test_caption_bytes_are_the_official_tokenizer_ids():
    ids, mask = value_encoders.caption_bytes(CAPTIONS, TEXT_BYTES)
    tokenizer = PerceiverTokenizer()
    for row, caption in enumerate(CAPTIONS):
        # Cut as the 512-position table requires ([CLS] and [SEP] kept); CAPTIONS[1] is longer than TEXT_BYTES.
        assert ids[row][mask[row]].tolist() == tokenizer(caption, max_length=TEXT_BYTES, truncation=True)["input_ids"]


def test_outputs_match_the_official_module(params):
    official = official_encoder()
    state = {name: torch.from_numpy(np.array(value)) for name, value in
             official_layout(params, CONFIG).items()}
    byte_table = "preprocessor.modalities.text.embeddings.weight"
    full_table = official.state_dict()[byte_table].clone()
    full_table[: value_encoders.BYTE_VOCAB] = state[byte_table]
    state[byte_table] = full_table
    official.load_state_dict(state, strict=True)

    rng = np.random.default_rng(0)
    images = rng.normal(size=(len(CAPTIONS), IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    ids, mask = value_encoders.caption_bytes(CAPTIONS, TEXT_BYTES)
    mine = np.asarray(jax.jit(value_encoders.perceiver_values, static_argnums=1)(params, CONFIG, images, ids, mask))
    with torch.no_grad():
        theirs = np.concatenate([official({
            "image": torch.from_numpy(images[row : row + 1]).permute(0, 3, 1, 2),   # NCHW, as the script passes it
            "text": torch.from_numpy(ids[row : row + 1, mask[row]].astype(np.int64))}).numpy()
            for row in range(len(CAPTIONS))])
    assert mine.shape == theirs.shape == (len(CAPTIONS), 32, 96)
    np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-4)


def _torch_bound(weight_shape: tuple[int, ...]) -> float:
    """1/sqrt(fan_in) of a torch Linear / Conv2d weight ([out, in, *kernel])."""
    return 1.0 / math.sqrt(int(np.prod(weight_shape[1:])))


def test_init_follows_the_official_distributions(params):
    mine = official_layout(params, CONFIG)
    theirs = {name: value.numpy() for name, value in official_encoder().state_dict().items()}   # PyTorch's draw
    # Tables: N(0, 1) (torch.randn, nn.Embedding).
    for name in ("embeddings.latents", "preprocessor.modalities.image.position_embeddings.position_embeddings",
                 "preprocessor.modalities.text.embeddings.weight",
                 "preprocessor.modalities.text.position_embeddings.weight", "preprocessor.padding.text"):
        assert abs(mine[name].mean()) < 0.06 and mine[name].std() == pytest.approx(1.0, rel=0.05), name
    # Dense and convolution kernels and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    linears = [name[: -len(".weight")] for name in theirs if name.endswith(".weight") and theirs[name].ndim in (2, 4)
               and "embeddings" not in name]
    assert len(linears) == 2 + 6 * (1 + SELF_LAYERS)   # the conv, positions_projection; q, k, v, out, mlp x 2
    for base in linears:
        bound = _torch_bound(theirs[f"{base}.weight"].shape)
        for leaf in ("weight", "bias"):
            values = mine[f"{base}.{leaf}"]
            assert np.abs(values).max() <= bound and np.abs(values).max() > 0.9 * bound, (base, leaf)
            assert np.abs(theirs[f"{base}.{leaf}"]).max() <= bound   # the rule is PyTorch's indeed
        weight = mine[f"{base}.weight"]
        if weight.size >= 5000:
            assert weight.std() == pytest.approx(bound / math.sqrt(3), rel=0.03), base
            assert weight.std() == pytest.approx(theirs[f"{base}.weight"].std(), rel=0.05), base
    # LayerNorms: ones and zeros, as torch leaves them.
    for name, value in theirs.items():
        if "layernorm" in name:
            np.testing.assert_array_equal(mine[name], value)
            np.testing.assert_array_equal(value, 1.0 if name.endswith("weight") else 0.0)
