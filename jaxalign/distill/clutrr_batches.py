"""Model inputs from CLUTRR rows: padded graph batches for the GNN teacher, anonymised token batches for students.

Both featurisers take rows with the attributes of `jaxalign.clutrr.reader.ClutrrRow` (see `StoryRow`) and return
dicts of NumPy arrays with fixed shapes, so a jitted step compiles once:

  graph_batch -> node_mask [B, N], senders / receivers / edge_types / edge_mask [B, E], source / target [B],
                 label [B], example_mask [B]
  text_batch  -> tokens / token_mask / token_node / source_mentions / target_mentions [B, L], source / target,
                 label, example_mask [B]

An edge (a, b) with relation r means "b is a's r"; it becomes sender a, receiver b, type r. Node i is the i-th
person of `genders`; the query asks for "target is source's <label>". A row's edge types are its `edge_types`
when they cover every story edge, else its path labels followed by its `noise_edge_types` (a reader row of a file
that labels noise edges); noise edges no file labels get a type from `jaxalign.distill.evaluate.graph_rows`.

Students read stories with people anonymised per story: every bracketed name becomes `@entK`, with K drawn from
a random permutation of the entity slots (seeded), so a model cannot learn facts about names and sees every
entity token during training. Stories longer than the token budget are truncated and counted in a `TextReport`,
never silently.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np

# The 18 answer labels of the released data, in a fixed order (class ids; saved with every model).
CLUTRR_LABELS: tuple[str, ...] = (
    "son", "daughter", "father", "mother", "brother", "sister", "grandson", "granddaughter", "grandfather",
    "grandmother", "son-in-law", "daughter-in-law", "father-in-law", "mother-in-law", "nephew", "niece",
    "uncle", "aunt")
# Every gendered relation label an edge may carry (the 18 answers plus spouses and siblings-in-law).
EDGE_TYPE_LABELS: tuple[str, ...] = (
    "son", "daughter", "father", "mother", "husband", "wife", "brother", "sister", "grandson", "granddaughter",
    "grandfather", "grandmother", "son-in-law", "daughter-in-law", "father-in-law", "mother-in-law",
    "brother-in-law", "sister-in-law", "nephew", "niece", "uncle", "aunt")

PAD, UNKNOWN = "<pad>", "<unk>"
ENTITY_PREFIX = "@ent"
DEFAULT_ENTITY_SLOTS = 20
_NAME = re.compile(r"\[([^\[\]]+)\]")
_TOKEN = re.compile(r"@ent\d+|'s\b|[a-z0-9]+|[^\sa-z0-9]")
_ENTITY_TOKEN = re.compile(r"@ent(\d+)$")


class StoryRow(Protocol):
    """The attributes the featurisers read (all present on `jaxalign.clutrr.reader.ClutrrRow`)."""

    id: str
    story: str
    query: tuple[str, str]
    target: str
    story_edges: Sequence[tuple[int, int]]
    edge_types: Sequence[str]                   # one per story edge, or the path's (then noise_edge_types)
    query_edge: tuple[int, int]
    genders: Sequence[tuple[str, str]]          # (name, gender) by node index
    # Optional (read with getattr): labels of the noise edges story_edges[len(edge_types):], when labelled.


# ------------------------------------------------------------------------------------------ vocabularies


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """A fixed, ordered list of tokens (labels, edge types or words) and their ids.

    Attributes:
      kind: what the tokens are ('labels', 'edge_types', 'words'); checked when loading.
      tokens: the tokens; id i is tokens[i].
      unknown: the token unknown inputs map to, or None to raise on unknown inputs.
    """

    kind: str
    tokens: tuple[str, ...]
    unknown: str | None = None

    def __post_init__(self):
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError(f"{self.kind} vocabulary has duplicate tokens")
        if self.unknown is not None and self.unknown not in self.tokens:
            raise ValueError(f"{self.kind} vocabulary: unknown token {self.unknown!r} is not in the vocabulary")
        object.__setattr__(self, "_index", {token: i for i, token in enumerate(self.tokens)})

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self._index

    def id(self, token: str) -> int:
        """The id of `token`; the unknown id (or a ValueError naming the token) when it is not in the vocabulary."""
        found = self._index.get(token)
        if found is not None:
            return found
        if self.unknown is None:
            raise ValueError(f"{token!r} is not in the {self.kind} vocabulary ({len(self)} entries: "
                             f"{', '.join(self.tokens[:24])}{' ...' if len(self) > 24 else ''})")
        return self._index[self.unknown]

    def to_json(self) -> dict:
        return {"kind": self.kind, "tokens": list(self.tokens), "unknown": self.unknown}

    @classmethod
    def from_json(cls, data: dict, kind: str | None = None) -> "Vocabulary":
        if kind is not None and data.get("kind") != kind:
            raise ValueError(f"expected a {kind} vocabulary, found kind {data.get('kind')!r}")
        return cls(data["kind"], tuple(data["tokens"]), data.get("unknown"))

    def save(self, path: str | os.PathLike) -> None:
        """Writes the vocabulary as JSON (next to a model's checkpoint)."""
        with open(path, "w", encoding="utf-8") as stream:
            json.dump(self.to_json(), stream, indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike, kind: str | None = None) -> "Vocabulary":
        """Reads a vocabulary written by `save`; `kind` checks it is the expected one."""
        with open(path, encoding="utf-8") as stream:
            data = json.load(stream)
        try:
            return cls.from_json(data, kind)
        except (KeyError, ValueError) as error:
            raise ValueError(f"{os.fspath(path)}: not a usable vocabulary file ({error})") from None


def label_vocabulary(labels: Sequence[str] = CLUTRR_LABELS) -> Vocabulary:
    """The answer classes (default: the 18 labels of the released data, in `CLUTRR_LABELS` order)."""
    return Vocabulary("labels", tuple(labels))


def edge_type_vocabulary(edge_types: Sequence[str] = EDGE_TYPE_LABELS) -> Vocabulary:
    """The edge relation types (default: the 22 gendered labels)."""
    return Vocabulary("edge_types", tuple(edge_types))


def entity_token(slot: int) -> str:
    return f"{ENTITY_PREFIX}{slot}"


def entity_slots(vocabulary: Vocabulary) -> int:
    """How many `@entK` tokens a word vocabulary holds."""
    return sum(1 for token in vocabulary.tokens if _ENTITY_TOKEN.match(token))


# ----------------------------------------------------------------------------------------- graphs


def _label_id(row: StoryRow, labels: Vocabulary) -> int:
    if row.target not in labels:
        raise ValueError(f"row {row.id}: target {row.target!r} is not one of the {len(labels)} labels "
                         f"{labels.tokens}; build the label vocabulary with label_vocabulary([...]) to include it")
    return labels.id(row.target)


def graph_batch(rows: Sequence[StoryRow], labels: Vocabulary, edge_types: Vocabulary, max_nodes: int,
                max_edges: int, batch_size: int | None = None) -> dict[str, np.ndarray]:
    """Pads the story graphs of `rows` to (max_nodes, max_edges) for the GNN teacher.

    Args:
      rows: stories with their symbolic graphs.
      labels, edge_types: vocabularies for targets and edge relations.
      max_nodes, max_edges: the static budget; a larger graph is an error (a graph cannot be cut safely).
      batch_size: pad the batch to this many examples (example_mask False on the padding); default len(rows).
    Returns:
      node_mask [B, N] bool, senders / receivers / edge_types [B, E] int32, edge_mask [B, E] bool,
      source / target [B] int32 (query nodes), label [B] int32, example_mask [B] bool.
    """
    batch_size = len(rows) if batch_size is None else batch_size
    if len(rows) > batch_size:
        raise ValueError(f"{len(rows)} rows do not fit in a batch of {batch_size}")
    out = {
        "node_mask": np.zeros((batch_size, max_nodes), bool),
        "senders": np.zeros((batch_size, max_edges), np.int32),
        "receivers": np.zeros((batch_size, max_edges), np.int32),
        "edge_types": np.zeros((batch_size, max_edges), np.int32),
        "edge_mask": np.zeros((batch_size, max_edges), bool),
        "source": np.zeros((batch_size,), np.int32),
        "target": np.zeros((batch_size,), np.int32),
        "label": np.zeros((batch_size,), np.int32),
        "example_mask": np.zeros((batch_size,), bool),
    }
    for b, row in enumerate(rows):
        num_nodes, num_edges = len(row.genders), len(row.story_edges)
        if num_nodes > max_nodes or num_edges > max_edges:
            raise ValueError(f"row {row.id}: graph has {num_nodes} nodes and {num_edges} edges, over the budget "
                             f"of {max_nodes} nodes and {max_edges} edges; raise max_nodes / max_edges")
        relation_types = tuple(row.edge_types)
        if len(relation_types) != num_edges:  # a reader row: path labels, then the noise labels if any
            relation_types += tuple(getattr(row, "noise_edge_types", ()))
        if len(relation_types) != num_edges:
            raise ValueError(f"row {row.id}: {num_edges} story_edges but {len(relation_types)} edge types; give "
                             "unlabelled noise edges a type first (jaxalign.distill.evaluate.graph_rows)")
        for e, ((head, tail), relation) in enumerate(zip(row.story_edges, relation_types)):
            if not (0 <= head < num_nodes and 0 <= tail < num_nodes):
                raise ValueError(f"row {row.id}: story_edges[{e}] = {(head, tail)} names a node outside 0.."
                                 f"{num_nodes - 1} (genders lists {num_nodes} people)")
            out["senders"][b, e], out["receivers"][b, e] = head, tail
            out["edge_types"][b, e] = edge_types.id(relation)
        if not all(0 <= node < num_nodes for node in row.query_edge):
            raise ValueError(f"row {row.id}: query_edge {tuple(row.query_edge)} names a node outside 0.."
                             f"{num_nodes - 1}")
        out["edge_mask"][b, :num_edges] = True
        out["node_mask"][b, :num_nodes] = True
        out["source"][b], out["target"][b] = row.query_edge
        out["label"][b] = _label_id(row, labels)
        out["example_mask"][b] = True
    return out


# ------------------------------------------------------------------------------------------- text


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens: entity tokens, "'s", runs of letters / digits, and single punctuation marks."""
    return _TOKEN.findall(text.lower())


def anonymise(story: str, rng: np.random.Generator, num_slots: int = DEFAULT_ENTITY_SLOTS,
              row_id: str = "<story>") -> tuple[str, dict[str, int]]:
    """Replaces each bracketed name by `@entK`, K from a random permutation of `num_slots` entity slots.

    Returns:
      The anonymised story and {name: slot}. Names are given slots in order of first appearance.
    """
    names = list(dict.fromkeys(_NAME.findall(story)))
    if len(names) > num_slots:
        raise ValueError(f"row {row_id}: {len(names)} people but only {num_slots} entity slots; "
                         f"build the vocabulary with more entity slots")
    slots = rng.permutation(num_slots)[:len(names)]
    slot_of = {name: int(slot) for name, slot in zip(names, slots)}
    return _NAME.sub(lambda match: entity_token(slot_of[match.group(1)]), story), slot_of


def build_word_vocabulary(stories: Iterable[str], num_slots: int = DEFAULT_ENTITY_SLOTS,
                          min_count: int = 1) -> Vocabulary:
    """The word vocabulary of training stories: <pad>, <unk>, @ent0..@ent{num_slots-1}, then words.

    Names are removed before counting (they become entity tokens), so no name enters the vocabulary. Words are
    ordered by decreasing count, ties alphabetically, so the same stories always give the same ids.
    """
    counts = collections.Counter()
    for story in stories:
        counts.update(token for token in tokenize(_NAME.sub(" ", story)))
    words = sorted((word for word, count in counts.items() if count >= min_count), key=lambda w: (-counts[w], w))
    entities = [entity_token(slot) for slot in range(num_slots)]
    return Vocabulary("words", (PAD, UNKNOWN, *entities, *words), unknown=UNKNOWN)


@dataclasses.dataclass
class TextReport:
    """What happened to the stories while they were tokenised (one report can span many batches)."""

    stories: int = 0
    tokens: int = 0
    unknown_tokens: int = 0
    truncated: int = 0
    query_mentions_lost: int = 0
    truncated_rows: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.stories} stories, {self.tokens} tokens ({self.unknown_tokens} unknown); "
                f"{self.truncated} truncated to the token budget, {self.query_mentions_lost} lost a query "
                f"person's every mention" + (f"; truncated rows: {', '.join(self.truncated_rows[:10])}"
                                             if self.truncated_rows else ""))


def text_batch(rows: Sequence[StoryRow], vocabulary: Vocabulary, labels: Vocabulary, max_length: int,
               rng: np.random.Generator | int | Sequence[np.random.Generator], report: TextReport | None = None,
               batch_size: int | None = None) -> dict[str, np.ndarray]:
    """Anonymises, tokenises and pads the stories of `rows` for a text student.

    Args:
      rows: stories with their query and target.
      vocabulary: from `build_word_vocabulary`; its entity slots bound the people per story.
      labels: answer classes.
      max_length: token budget L; longer stories keep their first L tokens and are counted in `report`.
      rng: a Generator (advance it across epochs for fresh permutations), an int seed (fixed anonymisation),
        or one Generator per row, so that a row's anonymisation does not depend on the other rows of its batch
        (each process of a multi-process run featurises only its own block of the global batch).
      report: collects counts of truncated stories, unknown tokens and lost query mentions.
      batch_size: pad the batch to this many examples (example_mask False on the padding); default len(rows).
    Returns:
      tokens [B, L] int32 (0 = <pad>), token_mask [B, L] bool, token_node [B, L] int32 (graph node a token
      names, -1 for other tokens), source_mentions / target_mentions [B, L] bool (the query people's
      mentions), source / target [B] int32 (their graph nodes), label [B] int32, example_mask [B] bool.
    """
    rng = np.random.default_rng(rng) if isinstance(rng, (int, np.integer)) else rng
    if isinstance(rng, np.random.Generator):
        row_rngs = [rng] * len(rows)
    else:
        row_rngs = list(rng)
        if len(row_rngs) != len(rows):
            raise ValueError(f"{len(row_rngs)} random generators for {len(rows)} rows: pass one per row")
    report = report if report is not None else TextReport()
    num_slots = entity_slots(vocabulary)
    batch_size = len(rows) if batch_size is None else batch_size
    if len(rows) > batch_size:
        raise ValueError(f"{len(rows)} rows do not fit in a batch of {batch_size}")
    shape = (batch_size, max_length)
    out = {
        "tokens": np.zeros(shape, np.int32), "token_mask": np.zeros(shape, bool),
        "token_node": np.full(shape, -1, np.int32),
        "source_mentions": np.zeros(shape, bool), "target_mentions": np.zeros(shape, bool),
        "source": np.zeros((batch_size,), np.int32), "target": np.zeros((batch_size,), np.int32),
        "label": np.zeros((batch_size,), np.int32), "example_mask": np.zeros((batch_size,), bool),
    }
    unknown_id = vocabulary.id(UNKNOWN)
    for b, (row, row_rng) in enumerate(zip(rows, row_rngs)):
        text, slot_of = anonymise(row.story, row_rng, num_slots, row.id)
        tokens = tokenize(text)
        if len(tokens) > max_length:
            report.truncated += 1
            report.truncated_rows.append(str(row.id))
            tokens = tokens[:max_length]
        node_of_slot = {slot_of[name]: node for node, (name, _) in enumerate(row.genders) if name in slot_of}
        source_name, target_name = row.query
        query_slots = (slot_of.get(source_name, -1), slot_of.get(target_name, -1))
        ids = [vocabulary.id(token) for token in tokens]
        out["tokens"][b, :len(ids)] = ids
        out["token_mask"][b, :len(ids)] = True
        for position, token in enumerate(tokens):
            entity = _ENTITY_TOKEN.match(token)
            if entity:
                slot = int(entity.group(1))
                out["token_node"][b, position] = node_of_slot.get(slot, -1)
                out["source_mentions"][b, position] = slot == query_slots[0]
                out["target_mentions"][b, position] = slot == query_slots[1]
        if not (out["source_mentions"][b].any() and out["target_mentions"][b].any()):
            report.query_mentions_lost += 1
        out["source"][b], out["target"][b] = row.query_edge
        out["label"][b] = _label_id(row, labels)
        out["example_mask"][b] = True
        report.stories += 1
        report.tokens += len(ids)
        report.unknown_tokens += sum(1 for i in ids if i == unknown_id)
    return out
