"""BERT-style WordPiece tokenizers from a Hugging Face snapshot folder, as `transformers`' BertTokenizer encodes.

`jaxalign.data.tokenizer.Tokenizer.from_folder` already reads a BERT `tokenizer.json` (normaliser with
lowercasing, WordPiece model, offsets), but two things of such folders need more:

* Many of them (sentence-transformers' all-MiniLM-L6-v2 among them) save a fixed padding (to 128) and a
  truncation in `tokenizer.json`. `tokenizers` applies both on every `encode`, so the plain `Tokenizer` returns
  128 ids for "hello"; `transformers` switches them off. `WordPieceTokenizer` does the same.
* A BERT input is [CLS] text [SEP]: `cls_id` / `sep_id` are read from the post-processor, `unk_id` from the
  WordPiece model, and `pad_batch` pads to a fixed budget with an attention mask.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import tokenizers

from jaxalign.data.tokenizer import Tokenizer


class WordPieceTokenizer(Tokenizer):
    """A `Tokenizer` for BERT-style models: no stored padding / truncation, [CLS] / [SEP] / [UNK] ids known.

    Load with `WordPieceTokenizer.from_folder(folder)` (reads tokenizer.json and the special-token files).
    """

    def __init__(self, backend: tokenizers.Tokenizer, **kwargs):
        # A copy, so switching off the stored padding does not change a backend the caller still holds.
        backend = tokenizers.Tokenizer.from_str(backend.to_str())
        backend.no_padding()
        backend.no_truncation()
        super().__init__(backend, **kwargs)
        if not (self.special_prefix_ids and self.special_suffix_ids):
            raise ValueError(f"{self.source}: the tokenizer's post-processor does not wrap a text in special tokens "
                             "([CLS] ... [SEP]); this is not a BERT-style tokenizer")
        self.cls_id = self.special_prefix_ids[0]
        self.sep_id = self.special_suffix_ids[-1]
        unk_token = getattr(backend.model, "unk_token", None)
        self.unk_id = None if unk_token is None else backend.token_to_id(unk_token)

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        """`encode` of each text (in parallel in the Rust library)."""
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [list(encoding.ids) for encoding in encodings]

    def pad_batch(self, sequences: Sequence[Sequence[int]], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """Right-pads id lists (special tokens already in place) to max_length.

        Returns:
          input_ids [B, max_length] int32 (pad id on padding) and attention_mask [B, max_length] bool.
        Raises:
          ValueError: a sequence is longer than max_length (truncate before, where it is safe to cut).
        """
        pad_id = self.pad_id if self.pad_id is not None else 0
        input_ids = np.full((len(sequences), max_length), pad_id, np.int32)
        attention_mask = np.zeros((len(sequences), max_length), bool)
        for row, ids in enumerate(sequences):
            if len(ids) > max_length:
                raise ValueError(f"sequence {row} has {len(ids)} tokens, over max_length={max_length}")
            input_ids[row, :len(ids)] = ids
            attention_mask[row, :len(ids)] = True
        return input_ids, attention_mask
