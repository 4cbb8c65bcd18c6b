"""A CLUTRR text student on a pretrained BERT encoder: the BERT and BERT-LSTM baselines of Sinha et al. (2019).

The student reads the WordPiece ids of an anonymised story, [CLS] story [SEP], runs BERT (fine-tuned end to end),
optionally a bidirectional LSTM over BERT's token states (BERT-LSTM), and answers "how is the target related to
the source" from the same latent as the students of `jaxalign.models.text_encoders`:

    latent = [mean state over the source's mentions; mean over the target's mentions; mean over the story]

read by a 2-layer MLP classifier. `apply` returns `text_encoders.TextEncoderOutput`, so the distillation losses
(KD on logits, contrastive on the latent, FitNets on `entity_states`) take this student unchanged.

Entities. Stories are anonymised as for the other students (`clutrr_batches.anonymise`: person -> `@entK` with
a random slot K per story), and entity slot K is written as BERT's vocabulary token `[unusedK]`. Why that token:
  * one mention is exactly one position, so mention pooling and `token_node` stay per token (WordPiece would cut
    `@ent12` into '@', 'en', '##t', '##12', and a real name into a varying number of pieces);
  * the ids are already in the pretrained vocabulary: the embedding table keeps its shape, so the fine-tuned
    encoder still exports to a Hugging Face folder with the original config, and no new rows need a special
    initialisation (the unused rows were never trained on text, so a slot carries no name's prior, e.g. gender);
  * the WordPiece text around a mention is exactly what the tokenizer gives for the story, because the story is
    cut only at mentions, which are word boundaries.

Batch keys (`featurise`): tokens [B, L] (WordPiece ids, [CLS] first), attention_mask [B, L] (real positions,
[CLS] and [SEP] included), token_mask [B, L] (the story's pieces only: what "mean over the story" averages),
token_node / source_mentions / target_mentions [B, L], source / target / label / example_mask [B], as in
`clutrr_batches.text_batch`.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.data.wordpiece import WordPieceTokenizer
from jaxalign.distill import clutrr_batches
from jaxalign.distill.clutrr_batches import StoryRow, TextReport, Vocabulary
from jaxalign.io import hf_bert
from jaxalign.models import bert, layers, text_encoders
from jaxalign.models.bert import BertConfig
from jaxalign.models.layers import EMBED, MLP
from jaxalign.models.text_encoders import TextEncoderOutput

ENTITY_VOCABULARY_TOKEN = "[unused{slot}]"
_MENTION = re.compile(rf"({re.escape(clutrr_batches.ENTITY_PREFIX)}\d+)")


@dataclasses.dataclass(frozen=True)
class BertStudentConfig:
    """Shape of a BERT student; hashable, so it can be a static argument of `jax.jit`.

    Attributes:
      bert: the encoder (from the pretrained folder, see `init_from_pretrained`); its `dropout` is BERT's hidden
        dropout during training.
      use_lstm: run a bidirectional LSTM over BERT's token states (BERT-LSTM); False pools BERT's states directly.
      lstm_hidden: LSTM width per direction.
      num_classes: answer classes.
      max_nodes: graph nodes for `entity_states` (the GNN teacher's budget).
      dropout: dropout rate on the latent before the classifier, applied only when `apply` gets an rng.
    """

    bert: BertConfig = BertConfig()
    use_lstm: bool = False
    lstm_hidden: int = 128
    num_classes: int = 18
    max_nodes: int = 16
    dropout: float = 0.1

    @property
    def state_dim(self) -> int:
        """Width of one token state: both LSTM directions, or BERT's width."""
        return 2 * self.lstm_hidden if self.use_lstm else self.bert.hidden

    @property
    def latent_dim(self) -> int:
        return 3 * self.state_dim

    @property
    def dtype(self) -> str:
        return self.bert.dtype


# ------------------------------------------------------------------------------------------ parameters


def _dense(in_dim: int, out_dim: int, in_axis: str | None = EMBED, out_axis: str | None = MLP,
           bias: bool = True) -> dict:
    return layers.dense_spec(in_dim, out_dim, in_axis, out_axis, bias=bias, scale=1.0 / max(in_dim, 1) ** 0.5)


def _head_specs(cfg: BertStudentConfig) -> dict:
    """Everything but the encoder: the LSTM (laid out as `text_encoders.lstm` reads it) and the classifier."""
    specs: dict = {}
    if cfg.use_lstm:
        specs["lstm"] = {direction: {"input": _dense(cfg.bert.hidden, 4 * cfg.lstm_hidden),
                                     "recurrent": _dense(cfg.lstm_hidden, 4 * cfg.lstm_hidden, bias=False)}
                         for direction in ("forward", "backward")}
    specs["classifier"] = {"hidden": _dense(cfg.latent_dim, cfg.state_dim),
                           "output": _dense(cfg.state_dim, cfg.num_classes, MLP, None)}
    return specs


def param_specs(cfg: BertStudentConfig) -> dict:
    """ParamSpec pytree: {'bert': `bert.param_specs`, 'lstm' (with use_lstm), 'classifier'}."""
    return {"bert": bert.param_specs(cfg.bert), **_head_specs(cfg)}


def init(cfg: BertStudentConfig, key: jax.Array) -> dict:
    """Random parameters, encoder included (for tests and small configs; real students start pretrained)."""
    return layers.init_params(param_specs(cfg), key)


def init_from_pretrained(folder: str, key: jax.Array, *, use_lstm: bool = False, lstm_hidden: int = 128,
                         num_classes: int = 18, max_nodes: int = 16, dropout: float = 0.1,
                         bert_dropout: float | None = None, dtype: str = "float32"
                         ) -> tuple[BertStudentConfig, dict]:
    """A student whose encoder is the BERT of a Hugging Face folder and whose LSTM and classifier are random.

    Args:
      folder: a BERT snapshot folder (config.json, model.safetensors), e.g. sentence-transformers'
        all-MiniLM-L6-v2; read by `jaxalign.io.hf_bert.load`.
      key: draws the LSTM and classifier.
      use_lstm, lstm_hidden, num_classes, max_nodes, dropout: `BertStudentConfig` fields.
      bert_dropout: BERT's hidden dropout while training; None keeps the folder's hidden_dropout_prob.
      dtype: compute dtype of the encoder ('float32' or 'bfloat16'); parameters stay float32.
    Returns:
      (config, params) with params = {'bert': ..., 'lstm': ... (with use_lstm), 'classifier': ...}.
    """
    bert_cfg, bert_params = hf_bert.load(folder, dtype)
    if bert_dropout is not None:
        bert_cfg = dataclasses.replace(bert_cfg, dropout=bert_dropout)
    cfg = BertStudentConfig(bert=bert_cfg, use_lstm=use_lstm, lstm_hidden=lstm_hidden, num_classes=num_classes,
                            max_nodes=max_nodes, dropout=dropout)
    heads = layers.init_params(_head_specs(cfg), key)
    return cfg, {"bert": jax.tree.map(jnp.asarray, bert_params), **heads}


# ------------------------------------------------------------------------------------------ featurising


def entity_token_ids(tokenizer: WordPieceTokenizer, num_slots: int) -> list[int]:
    """The vocabulary id standing for each entity slot 0 .. num_slots-1 ([unusedK], see the module docstring)."""
    ids = [tokenizer.token_to_id(ENTITY_VOCABULARY_TOKEN.format(slot=slot)) for slot in range(num_slots)]
    if any(i is None for i in ids):
        raise ValueError(f"{tokenizer.source}: the vocabulary lacks {ENTITY_VOCABULARY_TOKEN.format(slot='K')} for "
                         f"some K < {num_slots}; the BERT student writes entity slot K as that token, so it needs "
                         f"a BERT vocabulary with at least {num_slots} unused tokens (or fewer entity slots)")
    return ids


def featurise(rows: Sequence[StoryRow], tokenizer: WordPieceTokenizer, max_length: int,
              rngs: np.random.Generator | int | Sequence[np.random.Generator], *, labels: Vocabulary | None = None,
              num_slots: int = clutrr_batches.DEFAULT_ENTITY_SLOTS, report: TextReport | None = None,
              batch_size: int | None = None) -> dict[str, np.ndarray]:
    """Anonymises, WordPiece-tokenises and pads the stories of `rows` for the BERT student.

    Args:
      rows: stories with their query and target.
      tokenizer: the encoder folder's tokenizer (`WordPieceTokenizer.from_folder`).
      max_length: token budget L, [CLS] and [SEP] included; longer stories keep their first L - 2 pieces and are
        counted in `report`.
      rngs: as `clutrr_batches.text_batch`'s rng: a Generator, an int seed, or one Generator per row.
      labels: answer classes (default `clutrr_batches.label_vocabulary()`).
      num_slots: entity slots of the anonymisation (at most the vocabulary's unused tokens).
      report: collects counts of truncated stories, unknown pieces and lost query mentions.
      batch_size: pad the batch to this many examples (example_mask False on the padding); default len(rows).
    Returns:
      tokens [B, L] int32 (0 = [PAD]), attention_mask [B, L] bool ([CLS] .. [SEP]), token_mask [B, L] bool (story
      pieces), token_node [B, L] int32 (graph node of a mention, -1 elsewhere), source_mentions /
      target_mentions [B, L] bool, source / target [B] int32, label [B] int32, example_mask [B] bool.
    """
    if max_length < 3:
        raise ValueError(f"max_length={max_length} leaves no room for a story between [CLS] and [SEP]")
    labels = labels if labels is not None else clutrr_batches.label_vocabulary()
    rngs = np.random.default_rng(rngs) if isinstance(rngs, (int, np.integer)) else rngs
    row_rngs = [rngs] * len(rows) if isinstance(rngs, np.random.Generator) else list(rngs)
    if len(row_rngs) != len(rows):
        raise ValueError(f"{len(row_rngs)} random generators for {len(rows)} rows: pass one per row")
    report = report if report is not None else TextReport()
    batch_size = len(rows) if batch_size is None else batch_size
    if len(rows) > batch_size:
        raise ValueError(f"{len(rows)} rows do not fit in a batch of {batch_size}")
    slot_ids = entity_token_ids(tokenizer, num_slots)
    shape = (batch_size, max_length)
    out = {
        "tokens": np.zeros(shape, np.int32), "attention_mask": np.zeros(shape, bool),
        "token_mask": np.zeros(shape, bool), "token_node": np.full(shape, -1, np.int32),
        "source_mentions": np.zeros(shape, bool), "target_mentions": np.zeros(shape, bool),
        "source": np.zeros((batch_size,), np.int32), "target": np.zeros((batch_size,), np.int32),
        "label": np.zeros((batch_size,), np.int32), "example_mask": np.zeros((batch_size,), bool),
    }
    # Split every story at its mentions: odd parts are `@entK`, even parts are text, all encoded in one call.
    anonymised = [clutrr_batches.anonymise(row.story, row_rng, num_slots, row.id) for row, row_rng in
                  zip(rows, row_rngs)]
    parts = [_MENTION.split(text) for text, _ in anonymised]
    encoded = iter(tokenizer.encode_batch([p for row_parts in parts for p in row_parts[0::2]]))
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    out["tokens"][:] = pad_id
    for b, (row, (_, slot_of), row_parts) in enumerate(zip(rows, anonymised, parts)):
        pieces, slots = [], []
        for index, part in enumerate(row_parts):
            if index % 2:
                slot = int(part[len(clutrr_batches.ENTITY_PREFIX):])
                pieces.append(slot_ids[slot])
                slots.append(slot)
            else:
                ids = next(encoded)
                pieces += ids
                slots += [-1] * len(ids)
        if len(pieces) > max_length - 2:
            report.truncated += 1
            report.truncated_rows.append(str(row.id))
            pieces, slots = pieces[:max_length - 2], slots[:max_length - 2]
        length = len(pieces) + 2
        out["tokens"][b, :length] = [tokenizer.cls_id, *pieces, tokenizer.sep_id]
        out["attention_mask"][b, :length] = True
        out["token_mask"][b, 1:length - 1] = True
        node_of_slot = {slot_of[name]: node for node, (name, _) in enumerate(row.genders) if name in slot_of}
        source_slot, target_slot = (slot_of.get(name, -1) for name in row.query)
        slots = np.asarray([-2, *slots], np.int64)  # position 0 is [CLS]; -2 matches no slot
        out["token_node"][b, :len(slots)] = [node_of_slot.get(s, -1) if s >= 0 else -1 for s in slots]
        # A query person cut off the story has slot -1, which must not match the text pieces' -1.
        out["source_mentions"][b, :len(slots)] = (slots == source_slot) & (slots >= 0)
        out["target_mentions"][b, :len(slots)] = (slots == target_slot) & (slots >= 0)
        if not (out["source_mentions"][b].any() and out["target_mentions"][b].any()):
            report.query_mentions_lost += 1
        if row.target not in labels:
            raise ValueError(f"row {row.id}: target {row.target!r} is not one of the {len(labels)} labels "
                             f"{labels.tokens}")
        out["source"][b], out["target"][b] = row.query_edge
        out["label"][b] = labels.id(row.target)
        out["example_mask"][b] = True
        report.stories += 1
        report.tokens += len(pieces)
        report.unknown_tokens += sum(1 for i in pieces if i == tokenizer.unk_id)
    return out


# ------------------------------------------------------------------------------------------ model


def apply(params: dict, batch: dict, cfg: BertStudentConfig, rng: jax.Array | None = None) -> TextEncoderOutput:
    """Runs the student on a `featurise` batch.

    Args:
      params: from `init_from_pretrained` or `init`.
      batch: tokens, attention_mask, token_mask, source_mentions, target_mentions [B, L]; optional token_node
        [B, L] (for entity_states) and token_type_ids [B, L] (default 0).
      cfg: the student's shape (static under jit).
      rng: key for BERT's hidden dropout and the latent dropout; None (evaluation) disables both.
    Returns:
      TextEncoderOutput(logits [B, classes] float32, latent [B, 3 * state_dim], token_states [B, L, state_dim]
      (zero on padding), entity_states [B, max_nodes, state_dim] or None without token_node).
    """
    attention_mask = batch["attention_mask"].astype(bool)
    bert_rng, latent_rng = jax.random.split(rng) if rng is not None else (None, None)
    states = bert.apply(params["bert"], batch["tokens"], attention_mask, batch.get("token_type_ids"),
                        cfg=cfg.bert, rng=bert_rng)
    if cfg.use_lstm:
        lstm = params["lstm"]
        states = jnp.concatenate([text_encoders.lstm(lstm["forward"], states, attention_mask),
                                  text_encoders.lstm(lstm["backward"], states, attention_mask, reverse=True)], -1)
    states = states * attention_mask[..., None].astype(states.dtype)
    latent = jnp.concatenate([text_encoders.masked_mean(states, batch["source_mentions"]),
                              text_encoders.masked_mean(states, batch["target_mentions"]),
                              text_encoders.masked_mean(states, batch["token_mask"])], axis=-1)
    hidden = jax.nn.relu(layers.dense(params["classifier"]["hidden"], bert.dropout(latent, cfg.dropout, latent_rng)))
    logits = layers.dense(params["classifier"]["output"], hidden).astype(jnp.float32)
    entities = (text_encoders.entity_states(states, batch["token_node"], cfg.max_nodes)
                if "token_node" in batch else None)
    return TextEncoderOutput(logits, latent, states, entities)
