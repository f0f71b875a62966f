"""Step-cache benchmark on tiny random models: DiT evaluations saved vs output deviation.

    python bench/step_cache.py                      # table (markdown)
    python bench/step_cache.py --steps 50 --json    # machine-readable

What runs: the self-test models (``wan_core.selftest.write_selftest_models``: DiT T2V dim 256,
2 blocks, random weights; tiny VAE) sample one T2V video (default 30 unipc steps, cfg 5,
shift 5, 128x128x17 -> latents [16, 5, 16, 16], 320 tokens) without a cache, then with
TeaCache (published T2V-1.3B coefficients, modes "e" and "e0"), MagCache with the published
T2V-1.3B ratios, TeaCache on the raw relative L1 of ``e`` (polynomial ``x``; the published
ones do not transfer to random weights, see below) and MagCache with ratios calibrated on this model by
:class:`~wan_core.step_cache.MagCalibrator` during the uncached run (same seed, so this is
in-sample). For each: block evaluations computed / total (cond + uncond), the fraction
saved, the deviation of the latents from the uncached ones (relative L2 and PSNR with the
reference's value range as peak) and of the decoded frames (PSNR, 0..1 pixels), wall time.

What it does NOT tell: quality on real weights. The published coefficients and ratios were
fitted on the real 1.3B/14B models; on random weights the time embedding and residual
magnitudes behave differently (here rel-L1(e) is 0.6..0.9 per step: the published "e"
polynomial turns that into 100s, so it never skips; the "e0" one into large negative values,
so it skips every allowed step), so which threshold skips how much differs from real runs,
and a tiny model's blocks are not > 99 % of the step cost as on a real model, so the wall
time understates the speed-up. Real figures need real weights and a GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wan_core import SamplerSettings, TextEmbeds, latent_shape, load_dit, load_text_encoder, load_vae, sample  # noqa: E402
from wan_core.pipeline import frames_from_video  # noqa: E402
from wan_core.runner import DiTRunner  # noqa: E402
from wan_core.selftest import write_selftest_models  # noqa: E402
from wan_core.step_cache import MagCache, MagCalibrator, TeaCache  # noqa: E402


def _psnr(a: torch.Tensor, ref: torch.Tensor, peak: float) -> float:
    mse = (a.double() - ref.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--size", default="128x128x17", help="WxHxFRAMES")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    w, h, f = (int(v) for v in args.size.split("x"))
    settings = SamplerSettings(steps=args.steps, cfg=5.0, shift=5.0, seed=args.seed)

    with tempfile.TemporaryDirectory(prefix="wan_core_cachebench_") as tmp:
        paths = write_selftest_models(tmp, args.seed)
        dit = load_dit(paths.dit_t2v, dtype=torch.float32, device=args.device)
        vae = load_vae(paths.vae, device=args.device)
        te = load_text_encoder(paths.text_encoder, dtype=torch.float32, device=args.device)
    pos, neg = te.encode(["a cat walks on the grass, realistic style", ""])
    text = TextEmbeds(pos.float().cpu(), neg.float().cpu())
    shape = latent_shape(w, h, f)

    def run(cache):
        t0 = time.perf_counter()
        lat = sample(dit, text, settings, shape=shape, runner=DiTRunner(dit, step_cache=cache))
        sec = time.perf_counter() - t0
        frames = frames_from_video(vae.decode(lat[None].to(args.device)))
        return lat, frames, sec

    calib = MagCalibrator()
    ref_lat, ref_frames, ref_sec = run(calib)
    ratios = calib.table()
    peak = (ref_lat.max() - ref_lat.min()).item()
    configs = [("none", "-", None)]
    configs += [("TeaCache e", f"thresh {t:g}", TeaCache.for_model(dit, t)) for t in (0.05, 0.1, 0.2, 0.3)]
    configs += [("TeaCache e0", f"thresh {t:g}", TeaCache.for_model(dit, t, mode="e0")) for t in (0.1, 0.2, 0.3)]
    # On random weights rel-L1(e) is 0.6..0.9 per step (real models: a few 1e-2), far outside
    # the range the published polynomials were fitted on; the raw (unrescaled) distance shows
    # the mechanics instead.
    configs += [("TeaCache raw", f"thresh {t:g}", TeaCache(t, coefficients=(1.0, 0.0))) for t in (1.0, 2.0, 4.0)]
    for label, kw in (("MagCache 1.3B", {}), ("MagCache calib.", {"ratios": ratios})):
        for t, k in ((0.06, 2), (0.12, 2), (0.12, 4), (0.24, 6)):
            cache = MagCache(t, k=k, ratios=kw["ratios"]) if kw else MagCache.for_model(dit, t, k=k)
            configs.append((label, f"E{t:g} K{k} R0.2", cache))

    rows = []
    for method, setting, cache in configs:
        if cache is None:
            lat, frames, sec = ref_lat, ref_frames, ref_sec
            computed, total = 2 * args.steps, 2 * args.steps
        else:
            lat, frames, sec = run(cache)
            counts = cache.counts().values()
            computed, total = sum(c.computed for c in counts), sum(c.total for c in counts)
        rel = ((lat - ref_lat).norm() / ref_lat.norm()).item()
        rows.append({"method": method, "setting": setting, "computed": computed, "total": total,
                     "saved": 1 - computed / total, "latent_rel_l2": rel, "latent_psnr": _psnr(lat, ref_lat, peak),
                     "frames_psnr": _psnr(frames, ref_frames, 1.0), "seconds": sec,
                     "summary": "" if cache is None else cache.summary()})

    if args.json:
        print(json.dumps(rows, indent=1))
        return rows
    print(f"Step caches on the tiny self-test T2V DiT (random weights), {w}x{h}x{f}, {args.steps} unipc steps, "
          f"cfg 5, seed {args.seed}, {args.device}, {args.threads} thread(s)\n")
    print("| method | setting | blocks computed | saved | latent rel. L2 | latent PSNR dB | frames PSNR dB | time s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['setting']} | {r['computed']}/{r['total']} | {100 * r['saved']:.0f}% | "
              f"{r['latent_rel_l2']:.4f} | {r['latent_psnr']:.1f} | {r['frames_psnr']:.1f} | {r['seconds']:.2f} |")
    print("\nQuality on real weights needs the real models and a GPU; these figures show the mechanics only.")
    return rows


if __name__ == "__main__":
    main()
