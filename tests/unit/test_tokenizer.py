"""umT5 tokenizer: same ids and mask as the official HF call, official prompt cleaning,
truncation to 511 + ``</s>`` with one warning, and every way of building it.

Reference: transformers ``T5Tokenizer`` built from the same sentencepiece model
(``tests/data/tiny_spiece.model``: pad 0, eos 1, bos 2, unk 3) and called like the official
``HuggingfaceTokenizer``: ``padding='max_length', truncation=True, max_length=512``.
"""
from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import pytest
import sentencepiece
import torch

from factory import TINY_SPIECE
from wan_core.tokenizer import UMT5Tokenizer, clean_prompt

NEGATIVE_ZH = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，"
               "最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，"
               "画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
               "三条腿，背景人很多，倒着走")
PROMPTS = [
    "A cat walks on the grass, realistic style.",
    NEGATIVE_ZH,
    "镜头晃动，" + NEGATIVE_ZH,
    # html entities (one escaped twice) and whitespace runs; the tiny vocabulary has no "&" or "<"
    "  Two &#99;ats and a &amp;#100;og fight\n\n\tintensely   on a stage.  ",
    "夏日海滩度假风格，一只戴着墨镜的白猫坐在冲浪板上。 A white cat\u3000wears sunglasses.",
    "",
]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("umt5_tiny")
    shutil.copy(TINY_SPIECE, folder / "spiece.model")
    return transformers.T5Tokenizer.from_pretrained(str(folder), extra_ids=0)


@pytest.fixture(scope="module")
def tok() -> UMT5Tokenizer:
    return UMT5Tokenizer.from_file(TINY_SPIECE)


def _official(hf, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The official ``HuggingfaceTokenizer(clean='whitespace')`` call."""
    out = hf([clean_prompt(p) for p in prompts], padding="max_length", truncation=True, max_length=512,
             add_special_tokens=True, return_tensors="pt")
    return out.input_ids, out.attention_mask


def test_ids_and_mask_match_transformers(tok: UMT5Tokenizer, hf_tokenizer) -> None:
    ids, mask = tok(PROMPTS)
    ref_ids, ref_mask = _official(hf_tokenizer, PROMPTS)
    assert ids.shape == mask.shape == (len(PROMPTS), 512)
    assert ids.dtype == torch.int64
    assert torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask)
    assert (ids[:, 0] != 2).all()                                   # no BOS
    for row, m in zip(ids, mask.sum(1).tolist()):
        assert row[m - 1] == 1 and (row[m:] == 0).all()             # </s> then <pad>


def test_single_string_is_a_batch_of_one(tok: UMT5Tokenizer) -> None:
    ids, mask = tok(PROMPTS[0])
    assert ids.shape == (1, 512)
    assert torch.equal(ids[0], tok(PROMPTS)[0][0])


def test_out_of_vocabulary_characters_follow_sentencepiece(tok: UMT5Tokenizer) -> None:
    # transformers 5's spm -> Unigram conversion hard-codes unk id 2 and drops byte fallback;
    # the official repo ships a tokenizer.json instead, and ComfyUI runs sentencepiece itself.
    # We follow sentencepiece: <unk> (3) here, byte pieces for umT5 (byte_fallback model).
    sp = sentencepiece.SentencePieceProcessor(model_file=str(TINY_SPIECE))
    text = "Quiz 🦙 ß"
    assert tok.encode(text) == sp.encode(text) + [1]
    assert 3 in tok.encode(text)


def test_long_prompt_keeps_511_tokens_plus_eos_and_warns_once(tok: UMT5Tokenizer, hf_tokenizer,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    long = " ".join(["A cat walks on the grass, realistic style."] * 60)
    n = len(tok.encode(long))
    assert n > 512
    with caplog.at_level(logging.WARNING, logger="wan_core.tokenizer"):
        ids, mask = tok([PROMPTS[0], long])
    ref_ids, ref_mask = _official(hf_tokenizer, [PROMPTS[0], long])
    assert torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask)
    assert mask[1].sum() == 512 and ids[1, 511] == 1
    assert ids[1, :511].tolist() == tok.encode(long)[:511]
    records = [r for r in caplog.records if r.name == "wan_core.tokenizer"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert f"last {n - 512} tokens were dropped" in records[0].getMessage()


def test_prompt_of_exactly_512_tokens_is_not_truncated(tok: UMT5Tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    small = UMT5Tokenizer.from_file(TINY_SPIECE, max_length=8)
    text = "A cat walks on the grass"
    n = len(small.encode(text))
    exact = UMT5Tokenizer.from_file(TINY_SPIECE, max_length=n)
    with caplog.at_level(logging.WARNING, logger="wan_core.tokenizer"):
        ids, mask = exact(text)
    assert mask.sum() == n and ids[0].tolist() == small.encode(text) and not caplog.records


def test_cleaning_matches_the_official_steps() -> None:
    assert clean_prompt("  a\n\n b\t\u3000c  ") == "a b c"
    assert clean_prompt("Tom &amp;amp; Jerry &lt;3") == "Tom & Jerry <3"     # unescaped twice
    # ftfy unescapes entities itself unless the text looks like HTML ("<" or ">"); then only
    # the two html.unescape calls apply.
    assert clean_prompt("&amp;amp;amp;amp;") == "&"
    assert clean_prompt("<b>&amp;amp;amp;</b>") == "<b>&amp;</b>"
    assert clean_prompt("doesn\u00c3\u00a2\u00e2\u201a\u00ac\u00e2\u201e\u00a2t") == "doesn't"  # ftfy mojibake


def test_whitespace_class_equals_the_regex_module_used_upstream() -> None:
    regex = pytest.importorskip("regex")
    from wan_core.tokenizer import _WHITESPACE

    # Every code point, each followed by "x" so that every match is a single character.
    text = "".join(chr(c) + "x" for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF)
    assert _WHITESPACE.findall(text) == regex.findall(r"\s+", text)


def test_builds_from_bytes_tensor_and_file_alike(tmp_path: Path) -> None:
    data = TINY_SPIECE.read_bytes()
    comfy = torch.frombuffer(bytearray(data), dtype=torch.uint8)      # ComfyUI's spiece_model key
    variants = [UMT5Tokenizer(data), UMT5Tokenizer.from_bytes(data), UMT5Tokenizer.from_tensor(comfy),
                UMT5Tokenizer.from_file(TINY_SPIECE)]
    outs = [t(PROMPTS)[0] for t in variants]
    assert all(torch.equal(o, outs[0]) for o in outs)
    assert variants[0].vocab_size == 256 and variants[0].eos_id == 1 and variants[0].pad_id == 0


def test_bad_tokenizer_data_explains_what_is_needed() -> None:
    with pytest.raises(ValueError, match="spiece_model"):
        UMT5Tokenizer(b"this is not a sentencepiece model")
    with pytest.raises(ValueError, match="uint8"):
        UMT5Tokenizer.from_tensor(torch.zeros(4, dtype=torch.float32))
