"""easy-vqa as a tfds data set: the questions (stage 2) and one caption per image (stage 1).

The `easy-vqa` PyPI package ships a small real VQA set: 64x64 PNG images of one coloured shape each
(`easy_vqa/data/{train,test}/images/{id}.png`), questions as `[question, answer, image_id]` lists
(`{train,test}/questions.json`: 38,575 / 9,673 questions over 4,000 / 1,000 images) and 13 answers
(`answers.txt`: 8 colours, 3 shapes, yes, no). Nothing is downloaded: the builder reads the installed package.

Two configs:
- `questions`: one example per question, with its `question_type` (one of `QUESTION_TYPES`, parsed from the
  question's wording; an unknown wording is an error, never a guess) and a LLaVA-format conversation
  `[{"from": "human", "value": "<image>\\n{question}"}, {"from": "gpt", "value": "{answer}"}]` stored as JSON
  text (conversations vary in length in LLaVA data, so one JSON string fits both builders).
- `captions`: one example per image, captioned "a {color} {shape}". The package has no captions: the colour and
  the shape of each image are derived from its questions (an answered "what color is the triangle?" gives both;
  a "no" to "is there a red shape?" rules red out). Images whose colour or shape the questions do not determine
  are left out of this config and listed in `CaptionReport` (printed at the end of the build); in the
  `questions` config their `caption` is empty.

`prepare_easy_vqa_shards` writes the same data sets shard by shard, resumably (`jaxalign prepare-data easy-vqa`).

Example::

    source = load_easy_vqa("questions", "train")      # builds once into default_data_dir(), then reads
    record = source[0]                                # dict of numpy values; text fields are bytes
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

COLORS = ("blue", "brown", "black", "gray", "green", "red", "teal", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
QUESTION_TYPES = ("shape", "color", "yes_no_shape", "yes_no_color")
SPLITS = ("train", "test")
CAPTION_PROMPT = "Describe the image briefly."
DATA_DIR_ENV = "JAXALIGN_DATA_DIR"

_COLOR = "(?P<color>" + "|".join(COLORS) + ")"
_SHAPE = "(?P<shape>" + "|".join(SHAPES) + ")"
# Every wording the package's generator uses (all of them occur in both splits). Yes / no questions come in
# plain and negated forms; `neg` marks the negation, so "yes" to a negated question means the thing is absent.
_YES_NO_FORMS = ("does the image(?P<neg> not)? contain a {x}", "is (?:a|(?P<neg>no)) {x} present",
                 "is there(?P<neg> not)? a {x}(?: in the image)?")
_PATTERNS: list[tuple[re.Pattern, str]] = [
    (re.compile(rf"what (?:color is|is the color of) the (?:shape|{_SHAPE})\?"), "color"),
    (re.compile(rf"what is the {_COLOR} shape\?"), "shape"),
    (re.compile(r"what shape (?:does the image contain|is in the image|is present)\?"), "shape"),
] + [(re.compile(form.format(x=f"{_COLOR} shape") + r"\?"), "yes_no_color") for form in _YES_NO_FORMS] + [
    (re.compile(form.format(x=_SHAPE) + r"\?"), "yes_no_shape") for form in _YES_NO_FORMS]


def package_data_dir() -> str:
    """The installed `easy_vqa/data` folder (raises a clear error when the package is missing)."""
    try:
        import easy_vqa
    except ImportError as error:
        raise ImportError("the easy-vqa data set comes from the `easy-vqa` package: pip install easy-vqa") from error
    return os.path.join(os.path.dirname(easy_vqa.__file__), "data")


def default_data_dir() -> str:
    """Where built tfds data sets are cached: $JAXALIGN_DATA_DIR, else ~/.cache/jaxalign/tfds."""
    return os.environ.get(DATA_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "jaxalign", "tfds")


# ------------------------------------------------------------------------------------------ questions
@dataclasses.dataclass(frozen=True)
class QuestionFacts:
    """What one answered question says about its image.

    Attributes:
        question_type: one of `QUESTION_TYPES`.
        facts: (attribute, value, present) triples, attribute 'color' or 'shape'; present False means the image
            does not show that value ("no" to "is there a red shape?").
    """

    question_type: str
    facts: tuple[tuple[str, str, bool], ...]


def parse_question(question: str, answer: str, sample_id: Any = None) -> QuestionFacts:
    """The type of an easy-vqa question and the facts its answer gives about the image.

    Raises:
        ValueError: the wording is none of the package's templates, or the answer does not fit the question.
    """
    for pattern, question_type in _PATTERNS:
        match = pattern.fullmatch(question.strip().lower())
        if match is None:
            continue
        groups = match.groupdict()
        facts = [(attribute, groups[attribute], True) for attribute in ("color", "shape") if groups.get(attribute)]
        if question_type in ("color", "shape"):
            expected = COLORS if question_type == "color" else SHAPES
            if answer not in expected:
                raise ValueError(f"question {sample_id!r}: {question!r} asks for a {question_type} but the answer "
                                 f"is {answer!r}; expected one of {expected}")
            facts.append((question_type, answer, True))
        else:
            if answer not in ("yes", "no"):
                raise ValueError(f"question {sample_id!r}: {question!r} is a yes / no question but the answer is "
                                 f"{answer!r}")
            present = (answer == "yes") != bool(groups.get("neg"))
            facts = [(attribute, value, present) for attribute, value, _ in facts]
        return QuestionFacts(question_type, tuple(facts))
    raise ValueError(f"question {sample_id!r}: {question!r} matches none of the easy-vqa question templates; "
                     "add its wording to jaxalign.data.easy_vqa._PATTERNS with its question type")


def question_type(question: str) -> str:
    """'shape', 'color', 'yes_no_shape' or 'yes_no_color' (see `parse_question`)."""
    for pattern, kind in _PATTERNS:
        if pattern.fullmatch(question.strip().lower()):
            return kind
    raise ValueError(f"{question!r} matches none of the easy-vqa question templates")


def read_questions(split: str, data_dir: str | None = None) -> list[tuple[str, str, int]]:
    """The `[question, answer, image_id]` triples of a split, in file order."""
    if split not in SPLITS:
        raise ValueError(f"unknown easy-vqa split {split!r}; choose one of {SPLITS}")
    path = os.path.join(data_dir or package_data_dir(), split, "questions.json")
    with open(path) as f:
        rows = json.load(f)
    for position, row in enumerate(rows):
        if not (isinstance(row, list) and len(row) == 3):
            raise ValueError(f"{path}: entry {position} is {row!r}; expected [question, answer, image_id]")
    return [(str(question), str(answer), int(image_id)) for question, answer, image_id in rows]


# ---------------------------------------------------------------------------------------- captions
@dataclasses.dataclass
class CaptionReport:
    """Images whose caption could not be derived from their questions.

    Attributes:
        total: images seen.
        undetermined: image id -> what is missing or contradictory ("color: no question settles it").
    """

    total: int = 0
    undetermined: dict[int, str] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"captioned {self.total - len(self.undetermined)} of {self.total} images; "
                 f"{len(self.undetermined)} undetermined"]
        lines += [f"  image {image_id}: {reason}" for image_id, reason in sorted(self.undetermined.items())[:20]]
        if len(self.undetermined) > 20:
            lines.append(f"  ... and {len(self.undetermined) - 20} more")
        return "\n".join(lines)


def derive_image_attributes(questions: list[tuple[str, str, int]],
                            ) -> tuple[dict[int, tuple[str, str]], CaptionReport]:
    """(image id -> (color, shape)) for every image the questions determine, and a report of the others.

    A value is determined when the questions assert exactly one value, or when they assert none but rule out
    all values but one. Two asserted values, or an asserted value that is also ruled out, is a contradiction.
    """
    evidence: dict[int, dict[str, tuple[set, set]]] = {}
    for position, (question, answer, image_id) in enumerate(questions):
        sides = evidence.setdefault(image_id, {"color": (set(), set()), "shape": (set(), set())})
        for attribute, value, present in parse_question(question, answer, position).facts:
            sides[attribute][0 if present else 1].add(value)
    attributes: dict[int, tuple[str, str]] = {}
    report = CaptionReport(total=len(evidence))
    for image_id, sides in sorted(evidence.items()):
        found, problems = {}, []
        for attribute, choices in (("color", COLORS), ("shape", SHAPES)):
            present, absent = sides[attribute]
            candidates = present if present else set(choices) - absent
            if present & absent:
                problems.append(f"{attribute}: {sorted(present & absent)} both asserted and ruled out")
            if len(present) > 1:
                problems.append(f"{attribute}: contradictory answers {sorted(present)}")
            if not present and len(candidates) != 1:
                problems.append(f"{attribute}: no question settles it (still possible: {sorted(candidates)})")
            if len(candidates) == 1 and not present & absent:
                found[attribute] = next(iter(candidates))
        if problems:
            report.undetermined[image_id] = "; ".join(problems)
        else:
            attributes[image_id] = (found["color"], found["shape"])
    return attributes, report


def caption_of(color: str, shape: str) -> str:
    """The stage-1 caption of an image: 'a blue rectangle'."""
    return f"a {color} {shape}"


def question_conversation(question: str, answer: str) -> list[dict[str, str]]:
    """The LLaVA-format conversation of one question."""
    return [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]


def caption_conversation(caption: str) -> list[dict[str, str]]:
    """The LLaVA-format conversation of one caption (the `plain` template keeps only the image and the caption)."""
    return [{"from": "human", "value": f"<image>\n{CAPTION_PROMPT}"}, {"from": "gpt", "value": caption}]


def question_records(split: str, data_dir: str | None = None) -> list[dict[str, Any]]:
    """The `questions` examples of a split, in file order, as plain Python values (the builder writes these)."""
    data_dir = data_dir or package_data_dir()
    questions = read_questions(split, data_dir)
    attributes, _ = derive_image_attributes(questions)
    images = _read_images(split, data_dir, {image_id for _, _, image_id in questions})
    records = []
    for position, (question, answer, image_id) in enumerate(questions):
        facts = parse_question(question, answer, f"{split}-{position}")
        caption = caption_of(*attributes[image_id]) if image_id in attributes else ""
        records.append({
            "id": f"{split}-{position:06d}", "question_index": position, "image": images[image_id],
            "image_id": image_id, "question": question, "answer": answer, "question_type": facts.question_type,
            "caption": caption, "conversations": json.dumps(question_conversation(question, answer))})
    return records


def caption_records(split: str, data_dir: str | None = None) -> tuple[list[dict[str, Any]], CaptionReport]:
    """The `captions` examples of a split (one per determined image, by image id) and the report of the rest."""
    data_dir = data_dir or package_data_dir()
    attributes, report = derive_image_attributes(read_questions(split, data_dir))
    images = _read_images(split, data_dir, set(attributes))
    records = [{"id": f"{split}-image-{image_id:05d}", "image": images[image_id], "image_id": image_id,
                "caption": caption_of(color, shape), "color": color, "shape": shape,
                "conversations": json.dumps(caption_conversation(caption_of(color, shape)))}
               for image_id, (color, shape) in sorted(attributes.items())]
    return records, report


def _read_images(split: str, data_dir: str, image_ids: set[int]) -> dict[int, bytes]:
    images = {}
    for image_id in sorted(image_ids):
        path = os.path.join(data_dir, split, "images", f"{image_id}.png")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: image {image_id} of the easy-vqa {split} split is missing; "
                                    "reinstall the easy-vqa package")
        with open(path, "rb") as f:
            images[image_id] = f.read()
    return images


# ------------------------------------------------------------------------------------------- builder
_TEXT = tfds.features.Text
_BYTES = dict(shape=(), dtype=np.object_)


class EasyVqa(tfds.core.GeneratorBasedBuilder):
    """easy-vqa questions (`questions`) or image captions (`captions`); splits train and test."""

    name = "jaxalign_easy_vqa"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Questions with types and derived captions; one caption per image."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="questions", description="One example per question."),
        tfds.core.BuilderConfig(name="captions", description="One example per image, captioned 'a {color} "
                                                              "{shape}' (derived from the image's questions)."),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        common = {"id": _TEXT(), "image": tfds.features.Tensor(**_BYTES), "image_id": np.int32,
                  "caption": _TEXT(), "conversations": _TEXT()}
        if self.builder_config.name == "questions":
            extra = {"question_index": np.int32, "question": _TEXT(), "answer": _TEXT(), "question_type": _TEXT()}
        else:
            extra = {"color": _TEXT(), "shape": _TEXT()}
        return tfds.core.DatasetInfo(
            builder=self,
            description="easy-vqa (github.com/vzhou842/easy-VQA): 64x64 PNG images of one coloured shape, "
                        "questions with 13 answers. `image` holds the PNG bytes; `conversations` is LLaVA-format "
                        "JSON text.",
            features=tfds.features.FeaturesDict({**common, **extra}),
            homepage="https://github.com/vzhou842/easy-VQA",
            license="MIT",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str):
        if self.builder_config.name == "questions":
            records = question_records(split)
        else:
            records, report = caption_records(split)
            print(f"easy-vqa {split} captions: {report}")
        for record in records:
            yield record["id"], record


def load_easy_vqa(config: str = "questions", split: str = "train", data_dir: str | None = None):
    """A random-access source (`len`, `[index]` -> dict of numpy values) of a built easy-vqa split.

    Builds the data set into `data_dir` (default `default_data_dir()`) the first time; later calls only read.
    Text fields come back as bytes, `image` as PNG bytes.
    """
    data_dir = data_dir or default_data_dir()
    builder = EasyVqa(config=config, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return tfds.data_source(f"{EasyVqa.name}/{config}", data_dir=data_dir, split=split)


def prepare_easy_vqa_shards(config: str = "questions", data_dir: str | None = None, **shard_options: Any):
    """Writes the data set `load_easy_vqa` builds (both splits; same records, same order) shard by shard: split
    over processes and threads, resumable (`jaxalign.data.sharded_prepare.prepare_shards`, whose options
    `shard_options` are). For `captions`, the images the questions leave undetermined are counted in the report
    as 'undetermined_caption'. Returns the `PrepareResult`."""
    from jaxalign.data import sharded_prepare
    from jaxalign.data.batching import SkipReport

    data_dir = data_dir or default_data_dir()
    builder = EasyVqa(config=config, data_dir=data_dir, file_format="array_record")
    result = sharded_prepare.finished(builder, shard_options.get("process_index", 0))
    if result is not None:
        return result
    plans = []
    for split in SPLITS:
        skipped = None
        if config == "questions":
            records = question_records(split)
        else:
            records, report = caption_records(split)
            skipped = SkipReport(total=len(report.undetermined), action="kept")
            skipped.skipped["undetermined_caption"].extend(sorted(report.undetermined))
        plans.append(sharded_prepare.SplitPlan(split, [record["id"] for record in records], records.__getitem__,
                                               skipped_before=skipped))
    fingerprint = {"package_data": package_data_dir(), "config": config,
                   "questions": {split: os.path.getsize(os.path.join(package_data_dir(), split, "questions.json"))
                                 for split in SPLITS}}
    return sharded_prepare.prepare_shards(builder, plans, fingerprint=fingerprint, **shard_options)
