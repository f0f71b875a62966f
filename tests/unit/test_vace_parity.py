"""WanVaceDiT reproduces diffusers' WanVACETransformer3DModel (fp32, CPU), with random
non-symmetric weights in the official VACE layout (``vace_factory.vace_official``) converted by
diffusers' own single-file converter (before_proj -> proj_in, after_proj -> proj_out).

Measured here (tiny config: dim 256, 4 blocks, hints after 0 and 2; latent [1, 16, 3, 8, 8],
7 text tokens, outputs ~|4|): max abs error vs diffusers 4.8e-6 without and 1.2e-5 with a
reference frame (latent [1, 16, 4, 8, 8]), 7.9e-6 at strength 0.6 ([1, 16, 2, 4, 6]). Like the base DiT (test_dit_parity.py)
the residual is the timestep sinusoid (diffusers fp32, official and ours fp64).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from vace_factory import TINY_VACE, vace_official
from factory import dit_to_diffusers
from wan_core.configs import KNOWN_DIT, DiTConfig
from wan_core.dit import WanDiT
from wan_core.offload import BlockSwap
from wan_core.runner import DiTRunner
from wan_core.vace import WanVaceDiT, vace_layers_for

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-4     # measured <= 1.2e-5 max abs (module docstring): 8x margin
WRONG = 1e-3    # each wrong mapping below measured >= 0.032 (norm3 swap), 0.6-4.1 the others


def diffusers_model(cfg: DiTConfig, sd: dict[str, torch.Tensor]):
    from diffusers import WanVACETransformer3DModel

    model = WanVACETransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=cfg.eps, rope_max_seq_len=1024, vace_layers=list(cfg.vace_layers), vace_in_channels=cfg.vace_in_dim)
    if sd:
        model.load_state_dict(dit_to_diffusers(sd), strict=True)
    return model.eval()


def ours(sd: dict[str, torch.Tensor], cfg: DiTConfig = TINY_VACE) -> WanVaceDiT:
    model = WanVaceDiT(cfg).eval()
    model.load_state_dict(sd, strict=True)
    return model


def make_inputs(refs: int = 0, f: int = 3, h: int = 8, w: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
    """Noise, timestep, text and a VACE context; ``refs`` reference frames lead both x and y
    (their 64 mask channels zero, as the conditioning builds them)."""
    g = torch.Generator().manual_seed(seed)
    cfg = TINY_VACE
    frames = refs + f
    y = torch.randn(1, cfg.vace_in_dim, frames, h, w, generator=g)
    y[:, 32:, :refs] = 0
    y[:, 32:, refs:] = (y[:, 32:, refs:] > 0).float()      # a binary mask, like real masks
    return {"x": torch.randn(1, 16, frames, h, w, generator=g), "t": torch.rand(1, generator=g) * 1000,
            "context": torch.randn(1, 7, cfg.text_dim, generator=g), "y": y}


def run_diffusers(model, x, t, context, y, strength: float = 1.0) -> torch.Tensor:
    context = F.pad(context, (0, 0, 0, TINY_VACE.text_len - context.shape[1]))
    scale = torch.full((len(TINY_VACE.vace_layers),), strength)
    return model(x, t, context, control_hidden_states=y, control_hidden_states_scale=scale, return_dict=False)[0]


@pytest.fixture(scope="module")
def models():
    sd = vace_official(TINY_VACE, seed=0)
    return sd, ours(sd), diffusers_model(TINY_VACE, sd)


# ---- parity ------------------------------------------------------------------------------

@pytest.mark.parametrize("refs", [0, 1])
@torch.no_grad()
def test_matches_diffusers_with_and_without_reference_frames(models, refs):
    _, model, ref = models
    inputs = make_inputs(refs=refs)
    torch.testing.assert_close(model(**inputs), run_diffusers(ref, **inputs), atol=ATOL, rtol=0)


@torch.no_grad()
def test_strength_scales_the_hints_like_diffusers(models):
    _, model, ref = models
    inputs = make_inputs(f=2, h=4, w=6)
    out = model(**inputs, vace_strength=0.6)
    torch.testing.assert_close(out, run_diffusers(ref, **inputs, strength=0.6), atol=ATOL, rtol=0)
    assert (out - model(**inputs)).abs().max() > WRONG


def _swap(sd, a, b):
    sd = dict(sd)
    sd[a], sd[b] = sd[b], sd[a]
    return sd


@pytest.mark.parametrize("key_a,key_b", [
    ("vace_blocks.0.before_proj.weight", "vace_blocks.0.after_proj.weight"),
    ("vace_blocks.0.after_proj.weight", "vace_blocks.1.after_proj.weight"),
    ("vace_blocks.1.norm3.weight", "blocks.1.norm3.weight"),
    ("vace_blocks.0.self_attn.k.weight", "vace_blocks.0.self_attn.v.weight"),
])
@torch.no_grad()
def test_one_wrong_key_mapping_breaks_parity(models, key_a, key_b):
    sd, _, ref = models
    inputs = make_inputs()
    wrong = ours(_swap(sd, key_a, key_b))(**inputs)
    assert (wrong - run_diffusers(ref, **inputs)).abs().max() > WRONG


# ---- strength 0 / no context = the base model --------------------------------------------

@torch.no_grad()
def test_strength_zero_and_no_context_are_the_base_model_bit_for_bit(models):
    sd, model, _ = models
    base_cfg = dataclasses.replace(TINY_VACE, vace_layers=())
    base = WanDiT(base_cfg).eval()
    base.load_state_dict({k: v for k, v in sd.items() if not k.startswith("vace_")}, strict=True)
    inputs = make_inputs()
    plain = base(inputs["x"], inputs["t"], inputs["context"])
    assert torch.equal(model(**inputs, vace_strength=0.0), plain)
    assert torch.equal(model(**dict(inputs, y=None)), plain)


# ---- runner, block swap, skip layers -----------------------------------------------------

@torch.no_grad()
def test_runner_with_block_swap_is_bit_identical_to_forward(models):
    _, model, _ = models
    inputs = make_inputs(refs=1)
    expected = model(**inputs, vace_strength=0.7)
    tokens, block_inputs = model.prepare(**inputs, vace_strength=0.7)
    swap = BlockSwap(resident_blocks=1, compute_device="cpu").setup(model)
    try:
        out = model.finish(swap.run(model.blocks, tokens, block_inputs), block_inputs)
    finally:
        swap.release()
    assert torch.equal(out, expected)
    assert swap.streamed_blocks == len(model.blocks) - 1


@torch.no_grad()
def test_plain_runner_call_is_the_model_call(models):
    _, model, _ = models
    inputs = make_inputs()
    out = DiTRunner(model)(inputs["x"], inputs["t"], inputs["context"], None, inputs["y"])
    assert torch.equal(out, model(**inputs))


@torch.no_grad()
def test_hints_out_of_order_are_refused(models):
    _, model, _ = models
    tokens, inp = model.prepare(**make_inputs())
    inp.vace.add_hint(1, tokens)
    with pytest.raises(RuntimeError, match="out of order"):
        inp.vace.add_hint(0, tokens)


# ---- construction ------------------------------------------------------------------------

def test_bad_context_and_strength_are_refused(models):
    _, model, _ = models
    inputs = make_inputs()
    with pytest.raises(ValueError, match="VACE context must be"):
        model(**dict(inputs, y=inputs["y"][:, :64]))
    with pytest.raises(ValueError, match="strength"):
        model(**inputs, vace_strength=float("nan"))


@pytest.mark.parametrize("name,count,layers", [
    ("T2V-1.3B", 15, tuple(range(0, 30, 2))),      # official default: every 2nd layer
    ("T2V-14B", 8, (0, 5, 10, 15, 20, 25, 30, 35)),  # the published 14B config.json
])
def test_published_layers_follow_from_the_block_count_and_build_on_meta(name, count, layers):
    assert vace_layers_for(KNOWN_DIT[name].num_layers, count) == layers
    cfg = dataclasses.replace(KNOWN_DIT[name], vace_layers=layers)
    with torch.device("meta"):
        model = WanVaceDiT(cfg)
        ref = diffusers_model(cfg, {})
    assert not list(model.buffers())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())
    assert cfg.variant == "VACE-" + name.split("-")[1]


def test_uneven_block_counts_are_refused():
    with pytest.raises(ValueError, match="evenly"):
        vace_layers_for(30, 8)


def test_memory_planner_counts_the_resident_vace_blocks():
    from wan_core.planner import dit_sizes

    cfg = dataclasses.replace(KNOWN_DIT["T2V-14B"], vace_layers=vace_layers_for(40, 8))
    vace, base = dit_sizes(cfg, "fp8_e4m3fn"), dit_sizes(KNOWN_DIT["T2V-14B"], "fp8_e4m3fn")
    assert vace.block_bytes == base.block_bytes
    # 8 vace blocks (a base block + after_proj each, before_proj once) + the 96-channel patch conv;
    # fp8 Linear: 1 byte/weight + a 4-byte scale, bf16 bias; the conv stays float32
    d = cfg.dim
    proj = d * d + 4 + 2 * d
    conv = 4 * (d * 96 * 4 + d)
    assert vace.other_bytes - base.other_bytes == 8 * (base.block_bytes[0] + proj) + proj + conv


def test_vace_14b_fp8_at_480p_81_frames_plans_within_8_gib():
    from wan_core.planner import GiB, dit_sizes, plan_memory, tokens_for

    cfg = dataclasses.replace(KNOWN_DIT["T2V-14B"], vace_layers=vace_layers_for(40, 8))
    sizes = dit_sizes(cfg, "fp8_e4m3fn")
    # all vace blocks but the largest (block 0, with before_proj) leave the device while blocks stream
    assert sizes.swap_streamed_bytes == 7 * (sizes.block_bytes[0] + cfg.dim * cfg.dim + 4 + 2 * cfg.dim)
    plan = plan_memory(8 * GiB, sizes, tokens_for(832, 480, 81), latent_hw=(60, 104))
    # planned (no GPU measurement): 1/40 blocks resident, DiT step peak 7.48 GiB + 0.5 GiB reserve
    assert plan.resident_blocks >= 1 and plan.stages.dit_step + plan.reserve_bytes <= 8 * GiB


def test_block_swap_streams_the_vace_blocks_only_while_blocks_stream(models):
    _, model, _ = models
    vace = sum(p.numel() * p.element_size() for p in model.vace_blocks.parameters())
    swap = BlockSwap(resident_blocks=len(model.blocks), compute_device="cpu").setup(model)
    all_resident = swap.device_bytes().resident
    swap.release()
    swap = BlockSwap(resident_blocks=1, compute_device="cpu").setup(model)
    try:
        some = swap.device_bytes().resident
    finally:
        swap.release()
    blocks = [sum(p.numel() * p.element_size() for p in b.parameters()) for b in model.blocks]
    assert all_resident - some == vace + sum(blocks[1:])
