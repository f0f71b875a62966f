"""umT5 sentencepiece tokenizer with the official Wan 2.1 prompt cleaning and padding.

Upstream runs ``AutoTokenizer('google/umt5-xxl')`` with ``padding='max_length',
truncation=True, max_length=512``. We run the same sentencepiece model directly, because
that is what ships inside ComfyUI text-encoder files (the ``spiece_model`` uint8 tensor):
- cleaning: ``ftfy.fix_text``, ``html.unescape`` twice, strip, collapse whitespace, strip;
- ids: sentencepiece pieces, then ``</s>`` (id 1); no BOS;
- padding with id 0 to ``max_length``; mask 1 for real tokens (including ``</s>``), 0 after;
- longer prompts keep their first ``max_length - 1`` pieces plus ``</s>``, like the HF call,
  and log one warning per prompt saying how many pieces were dropped.

Known difference from HF: a prompt that literally contains a special-token string such as
``</s>`` or ``<extra_id_0>`` is tokenized as plain text here (HF maps it to the special id).
umT5's 300 ``<extra_id_*>`` sentinels (ids 256000-256299, above the sentencepiece vocab)
are never produced by ordinary text, so nothing else depends on them.
"""
from __future__ import annotations

import html
import logging
import os
import re
from typing import Sequence

import ftfy
import sentencepiece
import torch

logger = logging.getLogger(__name__)

# Unicode White_Space, the set upstream's `regex` ``\s`` matches. Python's ``re`` ``\s`` also
# matches U+001C..U+001F, so spell the class out instead of depending on `regex`.
_WHITESPACE = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")


def clean_prompt(text: str) -> str:
    """Official Wan 2.1 prompt cleaning (``clean='whitespace'``): mojibake, html entities, spaces."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


class UMT5Tokenizer:
    """Prompts -> ``(ids [B, max_length] int64, mask [B, max_length] int64)``.

    Build it from the serialized sentencepiece model (``from_bytes``/``from_tensor``, the
    ComfyUI ``spiece_model`` key) or from a ``spiece.model`` file (``from_file``).
    """

    def __init__(self, model_proto: bytes, max_length: int = 512) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must leave room for a token and </s>; got {max_length}.")
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        except (RuntimeError, OSError) as err:  # sentencepiece raises RuntimeError on a bad proto
            raise ValueError(
                f"The tokenizer data ({len(model_proto)} bytes) is not a serialized sentencepiece model. "
                "A umT5 text encoder needs the spiece_model tensor (ComfyUI files) or google/umt5-xxl's "
                f"spiece.model next to it. ({err})") from err
        self.max_length = max_length
        self.eos_id = self.sp.eos_id()
        if self.eos_id < 0:
            raise ValueError("This sentencepiece model defines no </s> piece; umT5 needs one (id 1).")
        self.pad_id = max(self.sp.pad_id(), 0)  # umT5 pads with <pad> = 0

    @classmethod
    def from_bytes(cls, data: bytes, max_length: int = 512) -> "UMT5Tokenizer":
        return cls(bytes(data), max_length)

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor, max_length: int = 512) -> "UMT5Tokenizer":
        """From ComfyUI's ``spiece_model`` tensor (uint8, one byte per element)."""
        if tensor.dtype != torch.uint8:
            raise ValueError(f"spiece_model should be a uint8 tensor of the serialized model; got {tensor.dtype}.")
        return cls(tensor.detach().cpu().contiguous().numpy().tobytes(), max_length)

    @classmethod
    def from_file(cls, path: str | os.PathLike, max_length: int = 512) -> "UMT5Tokenizer":
        with open(path, "rb") as f:
            return cls(f.read(), max_length)

    @property
    def vocab_size(self) -> int:
        """Number of sentencepiece pieces (256000 for umT5; the embedding has 256384 rows)."""
        return self.sp.get_piece_size()

    def encode(self, prompt: str) -> list[int]:
        """Cleaned prompt -> piece ids followed by ``</s>``, without truncation or padding."""
        return list(self.sp.encode(clean_prompt(prompt), out_type=int)) + [self.eos_id]

    def __call__(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``prompts`` (B strings) -> ``ids [B, max_length]`` int64, ``mask [B, max_length]`` int64."""
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = torch.full((len(prompts), self.max_length), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(prompts), self.max_length), dtype=torch.int64)
        for row, prompt in enumerate(prompts):
            tokens = self.encode(prompt)
            if len(tokens) > self.max_length:
                tokens = self._truncate(tokens, row)
            ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
            mask[row, :len(tokens)] = 1
        return ids, mask

    def _truncate(self, tokens: list[int], row: int) -> list[int]:
        keep = self.max_length - 1
        dropped = tokens[keep:-1]
        logger.warning(
            "Prompt %d is %d tokens long but umT5 reads at most %d (%d + </s>); the last %d tokens "
            "were dropped, starting at: %r", row, len(tokens), self.max_length, keep, len(dropped),
            self.sp.decode(dropped)[:80])
        return tokens[:keep] + [self.eos_id]


__all__ = ["UMT5Tokenizer", "clean_prompt"]
