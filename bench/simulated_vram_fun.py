"""Planned vs simulated VRAM of a Fun Control 14B DiT step (V1.0, and V1.1 with its reference
frame of tokens) at 832x480x81 in an 8 GiB budget: the planner's figure (reference tokens
counted by wan_core.fun.reference_tokens) against the real DiTRunner + BlockSwap + Fun model
call on wan_core.memsim's simulated CUDA device, as bench/simulated_vram.py does for T2V / I2V.

Usage: python bench/simulated_vram_fun.py   (under a minute; one line per variant)
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from wan_core.conditioning import make_noise  # noqa: E402
from wan_core.configs import KNOWN_DIT  # noqa: E402
from wan_core.fun import FunControlEmbeds, fun_model_call, reference_tokens  # noqa: E402
from wan_core.memsim import (FakeGPU, SimJob, fake_clip_vision, fake_dit, fake_text_encoder, fake_vae,  # noqa: E402
                             sim_latent_shape)
from wan_core.offload import BlockSwap, module_bytes  # noqa: E402
from wan_core.planner import DEFAULT_RESERVE, GiB, MiB, dit_sizes, plan_memory, tokens_for, vae_figures  # noqa: E402
from wan_core.runner import DiTRunner  # noqa: E402
from wan_core.schedulers import flow_schedule, sample_euler  # noqa: E402

COMFY_RESERVE = 400 * MiB
WIDTH, HEIGHT, FRAMES, BUDGET = 832, 480, 81, 8 * GiB


def simulate(ref_in_dim: int) -> bool:
    """Plan and simulate one CFG step; True when the plan covers the simulation and fits."""
    cfg = dataclasses.replace(KNOWN_DIT["Fun-Control-14B"], ref_in_dim=ref_in_dim)
    with FakeGPU() as gpu:
        te, vae, clip = fake_text_encoder(), fake_vae(), fake_clip_vision()
        job = SimJob("I2V-14B", "fp8_e4m3fn", WIDTH, HEIGHT, FRAMES, image=True)
        hw = (HEIGHT // 8, WIDTH // 8)
        tokens = tokens_for(WIDTH, HEIGHT, FRAMES) + reference_tokens(cfg, hw)
        plan = plan_memory(BUDGET, dit_sizes(cfg, "fp8_e4m3fn"), tokens, text_encoder_bytes=module_bytes(te),
                           vae_bytes=module_bytes(vae), latent_hw=hw, clip_vision_bytes=module_bytes(clip),
                           encode_video=True, vae=vae_figures(vae))
        dit = fake_dit(cfg, "fp8_e4m3fn")
        t0 = time.time()
        shape = sim_latent_shape(16, job)
        with gpu.stage("DiT step") as stage:
            swap = BlockSwap(plan.resident_blocks, compute_device="cuda").setup(dit)
            try:
                base = DiTRunner(dit, executor=swap)
                reference = torch.zeros(16, *shape[2:]) if ref_in_dim else None
                runner = fun_model_call(base, FunControlEmbeds(torch.zeros(32, *shape[1:]), None, reference,
                                                               WIDTH, HEIGHT, FRAMES))
                device = dit.patch_embedding.weight.device
                x = make_noise(0, shape).to(device)[None]
                pos = torch.empty(1, job.text_tokens, cfg.text_dim).to(device)
                neg = torch.empty(1, job.text_tokens, cfg.text_dim).to(device)
                y = torch.empty(1, 32, *shape[1:]).to(device)
                clip_fea = torch.empty(1, 257, cfg.clip_dim).to(device)
                base.begin_run(1)

                def model_fn(xt, t):   # pipeline.sample's, without the NaN checks
                    base.begin_step(0)
                    cond = runner(xt, t.to(device), pos, clip_fea, y, branch="cond")
                    uncond = runner(xt, t.to(device), neg, clip_fea, y, branch="uncond")
                    return uncond + 5.0 * (cond - uncond)

                out = sample_euler(model_fn, x, flow_schedule(1, 5.0, "euler"))[0].float().cpu()
                del out, x, pos, neg, y, clip_fea
            finally:
                swap.release()
        planned, sim = plan.stages.dit_step, stage.peak
        left = BUDGET - DEFAULT_RESERVE - COMFY_RESERVE - sim
        ok = sim <= planned and left >= 0
        print(f"Fun-Control-14B {'V1.1' if ref_in_dim else 'V1.0'} fp8 {WIDTH}x{HEIGHT}x{FRAMES} @8GB DiT step: "
              f"{plan.resident_blocks}/{plan.num_blocks} resident, {tokens} tokens, planned {planned / GiB:.2f} GiB, "
              f"simulated {sim / GiB:.2f} GiB, ratio {planned / sim:.3f}, left {left / GiB:.2f} GiB "
              f"({time.time() - t0:.0f} s) {'ok' if ok else 'NOT MET'}", flush=True)
        return ok


def main() -> int:
    return 0 if all([simulate(0), simulate(16)]) else 1


if __name__ == "__main__":
    sys.exit(main())
