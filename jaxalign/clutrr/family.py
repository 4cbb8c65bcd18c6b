"""Family trees for the CLUTRR generator, closed under the kinship rules.

A tree is a root couple and its descendants: ``levels`` generations, ``children_per_couple`` children per
couple, everyone married to a new person of the other gender (3 levels and 4 children give 2 + 8 + 32 = 42
people). The kinship graph starts from the child / parent, spouse and sibling facts and is closed under the
composition rules and inverses of ``relations``, the first derivation of a pair winning (as in the CLUTRR
generator).
"""
from __future__ import annotations

import collections
import dataclasses
import random

from jaxalign.clutrr import relations, templates


@dataclasses.dataclass
class FamilyGraph:
    """People and the closed kinship graph between them.

    Attributes:
      names: name of each person id.
      genders: 'male' / 'female' of each person id.
      relation: (a, b) -> relation type, meaning "b is a's relation"; every pair the rules reach.
      neighbors: person id -> ids b with an edge (a, b), in insertion order (deterministic).
    """

    names: list[str]
    genders: list[str]
    relation: dict[tuple[int, int], str]
    neighbors: list[list[int]]

    def add(self, head: int, tail: int, relation: str) -> bool:
        """Adds (head, relation, tail) unless the pair already has a relation; True when added."""
        if head == tail or (head, tail) in self.relation:
            return False
        self.relation[(head, tail)] = relation
        self.neighbors[head].append(tail)
        return True

    def label(self, head: int, tail: int) -> str:
        """The gendered label of edge (head, tail): tail is head's <label>."""
        return relations.gendered_label(self.relation[(head, tail)], self.genders[tail])


def build_family_tree(rng: random.Random, levels: int = 3, children_per_couple: int = 4,
                      flip_genders: bool = False) -> FamilyGraph:
    """Builds one married family tree and closes its kinship graph.

    Args:
      rng: source of genders and names.
      levels: generations including the root couple's.
      children_per_couple: children of every couple above the last generation.
      flip_genders: swap every person's gender (the generator alternates this between rounds for variety).
    """
    genders: list[str] = []
    parent_edges: list[tuple[int, int]] = []  # (parent, child)
    spouse_pairs: list[tuple[int, int]] = []
    sibling_groups: list[list[int]] = []

    def new_person(gender: str) -> int:
        genders.append(gender)
        return len(genders) - 1

    def marry(person: int) -> tuple[int, int]:
        other = relations.FEMALE if genders[person] == relations.MALE else relations.MALE
        spouse = new_person(other)
        spouse_pairs.append((person, spouse))
        return person, spouse

    couples = [marry(new_person(rng.choice(relations.GENDERS)))]
    for _ in range(levels - 1):
        next_couples = []
        for couple in couples:
            children = [new_person(rng.choice(relations.GENDERS)) for _ in range(children_per_couple)]
            sibling_groups.append(children)
            for child in children:
                parent_edges.extend((parent, child) for parent in couple)
                next_couples.append(marry(child))
        couples = next_couples

    if flip_genders:
        genders = [relations.FEMALE if g == relations.MALE else relations.MALE for g in genders]
    male_names = iter(rng.sample(templates.MALE_NAMES, genders.count(relations.MALE)))
    female_names = iter(rng.sample(templates.FEMALE_NAMES, genders.count(relations.FEMALE)))
    names = [next(male_names) if g == relations.MALE else next(female_names) for g in genders]

    graph = FamilyGraph(names=names, genders=genders, relation={}, neighbors=[[] for _ in genders])
    for parent, child in parent_edges:
        graph.add(parent, child, "child")
        graph.add(child, parent, "inv-child")
    for first, second in spouse_pairs:
        graph.add(first, second, "SO")
        graph.add(second, first, "SO")
    for group in sibling_groups:
        for first in group:
            for second in group:
                graph.add(first, second, "sibling")
    close_graph(graph)
    return graph


def close_graph(graph: FamilyGraph) -> None:
    """Adds every relation the composition rules derive, with its inverse, until nothing changes.

    Semi-naive closure: each edge, when taken from the work queue, is composed with the edges already present on
    both sides, so every pair of adjacent edges is tried once. The queue is first-in first-out over a
    deterministic insertion order, so the first derivation of a pair wins and the result depends only on the tree.
    """
    incoming: list[list[int]] = [[] for _ in graph.names]
    for head, tail in graph.relation:
        incoming[tail].append(head)
    queue = collections.deque(graph.relation)

    def derive(head: int, tail: int, relation: str | None) -> None:
        if relation is None:
            return
        for edge, edge_relation in (((head, tail), relation),
                                    ((tail, head), relations.INVERSE_RELATIONS[relation])):
            if graph.add(*edge, edge_relation):
                incoming[edge[1]].append(edge[0])
                queue.append(edge)

    rules = relations.COMPOSITION_RULES
    while queue:
        head, middle = queue.popleft()
        relation = graph.relation[(head, middle)]
        for tail in list(graph.neighbors[middle]):  # (head, middle) then (middle, tail)
            if tail != head and (head, tail) not in graph.relation:
                derive(head, tail, rules.get((relation, graph.relation[(middle, tail)])))
        for before in list(incoming[head]):  # (before, head) then (head, middle)
            if before != middle and (before, middle) not in graph.relation:
                derive(before, middle, rules.get((graph.relation[(before, head)], relation)))
