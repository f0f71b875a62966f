"""Print the offload planner's table: 6/8/12/16/24 GiB x the published DiTs at 480p x 81.

Sizes come from the real configs on the meta device (nothing is loaded or allocated), so
this runs anywhere in a second. For each plan: K resident blocks, where the text encoder
runs, the VAE tile, and the DiT weight bytes resident on the compute device (non-block +
K blocks) plus what streaming adds at its peak (two blocks in flight).

Usage: python bench/memory_plan.py [--width 832 --height 480 --frames 81] [--te-fp8]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wan_core.configs import KNOWN_DIT, T5Config, VAEConfig
from wan_core.planner import GiB, PlanError, dit_sizes, module_param_bytes, plan_memory, tokens_for
from wan_core.text_encoder import UMT5Encoder
from wan_core.vae import WanVAE

BUDGETS = (6, 8, 12, 16, 24)
MODELS = (("T2V-1.3B", "bf16"), ("T2V-1.3B", "fp8_e4m3fn"), ("T2V-14B", "bf16"), ("T2V-14B", "fp8_e4m3fn"),
          ("I2V-14B", "bf16"), ("I2V-14B", "fp8_e4m3fn"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--te-fp8", action="store_true", help="text encoder stored in fp8 (1 byte/param)")
    args = ap.parse_args()
    tokens = tokens_for(args.width, args.height, args.frames)
    latent = (args.height // 8, args.width // 8)
    te = module_param_bytes(UMT5Encoder, T5Config(), 1 if args.te_fp8 else 2)
    vae = module_param_bytes(WanVAE, VAEConfig(), 4)
    print(f"{args.width}x{args.height}x{args.frames}: {tokens} tokens, latent {latent[0]}x{latent[1]}; "
          f"text encoder {te / GiB:.2f} GiB, VAE {vae / GiB:.2f} GiB (float32)")
    print(f"{'budget':>6} {'model':<22} {'K':>7} {'TE':>6} {'VAE tile':>8} {'resident':>9} {'+stream':>8} "
          f"{'activ.':>7} {'DiT peak':>9}")
    for budget in BUDGETS:
        for variant, storage in MODELS:
            sizes = dit_sizes(KNOWN_DIT[variant], storage)
            name = f"{variant} {storage}"
            try:
                p = plan_memory(budget * GiB, sizes, tokens, text_encoder_bytes=te, vae_bytes=vae, latent_hw=latent)
            except PlanError as err:
                minimum = str(err).split("the minimum is ")[1].split(" GiB")[0]
                print(f"{budget:>4} GB {name:<22} {'--':>7} does not fit: needs at least {minimum} GiB")
                continue
            print(f"{budget:>4} GB {name:<22} {p.resident_blocks:>3}/{p.num_blocks:<3} "
                  f"{'cpu' if p.text_encoder_on_cpu else 'gpu':>6} {p.vae_tile or '-'!s:>8} "
                  f"{p.device_weight_bytes / GiB:>8.2f}G {p.streaming_bytes / GiB:>7.2f}G "
                  f"{p.activation_bytes / GiB:>6.2f}G {p.dit_peak_bytes / GiB:>8.2f}G")


if __name__ == "__main__":
    main()
