"""The TinyAlign vision-language model: frozen vision tower, connector, retrieval, splice, language model.

Parameters are namespaced like big_vision's VLMs: {'vision': ..., 'connector': ..., 'retrieval_connector': ...,
'lm': ...}. One alignment step (ARCHITECTURE.md, "Data flow of one alignment step") is one pure function:

    pixels ──vision (frozen, stop-gradient)──► features ──connector──► image tokens ───────────────┐
    input_ids (sentinels -> pad) ──LM embedding──► text embeddings ────────────────────────────────┤
    query = retrieval_key(features | image tokens, text embeddings)      (stop-gradient)           │
    memory.search(query, k, exclude_ids = own id / group in training) ──► rows ──control──► values┤
    values ──(token ids: LM embedding)──retrieval connector──► retrieved tokens ───────────────────┤
    splice [prefix][image tokens][retrieved tokens][rest] ──► LM ──► hidden states ──► CE on answers

Modes (`TinyAlignConfig.query.mode`):
- 'default': keys and queries from the frozen encoders (`memory_keys.default_key`), token-id values of the
  neighbours' answers / captions embedded with the LM's own table, leave-one-out in training: of the sample's
  own entry, or with `leave_out_group` of every entry of its group (its image; the batch's `group_member_ids`).
- 'faithful': the official recipe: softmax-mean query over connector outputs and all text from `text_start`
  (padding and answers included), Perceiver latent values, no leave-one-out (a sample can retrieve itself).
Control 'off' is the TinyLLaVA baseline: no search and no retrieved tokens at all. Control 'oracle' gives every
slot the sample's own value from the batch's `oracle_value_ids` [B, Lv] (see `controls.py` for all controls).

Public API:
  TinyAlignConfig
  init(cfg, key) -> params;  init_connectors(cfg, key) -> {'connector', 'retrieval_connector'}
  logical_axes(cfg) -> PartitionSpecs of params
  image_features(params, cfg, pixels) -> [B, N, Ev];  image_tokens(params, cfg, features) -> [B, Ni, d]
  retrieval_key(params, cfg, batch, features, image_tokens, text_embeddings) -> [B, key_dim]
  build_lm_inputs(params, cfg, batch, memory, train, padding_side='right') -> (SplicedInputs, aux)
  vlm_forward(params, cfg, batch, memory, rng, train) -> (hidden [B, L, E], labels [B, L], aux)
  excluded_ids(cfg, batch, train) -> None | [B] own ids | [B, G] group ids: what the search leaves out
  in_sample_group(retrieved_ids [B, k], group_member_ids [B, G]) -> [B, k] bool
  make_bank_encoder(cfg, perceiver_cfg=None) -> encode(params, perceiver_params, batch) -> (keys, values)
  numpy_batch(batch) -> the array fields of a pipeline batch
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.align import controls, memory_keys, query as query_lib, silhouette, splice, value_encoders
from jaxalign.align.controls import RetrievalControl
from jaxalign.align.query import QueryConfig
from jaxalign.data import image_ops
from jaxalign.models import connector, decoder, vit
from jaxalign.models.connector import ConnectorConfig
from jaxalign.models.decoder import DecoderConfig
from jaxalign.models.vit import VisionConfig

PyTree = Any
VALUE_KINDS = ("tokens", "latents")
GROUP_FIELD = "group_member_ids"   # training batches: [B, G] bank ids of each sample's group (leave_out 'group')
ORACLE_FIELD = "oracle_value_ids"  # control 'oracle': [B, value_length] each sample's own value (pipeline.OracleValues)


@dataclasses.dataclass(frozen=True)
class TinyAlignConfig:
    """The whole model; hashable, so it is a static argument of `jax.jit`.

    Attributes:
      vision, lm, connector, retrieval_connector: the parts (connector: vision width -> LM width; retrieval
        connector: value width -> LM width, i.e. LM width -> LM width for token values, 96 -> LM width for the
        faithful latents).
      query: query mode ('default' | 'faithful') and the image / text weights.
      control: 'real' | 'shuffled' | 'shuffle_within_group' | 'constant' | 'oracle' | 'off' (`controls.py`).
      value_kind: 'tokens' (token ids embedded by the LM) or 'latents' (float [P, w] values, e.g. Perceiver).
      value_length: tokens per value (token values) or latents per value (32 for the Perceiver).
      k: neighbours per sample.
      leave_one_out: in training, a sample may not retrieve its own entry (the default mode; faithful: False).
      leave_out_group: with leave_one_out, nor any entry of its group (same image): the batch's
        `group_member_ids` [B, G] (`memory_keys.GroupMembers`). `leave_out` names the three settings.
      vision_layer: which vision layer feeds the connector (Hugging Face hidden_states indexing; -2 as LLaVA).
      drop_first_vision_token: drop feature token 0 (the official code's inherited CLIP class-token bug, which
        with SigLIP drops a real patch); True in faithful mode.
      search_method: memory search method ('exact' | 'binned' | 'approx' | 'auto').
      max_length: LM sequence length after splicing (the data pipeline counts the expanded sentinels).
      loss_chunk_size: vocabulary columns per chunk of the cross-entropy.
    """

    vision: VisionConfig
    lm: DecoderConfig
    connector: ConnectorConfig
    retrieval_connector: ConnectorConfig
    query: QueryConfig = QueryConfig()
    control: RetrievalControl = RetrievalControl()
    value_kind: str = "tokens"
    value_length: int = 8
    k: int = 3
    leave_one_out: bool = True
    leave_out_group: bool = False
    vision_layer: int = -2
    drop_first_vision_token: bool = False
    search_method: str = "exact"
    max_length: int = 512
    loss_chunk_size: int = 8192

    def __post_init__(self):
        if self.value_kind not in VALUE_KINDS:
            raise ValueError(f"TinyAlignConfig.value_kind={self.value_kind!r}; expected one of {VALUE_KINDS}")
        if self.connector.in_dim != self.vision.hidden_size or self.connector.out_dim != self.lm.hidden_size:
            raise ValueError(f"the connector maps {self.connector.in_dim} -> {self.connector.out_dim}, but the "
                             f"vision width is {self.vision.hidden_size} and the LM width {self.lm.hidden_size}")
        if self.retrieval_connector.out_dim != self.lm.hidden_size:
            raise ValueError(f"retrieval_connector.out_dim={self.retrieval_connector.out_dim} must be the LM width "
                             f"{self.lm.hidden_size}")
        if self.value_kind == "tokens" and self.retrieval_connector.in_dim != self.lm.hidden_size:
            raise ValueError("token values are embedded with the LM table, so retrieval_connector.in_dim must be "
                             f"the LM width {self.lm.hidden_size}, got {self.retrieval_connector.in_dim}")
        if self.k < 1 or self.value_length < 1:
            raise ValueError(f"k={self.k} and value_length={self.value_length} must be >= 1")
        if self.control.kind == "oracle" and self.value_kind != "tokens":
            raise ValueError("the 'oracle' retrieval control hands each sample its own token value, so it needs "
                             f"token values (mode 'default'), not value_kind={self.value_kind!r}")

    @property
    def leave_out(self) -> str:
        """What a training sample may not retrieve: 'none', 'self' (its own entry) or 'group' (its group's)."""
        if not self.leave_one_out:
            return "none"
        return "group" if self.leave_out_group else "self"

    @property
    def retrieval(self) -> bool:
        """False for the TinyLLaVA baseline (control 'off')."""
        return controls.retrieval_enabled(self.control)

    @property
    def num_vision_tokens(self) -> int:
        return self.vision.num_patches - int(self.drop_first_vision_token)  # a CLIP class token is always dropped

    @property
    def num_image_tokens(self) -> int:
        """Image tokens spliced per sample (what the pipeline's `image_length` must be)."""
        return self.connector.num_output_tokens(self.num_vision_tokens)

    @property
    def num_retrieved_tokens(self) -> int:
        """Retrieved tokens spliced per sample at most (the pipeline's `retrieval_length`); 0 when off."""
        if not self.retrieval:
            return 0
        return self.retrieval_connector.num_output_tokens(self.k * self.value_length)

    @property
    def key_dim(self) -> int:
        if self.query.mode == "faithful":
            return self.lm.hidden_size
        if self.query.key_encoder == "silhouette":
            return silhouette.feature_dim(channels=self.vision.num_channels)
        return self.vision.hidden_size + self.lm.hidden_size


# ----------------------------------------------------------------------------------------------- parameters
def init_connectors(cfg: TinyAlignConfig, key: jax.Array, identity_retrieval: bool = False) -> dict:
    """Random connector and retrieval-connector parameters.

    With `identity_retrieval` and a square 'linear' retrieval connector (token values), the retrieval connector
    starts as the identity: the LM then reads the neighbours' tokens exactly as its own embeddings from step 0,
    instead of learning that map from a random projection.
    """
    connector_key, retrieval_key_ = jax.random.split(key)
    params = {"connector": connector.init(cfg.connector, connector_key),
              "retrieval_connector": connector.init(cfg.retrieval_connector, retrieval_key_)}
    rc = cfg.retrieval_connector
    if identity_retrieval:
        if rc.kind != "linear" or rc.in_dim != rc.out_dim:
            raise ValueError("identity_retrieval needs a square 'linear' retrieval connector, got "
                             f"{rc.kind} {rc.in_dim} -> {rc.out_dim}")
        params["retrieval_connector"]["dense_0"] = {"kernel": jnp.eye(rc.in_dim, dtype=jnp.float32),
                                                    "bias": jnp.zeros((rc.out_dim,), jnp.float32)}
    return params


def init(cfg: TinyAlignConfig, key: jax.Array, identity_retrieval: bool = False) -> dict:
    """Random parameters of every part (tests and tiny runs; real towers come from `jaxalign.io`)."""
    vision_key, lm_key, connector_key = jax.random.split(key, 3)
    return {"vision": vit.init(cfg.vision, vision_key), "lm": decoder.init(cfg.lm, lm_key),
            **init_connectors(cfg, connector_key, identity_retrieval)}


def logical_axes(cfg: TinyAlignConfig) -> dict:
    return {"vision": vit.logical_axes(cfg.vision), "connector": connector.logical_axes(cfg.connector),
            "retrieval_connector": connector.logical_axes(cfg.retrieval_connector),
            "lm": decoder.logical_axes(cfg.lm)}


# -------------------------------------------------------------------------------------------------- parts
def image_features(params: dict, cfg: TinyAlignConfig, pixels: jax.Array) -> jax.Array:
    """Frozen vision features [B, N, Ev] of pixels [B, H, W, C]; no gradient flows into the tower."""
    features = vit.encode(params["vision"], cfg.vision, pixels, layer=cfg.vision_layer,
                          drop_class_token=True).hidden_states
    if cfg.drop_first_vision_token:
        features = features[:, 1:]
    return jax.lax.stop_gradient(features)


def image_tokens(params: dict, cfg: TinyAlignConfig, features: jax.Array) -> jax.Array:
    """Connector outputs [B, Ni, d]: the image as LM input tokens."""
    return connector.apply(params["connector"], cfg.connector, features)


def text_embeddings(params: dict, cfg: TinyAlignConfig, input_ids: jax.Array) -> jax.Array:
    """LM input embeddings [B, L, d]; sentinel ids (negative) are embedded as id 0 (the splice drops them)."""
    return decoder.embed(params["lm"], cfg.lm, splice.replace_sentinels(input_ids, 0))


def retrieval_key(params: dict, cfg: TinyAlignConfig, batch: dict, features: jax.Array, tokens: jax.Array,
                  embeddings: jax.Array) -> jax.Array:
    """The query of a batch, which is also how the bank's keys are made ([B, key_dim] unit float32)."""
    query_cfg = cfg.query
    if query_cfg.mode == "faithful":
        start = jnp.where(batch["text_start"] >= 0, batch["text_start"], query_cfg.text_start)
        # The official batch ends at its longest sample; a batch padded to a length bucket ends later, so the
        # query stops where the batch's last real token is (left-padded prompts end at the batch's end anyway).
        positions = jnp.arange(batch["attention_mask"].shape[1])
        end = jnp.max(jnp.where(batch["attention_mask"] > 0, positions[None, :], -1)) + 1
        return query_lib.faithful_query(tokens, embeddings, start, query_cfg.image_weight, query_cfg.text_weight,
                                        text_end=end)
    if query_cfg.key_encoder == "silhouette":
        mean, std = image_ops.NORMALISATION[cfg.vision.variant]   # back to [0, 1] pixels
        pixels = batch["pixels"].astype(jnp.float32) * jnp.asarray(std) + jnp.asarray(mean)
        return query_lib.unit_rows(silhouette.silhouette_features(pixels))
    text_mask = query_lib.prompt_text_mask(batch["attention_mask"], batch["labels"], batch["input_ids"])
    return memory_keys.default_key(features, embeddings, text_mask, query_cfg.image_weight, query_cfg.text_weight)


def excluded_ids(cfg: TinyAlignConfig, batch: dict, train: bool) -> jax.Array | None:
    """The bank ids each sample may not retrieve: None (evaluation, or leave_out 'none'), its own id [B]
    ('self'), or its group's ids [B, G] from the batch's `group_member_ids` ('group', -1 padded)."""
    if not (train and cfg.leave_one_out):
        return None
    if not cfg.leave_out_group:
        return batch["sample_index"]
    if GROUP_FIELD not in batch:
        raise ValueError(f"leave_out='group' needs the batch field {GROUP_FIELD!r} [B, G] (the bank ids of each "
                         "sample's group): make the training batches with pipeline.make_vqa_dataset(group_members="
                         "memory_keys.source_group_members(...)), as tinyalign_setup.build_run sets up")
    return batch[GROUP_FIELD]


def _check_oracle_field(cfg: TinyAlignConfig, oracle_values: Any, batch_size: int | None = None) -> None:
    """Control 'oracle' needs the batch's `oracle_value_ids` [B, value_length]; other controls ignore it."""
    if cfg.control.kind != "oracle":
        return
    if oracle_values is None:
        raise ValueError(f"the 'oracle' control needs the batch field {ORACLE_FIELD!r} [B, value_length]: make the "
                         "batches with pipeline.make_vqa_dataset / make_eval_dataset(oracle_values=memory_keys."
                         "oracle_values(value_length)), as tinyalign_setup.build_memory sets up")
    expected = (oracle_values.shape[0] if batch_size is None else batch_size, cfg.value_length)
    if tuple(oracle_values.shape) != expected:
        raise ValueError(f"{ORACLE_FIELD} has shape {tuple(oracle_values.shape)}; expected [batch, value_length] = "
                         f"{expected}")


def _retrieve(params: dict, cfg: TinyAlignConfig, memory: memory_keys.RetrievalMemory, query: jax.Array,
              exclude: jax.Array | None, oracle_values: jax.Array | None = None
              ) -> tuple[jax.Array, jax.Array, dict]:
    """Search, control and value mapping: retrieved tokens [B, Nr, d], their mask [B, Nr] and search info.

    `exclude`: `excluded_ids` ([B] or [B, G] bank ids, or None). A row control never hands a sample a value the
    search may not return: its remapped rows are moved off the excluded entries (the own one, or with groups
    every entry of the group). `oracle_values`: control 'oracle', [B, Lv] the batch's own values, given to each
    of the k slots that the search filled (so the token count is that of 'real'); its `value_ids` are -1 (no
    bank row: the value came from the batch)."""
    bank = memory.bank
    result = bank.search(query, cfg.k, method=cfg.search_method, exclude_ids=exclude, with_values=False)
    found = result.rows >= 0                                                   # [B, k]
    if cfg.control.kind == "oracle":
        _check_oracle_field(cfg, oracle_values, query.shape[0])
        oracle_values = jnp.asarray(oracle_values, jnp.int32)
        ids = jnp.where(found[:, :, None], oracle_values[:, None, :], value_encoders.VALUE_PAD_ID)
        value_ids = jnp.full(found.shape, -1, jnp.int32)
    else:
        if cfg.control.kind == "real":
            value_rows = result.rows
        else:
            excluded_rows = None if exclude is None else memory_keys.own_rows(bank, exclude)   # [B] or [B, G]
            value_rows = controls.controlled_value_ids(cfg.control, jnp.where(found, result.rows, 0),
                                                       memory.num_rows, memory.permutation, excluded_rows)
        value_rows = jnp.where(found, value_rows, -1)
        values = bank.gather_values(value_rows)
        value_ids = jnp.where(value_rows >= 0, bank.ids[jnp.clip(value_rows, 0)], -1)
        if cfg.value_kind == "tokens":
            ids = jnp.where(found[:, :, None], values["tokens"], value_encoders.VALUE_PAD_ID)
    info = {"retrieved_ids": result.ids, "value_ids": value_ids, "scores": result.scores}
    if cfg.value_kind == "tokens":
        embed = functools.partial(decoder.embed, params["lm"], cfg.lm)
        raw, mask = value_encoders.retrieved_tokens_from_ids(embed, ids)
        info["value_token_ids"] = ids
    else:
        raw = value_encoders.flatten_retrieved(values["latents"])
        mask = jnp.repeat(found, values["latents"].shape[2], axis=1)
    tokens = connector.apply(params["retrieval_connector"], cfg.retrieval_connector, raw, mask)
    if cfg.retrieval_connector.kind == "resampler":
        mask = jnp.ones(tokens.shape[:2], bool)
    return tokens, mask, info


def build_lm_inputs(params: dict, cfg: TinyAlignConfig, batch: dict, memory: memory_keys.RetrievalMemory | None,
                    train: bool, padding_side: str = "right") -> tuple[splice.SplicedInputs, dict]:
    """Everything before the LM: image tokens, query, retrieval and the splice.

    Args:
      params: {'vision', 'connector', 'retrieval_connector', 'lm'}.
      cfg: the model.
      batch: pixels [B, H, W, C]; input_ids, labels, attention_mask [B, L]; image_index, retrieval_index,
        text_start, sample_index [B] (the pipeline's batch); with `cfg.leave_out_group`, group_member_ids [B, G];
        with control 'oracle', oracle_value_ids [B, value_length].
      memory: the bank (ignored, may be None, when retrieval is off).
      train: leave-one-out applies only in training (evaluation samples are not in the bank).
      padding_side: 'right' for training, 'left' for generation prompts.
    Returns:
      (SplicedInputs of length cfg.max_length, or L for a right-padded batch narrower than that, aux) with aux
      {'query', 'retrieved_ids', 'value_ids', 'scores'} (retrieval fields only when retrieval is on), and for
      token values 'value_token_ids' [B, k, Lv] (the ids the LM reads, -1 padded).

    Length buckets: the training pipeline pads a batch to a length bucket L <= cfg.max_length chosen so that every
    row's spliced length (text, with each sentinel counted as the image / retrieved positions it stands for)
    fits in L; the splice output is then cut at L, which removes only padding, and the step's shapes follow the
    bucket. Batches of width cfg.max_length (no buckets, evaluation) and generation prompts (left padded) keep
    cfg.max_length. A hand-made right-padded batch narrower than cfg.max_length must obey the same rule.
    """
    if cfg.retrieval and memory is None:
        raise ValueError(f"retrieval control {cfg.control.kind!r} needs a memory bank; pass memory=...")
    _check_oracle_field(cfg, batch.get(ORACLE_FIELD))
    features = image_features(params, cfg, batch["pixels"])
    tokens = image_tokens(params, cfg, features)
    embeddings = text_embeddings(params, cfg, batch["input_ids"])
    aux: dict = {}
    retrieved = retrieved_mask = None
    if cfg.retrieval:
        query = retrieval_key(params, cfg, batch, features, tokens, embeddings)
        retrieved, retrieved_mask, info = _retrieve(params, cfg, memory, query, excluded_ids(cfg, batch, train),
                                                    batch.get(ORACLE_FIELD))
        aux.update(info, query=query)
    max_length = cfg.max_length
    if padding_side == "right":
        max_length = min(max_length, batch["input_ids"].shape[1])  # the batch's length bucket
    spliced = splice.splice_inputs(embeddings, batch["attention_mask"], batch["labels"], batch["image_index"],
                                   tokens, retrieved, retrieved_mask, batch["retrieval_index"],
                                   max_length=max_length, padding_side=padding_side)
    return spliced, aux


def vlm_forward(params: dict, cfg: TinyAlignConfig, batch: dict, memory: memory_keys.RetrievalMemory | None,
                rng: jax.Array | None, train: bool) -> tuple[jax.Array, jax.Array, dict]:
    """One forward pass of the VLM up to the LM's final hidden states (jit-able as one function).

    Args:
      params, cfg, batch, memory, train: see `build_lm_inputs`.
      rng: unused by the current model (it has no dropout); kept so that stochastic parts need no new signature.
    Returns:
      hidden [B, L, E] final-normed LM hidden states (L: cfg.max_length, or the batch's length bucket, see
      `build_lm_inputs`); labels [B, L] (not shifted; -100 on prompt, image, retrieved and padding positions);
      aux: `build_lm_inputs`'s plus 'token_kind', 'attention_mask', 'positions' [B, L].
    """
    del rng
    spliced, aux = build_lm_inputs(params, cfg, batch, memory, train)
    out = decoder.forward(params["lm"], cfg.lm, inputs_embeds=spliced.inputs_embeds,
                          attention_mask=spliced.attention_mask, positions=spliced.positions, return_hidden=True,
                          compute_logits=False)
    aux.update(token_kind=spliced.token_kind, attention_mask=spliced.attention_mask, positions=spliced.positions)
    return out.hidden, spliced.labels, aux


# ----------------------------------------------------------------------------------------------- the bank
def make_bank_encoder(cfg: TinyAlignConfig, perceiver_cfg: value_encoders.PerceiverValueConfig | None = None):
    """`encode(params, perceiver_params, batch) -> (keys [b, key_dim], values)` for `memory_keys.build_bank`.

    Keys come from `retrieval_key`, the very function that makes the queries. Values: {'tokens': [b, Lv]}
    (from the batch's 'value_tokens') or {'latents': [b, P, w]} (faithful Perceiver over pixels and bytes).
    """
    def encode(params: dict, perceiver_params: dict | None, batch: dict):
        features = image_features(params, cfg, batch["pixels"])
        tokens = image_tokens(params, cfg, features)
        embeddings = text_embeddings(params, cfg, batch["input_ids"])
        keys = retrieval_key(params, cfg, batch, features, tokens, embeddings)
        if cfg.value_kind == "tokens":
            return keys, {"tokens": batch["value_tokens"]}
        latents = value_encoders.perceiver_values(perceiver_params, perceiver_cfg, batch["pixels"],
                                                  batch["value_bytes"], batch["value_byte_mask"])
        return keys, {"latents": latents}
    return encode


def sample_ids_equal(retrieved_ids: jax.Array, sample_ids: jax.Array) -> jax.Array:
    """[B, k] bool: where a retrieved id is the sample's own id (leave-one-out must make this all False)."""
    return retrieved_ids == sample_ids[:, None]


def in_sample_group(retrieved_ids: jax.Array, group_member_ids: jax.Array) -> jax.Array:
    """[B, k] bool: where a retrieved id is one of the sample's group members [B, G] (-1 padding never matches a
    found id; leave-one-out by group must make this all False)."""
    hit = jnp.any(retrieved_ids[:, :, None] == group_member_ids[:, None, :], axis=-1)
    return hit & (retrieved_ids >= 0)


def numpy_batch(batch: dict) -> dict:
    """The array fields of a pipeline batch (string fields such as 'answer' removed), as NumPy."""
    return {name: np.asarray(value) for name, value in batch.items()
            if name not in ("answer", "question_type") and np.asarray(value).dtype != object}
