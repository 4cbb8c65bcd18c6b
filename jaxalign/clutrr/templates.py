"""Synthetic text for generated CLUTRR stories: first names and one-sentence-per-edge templates.

The released data uses crowd-written paraphrases of 1-3 edge chains, which jaxalign cannot ship; these simple
templates state one edge each. An edge (head, label, tail) means "tail is head's label".
"""
from __future__ import annotations

import random

from jaxalign.clutrr import relations

MALE_NAMES: tuple[str, ...] = (
    "Aaron", "Adam", "Albert", "Alan", "Andrew", "Anthony", "Arthur", "Benjamin", "Bernard", "Brian", "Bruce",
    "Carl", "Charles", "Christopher", "Clarence", "Craig", "Daniel", "David", "Dennis", "Donald", "Douglas",
    "Edward", "Eric", "Eugene", "Frank", "Fred", "Gary", "George", "Gerald", "Gregory", "Harold", "Harry",
    "Henry", "Howard", "Jack", "James", "Jason", "Jeffrey", "Jerry", "Jesse", "John", "Jonathan", "Joseph",
    "Joshua", "Keith", "Kenneth", "Kevin", "Larry", "Lawrence", "Louis", "Mark", "Martin", "Matthew",
    "Michael", "Nicholas", "Oliver", "Patrick", "Paul", "Peter", "Philip", "Ralph", "Raymond", "Richard",
    "Robert", "Roger", "Ronald", "Roy", "Russell", "Samuel", "Scott", "Stephen", "Steven", "Thomas",
    "Timothy", "Victor", "Walter", "Wayne", "William")
FEMALE_NAMES: tuple[str, ...] = (
    "Alice", "Amanda", "Amy", "Angela", "Ann", "Anna", "Barbara", "Betty", "Beverly", "Brenda", "Carol",
    "Carolyn", "Catherine", "Christine", "Cynthia", "Deborah", "Debra", "Diane", "Donna", "Doris", "Dorothy",
    "Elizabeth", "Emily", "Emma", "Evelyn", "Frances", "Gloria", "Grace", "Heather", "Helen", "Irene", "Jacqueline",
    "Janet", "Janice", "Jean", "Jennifer", "Jessica", "Joan", "Joyce", "Judith", "Julia", "Julie", "Karen",
    "Katherine", "Kathleen", "Kathryn", "Kelly", "Laura", "Linda", "Lisa", "Lois", "Margaret", "Maria",
    "Marie", "Marilyn", "Martha", "Mary", "Michelle", "Nancy", "Nicole", "Pamela", "Patricia", "Rachel",
    "Rebecca", "Rose", "Ruth", "Sandra", "Sara", "Sharon", "Shirley", "Stephanie", "Susan", "Teresa",
    "Theresa", "Virginia", "Wanda")

# Sentence templates with {head}, {tail}, {label}, {article} ("a" / "an") and {possessive} (the head's his/her).
EDGE_TEMPLATES: tuple[str, ...] = (
    "[{tail}] is [{head}]'s {label}.",
    "[{head}]'s {label} is [{tail}].",
    "[{head}] has {article} {label} named [{tail}].",
    "[{head}] spent the afternoon with {possessive} {label}, [{tail}].",
)
ANSWER_TEMPLATES: tuple[str, ...] = (
    "[{head}] went to dinner with {possessive} {label}, [{tail}].",
    "[{head}] called {possessive} {label} [{tail}] on the phone.",
)


def _fill(template: str, head: str, label: str, tail: str, head_gender: str) -> str:
    return template.format(head=head, tail=tail, label=label,
                           article="an" if label[0] in "aeiou" else "a",
                           possessive="his" if head_gender == relations.MALE else "her")


def edge_sentence(head: str, label: str, tail: str, head_gender: str, rng: random.Random) -> str:
    """One sentence saying that ``tail`` is ``head``'s ``label``, with a template drawn from ``rng``."""
    return _fill(rng.choice(EDGE_TEMPLATES), head, label, tail, head_gender)


def answer_sentence(head: str, label: str, tail: str, head_gender: str, rng: random.Random) -> str:
    """A sentence stating the answer (the ``text_target`` column)."""
    return _fill(rng.choice(ANSWER_TEMPLATES), head, label, tail, head_gender)
