"""A small wrapper over the Hugging Face `tokenizers` library (`tokenizer.json`), plus in-memory training.

Pretrained language models come with a `tokenizer.json` in their snapshot folder; its special tokens (BOS, EOS,
PAD) are named in `tokenizer_config.json`, `special_tokens_map.json` or `generation_config.json`. `Tokenizer`
reads all of them without `transformers`, and answers the few questions the data pipeline asks: ids of a text,
text of ids, the special ids, and whether the tokenizer's post-processor puts a BOS in front of every encoding
(the chat templates need that to keep the image and retrieval markers, see `chat_templates.py`).

No real tokenizer can be downloaded in the tests or the demo, so `train_word_level_tokenizer` and
`train_byte_level_bpe_tokenizer` build small ones from a list of texts in memory.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping, Sequence

import tokenizers
from etils import epath
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors, trainers

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"


class Tokenizer:
    """Text <-> token ids for one language model, with its BOS / EOS / PAD tokens.

    Attributes:
        backend: the underlying `tokenizers.Tokenizer`.
        bos_token, eos_token, pad_token: the special token strings, or None when the model has none. When no pad
            token is configured, `pad_id` falls back to `eos_id` (padding positions are masked anyway, so any id
            in the vocabulary does; EOS is what Llama / Phi / Qwen2 fine-tuning code conventionally uses).
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        source: str = "<in memory>",
    ):
        self.backend = backend
        self.source = source
        for role, token in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token)):
            if token is not None and backend.token_to_id(token) is None:
                raise ValueError(f"{source}: {role} token {token!r} is not in the vocabulary of the tokenizer")
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        self._special_prefix_ids, self._special_suffix_ids = _post_processor_specials(backend)

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_file(
        cls,
        path: str,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
    ) -> "Tokenizer":
        """Loads a `tokenizer.json` file (local or gs://); the special tokens are given by name since the file does
        not say them."""
        if not epath.Path(path).is_file():
            raise FileNotFoundError(f"{path}: tokenizer file not found (expected a Hugging Face tokenizer.json)")
        try:
            # read here rather than by `Tokenizer.from_file`, which only opens local files
            backend = tokenizers.Tokenizer.from_str(epath.Path(path).read_text())
        except Exception as error:  # the Rust side raises a bare Exception for malformed files
            raise ValueError(f"{path}: not a valid tokenizer.json ({error})") from error
        return cls(backend, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token, source=path)

    @classmethod
    def from_folder(cls, folder: str) -> "Tokenizer":
        """Loads the tokenizer of a Hugging Face snapshot folder.

        Reads `tokenizer.json` (required) and, when present, the special tokens from `tokenizer_config.json`,
        then `special_tokens_map.json`, then the ids in `generation_config.json` (first source that names a token
        wins).
        """
        if not epath.Path(folder).is_dir():
            raise FileNotFoundError(f"{folder}: not a folder (expected a Hugging Face snapshot folder)")
        path = os.fspath(epath.Path(folder) / TOKENIZER_FILE)
        if not epath.Path(path).is_file():
            raise FileNotFoundError(
                f"{path}: missing; jaxalign reads the fast-tokenizer file {TOKENIZER_FILE} (a folder with only a "
                "sentencepiece tokenizer.model must first be converted, e.g. by saving it once with transformers)")
        backend = cls.from_file(path).backend
        special: dict[str, str | None] = {"bos": None, "eos": None, "pad": None}
        for file_name in (TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE):
            config = _read_json_if_present(epath.Path(folder) / file_name)
            for role in special:
                if special[role] is None:
                    special[role] = _token_content(config.get(f"{role}_token"))
        generation = _read_json_if_present(epath.Path(folder) / GENERATION_CONFIG_FILE)
        for role in special:
            if special[role] is None:
                token_id = generation.get(f"{role}_token_id")
                if isinstance(token_id, list):  # several EOS ids are allowed there; the first is the main one
                    token_id = token_id[0] if token_id else None
                if token_id is not None:
                    special[role] = backend.id_to_token(int(token_id))
        for role, token in special.items():
            if token is not None and backend.token_to_id(token) is None:
                raise ValueError(f"{folder}: the configured {role} token {token!r} is not in {TOKENIZER_FILE}")
        return cls(backend, bos_token=special["bos"], eos_token=special["eos"], pad_token=special["pad"],
                   source=folder)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the `tokenizer.json` file, local or gs:// (special-token names are not part of it: see
        `save_folder`)."""
        epath.Path(path).write_text(self.backend.to_str(pretty=True))  # what `backend.save(path)` writes locally

    def save_folder(self, folder: str | os.PathLike) -> None:
        """Writes `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` in the Hugging Face
        layout, so that `Tokenizer.from_folder` and `transformers.AutoTokenizer` load it with its special tokens."""
        folder = epath.Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.save(folder / TOKENIZER_FILE)
        special = {f"{role}_token": token for role, token in
                   (("bos", self.bos_token), ("eos", self.eos_token), ("pad", self.pad_token)) if token is not None}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": self.adds_bos, **special}
        (folder / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2))
        (folder / SPECIAL_TOKENS_MAP_FILE).write_text(json.dumps(special, indent=2))

    # ------------------------------------------------------------------------------------------ conversion
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; with `add_special_tokens` the post-processor's tokens (e.g. a BOS) are added."""
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of `text` (no special tokens added) and each token's [start, end) character span in `text`.

        The spans let the chat templates tell prompt tokens from answer tokens after tokenising the whole turn at
        once (so the ids equal what the plain tokenizer produces for the full string).
        """
        encoding = self.backend.encode(text, add_special_tokens=False)
        return list(encoding.ids), [tuple(span) for span in encoding.offsets]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Negative ids (image / retrieval sentinels, ignored labels) are left out, so a label row
        can be decoded as is."""
        return self.backend.decode([int(i) for i in ids if int(i) >= 0], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, batch: Iterable[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        """`decode` for each row of a batch (a list of lists or a 2-D array)."""
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in batch]

    def token_to_id(self, token: str) -> int | None:
        """The id of one token string, or None when it is not in the vocabulary."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The token string of one id, or None when the id is out of range."""
        return self.backend.id_to_token(int(token_id))

    # ---------------------------------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the LM's embedding table must have at least this many rows)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self.backend.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return None if self.eos_token is None else self.backend.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        """The pad id, or the EOS id when no pad token is configured (None only when neither exists)."""
        if self.pad_token is not None:
            return self.backend.token_to_id(self.pad_token)
        return self.eos_id

    @property
    def adds_bos(self) -> bool:
        """Whether the post-processor puts special token(s) such as a BOS in front of every encoding."""
        return bool(self._special_prefix_ids)

    @property
    def special_prefix_ids(self) -> list[int]:
        """The ids the post-processor puts in front of a single sequence (e.g. `[bos_id]` for Llama)."""
        return list(self._special_prefix_ids)

    @property
    def special_suffix_ids(self) -> list[int]:
        """The ids the post-processor appends to a single sequence (rare for decoder LMs)."""
        return list(self._special_suffix_ids)

    def __repr__(self) -> str:
        return (f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
                f"eos={self.eos_token!r}, pad={self.pad_token!r}, adds_bos={self.adds_bos})")


def _post_processor_specials(backend: tokenizers.Tokenizer) -> tuple[list[int], list[int]]:
    """The ids the post-processor adds before and after a single sequence, found by encoding a probe text."""
    encoding = backend.encode("a", add_special_tokens=True)
    plain_length = len(backend.encode("a", add_special_tokens=False).ids)
    mask = list(encoding.special_tokens_mask)
    prefix = 0
    while prefix < len(mask) and mask[prefix] == 1:
        prefix += 1
    suffix_start = prefix + plain_length
    return list(encoding.ids[:prefix]), list(encoding.ids[suffix_start:])


def _read_json_if_present(path: epath.Path) -> dict:
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level, found {type(content).__name__}")
    return content


def _token_content(entry: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string, or a serialised AddedToken dict."""
    if isinstance(entry, str):
        return entry
    if isinstance(entry, Mapping) and isinstance(entry.get("content"), str):
        return entry["content"]
    return None


# --------------------------------------------------------------------------------- in-memory training
DEFAULT_SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")


def train_word_level_tokenizer(
    texts: Iterable[str],
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    add_bos: bool = False,
    *,
    bos_token: str = "<s>",
    eos_token: str = "</s>",
    pad_token: str = "<pad>",
    unk_token: str = "<unk>",
    lowercase: bool = True,
) -> Tokenizer:
    """A word-level tokenizer whose vocabulary is every word and punctuation mark in `texts`.

    Words are split on whitespace and punctuation; decoding joins tokens with single spaces. Meant for tests and
    the demo, where no pretrained tokenizer can be downloaded.

    Args:
        texts: the corpus that defines the vocabulary.
        special_tokens: added as special tokens with the first ids (chat-template tokens such as `<|im_start|>`
            belong here); the bos / eos / pad / unk tokens are added when missing.
        add_bos: give the tokenizer a post-processor that puts `bos_token` in front of every encoding, like
            Llama's.
        lowercase: lower-case the text before splitting (a smaller vocabulary for small corpora).
    """
    specials = _with_required_specials(special_tokens, (pad_token, unk_token, bos_token, eos_token))
    backend = tokenizers.Tokenizer(models.WordLevel(unk_token=unk_token))
    if lowercase:
        backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=specials, show_progress=False))
    return _finish_trained(backend, specials, add_bos, bos_token, eos_token, pad_token)


def train_byte_level_bpe_tokenizer(
    texts: Iterable[str],
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    add_bos: bool = False,
    *,
    vocab_size: int = 400,
    bos_token: str = "<s>",
    eos_token: str = "</s>",
    pad_token: str = "<pad>",
) -> Tokenizer:
    """A small byte-level BPE tokenizer (the GPT-2 / Qwen2 / Phi kind: spaces are part of the following token,
    any text round-trips exactly). Arguments as in `train_word_level_tokenizer`; `vocab_size` counts the 256
    byte tokens and the special tokens."""
    specials = _with_required_specials(special_tokens, (pad_token, bos_token, eos_token))
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    return _finish_trained(backend, specials, add_bos, bos_token, eos_token, pad_token)


def _with_required_specials(special_tokens: Sequence[str], required: Sequence[str]) -> list[str]:
    specials = list(special_tokens)
    specials += [token for token in required if token not in specials]
    return specials


def _finish_trained(backend: tokenizers.Tokenizer, specials: list[str], add_bos: bool, bos_token: str,
                    eos_token: str, pad_token: str) -> Tokenizer:
    # Trainers register their special tokens already; adding them again marks any the trainer missed.
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    if add_bos:
        bos_id = backend.token_to_id(bos_token)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B", special_tokens=[(bos_token, bos_id)])
    return Tokenizer(backend, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token)
