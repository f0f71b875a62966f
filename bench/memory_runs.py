"""RSS across repeated generations in one process (the "RAM grows run after run" complaint).

Writes the selftest's tiny random models (``wan_core.selftest``), then runs ``--runs``
text-to-video generations through ``wan_core.generate``; every run loads the text encoder
from its file (load, encode, release), samples with the loaded DiT and decodes with the VAE.
Prints VmRSS after each run (after ``gc.collect()``), and the drift from run 1 to the last.

    python bench/memory_runs.py --runs 20 --steps 2 --size 64x48 --frames 5
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_bytes() -> int:
    gc.collect()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--size", default="64x48", help="WxH, multiples of 16")
    ap.add_argument("--frames", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from wan_core import generate, load_dit, load_vae
    from wan_core.selftest import write_selftest_models

    torch.set_num_threads(args.threads)
    width, height = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="wan_memory_runs_") as tmp:
        paths = write_selftest_models(tmp)
        dit = load_dit(paths.dit_t2v, dtype=torch.float32)
        vae = load_vae(paths.vae)
        job = dict(dit=dit, vae=vae, text_encoder=paths.text_encoder, prompt="a cat walks on the grass",
                   width=width, height=height, frames=args.frames, steps=args.steps)
        print(f"before runs: RSS {rss_bytes() / 2**20:.1f} MiB", flush=True)
        for i in range(args.warmup):
            generate(**job, seed=i)
        print(f"after {args.warmup} warm-up runs: RSS {rss_bytes() / 2**20:.1f} MiB", flush=True)
        rss = []
        for i in range(args.runs):
            t0 = time.perf_counter()
            generate(**job, seed=i)
            rss.append(rss_bytes())
            print(f"run {i + 1:2d}: RSS {rss[-1] / 2**20:.1f} MiB ({time.perf_counter() - t0:.2f} s)", flush=True)
    drift = (rss[-1] - rss[0]) / rss[0]
    print(f"drift run 1 -> run {args.runs}: {(rss[-1] - rss[0]) / 2**20:+.1f} MiB ({drift:+.2%}); "
          f"max over runs {max(rss) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
