"""Seeded, reproducible CLUTRR generator (a reimplementation of Sinha et al., 2019, from its released code).

For every row: build (or reuse) a family tree closed under the rules (``family.py``), pick a target edge
(x, r, y), expand it k - 1 times by splitting one path edge (a, b) into a decomposition (a, z), (z, b) whose
relations compose to r(a, b) and that reuses no edge already used (the proof records each split), add the noise
facts of the task, and render one template sentence per edge with the story's sentences shuffled. Rows are
balanced over patterns (``f_comb``) and patterns can be held out for testing. The output is ``ClutrrRow`` in the
released format, so the reader validates it and the solver labels it.

Noise tasks: 1 clean; 2 supporting (a second path a -> z -> b through an off-path person z for one path edge,
making a cycle); 3 irrelevant (one dangling edge from a path person to an off-path person); 4 disconnected (one
edge between two off-path people).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import sys
import uuid
from collections.abc import Collection, Sequence

import tqdm

from jaxalign.clutrr import family, relations, templates
from jaxalign.clutrr.reader import NOISE_TASKS, ClutrrRow, write_csv

__all__ = ["STORY_RELATIONS", "generate", "generate_dataset", "write_csv", "choose_holdout_patterns",
           "file_seed"]

# Relation types that story sentences state (the released stories' edges use only these).
STORY_RELATIONS: frozenset[str] = frozenset(
    {"child", "inv-child", "SO", "sibling", "grand", "inv-grand", "inv-un"})
STORIES_PER_TREE = 16
MAX_TREES_PER_ROW = 50


@dataclasses.dataclass
class _Story:
    """A generated story before rendering: person ids, path edges, noise edges and proof steps."""

    path: list[tuple[int, int]]
    noise: list[tuple[int, int]]
    proof: list[tuple[tuple[int, int], tuple[int, int], tuple[int, int]]]  # (split edge, first, second)
    pattern: str


def file_seed(seed: int, name: str) -> int:
    """A stable per-file seed derived from a dataset seed and a file name (not Python's salted hash)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def _sample_path(graph: family.FamilyGraph, k: int, rng: random.Random, attempts: int = 20):
    """A k-edge path by expanding a random target edge k - 1 times; None when the tree yields none."""
    edges = list(graph.relation)
    for _ in range(attempts):
        target = rng.choice(edges)
        path, used, proof = [target], {target}, []
        for _ in range(k - 1):
            positions = list(range(len(path)))
            rng.shuffle(positions)
            for position in positions:
                head, tail = path[position]
                wanted = graph.relation[(head, tail)]
                middles = [z for z in graph.neighbors[head]
                           if z != tail and (head, z) not in used and (z, tail) in graph.relation
                           and (z, tail) not in used
                           and relations.COMPOSITION_RULES.get(
                               (graph.relation[(head, z)], graph.relation[(z, tail)])) == wanted]
                if middles:
                    middle = rng.choice(middles)
                    path[position:position + 1] = [(head, middle), (middle, tail)]
                    used.update({(head, middle), (middle, tail)})
                    proof.append(((head, tail), (head, middle), (middle, tail)))
                    break
            else:
                break
        if len(path) == k and all(graph.relation[edge] in STORY_RELATIONS for edge in path):
            return path, proof
    return None


def _sample_noise(graph: family.FamilyGraph, path: list[tuple[int, int]], noise_task: int,
                  rng: random.Random) -> list[tuple[int, int]] | None:
    """Noise edges for a path (empty for the clean task); None when this tree offers none of the kind."""
    if noise_task == 1:
        return []
    on_path = {person for edge in path for person in edge}
    story_edges = [edge for edge, relation in graph.relation.items() if relation in STORY_RELATIONS]
    if noise_task == 2:
        choices = []
        for head, tail in path:
            wanted = graph.relation[(head, tail)]
            for middle in graph.neighbors[head]:
                if middle in on_path or (middle, tail) not in graph.relation:
                    continue
                first, second = graph.relation[(head, middle)], graph.relation[(middle, tail)]
                if (first in STORY_RELATIONS and second in STORY_RELATIONS
                        and relations.COMPOSITION_RULES.get((first, second)) == wanted):
                    choices.append([(head, middle), (middle, tail)])
    elif noise_task == 3:
        choices = [[edge] for edge in story_edges if edge[0] in on_path and edge[1] not in on_path]
    elif noise_task == 4:
        choices = [[edge] for edge in story_edges if edge[0] not in on_path and edge[1] not in on_path]
    else:
        raise ValueError(f"noise task must be one of {sorted(NOISE_TASKS)}, got {noise_task}")
    return rng.choice(choices) if choices else None


def _render(graph: family.FamilyGraph, story: _Story, k: int, noise_task: int, split: str,
            rng: random.Random) -> ClutrrRow:
    """Turns a sampled story into a row of the released format (node indices in order of appearance)."""
    order: list[int] = []
    for head, tail in story.path + story.noise:
        for person in (head, tail):
            if person not in order:
                order.append(person)
    node = {person: index for index, person in enumerate(order)}
    name = graph.names

    def sentence(edge: tuple[int, int]) -> str:
        head, tail = edge
        return templates.edge_sentence(name[head], graph.label(head, tail), name[tail], graph.genders[head], rng)

    path_sentences = [sentence(edge) for edge in story.path]
    all_sentences = path_sentences + [sentence(edge) for edge in story.noise]
    rng.shuffle(all_sentences)
    first, last = story.path[0][0], story.path[-1][1]
    target = graph.label(first, last)
    proof_state = [
        {(name[a], graph.label(a, b), name[b]): [(name[c], graph.label(c, d), name[d]) for c, d in parts]}
        for (a, b), *parts in story.proof]
    return ClutrrRow(
        index=0, id=str(uuid.UUID(int=rng.getrandbits(128), version=4)), story=" ".join(all_sentences),
        query=(name[first], name[last]), text_query="", target=target,
        text_target=(templates.answer_sentence(name[first], target, name[last], graph.genders[first], rng),),
        clean_story=" ".join(path_sentences), proof_state=tuple(proof_state), f_comb=story.pattern,
        task_name=f"task_{noise_task}.{k}",
        story_edges=tuple((node[a], node[b]) for a, b in story.path + story.noise),
        edge_types=tuple(graph.label(a, b) for a, b in story.path), query_edge=(node[first], node[last]),
        genders=tuple((name[p], graph.genders[p]) for p in order), syn_story="",
        node_mapping={person: node[person] for person in order}, task_split=split)


def _candidate_pool(count: int, k: int, noise_task: int, rng: random.Random, holdout: Collection[str],
                    patterns: Collection[str] | None, split: str, max_trees: int | None = None) -> list[ClutrrRow]:
    """At least ``count`` rendered rows of length k (fewer only if ``max_trees`` run out), from fresh trees."""
    pool: list[ClutrrRow] = []
    max_trees = max(1, count) * MAX_TREES_PER_ROW if max_trees is None else max_trees
    for tree_round in range(max_trees):
        if len(pool) >= count:
            break
        graph = family.build_family_tree(rng, flip_genders=tree_round % 2 == 1)
        for _ in range(STORIES_PER_TREE):
            sampled = _sample_path(graph, k, rng)
            if sampled is None:
                break
            path, proof = sampled
            pattern = "-".join(graph.label(a, b) for a, b in path)
            if pattern in holdout or (patterns is not None and pattern not in patterns):
                continue
            noise = _sample_noise(graph, path, noise_task, rng)
            if noise is None:
                continue
            pool.append(_render(graph, _Story(path, noise, proof, pattern), k, noise_task, split, rng))
    return pool


def generate(num_rows: int, ks: Sequence[int], noise_task: int, seed: int,
             holdout_patterns: Collection[str] = (), *, patterns: Collection[str] | None = None,
             split: str = "train", pool_factor: int = 2) -> list[ClutrrRow]:
    """Generates CLUTRR rows, balanced over patterns, reproducibly from ``seed``.

    Args:
      num_rows: rows to make, split evenly over ``ks``.
      ks: path lengths (number of edges from the query's head to its tail), each >= 1.
      noise_task: 1 clean, 2 supporting, 3 irrelevant, 4 disconnected.
      seed: the same seed (and arguments) gives the same rows.
      holdout_patterns: ``f_comb`` patterns never produced (kept for testing).
      patterns: when given, only these patterns are produced (the test side of a hold-out).
      split: the ``task_split`` column ('train' or 'test').
      pool_factor: candidates drawn per row kept; more gives better pattern balance.

    Returns:
      Rows in shuffled order with ``index`` 0..num_rows-1.

    Raises:
      ValueError: on a bad argument, or when the requested patterns cannot be produced.
    """
    if noise_task not in NOISE_TASKS:
        raise ValueError(f"noise_task must be one of {sorted(NOISE_TASKS)}, got {noise_task}")
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be path lengths >= 1, got {list(ks)}")
    rng = random.Random(seed)
    holdout = frozenset(holdout_patterns)
    allowed = frozenset(patterns) if patterns is not None else None
    rows: list[ClutrrRow] = []
    for position, k in enumerate(ks):
        wanted = num_rows // len(ks) + (position < num_rows % len(ks))
        if wanted == 0:
            continue
        if allowed is not None and not any(pattern.count("-") == k - 1 for pattern in allowed):
            raise ValueError(f"none of the {len(allowed)} requested patterns has k = {k} edges")
        pool = _candidate_pool(wanted * pool_factor, k, noise_task, rng, holdout, allowed, split)
        if len(pool) < wanted:
            raise ValueError(f"could only generate {len(pool)} of {wanted} rows with k = {k}, noise task "
                             f"{noise_task} under the pattern restrictions; allow more patterns or ask fewer rows")
        by_pattern: dict[str, list[ClutrrRow]] = {}
        for row in pool:
            by_pattern.setdefault(row.f_comb, []).append(row)
        # Natural pattern frequencies differ a lot; top up the rare patterns seen so far to an even quota.
        quota = -(-wanted // len(by_pattern))
        deficit = {pattern: quota - len(found) for pattern, found in by_pattern.items() if len(found) < quota}
        if deficit:
            extra = _candidate_pool(sum(deficit.values()), k, noise_task, rng, holdout, set(deficit), split,
                                    max_trees=max(1, pool_factor * wanted // STORIES_PER_TREE))
            for row in extra:
                if deficit.get(row.f_comb, 0) > 0:
                    deficit[row.f_comb] -= 1
                    by_pattern[row.f_comb].append(row)
        order = list(by_pattern)
        rng.shuffle(order)
        chosen: list[ClutrrRow] = []
        while len(chosen) < wanted:  # round robin over patterns: as even as the pool allows
            for pattern in order:
                if by_pattern[pattern] and len(chosen) < wanted:
                    chosen.append(by_pattern[pattern].pop())
        rows.extend(chosen)
    rng.shuffle(rows)
    return [dataclasses.replace(row, index=index) for index, row in enumerate(rows)]


def choose_holdout_patterns(k: int, noise_task: int, seed: int, fraction: float = 0.2,
                            sample_rows: int = 400) -> frozenset[str]:
    """Patterns of length k to keep out of training: a seeded ``fraction`` of the patterns seen in a sample."""
    rng = random.Random(file_seed(seed, f"holdout-{noise_task}.{k}"))
    seen = sorted({row.f_comb for row in _candidate_pool(sample_rows, k, noise_task, rng, (), None, "test")})
    return frozenset(rng.sample(seen, max(1, round(fraction * len(seen))))) if seen else frozenset()


def generate_dataset(out_dir: str | os.PathLike, train_ks: Sequence[int] = (2, 3),
                     test_ks: Sequence[int] = tuple(range(2, 11)), tasks: Sequence[int] = (1,),
                     rows_per_file: int = 100, seed: int = 0, *, train_rows_per_k: int | None = None,
                     holdout_fraction: float = 0.2) -> dict[str, str]:
    """Writes a data set folder named like the released ones: ``<t>.<k1>,<t>.<k2>_train.csv`` and
    ``<t>.<k>_test.csv`` per noise task t, plus ``config.json`` with the arguments.

    Test files at a k >= 3 that is also a training length use only held-out patterns, so every such test pattern
    is unseen in training; longer test lengths are unseen by construction.

    Returns:
      {file name: path} of every file written.
    """
    os.makedirs(out_dir, exist_ok=True)
    train_rows_per_k = rows_per_file if train_rows_per_k is None else train_rows_per_k
    written = {}
    progress = tqdm.tqdm(total=len(tasks) * (1 + len(test_ks)), desc="CLUTRR files", unit="file",
                         disable=not sys.stderr.isatty())
    for task in tasks:
        holdouts = {k: choose_holdout_patterns(k, task, seed, holdout_fraction) for k in train_ks if k >= 3}
        held_out = frozenset().union(*holdouts.values())
        train_name = ",".join(f"{task}.{k}" for k in train_ks) + "_train.csv"
        train_rows = generate(train_rows_per_k * len(train_ks), train_ks, task, file_seed(seed, train_name),
                              held_out, split="train")
        written[train_name] = os.path.join(out_dir, train_name)
        write_csv(train_rows, written[train_name])
        progress.update()
        for k in test_ks:
            test_name = f"{task}.{k}_test.csv"
            rows = generate(rows_per_file, [k], task, file_seed(seed, test_name),
                            patterns=holdouts.get(k), split="test")
            written[test_name] = os.path.join(out_dir, test_name)
            write_csv(rows, written[test_name])
            progress.update()
    progress.close()
    config = {"generator": "jaxalign.clutrr.generator", "seed": seed, "train_ks": list(train_ks),
              "test_ks": list(test_ks), "tasks": list(tasks), "rows_per_file": rows_per_file,
              "train_rows_per_k": train_rows_per_k, "holdout_fraction": holdout_fraction,
              "files": sorted(written)}
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as stream:
        json.dump(config, stream, indent=2)
    written["config.json"] = os.path.join(out_dir, "config.json")
    return written
