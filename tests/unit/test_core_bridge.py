"""Core types in and out without ComfyUI: the adapters' conversions on stand-ins of the host's
objects (a core CONDITIONING list, a core VAE whose ``encode`` takes IMAGE pixels 0..1, a
CLIP_VISION_OUTPUT with ``penultimate_hidden_states``). The real host's objects are checked
in tests/host/test_core_types.py.
"""
from __future__ import annotations

import importlib
import types

import pytest
import torch

import nodepack
from tiny import TINY_CLIP, TINY_VAE


@pytest.fixture(scope="module")
def pack():
    return nodepack.load_pack()


def _conditioning(tokens: torch.Tensor, pad_to: int = 512) -> list:
    """What core CLIPTextEncode gives for a umT5 CLIP: [[cond [1, 512, D], {"pooled_output": None}]],
    zero after the real tokens."""
    cond = torch.zeros(1, pad_to, tokens.shape[1])
    cond[0, :len(tokens)] = tokens
    return [[cond, {"pooled_output": None}]]


def test_text_embeds_from_conditioning_drop_core_padding_and_keep_every_real_token(pack):
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(9, 32, generator=g), torch.randn(4, 32, generator=g)
    (embeds,) = pack.nodes.WanCoreTextEmbedsFromConditioning().convert(_conditioning(pos), _conditioning(neg))
    assert isinstance(embeds, pack.wan_core.TextEmbeds)
    assert torch.equal(embeds.positive, pos) and torch.equal(embeds.negative, neg)


def test_text_embeds_from_conditioning_refuse_combined_or_mismatched_conditioning(pack):
    node = pack.nodes.WanCoreTextEmbedsFromConditioning()
    one = _conditioning(torch.ones(3, 32))
    with pytest.raises(ValueError, match="one prompt"):
        node.convert(one + one, one)
    with pytest.raises(ValueError, match="same umT5 CLIP"):
        node.convert(one, _conditioning(torch.ones(3, 64)))


class _CoreVAE:
    """A core VAE stand-in over our WanVAE: IMAGE [T, H, W, 3] 0..1 -> raw latents [1, 16, T', h, w]."""

    def __init__(self, vae):
        self.vae = vae

    def encode(self, pixels):
        return self.vae.encode(pixels.permute(3, 0, 1, 2)[None] * 2.0 - 1.0, normalize=False)


@pytest.mark.parametrize("flf2v", [False, True])
def test_image_embeds_from_core_equal_our_image_to_video_encode(pack, flf2v):
    wc = pack.wan_core
    torch.manual_seed(0)
    vae = wc.vae.WanVAE(TINY_VAE).eval()
    clip = wc.clip_vision.CLIPVisionTower(TINY_CLIP).eval()
    g = torch.Generator().manual_seed(1)
    start, end = torch.rand(1, 40, 48, 3, generator=g), torch.rand(1, 40, 48, 3, generator=g)

    def clip_output(image):   # CLIPVisionEncode, crop none: the penultimate tokens of the image
        return types.SimpleNamespace(
            penultimate_hidden_states=wc.clip_vision.encode_image(clip, wc.image_to_tensor(image[0])[None]))

    kwargs = {"end_image": end, "clip_vision_output_end": clip_output(end)} if flf2v else {}
    with torch.no_grad():
        (ours_core,) = pack.nodes.WanCoreImageEmbedsFromCore().encode(_CoreVAE(vae), clip_output(start), start,
                                                                      48, 32, 5, **kwargs)
        reference = wc.encode_image_conditioning(vae, clip, wc.image_to_tensor(start[0]), 5, 48, 32,
                                                 wc.image_to_tensor(end[0]) if flf2v else None)
    assert isinstance(ours_core, wc.ImageEmbeds)
    assert ours_core.y.shape == reference.y.shape and ours_core.clip_fea.shape == reference.clip_fea.shape
    # the only difference: the guide video passes through IMAGE pixels 0..1 and back
    assert (ours_core.y - reference.y).abs().max() <= 1e-5
    assert torch.equal(ours_core.clip_fea, reference.clip_fea)


def test_image_embeds_from_core_need_both_end_inputs_for_flf2v(pack):
    out = types.SimpleNamespace(penultimate_hidden_states=torch.zeros(1, 5, 8))
    with pytest.raises(ValueError, match="both end_image and clip_vision_output_end"):
        pack.nodes.WanCoreImageEmbedsFromCore().encode(None, out, torch.zeros(1, 32, 32, 3), 32, 32, 5,
                                                       end_image=torch.zeros(1, 32, 32, 3))


def _stub_dit(*layers, **cfg):
    """A module standing in for a loaded DiT: its layers and a config (T2V 1.3B unless given)."""
    dit = torch.nn.Sequential(*layers)
    dit.cfg = types.SimpleNamespace(**{"model_type": "t2v", "fun": "", "variant": "T2V-1.3B", **cfg})
    return dit


@pytest.mark.parametrize("cfg, what", [({"model_type": "ti2v", "variant": "TI2V-5B"}, "Wan 2.2 model"),
                                       ({"model_type": "i2v_noclip", "variant": "I2V-A14B"}, "Wan 2.2 model"),
                                       ({"model_type": "i2v", "fun": "control", "variant": "Fun-Control-1.3B"},
                                        "Fun Control")])
def test_dit_to_model_refuses_models_core_wan21_would_misread(pack, monkeypatch, cfg, what):
    monkeypatch.setattr(pack.nodes.host, "core_model", lambda dit, shift: pytest.fail("bridged " + what))
    with pytest.raises(ValueError, match=what):
        pack.nodes.WanCoreDiTToModel().convert(pack.nodes.types.LoadedDiT(_stub_dit(**cfg)), 3.0)


def test_dit_to_model_hands_the_loaded_dit_and_shift_to_the_host_bridge(pack, monkeypatch):
    calls = []
    monkeypatch.setattr(pack.nodes.host, "core_model", lambda dit, shift: calls.append((dit, shift)) or "MODEL")
    CastLinear = importlib.import_module(pack.__name__ + ".wan_core.layers").CastLinear   # the pack's own copy
    dit = _stub_dit(CastLinear(4, 4))
    (model,) = pack.nodes.WanCoreDiTToModel().convert(pack.nodes.types.LoadedDiT(dit), 3.0)
    assert model == "MODEL" and calls == [(dit, 3.0)]


@pytest.mark.parametrize("dtype, kind", [(torch.float8_e4m3fn, "fp8"), (torch.uint8, "gguf")])
def test_dit_to_model_refuses_fp8_and_gguf_storage_that_core_patches_would_corrupt(pack, monkeypatch, dtype, kind):
    CastLinear = importlib.import_module(pack.__name__ + ".wan_core.layers").CastLinear   # the pack's own copy
    monkeypatch.setattr(pack.nodes.host, "core_model", lambda dit, shift: pytest.fail("bridged a quantized DiT"))
    layer = CastLinear(4, 4)
    layer.weight = torch.nn.Parameter(torch.zeros(4, 4, dtype=dtype), requires_grad=False)
    with pytest.raises(ValueError, match=f"stored as {kind}.*weight_dtype bf16"):
        pack.nodes.WanCoreDiTToModel().convert(pack.nodes.types.LoadedDiT(_stub_dit(layer)), 3.0)


def test_core_encoder_workflows_spell_out_the_official_negative_prompt(pack):
    import json

    for name in ("wan_t2v_1.3B_core_encoders", "wan_t2v_1.3B_ksampler"):
        graph = json.loads((nodepack.ROOT / "workflows" / "api" / f"{name}.json").read_text())
        texts = [n["inputs"]["text"] for n in graph.values() if n["class_type"] == "CLIPTextEncode"]
        assert pack.wan_core.NEGATIVE_PROMPT in texts, name   # core CLIPTextEncode has no default for it
