"""The test-checkpoint factory is the spec: check it against the published layouts.

Full-size key and parameter counts are compared with those of the official Wan 2.1 modules
at their published configs (state-dict keys and parameters of ``WanModel``, the VAE, the
umT5 encoder and the CLIP visual tower, written as literals in the tests below); the
foreign layouts are loaded strictly into the reference libraries (diffusers, transformers),
and the hand-written umT5 / CLIP mappings are checked numerically against a forward pass
written from the official modules.
"""
from __future__ import annotations

import importlib.util
import math
import re

import pytest
import torch
import torch.nn.functional as F

import factory
import tiny
from wan_core.configs import KNOWN_DIT, CLIPVisionConfig, DiTConfig, T5Config, VAEConfig

pytestmark = pytest.mark.usefixtures("one_thread")


DIT_VARIANTS = {"t2v": tiny.TINY_DIT_T2V, "i2v": tiny.TINY_DIT_I2V, "flf2v": tiny.TINY_DIT_FLF2V}


def _count(shapes: dict) -> tuple[int, int]:
    return len(shapes), sum(math.prod(s) for s in shapes.values())


# ---------------------------------------------------------------- official layouts

def test_full_size_official_dit_keys_and_params_match_published_counts():
    assert _count(factory.official_shapes("dit", KNOWN_DIT["T2V-1.3B"])) == (825, 1_418_996_800)
    assert _count(factory.official_shapes("dit", KNOWN_DIT["T2V-14B"])) == (1095, 14_288_491_584)
    assert _count(factory.official_shapes("dit", KNOWN_DIT["I2V-14B"])) == (1303, 16_394_878_784)
    flf = factory.official_shapes("dit", KNOWN_DIT["FLF2V-14B"])
    i2v = factory.official_shapes("dit", KNOWN_DIT["I2V-14B"])
    assert set(flf) - set(i2v) == {"img_emb.emb_pos"} and flf["img_emb.emb_pos"] == (1, 514, 1280)


def test_full_size_official_vae_t5_clip_match_published_counts():
    assert _count(factory.official_shapes("vae", VAEConfig())) == (194, 126_892_531)
    t5 = factory.official_shapes("t5", T5Config())
    assert _count(t5) == (242, 5_680_910_336)
    assert t5["token_embedding.weight"] == (256384, 4096)
    assert t5["blocks.0.ffn.gate.0.weight"] == (10240, 4096)
    assert t5["blocks.0.ffn.fc2.weight"] == (4096, 10240)
    assert all(t5[f"blocks.{i}.pos_embedding.embedding.weight"] == (32, 64) for i in range(24))
    clip = factory.official_shapes("clip", CLIPVisionConfig(), with_textual=False)
    visual = {k: v for k, v in clip.items() if k.startswith("visual.")}
    assert _count(visual)[1] == 632_076_800
    assert visual["visual.cls_embedding"] == (1, 1, 1280)
    assert visual["visual.pos_embedding"] == (1, 257, 1280)
    assert visual["visual.patch_embedding.weight"] == (1280, 3, 14, 14)
    assert "visual.patch_embedding.bias" not in visual and visual["visual.head"] == (1280, 1024)
    assert visual["visual.transformer.31.attn.to_qkv.weight"] == (3840, 1280)
    assert visual["visual.transformer.0.mlp.0.weight"] == (5120, 1280) and clip["log_scale"] == ()


# One pattern per key family of the official Wan 2.1 DiT state dict (WanModel of the official
# wan/modules/model.py, as in the published Wan-AI/Wan2.1-* diffusion_pytorch_model*.safetensors);
# "image": I2V / FLF2V only, "flf2v": FLF2V only.
DIT_PATTERNS = {
    r"patch_embedding\.(weight|bias)": "all",
    r"(text|time)_embedding\.[02]\.(weight|bias)": "all",
    r"time_projection\.1\.(weight|bias)": "all",
    r"blocks\.\d+\.modulation": "all",
    r"blocks\.\d+\.(self|cross)_attn\.[qkvo]\.(weight|bias)": "all",
    r"blocks\.\d+\.(self|cross)_attn\.norm_[qk]\.weight": "all",
    r"blocks\.\d+\.norm3\.(weight|bias)": "all",
    r"blocks\.\d+\.cross_attn\.[kv]_img\.(weight|bias)": "image",
    r"blocks\.\d+\.cross_attn\.norm_k_img\.weight": "image",
    r"blocks\.\d+\.ffn\.[02]\.(weight|bias)": "all",
    r"head\.modulation": "all",
    r"head\.head\.(weight|bias)": "all",
    r"img_emb\.proj\.[0134]\.(weight|bias)": "image",
    r"img_emb\.emb_pos": "flf2v",
}


@pytest.mark.parametrize("variant", ["t2v", "i2v", "flf2v"])
def test_dit_keys_follow_documented_patterns_and_shapes_give_back_the_config(variant):
    cfg = DIT_VARIANTS[variant]
    sd = factory.dit_official(cfg)
    used = set()
    for k in sd:
        hits = [p for p in DIT_PATTERNS if re.fullmatch(p, k)]
        assert len(hits) == 1, k
        used.add(hits[0])
    wanted = {p for p, scope in DIT_PATTERNS.items()
              if scope == "all" or (scope == "image" and variant != "t2v") or scope == variant}
    assert used == wanted
    # §1b: every config field is recoverable from the tensors
    assert sd["head.modulation"].shape == (1, 2, cfg.dim)
    assert sd["patch_embedding.weight"].shape == (cfg.dim, cfg.in_dim, 1, 2, 2)
    assert sd["head.head.weight"].shape[0] // 4 == cfg.out_dim
    assert sd["blocks.0.ffn.0.weight"].shape[0] == cfg.ffn_dim
    assert sd["text_embedding.0.weight"].shape[1] == cfg.text_dim
    assert sd["time_embedding.0.weight"].shape[1] == cfg.freq_dim
    assert sd["time_projection.1.weight"].shape == (6 * cfg.dim, cfg.dim)
    assert sd["blocks.1.modulation"].shape == (1, 6, cfg.dim)
    assert len({k.split(".")[1] for k in sd if k.startswith("blocks.")}) == cfg.num_layers
    if variant != "t2v":
        assert sd["img_emb.proj.1.weight"].shape == (cfg.clip_dim, cfg.clip_dim)
        assert sd["img_emb.proj.4.weight"].shape == (cfg.dim,)
    if variant == "flf2v":
        assert sd["img_emb.emb_pos"].shape == (1, cfg.image_pos_len, cfg.clip_dim)


def test_vae_resamplers_sit_at_the_documented_indices():
    c = tiny.TINY_VAE.dim
    sd = factory.vae_official(tiny.TINY_VAE)

    def where(stack: str, part: str) -> set[int]:
        return {int(k.split(".")[2]) for k in sd if k.startswith(stack) and f".{part}." in k}

    enc, enc_t = where("encoder.downsamples.", "resample"), where("encoder.downsamples.", "time_conv")
    dec, dec_t = where("decoder.upsamples.", "resample"), where("decoder.upsamples.", "time_conv")
    assert (enc, enc_t, dec, dec_t) == ({2, 5, 8}, {5, 8}, {3, 7, 11}, {3, 7})
    assert sd["decoder.upsamples.3.time_conv.weight"].shape == (8 * c, 4 * c, 3, 1, 1)
    assert sd["decoder.upsamples.3.resample.1.weight"].shape == (2 * c, 4 * c, 3, 3)
    assert sd["encoder.downsamples.0.residual.0.gamma"].shape == (c, 1, 1, 1)
    assert sd["encoder.middle.1.norm.gamma"].shape == (4 * c, 1, 1)
    assert sd["encoder.head.2.weight"].shape[0] == 32 and sd["conv1.weight"].shape == (32, 32, 1, 1, 1)
    assert sd["conv2.weight"].shape == (16, 16, 1, 1, 1) and "decoder.middle.0.residual.0.gamma" in sd


def test_weights_are_deterministic_seeded_and_not_symmetric():
    for build, cfg in [(factory.dit_official, tiny.TINY_DIT_FLF2V),
                       (factory.vae_official, tiny.TINY_VAE),
                       (factory.t5_official, tiny.TINY_T5),
                       (factory.clip_official, tiny.TINY_CLIP)]:
        a, b, c = build(cfg, 0), build(cfg, 0), build(cfg, 1)
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert not any(torch.equal(a[k], c[k]) for k in a)
        seen = set()
        for k, v in a.items():
            assert v.dtype == torch.float32
            key = (tuple(v.shape), v.flatten()[:8].tolist().__repr__())
            assert key not in seen, f"{k} repeats another tensor"
            seen.add(key)
            if v.numel() > 1:
                assert v.std() > 0.01, k
            if k.endswith(("norm.weight", "gamma")) or re.search(r"norm\w*\.weight$", k):
                assert not torch.allclose(v, torch.ones_like(v)), k
            if v.dim() == 2 and v.shape[0] > 1:
                assert not torch.equal(v[0], v[1]), k


# ---------------------------------------------------------------- foreign layouts

@pytest.mark.parametrize("variant", ["t2v", "i2v", "flf2v"])
def test_dit_diffusers_layout_loads_strictly_into_diffusers(variant):
    from diffusers import WanTransformer3DModel

    cfg = DIT_VARIANTS[variant]
    image = variant != "t2v"
    model = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, image_dim=cfg.clip_dim if image else None,
        added_kv_proj_dim=cfg.dim if image else None,
        pos_embed_seq_len=cfg.image_pos_len if variant == "flf2v" else None)
    official = factory.dit_official(cfg)
    sd = factory.dit_to_diffusers(official)
    model.load_state_dict(sd, strict=True)
    # norm2 / norm3 swap: diffusers norm2 is the official affine norm3
    assert torch.equal(sd["blocks.0.norm2.weight"], official["blocks.0.norm3.weight"])
    assert torch.equal(factory.dit_to_diffusers(factory.with_prefix(official))["proj_out.weight"],
                       official["head.head.weight"])


def test_vae_diffusers_layout_loads_strictly_into_diffusers():
    from diffusers import AutoencoderKLWan

    cfg = tiny.TINY_VAE
    model = AutoencoderKLWan(base_dim=cfg.dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
                             num_res_blocks=cfg.num_res_blocks, attn_scales=[],
                             temperal_downsample=list(cfg.temporal_downsample))
    model.load_state_dict(factory.vae_to_diffusers(factory.vae_official(cfg)), strict=True)


def _t5_reference(sd: dict, cfg: T5Config, ids: torch.Tensor) -> torch.Tensor:
    """umT5 encoder forward written from the official t5.py (official key names)."""
    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.eps))

    b, n_tok = ids.shape
    n, c = cfg.num_heads, cfg.dim_attn // cfg.num_heads
    rel = torch.arange(n_tok)[None] - torch.arange(n_tok)[:, None]          # key - query
    half = cfg.num_buckets // 2
    exact = half // 2
    r = rel.abs()
    large = exact + (torch.log(r.float() / exact) / math.log(cfg.max_distance / exact)
                     * (half - exact)).long()
    bucket = (rel > 0).long() * half + torch.where(r < exact, r, large.clamp(max=half - 1))
    x = sd["token_embedding.weight"][ids]
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        h = rms(x, sd[p + "norm1.weight"])
        q, k, v = (F.linear(h, sd[f"{p}attn.{t}.weight"]).view(b, n_tok, n, c) for t in "qkv")
        bias = sd[p + "pos_embedding.embedding.weight"][bucket].permute(2, 0, 1)[None]
        a = torch.softmax(torch.einsum("binc,bjnc->bnij", q, k) + bias, dim=-1)
        o = torch.einsum("bnij,bjnc->binc", a, v).reshape(b, n_tok, -1)
        x = x + F.linear(o, sd[p + "attn.o.weight"])
        h = rms(x, sd[p + "norm2.weight"])
        gate = F.gelu(F.linear(h, sd[p + "ffn.gate.0.weight"]), approximate="tanh")
        x = x + F.linear(F.linear(h, sd[p + "ffn.fc1.weight"]) * gate, sd[p + "ffn.fc2.weight"])
    return rms(x, sd["norm.weight"])


def test_t5_hf_layout_loads_strictly_into_transformers_umt5_and_matches_official_forward():
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = tiny.TINY_T5
    hf_cfg = UMT5Config(vocab_size=cfg.vocab, d_model=cfg.dim, d_kv=cfg.dim_attn // cfg.num_heads,
                        d_ff=cfg.dim_ffn, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                        relative_attention_num_buckets=cfg.num_buckets,
                        relative_attention_max_distance=cfg.max_distance,
                        feed_forward_proj="gated-gelu", layer_norm_epsilon=cfg.eps, dropout_rate=0.0)
    model = UMT5EncoderModel(hf_cfg).eval()
    official = factory.t5_official(cfg)
    sd = factory.t5_to_hf(official, spiece=factory.TINY_SPIECE.read_bytes())
    assert bytes(sd.pop("spiece_model").numpy()) == factory.TINY_SPIECE.read_bytes()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # the only absentee is HF's alias of shared.weight (the same Parameter object)
    assert (missing, unexpected) == (["encoder.embed_tokens.weight"], [])
    assert model.encoder.embed_tokens.weight is model.shared.weight
    ids = torch.tensor([[5, 17, 300, 42, 9, 1], [7, 7, 250, 3, 1, 0]])
    with torch.no_grad():
        ours = _t5_reference(official, cfg, ids)
        theirs = model(input_ids=ids).last_hidden_state
    # measured max |diff| 9.5e-7 on outputs of magnitude ~3 (float32 summation order only);
    # swapping wi_0 / wi_1 in one layer gives 2.1
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def _clip_reference(sd: dict, cfg: CLIPVisionConfig, img: torch.Tensor):
    """Official VisionTransformer forward (clip.py, pool 'token', pre_norm, gelu): all blocks,
    then the pooled projection ``post_norm(x[:, 0]) @ head``."""
    w, n = cfg.width, cfg.num_heads

    def ln(x, p):
        return F.layer_norm(x, (w,), sd[p + ".weight"], sd[p + ".bias"], cfg.eps)

    x = F.conv2d(img, sd["visual.patch_embedding.weight"], stride=cfg.patch_size)
    x = x.flatten(2).transpose(1, 2)
    cls = sd["visual.cls_embedding"].expand(len(img), -1, -1)
    x = torch.cat([cls, x], 1) + sd["visual.pos_embedding"]
    x = ln(x, "visual.pre_norm")
    b, s = x.shape[:2]
    for i in range(cfg.num_layers):
        p = f"visual.transformer.{i}."
        qkv = F.linear(ln(x, p + "norm1"), sd[p + "attn.to_qkv.weight"], sd[p + "attn.to_qkv.bias"])
        q, k, v = (t.transpose(1, 2) for t in qkv.view(b, s, 3, n, w // n).unbind(2))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, w)
        x = x + F.linear(o, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.gelu(F.linear(ln(x, p + "norm2"), sd[p + "mlp.0.weight"], sd[p + "mlp.0.bias"]))
        x = x + F.linear(h, sd[p + "mlp.2.weight"], sd[p + "mlp.2.bias"])
    return x, ln(x[:, 0], "visual.post_norm") @ sd["visual.head"]


def test_clip_hf_layout_loads_strictly_into_transformers_and_matches_official_forward():
    from transformers import CLIPVisionConfig as HFConfig, CLIPVisionModelWithProjection

    cfg = tiny.TINY_CLIP
    model = CLIPVisionModelWithProjection(HFConfig(
        hidden_size=cfg.width, intermediate_size=cfg.mlp_dim, num_attention_heads=cfg.num_heads,
        num_hidden_layers=cfg.num_layers, image_size=cfg.image_size, patch_size=cfg.patch_size,
        projection_dim=cfg.out_dim, hidden_act="gelu", layer_norm_eps=cfg.eps)).eval()
    official = factory.clip_official(cfg)
    sd = factory.clip_to_hf(official)
    model.load_state_dict(sd, strict=True)
    bare = {k[7:]: v for k, v in official.items() if k.startswith("visual.")}
    assert factory.clip_to_hf(bare).keys() == sd.keys()
    img = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens, pooled = _clip_reference(official, cfg, img)
        out = model(pixel_values=img)
    # measured max |diff| 0 (tokens) and 1.1e-6 (projection); swapping k / v in one layer gives 3.7
    torch.testing.assert_close(out.last_hidden_state, tokens, rtol=0, atol=2e-5)
    torch.testing.assert_close(out.image_embeds, pooled, rtol=0, atol=2e-5)


# ---------------------------------------------------------------- fp8

def _dit_linear_weights(cfg: DiTConfig) -> set[str]:
    names = {f"blocks.{i}.{a}.{n}.weight" for i in range(cfg.num_layers)
             for a in ("self_attn", "cross_attn") for n in "qkvo"}
    names |= {f"blocks.{i}.ffn.{j}.weight" for i in range(cfg.num_layers) for j in (0, 2)}
    if cfg.model_type != "t2v":
        names |= {f"blocks.{i}.cross_attn.{n}_img.weight" for i in range(cfg.num_layers) for n in "kv"}
    return names


@pytest.mark.parametrize("fmt", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_plain_fp8_follows_the_kijai_keep_rule_and_dequantizes_by_cast(fmt):
    cfg = tiny.TINY_DIT_I2V
    official = factory.dit_official(cfg)
    sd = factory.to_fp8(official, fmt)
    fp8 = {k for k, v in sd.items() if v.dtype == fmt}
    assert fp8 == _dit_linear_weights(cfg) | {"text_embedding.0.weight", "text_embedding.2.weight"}
    assert all(v.dtype == torch.bfloat16 for k, v in sd.items() if k not in fp8)
    deq = factory.dequantize_reference(sd)
    for k, v in deq.items():
        assert v.dtype == torch.float32 and torch.equal(v, sd[k].float())
        rel = (v - official[k]).norm() / official[k].norm()
        assert rel < (0.08 if fmt == torch.float8_e5m2 else 0.04), (k, rel)
    t5 = factory.to_fp8(factory.t5_official(tiny.TINY_T5), keep=factory.T5_KEEP)
    assert sum(v.dtype == torch.float8_e4m3fn for v in t5.values()) == 7 * tiny.TINY_T5.num_layers


def test_scaled_fp8_scales_exactly_the_block_linears_and_dequantizes_by_scale():
    cfg = tiny.TINY_DIT_I2V
    official = factory.dit_official(cfg)
    sd = factory.to_scaled_fp8(official, with_scale_input=True)
    linears = _dit_linear_weights(cfg)
    scaled = {k[: -len(".scale_weight")] + ".weight" for k in sd if k.endswith(".scale_weight")}
    assert scaled == linears
    assert {k for k in sd if k.endswith(".scale_input")} == {k[:-7] + ".scale_input" for k in linears}
    assert sd["scaled_fp8"].dtype == torch.float8_e4m3fn and sd["scaled_fp8"].numel() == 0
    for k in linears:
        scale = sd[k[:-7] + ".scale_weight"]
        assert scale.dtype == torch.float32 and scale.dim() == 0
        assert sd[k].dtype == torch.float8_e4m3fn and sd[k].float().abs().max() == 448.0
        torch.testing.assert_close(scale, official[k].abs().max() / 448.0)
    others = set(official) - linears
    assert all(sd[k].dtype == torch.bfloat16 for k in others)
    deq = factory.dequantize_reference(sd)
    assert deq.keys() == official.keys()
    for k in linears:
        assert torch.equal(deq[k], sd[k].float() * sd[k[:-7] + ".scale_weight"])
        assert (deq[k] - official[k]).norm() / official[k].norm() < 0.04
    prefixed = factory.with_prefix(factory.to_scaled_fp8(official))
    assert "model.diffusion_model.scaled_fp8" in prefixed
    assert factory.dequantize_reference(prefixed).keys() == factory.with_prefix(official).keys()


def test_scaled_fp8_rule_counts_match_published_files():
    def meta(shapes):
        return {k: torch.empty(s, device="meta") for k, s in shapes.items()}

    t5_hf = factory.t5_to_hf(meta(factory.official_shapes("t5", T5Config())))
    assert sum(factory.is_scaled_linear(k, v) for k, v in t5_hf.items()) == 168   # 24 x 7
    t5 = meta(factory.official_shapes("t5", T5Config()))
    assert sum(factory.is_scaled_linear(k, v) for k, v in t5.items()) == 168
    dit = meta(factory.official_shapes("dit", KNOWN_DIT["T2V-14B"]))
    assert sum(factory.is_scaled_linear(k, v) for k, v in dit.items()) == 40 * 10
    diffusers = factory.dit_to_diffusers(meta(factory.official_shapes("dit", KNOWN_DIT["I2V-14B"])))
    assert sum(factory.is_scaled_linear(k, v) for k, v in diffusers.items()) == 40 * 12


# ---------------------------------------------------------------- files

def _cases():
    for kind, layout in factory.LAYOUTS:
        for variant in (DIT_VARIANTS if kind == "dit" else [None]):
            yield kind, layout, ({"variant": variant} if variant else {})


def _official_contract(kind: str, opts: dict) -> dict:
    if kind == "dit":
        return factory.dit_official(DIT_VARIANTS[opts["variant"]])
    if kind == "clip":
        full = factory.clip_official(tiny.TINY_CLIP)
        return {k[7:]: v for k, v in full.items() if k.startswith("visual.")}
    if kind == "vae":
        return factory.vae_official(tiny.TINY_VAE)
    return factory.t5_official(tiny.TINY_T5)


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (also for fp8, which has few CPU kernels)."""
    def raw(t):
        return t.contiguous().reshape(-1).view(torch.uint8)

    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(raw(a), raw(b))


def test_every_layout_writes_reads_back_and_maps_to_the_official_values(tmp_path):
    from safetensors.torch import load_file

    for kind, layout, opts in _cases():
        path = factory.write_checkpoint(tmp_path, kind, layout, **opts)
        if path.suffix == ".safetensors":
            stored = load_file(path)
        else:
            stored = torch.load(path, weights_only=True)
        made = factory.make_checkpoint(kind, layout, **opts)
        assert stored.keys() == made.keys(), path.name
        assert all(_bitwise_equal(stored[k], made[k]) for k in made), path.name
        expected = factory.expected_official(kind, layout, **opts)
        official = _official_contract(kind, opts)
        assert expected.keys() == official.keys(), path.name
        lossy = "fp8" in layout
        for k, v in expected.items():
            if lossy:
                assert (v - official[k]).norm() <= 0.08 * official[k].norm(), (path.name, k)
            else:
                assert torch.equal(v, official[k]), (path.name, k)
    st = factory.write_checkpoint(tmp_path, "vae", "official", ext=".safetensors",
                                  dtype=torch.bfloat16)
    assert st.suffix == ".safetensors"
    assert {v.dtype for v in load_file(st).values()} == {torch.bfloat16}
    prefixed = factory.make_checkpoint("dit_t2v", "scaled_fp8", prefix=True)
    assert all(k.startswith(factory.PREFIX) for k in prefixed)
    assert factory.expected_official("dit_t2v", "scaled_fp8", prefix=True).keys() == \
        factory.dit_official(tiny.TINY_DIT_T2V).keys()


def test_tiny_spiece_has_umt5_special_ids_and_covers_the_negative_prompt():
    import sentencepiece as spm

    script = factory.TINY_SPIECE.parent / "make_tiny_spiece.py"
    spec = importlib.util.spec_from_file_location("make_tiny_spiece", script)
    make_tiny_spiece = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_tiny_spiece)

    data = factory.TINY_SPIECE.read_bytes()
    assert len(data) < 16_000
    sp = spm.SentencePieceProcessor(model_proto=data)
    assert (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "</s>", "<s>", "<unk>"]
    assert sp.get_piece_size() < tiny.TINY_T5.vocab
    for text in (make_tiny_spiece.NEGATIVE_ZH, "A cat walks on the grass, realistic style."):
        assert sp.unk_id() not in sp.encode(text)
    assert make_tiny_spiece.train() == data      # regenerating gives the committed file
