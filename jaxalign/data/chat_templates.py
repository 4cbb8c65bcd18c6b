"""Chat templates: LLaVA-format conversations -> token ids with image / retrieval sentinels and masked labels.

A conversation is a list of turns `{'from': 'human' | 'gpt', 'value': str}` (optionally led by one
`{'from': 'system', ...}` turn that replaces the template's system message). The human turn that holds the image
contains `<image>`; as in LLaVA and TinyLLaVA the marker is moved to the front of that turn
(`<image>\\n{question}`). With `insert_retrieval=True` it becomes `<image><rag>` (TinyAlign).

In token ids the markers become negative sentinels, `IMAGE_TOKEN_ID = -200` and `RETRIEVAL_TOKEN_ID = -300`
(LLaVA's convention): the model later splices the image tokens and the retrieved tokens in at those positions.
Labels are `IGNORE_LABEL` everywhere except on the answer tokens and the assistant's end-of-turn token.

How the ids are made, and why:
- The text between markers is tokenised as one string, so the ids equal those of the plain tokenizer on the
  rendered prompt. Which tokens are answer tokens is decided from the tokens' character spans, not by counting
  tokens of re-tokenised pieces (LLaVA's way, which breaks when a merge crosses a boundary and then prints
  "tokenization mismatch" and drops the sample's labels).
- The markers are split out before tokenising, and the BOS is added once at the very start. The official
  TinyAlign code tokenises each piece with the tokenizer's BOS and strips it by position; with tokenizers that add
  a BOS the image and retrieval markers are lost there.
- `text_start` (the first token of the human text after the markers and their separator) is measured, not
  assumed: it replaces the official code's hard-coded `retrieval_text_start = 35`, which only fits Phi-2's
  tokenizer and template.

Sentinels count as one position each. When the model will splice `image_length` image tokens and
`retrieval_length` retrieved tokens, pass them to `encode_conversation` so that `max_length` counts the sequence
the LM will actually see.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from jaxalign.data.tokenizer import Tokenizer

IMAGE_PLACEHOLDER = "<image>"
RETRIEVAL_PLACEHOLDER = "<rag>"
IMAGE_TOKEN_ID = -200
RETRIEVAL_TOKEN_ID = -300
IGNORE_LABEL = -100

# Markers usable in template strings; they become the tokenizer's own BOS / EOS ids, so one template fits any
# tokenizer (Phi-2's EOS is <|endoftext|>, Llama's </s>, a demo tokenizer's whatever it was trained with).
BOS_MARKER = "{bos}"
EOS_MARKER = "{eos}"
SYSTEM_MARKER = "{system}"

HUMAN, ASSISTANT, SYSTEM = "human", "gpt", "system"


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """How a conversation is written out as text. Strings may contain `{bos}` / `{eos}` (the tokenizer's tokens).

    Rendered training text, for turns (q1, a1), (q2, a2):
        [system_format(system)] user_prefix q1 user_suffix assistant_prefix a1 assistant_suffix
        turn_separator user_prefix q2 user_suffix assistant_prefix a2 assistant_suffix
    Only `a*` and `assistant_suffix` carry labels.

    Attributes:
        name: the template's name in `get_template`.
        system_message: default system text; a leading `system` turn in the conversation replaces it.
        system_format: how the system text is written (`{system}` is replaced); skipped when the text is empty.
        system_inside_first_user: put the system block after the first `user_prefix` (Llama-2's `[INST] <<SYS>>`).
        user_prefix, user_suffix, assistant_prefix, assistant_suffix, turn_separator: see above.
        image_separator: text between the image (and retrieval) marker and the human text.
        begin_with_bos: always start with the tokenizer's BOS. Otherwise a BOS is added only when the
            tokenizer's post-processor would add one.
        keep_user_text: False for caption pretraining, where the human turn holds only the image (LLaVA "plain").
        single_turn: the template takes exactly one human turn and one answer.
        required_tokens: tokens the tokenizer must know as single tokens (checked before encoding).
    """

    name: str
    system_message: str = ""
    system_format: str = SYSTEM_MARKER
    system_inside_first_user: bool = False
    user_prefix: str = ""
    user_suffix: str = ""
    assistant_prefix: str = ""
    assistant_suffix: str = EOS_MARKER
    turn_separator: str = ""
    image_separator: str = "\n"
    begin_with_bos: bool = False
    keep_user_text: bool = True
    single_turn: bool = False
    required_tokens: tuple[str, ...] = ()


_TINYLLAVA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                     "helpful, detailed, and polite answers to the user's questions.")
_LLAVA_LLAMA2_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual "
                        "content that the user provides, and assist the user with a variety of tasks using natural "
                        "language.")

TEMPLATES: dict[str, ChatTemplate] = {
    # LLaVA / TinyLLaVA pretraining: "<image>" then the caption; the human text is dropped, "\n" ends the answer.
    "plain": ChatTemplate(name="plain", assistant_suffix="\n", image_separator="", keep_user_text=False,
                          single_turn=True),
    # Qwen2 ChatML; the "\n" after an assistant's <|im_end|> belongs to the next turn and carries no label.
    "qwen2": ChatTemplate(
        name="qwen2", system_message="You are a helpful assistant.",
        system_format="<|im_start|>system\n{system}<|im_end|>\n",
        user_prefix="<|im_start|>user\n", user_suffix="<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n", assistant_suffix="<|im_end|>", turn_separator="\n",
        required_tokens=("<|im_start|>", "<|im_end|>")),
    # Llama-2 chat (also TinyLlama-chat v0.x): <s>[INST] <<SYS>>..<</SYS>> q [/INST] a </s><s>[INST] q2 [/INST] ...
    "llama2": ChatTemplate(
        name="llama2", system_message=_LLAVA_LLAMA2_SYSTEM, system_format="<<SYS>>\n{system}\n<</SYS>>\n\n",
        system_inside_first_user=True, user_prefix="[INST] ", user_suffix=" [/INST]", assistant_prefix=" ",
        assistant_suffix=" {eos}", turn_separator=BOS_MARKER, begin_with_bos=True),
    # TinyLLaVA's (and the official TinyAlign's) Phi template: "{system} USER: <image>\nq ASSISTANT: a<|endoftext|>".
    "phi": ChatTemplate(
        name="phi", system_message=_TINYLLAVA_SYSTEM, system_format="{system} ", user_prefix="USER: ",
        user_suffix=" ", assistant_prefix="ASSISTANT: ", assistant_suffix=EOS_MARKER),
}


def get_template(name: str) -> ChatTemplate:
    """The template registered under `name` (one of `TEMPLATES`); use `dataclasses.replace` to vary one."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


class MaskingError(ValueError):
    """A sample cannot be turned into ids with at least one labelled answer token.

    Attributes:
        sample_id: the sample's id (None when not given).
        reason: a short key, counted by `batching.SkipReport`: one of `empty_conversation`, `malformed_turn`,
            `unknown_speaker`, `turn_order`, `no_assistant_turn`, `empty_answer`, `placeholder`, `truncated`.
        detail: what exactly was wrong, for the person fixing the data.
    """

    def __init__(self, sample_id: Any, reason: str, detail: str = ""):
        self.sample_id = sample_id
        self.reason = reason
        self.detail = detail
        super().__init__(f"sample {sample_id!r}: {reason}" + (f": {detail}" if detail else ""))


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
    """One encoded conversation, before padding.

    Attributes:
        input_ids: [tokens] token ids with `IMAGE_TOKEN_ID` / `RETRIEVAL_TOKEN_ID` at the marker positions.
        labels: [tokens] equal to `input_ids` on answer and assistant end-of-turn tokens, else `IGNORE_LABEL`.
        image_index: position of the image sentinel, or -1 for a text-only sample.
        retrieval_index: position of the retrieval sentinel, or -1.
        text_start: first token of the human text after the markers and their separator (the first human turn's
            text when there is no image). For caption pretraining this is the first caption token.
        num_answer_tokens: number of labelled positions.
        sample_id: the id the sample was encoded under.
    """

    input_ids: list[int]
    labels: list[int]
    image_index: int
    retrieval_index: int
    text_start: int
    num_answer_tokens: int
    sample_id: Any = None

    def __len__(self) -> int:
        return len(self.input_ids)


# A rendered piece: text or one explicit id, whether it carries labels, and (text only) whether text_start is at
# its first character.
@dataclasses.dataclass
class _Segment:
    value: str | int
    labelled: bool = False
    marks_text_start: bool = False


def encode_conversation(
    tokenizer: Tokenizer,
    template: ChatTemplate,
    conversation: Sequence[Mapping[str, Any]],
    *,
    max_length: int | None = None,
    insert_retrieval: bool = False,
    sample_id: Any = None,
    image_length: int = 1,
    retrieval_length: int = 1,
) -> TokenizedExample:
    """Ids and labels of a training conversation (it must end with an assistant answer).

    Args:
        tokenizer: the LM's tokenizer.
        template: from `get_template`.
        conversation: LLaVA-format turns.
        max_length: keep at most this many positions (the end is cut); None keeps all.
        insert_retrieval: put a retrieval sentinel right after the image sentinel (samples without an image get
            none, as in the official code).
        sample_id: named in errors.
        image_length, retrieval_length: positions each sentinel will expand to in the model, counted toward
            `max_length`.

    Raises:
        MaskingError: the conversation is malformed, has no (non-empty) answer, or truncation leaves no answer
            token or cuts a marker.
    """
    system, turns = _validated_turns(conversation, template, sample_id, for_generation=False)
    segments = _render(tokenizer, template, system, turns, insert_retrieval, generation_prompt=False)
    example = _tokenize(tokenizer, segments, sample_id)
    example = _truncate(example, max_length, image_length, retrieval_length)
    if example.num_answer_tokens == 0:
        reason = "truncated" if max_length is not None else "empty_answer"
        raise MaskingError(sample_id, reason, "no answer token is left to learn from")
    return example


def encode_prompt(
    tokenizer: Tokenizer,
    template: ChatTemplate,
    conversation: Sequence[Mapping[str, Any]],
    *,
    max_length: int | None = None,
    insert_retrieval: bool = False,
    sample_id: Any = None,
    image_length: int = 1,
    retrieval_length: int = 1,
) -> TokenizedExample:
    """Ids of a generation prompt: the conversation must end with a human turn; the assistant prefix is appended.

    Trailing spaces of the assistant prefix are left out: byte-level and sentencepiece tokenizers attach a space
    to the following word (" Red" is one token in training), so the model must be the one to produce it. All
    labels are IGNORE_LABEL.

    Raises MaskingError (reason `truncated`) when the prompt is longer than `max_length`: cutting a prompt would
    change the question.
    """
    system, turns = _validated_turns(conversation, template, sample_id, for_generation=True)
    segments = _render(tokenizer, template, system, turns, insert_retrieval, generation_prompt=True)
    example = _tokenize(tokenizer, segments, sample_id)
    length = _model_length(example, image_length, retrieval_length)
    if max_length is not None and length > max_length:
        raise MaskingError(sample_id, "truncated", f"prompt needs {length} positions, max_length is {max_length}")
    return example


# ------------------------------------------------------------------------------------------- validation
def _validated_turns(conversation: Any, template: ChatTemplate, sample_id: Any, for_generation: bool,
                     ) -> tuple[str, list[tuple[str, str]]]:
    """(system text, [(speaker, text)]) after checking speakers, order, answers and markers."""
    if not isinstance(conversation, Sequence) or isinstance(conversation, (str, bytes)):
        raise MaskingError(sample_id, "malformed_turn", f"conversation must be a list of turns, got "
                           f"{type(conversation).__name__}")
    turns = []
    for position, turn in enumerate(conversation):
        if not isinstance(turn, Mapping) or not isinstance(turn.get("value"), str) or "from" not in turn:
            raise MaskingError(sample_id, "malformed_turn", f"turn {position} needs 'from' and a string 'value'")
        if turn["from"] not in (HUMAN, ASSISTANT, SYSTEM):
            raise MaskingError(sample_id, "unknown_speaker", f"turn {position} is from {turn['from']!r}; expected "
                               f"'{HUMAN}' or '{ASSISTANT}' (or '{SYSTEM}' first)")
        turns.append((turn["from"], turn["value"]))
    system = template.system_message
    if turns and turns[0][0] == SYSTEM:
        system = turns.pop(0)[1]
    if not turns:
        raise MaskingError(sample_id, "empty_conversation", "no human or assistant turn")
    speakers = [speaker for speaker, _ in turns]
    if not for_generation and ASSISTANT not in speakers:
        raise MaskingError(sample_id, "no_assistant_turn", "the conversation has no 'gpt' turn to learn from")
    for position, speaker in enumerate(speakers):
        expected = HUMAN if position % 2 == 0 else ASSISTANT
        if speaker != expected:
            raise MaskingError(sample_id, "turn_order", f"turn {position} is from {speaker!r}, expected "
                               f"{expected!r} (turns must alternate human, gpt, ... starting with human)")
    last_expected = HUMAN if for_generation else ASSISTANT
    if speakers[-1] != last_expected:
        what = "an assistant answer" if for_generation else "an unanswered human turn"
        raise MaskingError(sample_id, "turn_order", f"the conversation ends with {what}")
    if template.single_turn and len(turns) != (1 if for_generation else 2):
        raise MaskingError(sample_id, "turn_order", f"the {template.name!r} template takes exactly one human turn "
                           f"and one answer, got {len(turns)} turns")
    for position, (speaker, text) in enumerate(turns):
        if speaker == ASSISTANT and not text.strip():
            raise MaskingError(sample_id, "empty_answer", f"turn {position} (gpt) is empty")
        if RETRIEVAL_PLACEHOLDER in text:
            raise MaskingError(sample_id, "placeholder", f"turn {position} contains {RETRIEVAL_PLACEHOLDER!r}; "
                               "retrieval markers are inserted by insert_retrieval=True, not written in the data")
        if speaker == ASSISTANT and IMAGE_PLACEHOLDER in text:
            raise MaskingError(sample_id, "placeholder", f"turn {position} (gpt) contains {IMAGE_PLACEHOLDER!r}")
    image_count = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
    if image_count > 1:
        raise MaskingError(sample_id, "placeholder", f"{image_count} {IMAGE_PLACEHOLDER!r} markers; one image per "
                           "sample is supported")
    if not template.keep_user_text and image_count == 0:
        raise MaskingError(sample_id, "placeholder", f"the {template.name!r} template needs {IMAGE_PLACEHOLDER!r} "
                           "in the human turn (caption pretraining without an image teaches nothing)")
    return system, turns


# -------------------------------------------------------------------------------------------- rendering
def _render(tokenizer: Tokenizer, template: ChatTemplate, system: str, turns: list[tuple[str, str]],
            insert_retrieval: bool, generation_prompt: bool) -> list[_Segment]:
    missing = [token for token in template.required_tokens if tokenizer.token_to_id(token) is None]
    if missing:
        raise ValueError(f"template {template.name!r} needs the tokens {missing} as single tokens, but the "
                         f"tokenizer from {tokenizer.source} does not have them; add them as special tokens")

    def literal(text: str, labelled: bool = False) -> list[_Segment]:
        # Split template text on {bos} / {eos} so those become the tokenizer's ids, whatever their spelling.
        pieces: list[_Segment] = []
        for part_index, part in enumerate(text.split(EOS_MARKER)):
            if part_index > 0:
                pieces.append(_Segment(_special_id(tokenizer, "eos", template), labelled))
            for bos_index, bos_part in enumerate(part.split(BOS_MARKER)):
                if bos_index > 0:
                    pieces.append(_Segment(_special_id(tokenizer, "bos", template), labelled))
                if bos_part:
                    pieces.append(_Segment(bos_part, labelled))
        return pieces

    segments: list[_Segment] = []
    if template.begin_with_bos:
        segments.append(_Segment(_special_id(tokenizer, "bos", template)))
    else:
        segments += [_Segment(token_id) for token_id in tokenizer.special_prefix_ids]
    system_block = literal(template.system_format.replace(SYSTEM_MARKER, system)) if system else []
    if not template.system_inside_first_user:
        segments += system_block
    has_image = any(IMAGE_PLACEHOLDER in text for _, text in turns)
    for position, (speaker, text) in enumerate(turns):
        if speaker == ASSISTANT:
            segments += literal(template.assistant_prefix)
            segments.append(_Segment(text, labelled=True))
            segments += literal(template.assistant_suffix, labelled=True)
            continue
        if position > 0:
            segments += literal(template.turn_separator)
        segments += literal(template.user_prefix)
        if position == 0 and template.system_inside_first_user:
            segments += system_block
        if IMAGE_PLACEHOLDER in text:
            content = text.replace(IMAGE_PLACEHOLDER, "").strip() if template.keep_user_text else ""
            segments.append(_Segment(IMAGE_TOKEN_ID))
            if insert_retrieval:
                segments.append(_Segment(RETRIEVAL_TOKEN_ID))
            if content:  # TinyLLaVA strips "<image>\n{content}", so an empty question has no separator
                segments += literal(template.image_separator)
            segments.append(_Segment(content, marks_text_start=True))
        else:
            segments.append(_Segment(text, marks_text_start=(position == 0 and not has_image)))
        segments += literal(template.user_suffix)
    if generation_prompt:
        segments += literal(template.assistant_prefix.rstrip(" "))
    return segments


def _special_id(tokenizer: Tokenizer, role: str, template: ChatTemplate) -> int:
    token_id = tokenizer.bos_id if role == "bos" else tokenizer.eos_id
    if token_id is None:
        raise ValueError(f"template {template.name!r} needs a {role.upper()} token, but the tokenizer from "
                         f"{tokenizer.source} has none configured; name it in tokenizer_config.json "
                         f"('{role}_token') or pass {role}_token= to Tokenizer.from_file")
    return token_id


# ------------------------------------------------------------------------------------------ tokenising
def _tokenize(tokenizer: Tokenizer, segments: list[_Segment], sample_id: Any) -> TokenizedExample:
    input_ids: list[int] = []
    labels: list[int] = []
    text_start = -1
    position = 0
    while position < len(segments):
        segment = segments[position]
        if isinstance(segment.value, int):
            input_ids.append(segment.value)
            labels.append(segment.value if segment.labelled else IGNORE_LABEL)
            position += 1
            continue
        # A run of text segments is tokenised as one string; each token is labelled when its character span
        # overlaps a labelled segment (a merged " yes" that starts in the prompt's space is an answer token).
        chunk, spans, mark = "", [], None
        while position < len(segments) and isinstance(segments[position].value, str):
            piece = segments[position]
            if piece.marks_text_start:
                mark = len(chunk)
            spans.append((len(chunk), len(chunk) + len(piece.value), piece.labelled))
            chunk += piece.value
            position += 1
        ids, offsets = tokenizer.encode_with_offsets(chunk)
        labelled_spans = [(start, end) for start, end, labelled in spans if labelled]
        if mark is not None:
            text_start = len(input_ids) + sum(1 for start, end in offsets if end <= mark and start < mark)
        for token_id, (start, end) in zip(ids, offsets):
            if end > start:
                is_answer = any(start < stop and end > begin for begin, stop in labelled_spans)
            else:  # zero width (e.g. a whitespace token after offset trimming): it belongs with the char before
                owner = max(start - 1, 0)
                is_answer = any(begin <= owner < stop for begin, stop in labelled_spans)
            input_ids.append(token_id)
            labels.append(token_id if is_answer else IGNORE_LABEL)
    image_index = input_ids.index(IMAGE_TOKEN_ID) if IMAGE_TOKEN_ID in input_ids else -1
    retrieval_index = input_ids.index(RETRIEVAL_TOKEN_ID) if RETRIEVAL_TOKEN_ID in input_ids else -1
    return TokenizedExample(
        input_ids=input_ids, labels=labels, image_index=image_index, retrieval_index=retrieval_index,
        text_start=text_start, num_answer_tokens=sum(label != IGNORE_LABEL for label in labels),
        sample_id=sample_id)


def _model_length(example: TokenizedExample, image_length: int, retrieval_length: int) -> int:
    """Positions the LM sees once the sentinels are expanded."""
    extra = (image_length - 1 if example.image_index >= 0 else 0)
    extra += (retrieval_length - 1 if example.retrieval_index >= 0 else 0)
    return len(example.input_ids) + extra


def _truncate(example: TokenizedExample, max_length: int | None, image_length: int,
              retrieval_length: int) -> TokenizedExample:
    if max_length is None:
        return example
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    length = _model_length(example, image_length, retrieval_length)
    if length <= max_length:
        return example
    keep = len(example.input_ids) - (length - max_length)
    last_marker = max(example.image_index, example.retrieval_index)
    if keep <= last_marker:
        raise MaskingError(example.sample_id, "truncated", f"max_length {max_length} cuts the image / retrieval "
                           f"marker at position {last_marker} (the sample needs {length} positions)")
    labels = example.labels[:keep]
    return dataclasses.replace(example, input_ids=example.input_ids[:keep], labels=labels,
                               text_start=min(example.text_start, keep),
                               num_answer_tokens=sum(label != IGNORE_LABEL for label in labels))
