"""VQA accuracy: answer normalisation, batched greedy generation with the KV cache, accuracy per question type.

Scoring is exact match after the normalisation of the official VQA evaluation (lower case, punctuation
removed except inside numbers, number words to digits, articles dropped, common contractions restored,
whitespace collapsed), against the single reference answer of each question (easy-vqa and LLaVA-format data
carry one answer). Generation is the caller's function (`generate_fn(batch) -> tokens [B, T]`, e.g.
`jaxalign.programs.tinyalign_trainer`'s, which runs the retrieval once at prefill and then decodes with the KV cache); this
module decodes and scores, so it also serves any other VLM.

Public API:
  normalize_answer(text) -> str
  first_answer(text) -> str                      (the generated text up to its first line break)
  VqaTally: .add(predictions, references, question_types) ; .result() -> table-ready dict ;
      .sum_over_processes() -> the tally of every JAX process's rows
  evaluate_vqa(generate_fn, batches, tokenizer, max_examples=None, progress=True) -> (result, examples)
"""
from __future__ import annotations

import collections
import json
import re
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

# From the official VQA evaluation script (vqaEval.py): number words, articles, punctuation and contractions.
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
CONTRACTIONS = {"aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't",
                "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't",
                "isnt": "isn't", "shouldnt": "shouldn't", "wasnt": "wasn't", "werent": "weren't", "wont": "won't",
                "wouldnt": "wouldn't", "youre": "you're", "youve": "you've", "whats": "what's", "thats": "that's",
                "theres": "there's", "im": "i'm", "ive": "i've", "its": "it's", "lets": "let's"}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
NO_TYPE = "(none)"


def _process_punctuation(text: str) -> str:
    out = text
    for mark in _PUNCTUATION:
        # As vqaEval: a mark next to a space (or a comma inside a number) is removed, others become spaces.
        if (mark + " " in text or " " + mark in text) or re.search(_COMMA_STRIP, text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out)


def normalize_answer(text: str) -> str:
    """The VQA normalisation of an answer: 'The Two  Dogs.' -> '2 dogs'; "Isnt it?" -> "isn't it"."""
    text = " ".join(str(text).replace("\n", " ").replace("\t", " ").strip().lower().split())
    text = _process_punctuation(text)
    words = []
    for word in text.split():
        word = NUMBER_WORDS.get(word, word)
        if word in ARTICLES:
            continue
        words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def first_answer(text: str) -> str:
    """The generated answer proper: the text before its first line break (models often go on talking)."""
    text = str(text).strip()
    return text.splitlines()[0].strip() if text else ""


class VqaTally:
    """Running exact-match counts, overall and per question type."""

    def __init__(self):
        self.correct: collections.Counter = collections.Counter()
        self.total: collections.Counter = collections.Counter()

    def add(self, predictions: Sequence[str], references: Sequence[str], question_types: Sequence[str]) -> list[bool]:
        """Scores one batch of (already decoded) predictions; returns which were right."""
        if not len(predictions) == len(references) == len(question_types):
            raise ValueError(f"{len(predictions)} predictions, {len(references)} references and "
                             f"{len(question_types)} question types must match")
        hits = []
        for prediction, reference, kind in zip(predictions, references, question_types):
            hit = normalize_answer(first_answer(prediction)) == normalize_answer(reference)
            kind = str(kind) or NO_TYPE
            self.total[kind] += 1
            self.correct[kind] += int(hit)
            hits.append(hit)
        return hits

    def result(self) -> dict[str, Any]:
        """{'accuracy', 'correct', 'count', 'per_type': {type: {'accuracy', 'correct', 'count'}}}; accuracies
        in [0, 1] (NaN-free: an empty tally has accuracy 0 and count 0)."""
        count, correct = sum(self.total.values()), sum(self.correct.values())
        per_type = {kind: {"accuracy": self.correct[kind] / self.total[kind], "correct": self.correct[kind],
                           "count": self.total[kind]} for kind in sorted(self.total)}
        return {"accuracy": correct / count if count else 0.0, "correct": correct, "count": count,
                "per_type": per_type}

    def sum_over_processes(self) -> "VqaTally":
        """The tally of every JAX process's questions together (each process scored its own rows); the same on
        every process. Every process must call it at the same point; with one process it is this tally."""
        import jax

        if jax.process_count() == 1:
            return self
        from jax.experimental import multihost_utils

        # Question types may differ between processes, so the counts travel as JSON text in a padded byte array.
        payload = np.frombuffer(json.dumps([self.correct, self.total]).encode("utf-8"), np.uint8)
        size = int(np.max(multihost_utils.process_allgather(np.asarray([payload.size], np.int32))))
        gathered = np.asarray(multihost_utils.process_allgather(np.pad(payload, (0, size - payload.size))))
        merged = VqaTally()
        for row in gathered:
            correct, total = json.loads(row.tobytes().rstrip(b"\0").decode("utf-8"))
            merged.correct.update(correct)
            merged.total.update(total)
        return merged


def evaluate_vqa(generate_fn: Callable[[dict], np.ndarray], batches: Iterable[dict], tokenizer: Any,
                 max_examples: int | None = None, progress: bool = True, keep_examples: int = 20
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """VQA accuracy of a model over generation batches.

    Args:
      generate_fn: batch -> generated token ids [B, T] (NumPy; pad after EOS), this host's rows.
      batches: `jaxalign.data.pipeline.make_eval_dataset(for_generation=True)` batches: the model inputs plus
        'valid' [B], 'answer' [B] and 'question_type' [B] (strings).
      tokenizer: decodes the generated ids (special tokens skipped).
      max_examples: stop after this many valid questions (None: all); with several processes, of this process's
        rows (cap the batches instead to score the same questions on any number of processes).
      keep_examples: how many (question type, reference, prediction) examples to return for inspection.
    Returns:
      (`VqaTally.result()` summed over all JAX processes, the same on each; this process's examples).
      Every process must call it with the same number of batches.
    """
    tally, examples = VqaTally(), []
    total = len(batches) if hasattr(batches, "__len__") else None
    for batch in tqdm(batches, total=total, desc="vqa eval", disable=None if progress else True):
        valid = np.asarray(batch["valid"], bool)
        tokens = np.asarray(generate_fn(batch))
        predictions = tokenizer.batch_decode(tokens[valid].tolist())
        references = [str(answer) for answer in np.asarray(batch["answer"])[valid]]
        kinds = [str(kind) for kind in np.asarray(batch["question_type"])[valid]]
        if max_examples is not None:
            room = max_examples - sum(tally.total.values())
            predictions, references, kinds = predictions[:room], references[:room], kinds[:room]
        hits = tally.add(predictions, references, kinds)
        for prediction, reference, kind, hit in zip(predictions, references, kinds, hits):
            if len(examples) < keep_examples:
                examples.append({"question_type": kind, "reference": reference, "prediction": prediction,
                                 "correct": hit})
        if max_examples is not None and sum(tally.total.values()) >= max_examples:
            break
    return tally.sum_over_processes().result(), examples
