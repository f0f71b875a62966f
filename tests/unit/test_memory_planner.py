"""The offload planner: (budget, model, tokens) -> plan, as a table.

Sizes come from the real configs on the meta device (nothing allocated): I2V-14B fp8
blocks are 0.376 GiB, T2V-14B fp8 0.327 GiB, T2V-1.3B bf16 0.087 GiB; the non-block
weights of a 14B model are ~0.75 GiB (mostly the float32 ``time_projection``). The umT5-XXL
encoder is 10.58 GiB in bf16, the VAE 0.47 GiB in float32.
"""
from __future__ import annotations

import dataclasses

import pytest

from wan_core.configs import KNOWN_DIT, T5Config, VAEConfig
from wan_core.planner import (
    DEFAULT_RESERVE,
    GiB,
    PlanError,
    dit_activation_bytes,
    dit_sizes,
    module_param_bytes,
    plan_memory,
    tokens_for,
)
from wan_core.text_encoder import UMT5Encoder
from wan_core.vae import WanVAE

TOKENS_480P_81 = tokens_for(832, 480, 81)
LATENT_480P = (60, 104)
LATENT_720P = (90, 160)
TE_BF16 = module_param_bytes(UMT5Encoder, T5Config(), 2)
TE_FP8 = module_param_bytes(UMT5Encoder, T5Config(), 1)
VAE = module_param_bytes(WanVAE, VAEConfig(), 4)


def _sizes(variant: str, storage: str):
    return dit_sizes(KNOWN_DIT[variant], storage)


def test_token_count_and_model_sizes_from_configs() -> None:
    assert TOKENS_480P_81 == 21 * 30 * 52 == 32760
    assert tokens_for(1280, 720, 81) == 21 * 45 * 80
    i2v = _sizes("I2V-14B", "fp8_e4m3fn")
    assert i2v.num_blocks == 40
    # per block: self q,k,v,o + cross q,k,v,o,k_img,v_img (5120^2 each) + ffn 2 x 5120 x 13824, 1 byte
    linear = 10 * 5120 * 5120 + 2 * 5120 * 13824
    assert linear < i2v.block_bytes[0] < linear * 1.01
    assert abs(_sizes("T2V-1.3B", "bf16").block_bytes[0] / GiB - 0.0865) < 0.001
    assert 10.5 < TE_BF16 / GiB < 10.7 and 0.45 < VAE / GiB < 0.5


def test_activation_estimate_follows_the_documented_formula() -> None:
    s = _sizes("T2V-14B", "bf16")
    d, f, h, c, n = 5120, 13824, 40, 2, TOKENS_480P_81
    latent = 4 * 128 + 16 * (2 * 16 + 16 - 16)
    per_token = max(20 * d + 2 * c * d, 12 * d + c * d + 2 * c * f) + 4 * h + latent
    # bf16: no upcast; 64 MiB of small per-step tensors
    assert dit_activation_bytes(s, n) == n * per_token + (512 + 257) * 4 * c * d + 64 * 2**20
    fp8 = _sizes("T2V-14B", "fp8_e4m3fn")
    assert dit_activation_bytes(fp8, n) - dit_activation_bytes(s, n) == 5120 * 13824 * (4 + c)
    # the math backend materialises the score matrix: quadratic in tokens
    assert dit_activation_bytes(s, n, "math") > 40 * n * n * 6


# (budget GiB, variant, storage, tokens, latent, text encoder bytes) ->
#   (K resident, text encoder on CPU, VAE tile)
TABLE = [
    (6, "T2V-1.3B", "bf16", TOKENS_480P_81, LATENT_480P, TE_BF16, (30, True, 64)),
    (8, "T2V-1.3B", "bf16", TOKENS_480P_81, LATENT_480P, TE_BF16, (30, True, 96)),
    (8, "T2V-1.3B", "bf16", TOKENS_480P_81, LATENT_480P, TE_FP8, (30, False, 96)),
    (8, "T2V-14B", "fp8_e4m3fn", TOKENS_480P_81, LATENT_480P, TE_BF16, (5, True, 96)),
    (8, "I2V-14B", "fp8_e4m3fn", TOKENS_480P_81, LATENT_480P, TE_BF16, (4, True, 96)),
    (8, "FLF2V-14B", "fp8_e4m3fn", TOKENS_480P_81, LATENT_480P, TE_BF16, (4, True, 96)),
    (8, "I2V-14B", "bf16", TOKENS_480P_81, LATENT_480P, TE_BF16, (1, True, 96)),
    (12, "I2V-14B", "fp8_e4m3fn", TOKENS_480P_81, LATENT_480P, TE_BF16, (14, False, None)),
    (16, "I2V-14B", "fp8_e4m3fn", TOKENS_480P_81, LATENT_480P, TE_BF16, (25, False, None)),
    (24, "I2V-14B", "fp8_e4m3fn", TOKENS_480P_81, LATENT_480P, TE_BF16, (40, False, None)),
    (24, "T2V-14B", "bf16", TOKENS_480P_81, LATENT_480P, TE_BF16, (26, False, None)),
    (24, "I2V-14B", "bf16", TOKENS_480P_81, LATENT_480P, TE_BF16, (22, False, None)),
    # 720p: the fp32 VAE needs 0.47 + 16.5 GiB untiled + the output video on the device (1.23 MB
    # per latent pixel: simulated 1.17 + 5 %), so it is tiled even at 16 GiB; a tile of t
    # latent px is t x t, its overlap included; 480p (7.6 GiB untiled) tiles up to 8 GiB
    (6, "T2V-1.3B", "bf16", tokens_for(1280, 720, 21), LATENT_720P, TE_BF16, (30, True, 64)),
    (8, "T2V-1.3B", "bf16", tokens_for(1280, 720, 21), LATENT_720P, TE_BF16, (30, True, 64)),
    (16, "T2V-1.3B", "bf16", tokens_for(1280, 720, 21), LATENT_720P, TE_BF16, (30, False, 128)),
]


@pytest.mark.parametrize("budget, variant, storage, tokens, latent, te, expected", TABLE)
def test_plan_table(budget, variant, storage, tokens, latent, te, expected) -> None:
    sizes = _sizes(variant, storage)
    plan = plan_memory(budget * GiB, sizes, tokens, text_encoder_bytes=te, vae_bytes=VAE, latent_hw=latent)
    assert (plan.resident_blocks, plan.text_encoder_on_cpu, plan.vae_tile) == expected, plan.describe()
    assert plan.dit_peak_bytes <= budget * GiB
    if plan.resident_blocks < plan.num_blocks:      # one more block would not fit
        more = dataclasses.replace(plan, resident_blocks=plan.resident_blocks + 1)
        assert more.dit_peak_bytes > budget * GiB or plan.resident_blocks + 1 == plan.num_blocks
        assert plan.streaming_bytes == 2 * sizes.block_bytes[0]
    else:
        assert plan.streaming_bytes == 0
    assert plan.device_weight_bytes == sizes.other_bytes + plan.resident_blocks * sizes.block_bytes[0]
    assert plan.vae_peak_bytes + plan.reserve_bytes <= budget * GiB
    line = plan.describe()
    assert "\n" not in line and f"budget {budget:.2f} GiB" in line and f"{tokens} tokens" in line


@pytest.mark.parametrize("budget, variant, storage", [(6, "I2V-14B", "fp8_e4m3fn"), (6, "T2V-14B", "bf16"),
                                                      (1, "T2V-1.3B", "bf16")])
def test_budget_too_small_names_the_minimum(budget, variant, storage) -> None:
    sizes = _sizes(variant, storage)
    with pytest.raises(PlanError, match=r"the minimum is \d+\.\d\d GiB") as err:
        plan_memory(budget * GiB, sizes, TOKENS_480P_81, text_encoder_bytes=TE_BF16, vae_bytes=VAE,
                    latent_hw=LATENT_480P)
    minimum = float(str(err.value).split("the minimum is ")[1].split(" GiB")[0])
    assert minimum > budget
    # and the minimum it names is enough
    plan = plan_memory(int((minimum + 0.01) * GiB), sizes, TOKENS_480P_81, vae_bytes=VAE, latent_hw=LATENT_480P)
    assert plan.resident_blocks == 0 and plan.dit_peak_bytes <= (minimum + 0.01) * GiB


def test_plan_is_monotonic_in_budget_and_tokens() -> None:
    sizes = _sizes("I2V-14B", "fp8_e4m3fn")
    ks = [plan_memory(b * GiB, sizes, TOKENS_480P_81).resident_blocks for b in range(8, 26)]
    assert ks == sorted(ks) and ks[0] < ks[-1] == 40
    ks = [plan_memory(12 * GiB, sizes, tokens_for(832, 480, f)).resident_blocks for f in (81, 49, 17, 1)]
    assert ks == sorted(ks)


def test_reserve_and_math_attention_are_honoured() -> None:
    sizes = _sizes("T2V-1.3B", "bf16")
    plan = plan_memory(8 * GiB, sizes, 1560)
    assert plan.reserve_bytes == DEFAULT_RESERVE and plan.attention == "sdpa"
    with pytest.raises(PlanError, match="math"):
        plan_memory(8 * GiB, sizes, TOKENS_480P_81, attention="math")


def test_image_models_get_an_encode_tile_and_every_stage_fits() -> None:
    sizes = _sizes("I2V-14B", "fp8_e4m3fn")
    clip = 1_266_000_000      # ViT-H/14 in fp16
    plan = plan_memory(12 * GiB, sizes, tokens_for(1280, 720, 81), text_encoder_bytes=TE_BF16, vae_bytes=VAE,
                       latent_hw=LATENT_720P, clip_vision_bytes=clip, encode_video=True)
    # 720p: the untiled guide-video encode alone would need 0.92 MB x 14400 latent px = 12.3 GiB
    assert plan.vae_encode_tile is not None and plan.vae_tile is not None
    names = [name for name, _ in plan.stages.items()]
    assert names == ["text encoder", "CLIP", "VAE encode", "DiT step", "VAE decode"]
    assert all(0 < peak <= 12 * GiB - DEFAULT_RESERVE for name, peak in plan.stages.items() if name != "text encoder")
    assert plan.stages.dit_step == plan.dit_peak_bytes - plan.reserve_bytes
    assert plan.stages.text_encoder == 0 if plan.text_encoder_on_cpu else plan.stages.text_encoder > TE_BF16
    t2v = plan_memory(8 * GiB, _sizes("T2V-14B", "fp8_e4m3fn"), TOKENS_480P_81, vae_bytes=VAE, latent_hw=LATENT_480P)
    assert t2v.vae_encode_tile is None and t2v.stages.vae_encode == t2v.stages.clip_vision == 0
