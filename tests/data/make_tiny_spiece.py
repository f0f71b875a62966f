"""Train the tiny sentencepiece model used by the tokenizer tests (``tiny_spiece.model``).

The model stands in for umT5's ``spiece.model``: the same special ids (pad 0, eos 1, bos 2,
unk 3, pieces ``<pad> </s> <s> <unk>``), a unigram model, and a vocabulary of 256 pieces, below the 384 rows of ``tiny.TINY_T5``'s token embedding. The
corpus below is built in so the output is reproducible; it covers every character of Wan's
default Chinese negative prompt (and the I2V / FLF2V prefixes) so Chinese text tokenises
into real pieces instead of ``<unk>``. Normalisation is a small custom rule set (full-width
punctuation to ASCII, as NFKC does) instead of the full ``nmt_nfkc`` table, whose compiled
char map alone is ~240 KB; whitespace is collapsed as usual.

Run from anywhere: ``python tests/data/make_tiny_spiece.py`` rewrites ``tiny_spiece.model``
next to this file (a few KB). Training is single-threaded on unshuffled input, so two runs
give byte-identical files.
"""
from __future__ import annotations

import io
import tempfile
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb

VOCAB_SIZE = 256
OUT = Path(__file__).resolve().parent / "tiny_spiece.model"

# Wan 2.1 default negative prompt (shared by T2V / I2V / FLF2V) and the two prefixes.
NEGATIVE_ZH = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，"
               "最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，"
               "画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
               "三条腿，背景人很多，倒着走")
PREFIXES_ZH = ("镜头晃动，", "镜头切换，")

# The NFKC mappings that matter for the prompts above (full-width punctuation and space).
NORMALIZE = {"，": ",", "。": ".", "：": ":", "；": ";", "！": "!", "？": "?", "（": "(",
             "）": ")", "、": ",", "\u3000": " "}

ENGLISH = [
    "A cat walks on the grass, realistic style.",
    "Two anthropomorphic cats in comfy boxing gear fight intensely on a spotlighted stage.",
    "A white dog runs along the beach at sunset, waves rolling in slowly.",
    "Summer beach vacation style, a white cat wearing sunglasses sits on a surfboard.",
    "The camera pans across a quiet city street at night with neon lights and light rain.",
    "An astronaut rides a horse on the moon, cinematic lighting, high detail, 4k.",
    "A close-up of a red flower opening in the morning, time-lapse video.",
    "The first frame shows a mountain lake; the last frame shows the same lake in winter.",
    "A small boat drifts on a calm river under a bright blue sky with white clouds.",
    "Bright colors, overexposed, static, blurry details, subtitles, worst quality, low quality.",
    "JPEG compression artifacts, ugly, extra fingers, poorly drawn hands and faces.",
    "Deformed, disfigured, fused fingers, still picture, messy background, three legs.",
    "Many people in the background, walking backwards, a person dances in the rain.",
    "Quick brown foxes jump over lazy dogs; 0 1 2 3 4 5 6 7 8 9 are digits.",
]

CHINESE = [
    NEGATIVE_ZH,
    PREFIXES_ZH[0] + NEGATIVE_ZH,
    PREFIXES_ZH[1] + PREFIXES_ZH[0] + NEGATIVE_ZH,
    "一只猫在草地上走，写实风格。",
    "夏日海滩度假风格，一只戴着墨镜的白猫坐在冲浪板上。",
    "镜头缓慢推进，城市街道在夜晚下着小雨。",
    "画面中一个人在雨中跳舞，背景是高楼。",
]


def corpus() -> list[str]:
    """Sentences for training; repeated so the unigram counts favour whole words."""
    return (ENGLISH + CHINESE) * 4


def train() -> bytes:
    """Serialized ``ModelProto`` of the tiny unigram model."""
    buf = io.BytesIO()
    with tempfile.TemporaryDirectory() as tmp:
        rules = Path(tmp) / "rules.tsv"
        rules.write_text("".join(f"{ord(a):X}\t{ord(b):X}\n" for a, b in NORMALIZE.items()))
        _train(buf, rules)
    # The trainer records the rule file's (temporary) path; drop it so runs are identical.
    proto = sp_pb.ModelProto()
    proto.ParseFromString(buf.getvalue())
    proto.normalizer_spec.ClearField("normalization_rule_tsv")
    return proto.SerializeToString()


def _train(buf: io.BytesIO, rules: Path) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_writer=buf,
        model_type="unigram",
        vocab_size=VOCAB_SIZE,
        character_coverage=1.0,       # keep every CJK character of the negative prompt
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="</s>", bos_piece="<s>", unk_piece="<unk>",
        normalization_rule_tsv=str(rules),
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        hard_vocab_limit=True,
        minloglevel=2,
    )


def main() -> None:
    data = train()
    OUT.write_bytes(data)
    sp = spm.SentencePieceProcessor(model_proto=data)
    ids = sp.encode(NEGATIVE_ZH)
    print(f"wrote {OUT} ({len(data)} bytes, vocab {sp.get_piece_size()}, "
          f"negative prompt -> {len(ids)} ids, unk {ids.count(sp.unk_id())})")


if __name__ == "__main__":
    main()
