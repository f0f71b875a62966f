"""Long videos: context windows vs one window, measured on the CPU and planned for a 14B GPU run.

1. A tiny random-weight T2V DiT (dim 256, 2 blocks, head_dim 128) samples a 257-frame video
   (65 latent frames) at ``--size`` pixels for ``--steps`` steps, once as one window and once
   with context windows (81 frames, overlap 48: windows of 21 latent frames). Each mode runs
   in its own process so ``ru_maxrss`` is that mode's peak RSS; reported: peak RSS, seconds
   per step, and the ratios (windows / one window).
2. The planner (:func:`wan_core.plan_memory`, no GPU needed) for Wan 2.1 T2V 14B, fp8 weights,
   832x480 x 257 frames at an 8 GiB budget: one window (all 101,400 tokens attend at once;
   the planner refuses it and names the minimum budget) vs context windows (planned for one
   window, 21 latent frames = 32,760 tokens), with the DiT peak and resident blocks.

Usage: python bench/long_video.py [--size 128] [--steps 2]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GiB = 1 << 30
FRAMES = 257


def run_mode(mode: str, size: int, steps: int) -> dict:
    """One sampling run in this process; returns peak RSS (bytes) and seconds per step."""
    import torch

    from wan_core import ContextOptions, SamplerSettings, TextEmbeds, latent_shape, sample
    from wan_core.configs import DiTConfig
    from wan_core.dit import WanDiT

    torch.manual_seed(0)
    torch.set_num_threads(2)
    dit = WanDiT(DiTConfig(dim=256, ffn_dim=384, num_layers=2, text_dim=64, freq_dim=64)).eval()
    g = torch.Generator().manual_seed(1)
    text = TextEmbeds(torch.randn(8, 64, generator=g), torch.randn(8, 64, generator=g))
    context = ContextOptions(context_frames=81, overlap=48) if mode == "windows" else None
    times: list[float] = []
    last = [time.perf_counter()]

    def tick(_info) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    settings = SamplerSettings(steps=steps, cfg=5.0, shift=5.0, seed=0, sampler="euler")
    sample(dit, text, settings, shape=latent_shape(size, size, FRAMES), context=context, callback=tick)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # KiB on Linux
    return {"mode": mode, "peak_rss": rss, "s_per_step": sum(times) / len(times),
            "windows": len(context.windows(65)) if context else 1}


def planner_figures() -> list[dict]:
    from wan_core import PlanError, dit_sizes, plan_memory, tokens_for
    from wan_core.configs import KNOWN_DIT

    sizes = dit_sizes(KNOWN_DIT["T2V-14B"], "fp8_e4m3fn")
    out = []
    for mode, frames in (("one window", FRAMES), ("windows of 81", 81)):
        try:
            plan = plan_memory(8 * GiB, sizes, tokens_for(832, 480, frames), latent_hw=(60, 104))
        except PlanError as err:
            out.append({"mode": mode, "tokens": tokens_for(832, 480, frames), "refused": str(err)})
            continue
        out.append({"mode": mode, "tokens": plan.tokens, "resident_blocks": plan.resident_blocks,
                    "num_blocks": plan.num_blocks, "activation_gib": plan.activation_bytes / GiB,
                    "dit_peak_gib": plan.dit_peak_bytes / GiB})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=128, help="width = height in pixels (multiple of 16)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--mode", choices=("one", "windows"), help=argparse.SUPPRESS)   # child process
    args = p.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.size, args.steps)))
        return 0
    results = {}
    for mode in ("one", "windows"):
        child = subprocess.run([sys.executable, __file__, "--mode", mode, "--size", str(args.size), "--steps",
                                str(args.steps)], capture_output=True, text=True, check=True)
        results[mode] = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"tiny T2V DiT, {args.size}x{args.size} x {FRAMES} frames (65 latent), {args.steps} euler steps, CPU:")
    for mode, r in results.items():
        print(f"  {mode:8s} {r['windows']:2d} window(s)  peak RSS {r['peak_rss'] / 2**20:8.1f} MiB   "
              f"{r['s_per_step']:.2f} s/step")
    one, win = results["one"], results["windows"]
    print(f"  ratio windows/one: peak RSS {win['peak_rss'] / one['peak_rss']:.2f}, time per step "
          f"{win['s_per_step'] / one['s_per_step']:.2f}")
    print("planner, T2V 14B fp8, 832x480 x 257 frames, 8 GiB budget:")
    for r in planner_figures():
        if "refused" in r:
            print(f"  {r['mode']:14s} {r['tokens']:6d} tokens  refused: {r['refused']}")
            continue
        print(f"  {r['mode']:14s} {r['tokens']:6d} tokens  {r['resident_blocks']}/{r['num_blocks']} blocks resident  "
              f"activations {r['activation_gib']:.2f} GiB  DiT peak {r['dit_peak_gib']:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
