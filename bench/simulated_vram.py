"""Planned vs simulated peak device memory of every stage, at real shapes, without a GPU.

For each case (published model x video size x VRAM budget) this builds the real networks
with fake weights (:mod:`wan_core.memsim`: nothing is allocated or loaded), asks the planner
for a plan (:func:`wan_core.plan_memory`), runs every stage of the run as the plan places it
on a simulated ``cuda`` device and prints, per stage: the planned peak, the simulated peak
(live device bytes, the most at once), their ratio, and what is left of the budget after
the simulated peak, the planner's reserve (``DEFAULT_RESERVE``, 512 MiB) and ComfyUI's own
reserve (400 MiB, ``EXTRA_RESERVED_VRAM`` on Linux).

The planner gets what ComfyUI hands the engine on an idle card of that size: the budget less
ComfyUI's reserve (``nodes.host.free_vram_bytes`` subtracts ``extra_reserved_memory``); the
planner then keeps its own reserve on top.

Goals (exit status 1 when one fails): every stage within its budget after both reserves;
every planned peak >= the simulated peak and <= 1.15 x it; the 14B at 6 GB refused with a
PlanError naming the minimum budget.

What a simulation does not see: allocator fragmentation, the CUDA context, cuBLAS/cuDNN
workspaces (see the module docstring of wan_core.memsim). The reserves are for those.

Wan 2.2 rows: each A14B expert is planned and simulated alone (the run plan holds one expert
on the device at a time, ``wan_core.moe.expert_stages``), T2V-A14B experts have the T2V-14B
shape; TI2V-5B runs with the Wan 2.2 VAE (48 channels, 16x16) and, with a start image,
per-token timesteps and a one-frame VAE encode.

Usage: python bench/simulated_vram.py [--quick] [--wan22]   (--quick: the 1.3B case only;
--wan22: the Wan 2.2 cases only; minutes in all)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wan_core.configs import KNOWN_DIT  # noqa: E402
from wan_core.memsim import (FakeGPU, SimJob, attention_workspace_bytes, fake_clip_vision, fake_dit,  # noqa: E402
                             fake_text_encoder, fake_vae, fake_vae22, simulate_run)
from wan_core.offload import module_bytes  # noqa: E402
from wan_core.planner import (DEFAULT_RESERVE, GiB, MiB, PlanError, dit_sizes, plan_memory, tokens_for,  # noqa: E402
                              vae_figures)

COMFY_RESERVE = 400 * MiB
TOLERANCE = 1.15
# (variant, DiT storage, width, height, frames, budget GiB[, start image: Wan 2.2 I2V])
CASES = [
    ("T2V-1.3B", "bf16", 832, 480, 81, 6),
    ("T2V-14B", "fp8_e4m3fn", 832, 480, 81, 8),
    ("I2V-14B", "fp8_e4m3fn", 832, 480, 81, 8),
    ("I2V-14B", "fp8_e4m3fn", 1280, 720, 81, 12),
]
# Wan 2.2: an A14B expert (T2V-A14B's have the T2V-14B shape), TI2V-5B with the Wan 2.2 VAE
CASES22 = [
    ("T2V-14B", "fp8_e4m3fn", 832, 480, 81, 8, False),
    ("I2V-A14B", "fp8_e4m3fn", 832, 480, 81, 8, True),
    ("TI2V-5B", "bf16", 1280, 704, 121, 8, False),
    ("TI2V-5B", "bf16", 1280, 704, 121, 8, True),      # per-token timesteps: +40 dim float32 bytes per token
]
REFUSED = [("T2V-14B", "fp8_e4m3fn", 832, 480, 81, 6), ("I2V-14B", "fp8_e4m3fn", 832, 480, 81, 6)]
REFUSED22 = [("TI2V-5B", "bf16", 1280, 704, 121, 7, True)]


def plan_for(job: SimJob, budget: int, te, vae, clip):
    cfg = KNOWN_DIT[job.variant]
    s = vae_figures(vae).space_stride
    tokens = tokens_for(job.width, job.height, job.frames, space_stride=s)
    return plan_memory(budget, dit_sizes(cfg, job.storage), tokens,
                       attention=job.attention, text_encoder_bytes=module_bytes(te), vae_bytes=module_bytes(vae),
                       latent_hw=(job.height // s, job.width // s),
                       clip_vision_bytes=module_bytes(clip) if cfg.has_image_input else 0,
                       encode_video=cfg.has_image_input or job.image, vae=vae_figures(vae),
                       per_token_timesteps=cfg.model_type == "ti2v" and job.image,
                       encode_frames=1 if cfg.model_type == "ti2v" else None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only the T2V-1.3B case")
    ap.add_argument("--wan22", action="store_true", help="only the Wan 2.2 cases")
    ap.add_argument("--last", type=int, default=len(CASES22), help="with --wan22: only the last N of its cases")
    args = ap.parse_args()
    failures: list[str] = []
    g = GiB
    print(f"{'case':<36} {'stage':<13} {'placement':<22} {'planned':>8} {'simulated':>9} {'ratio':>6} "
          f"{'left':>7}  ok")
    with FakeGPU() as gpu:
        te, vae21, clip, vae22 = fake_text_encoder(), fake_vae(), fake_clip_vision(), fake_vae22()
        cases = [c + (KNOWN_DIT[c[0]].has_image_input,) for c in CASES] + CASES22
        cases = cases[:1] if args.quick else CASES22[len(CASES22) - args.last:] if args.wan22 else cases
        for variant, storage, width, height, frames, budget_gib, image in cases:
            t0 = time.time()
            job = SimJob(variant, storage, width, height, frames, image=image)
            vae = vae22 if KNOWN_DIT[variant].out_dim == 48 else vae21
            budget = budget_gib * GiB
            plan = plan_for(job, budget - COMFY_RESERVE, te, vae, clip)
            dit = fake_dit(KNOWN_DIT[variant], storage)
            stages = simulate_run(gpu, job, plan, dit, vae, te, clip)
            case = (f"{variant}{' I2V' if image and variant == 'TI2V-5B' else ''} {storage} "
                    f"{width}x{height}x{frames} @{budget_gib}GB")
            where = {"text encoder": "CPU" if plan.text_encoder_on_cpu else "GPU",
                     "CLIP": "GPU (+VAE weights)",
                     "VAE encode": (f"tile {plan.vae_encode_tile}" if plan.vae_encode_tile else "untiled")
                     + (", 1 frame" if variant == "TI2V-5B" else ""),
                     "DiT step": f"{plan.resident_blocks}/{plan.num_blocks} blocks resident",
                     "VAE decode": f"tile {plan.vae_tile}" if plan.vae_tile else "untiled"}
            for name, planned in plan.stages.items():
                if name not in stages:
                    continue
                sim = stages[name].peak
                left = budget - DEFAULT_RESERVE - COMFY_RESERVE - sim
                ratio = planned / sim if sim else float("nan")
                ok = left >= 0 and (sim == 0 and planned == 0 or sim <= planned <= TOLERANCE * sim)
                if not ok:
                    failures.append(f"{case} {name}: planned {planned / g:.3f}, simulated {sim / g:.3f} GiB")
                if stages[name].end:
                    failures.append(f"{case} {name}: {stages[name].end} bytes left on the device after the stage")
                print(f"{case:<36} {name:<13} {where[name]:<22} {planned / g:>7.2f}G {sim / g:>8.2f}G "
                      f"{ratio:>6.3f} {left / g:>6.2f}G  {'yes' if ok else 'NO'}", flush=True)
            print(f"{'':<36} ({time.time() - t0:.0f} s) {plan.describe()}", flush=True)
            cfg, n = KNOWN_DIT[variant], plan.tokens
            ws = {b: attention_workspace_bytes(b, cfg.num_heads, n, n, cfg.head_dim) for b in ("sdpa", "flash", "sage")}
            print(f"{'':<36} attention workspace per self-attention call (formula, not simulated): "
                  + ", ".join(f"{b} {v / MiB:.0f} MiB" for b, v in ws.items())
                  + " - inside the planned attention phase (planner docstring)", flush=True)
            del dit
        refused = [r + (False,) for r in REFUSED] + REFUSED22
        if not args.quick:
            for variant, storage, width, height, frames, budget_gib, image in refused[len(REFUSED) * args.wan22:]:
                job = SimJob(variant, storage, width, height, frames, image=image)
                case = (f"{variant}{' I2V' if image and variant == 'TI2V-5B' else ''} {storage} "
                        f"{width}x{height}x{frames} @{budget_gib}GB")
                try:
                    plan_for(job, budget_gib * GiB - COMFY_RESERVE, te, vae22 if KNOWN_DIT[variant].out_dim == 48 else vae21, clip)
                except PlanError as err:
                    minimum = str(err).split("the minimum is ")[1].split(" GiB")[0]
                    print(f"{case:<36} refused: PlanError, minimum {minimum} GiB")
                else:
                    failures.append(f"{case}: planned although it should be refused")
                    print(f"{case:<36} NOT refused")
    print("all goals met" if not failures else "FAILED:\n  " + "\n  ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
