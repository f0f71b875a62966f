"""Peak RSS of the Wan VAE decode on CPU: untiled vs tiled, and the activation fit.

Every measurement runs in a fresh subprocess (so VmHWM is that decode's own peak) with the
real Wan 2.1 VAE config (dim 96, 127M parameters) and deterministic random weights scaled
to keep activations O(1). Nothing is downloaded.

    python bench/memory_vae.py                       # 832x480, 5 frames: untiled vs tiled
    python bench/memory_vae.py --size 832x480 --frames 5 --tile 32 --overlap 8
    python bench/memory_vae.py --fit                 # bytes per latent pixel (decode, encode)

Prints peak RSS (VmHWM) of each child, RSS before the decode (weights + torch), the
ratio tiled/untiled and the max / mean abs difference between the two videos.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _build_vae(seed: int = 0):
    import torch

    from wan_core.configs import VAEConfig
    from wan_core.vae import WanVAE

    with torch.device("meta"):
        vae = WanVAE(VAEConfig())
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in vae.state_dict().items():
        if name.endswith("gamma"):
            state[name] = 1 + 0.1 * torch.randn(p.shape, generator=g)
        elif name.endswith("bias"):
            state[name] = 0.05 * torch.randn(p.shape, generator=g)
        else:
            fan_in = max(1, p.numel() // max(1, p.shape[0]))
            state[name] = torch.randn(p.shape, generator=g) / math.sqrt(fan_in)
    vae.load_state_dict(state, strict=True, assign=True)
    return vae.eval()


def child(args: argparse.Namespace) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(args.threads)
    from wan_core.vae_tiling import decode_tiled, encode_tiled

    vae = _build_vae()
    h, w = args.latent
    g = torch.Generator().manual_seed(1)
    if args.mode == "encode":
        video = torch.rand(1, 3, 4 * args.latent_frames - 3, h * 8, w * 8, generator=g) * 2 - 1
    else:
        latents = torch.randn(1, 16, args.latent_frames, h, w, generator=g)
    with torch.no_grad():  # warm-up at a tiny size: kernels and allocator pools, not counted
        decode_tiled(vae, torch.randn(1, 16, 2, 2, 2), tile=None)
    before = _status("VmRSS")
    hwm_before = _status("VmHWM")
    if args.mode == "encode":
        out = encode_tiled(vae, video, tile=None)
    else:
        tile = None if args.tile == 0 else args.tile
        out = decode_tiled(vae, latents, tile=tile, overlap=args.overlap)
    peak = _status("VmHWM")
    if args.save:
        torch.save(out, args.save)
    print(json.dumps({"before": before, "hwm_before": hwm_before, "peak": peak,
                      "growth": peak - max(before, hwm_before) if peak > hwm_before else peak - before}))


def _run_child(extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode:
        raise RuntimeError(f"child failed ({res.returncode}): {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _fit(points: list[tuple[int, int]]) -> tuple[float, float]:
    n = len(points)
    mx = sum(p for p, _ in points) / n
    my = sum(b for _, b in points) / n
    slope = sum((p - mx) * (b - my) for p, b in points) / sum((p - mx) ** 2 for p, _ in points)
    return slope, my - slope * mx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="decode", choices=("decode", "encode"), help=argparse.SUPPRESS)
    ap.add_argument("--latent", type=lambda s: tuple(int(v) for v in s.split("x")), default=None,
                    help=argparse.SUPPRESS)
    ap.add_argument("--save", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--size", default="832x480", help="video WxH (multiples of 8)")
    ap.add_argument("--frames", type=int, default=5, help="video frames, 4n+1")
    ap.add_argument("--tile", type=int, default=40, help="tile side in latent pixels (0: untiled)")
    ap.add_argument("--overlap", type=int, default=8, help="tile overlap in latent pixels")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fit", action="store_true", help="fit activation bytes per latent pixel")
    ap.add_argument("--fit-sizes", default="8,16,24", help="latent tile sides for --fit")
    args = ap.parse_args()
    args.latent_frames = (args.frames - 1) // 4 + 1
    if args.child:
        child(args)
        return
    common = ["--threads", str(args.threads), "--frames", str(args.frames), "--overlap", str(args.overlap)]
    if args.fit:
        for mode in ("decode", "encode"):
            points = []
            for side in (int(v) for v in args.fit_sizes.split(",")):
                r = _run_child(common + ["--mode", mode, "--latent", f"{side}x{side}", "--tile", "0"])
                points.append((side * side, r["peak"] - r["before"]))
                print(f"{mode} {side}x{side} latent ({8 * side}x{8 * side} px, {args.frames} frames): "
                      f"RSS before {r['before'] / 2**20:.0f} MiB, peak {r['peak'] / 2**20:.0f} MiB, "
                      f"growth {(r['peak'] - r['before']) / 2**20:.0f} MiB", flush=True)
            slope, icpt = _fit(points)
            print(f"{mode}: {slope:,.0f} bytes per latent pixel + {icpt / 2**20:.0f} MiB (fp32, dim 96)", flush=True)
        return
    w, h = (int(v) for v in args.size.split("x"))
    latent = f"{h // 8}x{w // 8}"
    with tempfile.TemporaryDirectory() as tmp:
        a, b = os.path.join(tmp, "untiled.pt"), os.path.join(tmp, "tiled.pt")
        un = _run_child(common + ["--latent", latent, "--tile", "0", "--save", a])
        print(f"untiled {w}x{h}x{args.frames}: peak RSS {un['peak'] / 2**20:.0f} MiB "
              f"(before decode {un['before'] / 2**20:.0f} MiB)", flush=True)
        ti = _run_child(common + ["--latent", latent, "--tile", str(args.tile), "--save", b])
        print(f"tiled {args.tile}x{args.tile} latent, overlap {args.overlap}: peak RSS {ti['peak'] / 2**20:.0f} MiB "
              f"(before decode {ti['before'] / 2**20:.0f} MiB)", flush=True)
        import torch

        x, y = torch.load(a), torch.load(b)
        diff = (x - y).abs()
        print(f"peak ratio tiled/untiled {ti['peak'] / un['peak']:.2f}; growth ratio "
              f"{(ti['peak'] - ti['before']) / max(1, un['peak'] - un['before']):.2f}; "
              f"max abs diff {diff.max().item():.4f}, mean abs diff {diff.mean().item():.5f}")


if __name__ == "__main__":
    main()
