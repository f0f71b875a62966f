"""umT5 encoder: official parameter names, parity with transformers' UMT5EncoderModel, masking
and trimming like the official ``T5EncoderModel``.

Reference: transformers ``UMT5EncoderModel`` (eager attention, ``feed_forward_proj="gated-gelu"``)
loaded with ``factory.t5_to_hf`` of the same random official weights. transformers' umT5 is
the model the official Wan code was ported from; on the tiny model both agree with
``wan_core`` bit for bit in float32 (measured max abs error 0.0 on outputs of magnitude ~4;
the official ``wan/modules/t5.py`` was also checked by hand: 0.0 in fp32 and bf16, and in
fp16 with an overflow that triggers the clamp).
"""
from __future__ import annotations

import pytest
import torch
from transformers import UMT5Config, UMT5EncoderModel

from factory import TINY_SPIECE, t5_official, t5_to_hf
from tiny import TINY_T5
from wan_core.configs import T5Config
from wan_core.text_encoder import (FP32_PARAMS, UMT5Encoder, _fp16_clamp, encode_text,
                                   relative_position_buckets)
from wan_core.tokenizer import UMT5Tokenizer

# Measured 0.0 (same operations in the same order); the margin covers BLAS differences.
ATOL = 1e-5
L = 64  # sequence length for the parity runs (> max_exact buckets, < 512 to stay fast)


def _hf_model(cfg: T5Config, sd: dict[str, torch.Tensor]) -> UMT5EncoderModel:
    hc = UMT5Config(vocab_size=cfg.vocab, d_model=cfg.dim, d_kv=cfg.dim_attn // cfg.num_heads,
                    d_ff=cfg.dim_ffn, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                    relative_attention_num_buckets=cfg.num_buckets,
                    relative_attention_max_distance=cfg.max_distance, layer_norm_epsilon=cfg.eps,
                    feed_forward_proj="gated-gelu", dropout_rate=0.0)
    hc._attn_implementation = "eager"
    model = UMT5EncoderModel(hc).eval()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert missing == ["encoder.embed_tokens.weight"] and not unexpected  # tied to shared.weight
    return model


def _ours(cfg: T5Config = TINY_T5, seed: int = 0) -> UMT5Encoder:
    model = UMT5Encoder(cfg).eval()
    model.load_state_dict(t5_official(cfg, seed), strict=True)
    return model


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows: one full, one with 30 real tokens then padding (id 0, mask 0)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, TINY_T5.vocab, (2, L), generator=g)
    mask = torch.ones(2, L, dtype=torch.int64)
    ids[1, 30:], mask[1, 30:] = 0, 0
    return ids, mask


def _hf_out(sd_hf: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return _hf_model(TINY_T5, sd_hf)(input_ids=ids, attention_mask=mask).last_hidden_state


def test_parameter_names_and_shapes_are_the_official_ones() -> None:
    sd = t5_official(TINY_T5)
    with torch.device("meta"):
        model = UMT5Encoder(TINY_T5)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in sd.items()}
    assert "blocks.1.pos_embedding.embedding.weight" in sd          # a table in every layer


def test_builds_on_meta_without_buffers() -> None:
    with torch.device("meta"):
        model = UMT5Encoder(T5Config())                           # full umT5-XXL, no memory
    assert list(model.buffers()) == []
    assert all(p.is_meta for p in model.parameters())
    # the official models_t5_umt5-xxl-enc-bf16.pth (Wan-AI/Wan2.1-*): umT5-XXL encoder, vocab 256,384,
    # dim 4096, 24 layers, ffn 10240, 64 heads (umt5_xxl in the official wan/modules/t5.py)
    assert sum(p.numel() for p in model.parameters()) == 5_680_910_336
    assert sum(p.numel() for n, p in model.named_parameters() if any(f in n for f in FP32_PARAMS)) < 300_000


def test_matches_transformers_umt5_encoder_fp32() -> None:
    sd = t5_official(TINY_T5)
    ids, mask = _batch()
    with torch.no_grad():
        ours = _ours()(ids, mask)
    ref = _hf_out(t5_to_hf(sd), ids, mask)
    err = (ours - ref).abs().max().item()
    assert err <= ATOL, f"max abs error {err:.3g} vs transformers UMT5EncoderModel"


@pytest.mark.parametrize("swap", [("wi_0", "wi_1"), ("SelfAttention.q", "SelfAttention.k")])
def test_one_wrong_key_mapping_breaks_parity(swap: tuple[str, str]) -> None:
    sd = t5_official(TINY_T5)
    hf = t5_to_hf(sd)
    a, b = swap
    for key in [k for k in hf if f".{a}." in k]:
        other = key.replace(f".{a}.", f".{b}.")
        hf[key], hf[other] = hf[other], hf[key]
    ids, mask = _batch()
    with torch.no_grad():
        ours = _ours()(ids, mask)
    err = (ours - _hf_out(hf, ids, mask)).abs().max().item()
    assert err > 1000 * ATOL, f"swapping {a}/{b} went unnoticed (error {err:.3g})"


def test_relative_position_buckets_match_transformers() -> None:
    hc = UMT5Config(relative_attention_num_buckets=32, relative_attention_max_distance=128, num_heads=1,
                    d_model=8, d_kv=8, d_ff=8)
    from transformers.models.umt5.modeling_umt5 import UMT5Attention

    attn = UMT5Attention(hc, has_relative_attention_bias=True)
    pos = torch.arange(600)
    ref = attn._relative_position_bucket(pos[None, :] - pos[:, None])
    assert torch.equal(relative_position_buckets(600, 32, 128), ref)


def test_padding_does_not_change_real_token_outputs() -> None:
    model = _ours()
    ids, _ = _batch()
    real = ids[:1, :20]
    padded = torch.cat([real, torch.zeros(1, 492, dtype=torch.int64)], dim=1)   # 512 like the tokenizer
    mask = torch.cat([torch.ones(1, 20), torch.zeros(1, 492)], dim=1).long()
    with torch.no_grad():
        alone = model(real, torch.ones_like(real))
        with_pad = model(padded, mask)[:, :20]
        no_mask = model(real)
    # Masked keys get exactly zero attention; only the summation length differs (measured 0.0).
    assert torch.allclose(with_pad, alone, atol=1e-5, rtol=0)
    assert torch.equal(no_mask, alone)


def test_encode_text_trims_to_real_tokens_including_eos() -> None:
    model = _ours()
    tok = UMT5Tokenizer.from_file(TINY_SPIECE)
    prompts = ["A cat walks on the grass, realistic style.", "一只猫在草地上走，写实风格。", ""]
    ids, mask = tok(prompts)
    with torch.no_grad():
        full = model(ids, mask)
    out = encode_text(model, tok, prompts, "cpu")
    assert [u.shape for u in out] == [(len(tok.encode(p)), TINY_T5.dim) for p in prompts]
    assert out[2].shape[0] == 1                                           # empty prompt: just </s>
    # each prompt runs alone at its own length (the padding is not computed): same maths,
    # shorter softmax sums; measured <= 1.2e-6 max abs on outputs ~|3.8| against the padded run
    for u, row, n in zip(out, full, mask.sum(1).tolist()):
        torch.testing.assert_close(u, row[:n], atol=1e-5, rtol=0)


def test_fp16_clamp_mirrors_official_rule() -> None:
    big = torch.finfo(torch.float16).max
    finite = torch.tensor([big, -big, 1.0], dtype=torch.float16)
    assert torch.equal(_fp16_clamp(finite), finite)                   # no overflow: untouched
    overflowed = torch.tensor([float("inf"), -float("inf"), big, 1.0], dtype=torch.float16)
    expected = torch.tensor([big - 1000, -(big - 1000), big - 1000, 1.0], dtype=torch.float16)
    assert torch.equal(_fp16_clamp(overflowed), expected)
    bf = torch.tensor([float("inf")], dtype=torch.bfloat16)
    assert torch.equal(_fp16_clamp(bf), bf)                           # only fp16, as upstream


def test_weights_stored_in_bf16_and_fp8_run_in_the_requested_dtype() -> None:
    ref = _ours()
    ids, mask = _batch()
    with torch.no_grad():
        want = ref(ids, mask)
        fp8 = _ours()
        for name, p in fp8.named_parameters():
            if ".attn." in name or ".ffn." in name:
                p.data = p.data.to(torch.float8_e4m3fn)
        assert fp8.resolved_compute_dtype() == torch.float32           # CPU: fp8 -> float32
        got = fp8(ids, mask)
        bf = _ours().to(torch.bfloat16)
        assert bf(ids, mask).dtype == torch.bfloat16
        bf.compute_dtype = torch.float32
        got_bf = bf(ids, mask)
    assert got.dtype == torch.float32 and got_bf.dtype == torch.float32
    # fp8 weights: ~6 % relative weight error, so only a coarse check that it still works.
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.9
    assert torch.nn.functional.cosine_similarity(got_bf.flatten(), want.flatten(), dim=0) > 0.999
