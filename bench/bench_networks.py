"""CPU benchmark: our DiT forward and VAE decode against diffusers, same config, same weights.

    python bench/bench_networks.py            # table + one-line summary
    python bench/bench_networks.py --json     # machine-readable results

What runs
- DiT: the real Wan 2.1 1.3B widths (dim 1536, 12 heads of 128, ffn 8960, text_dim 4096,
  freq_dim 256, text_len 512) with ``--layers`` blocks (default 2), one forward over a latent
  ``[1, 16, F, H, W]`` (default 3x16x32 -> 384 tokens) and 32 real text tokens (padded to 512
  on both sides), fp32. Ours: ``WanDiT`` via ``wan_core.loaders.load_dit`` from an
  official-layout .safetensors; theirs: ``diffusers.WanTransformer3DModel`` with
  ``load_state_dict`` of the same weights converted by diffusers' own converter.
- VAE: the real config (dim 96, z 16), decoding raw latents ``[1, 16, T', h, w]`` (default
  2x8x8 -> 5 frames of 64x64; the second latent frame runs through the feature cache) one
  latent frame at a time, as both implementations do. ``--vae-latent 3x16x16`` (9 frames of
  128x128) is closer to real work but takes ~20 s per decode on two cores.
  Ours: ``WanVAE.decode(normalized=False)`` via ``load_vae``; theirs:
  ``AutoencoderKLWan.decode(z).sample``.

Random weights come from ``tests/factory.py`` (``dit_official``/``vae_official`` and the
diffusers converters), written once to .safetensors files the workers load. Everything runs
with ``torch.set_num_threads(--threads)`` (default 2), fp32, under ``torch.no_grad()``.

Time: one process per network loads both sides, warms each up once, then calls them
``--repeats`` times in alternation (the order flips each round) and reports the median (and
min) per side. Alternating in one process keeps the ratio meaningful on a shared machine
whose load drifts; timing the sides in separate processes one after the other did not
(ratios moved by +-30 % between runs under a load average of 4-10).

Memory (Linux): each (network, side) also runs in its own fresh process: load, build the
inputs, read ``VmRSS`` ("loaded"), reset the high-water mark (``echo 5 >
/proc/self/clear_refs``), run two calls and read ``VmHWM`` ("peak": the largest resident set
during compute, weights + activations + allocator slack); "extra" = peak - loaded is what
the calls needed on top of the weights. diffusers' weights are copied into its own
parameters by ``load_state_dict`` (not ``assign``-ed from the mmap-ed file, whose pages would
count only once touched), so both sides hold every weight in ordinary memory. If the reset
is not permitted, "peak" is the whole-process high-water mark, loading included. The outputs
of the memory runs are compared (``max|diff|``) to show both sides computed the same thing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: wan_core lives in the repo root
    sys.path.insert(0, str(ROOT))
CASES = ("dit", "vae")
SIDES = ("ours", "diffusers")


# --------------------------------------------------------------------------- configs

def dit_config(layers: int):
    from wan_core.configs import DiTConfig

    # the published 1.3B widths (facts: dim 1536, 12 heads, ffn 8960), fewer blocks
    return DiTConfig(dim=1536, ffn_dim=8960, num_layers=layers, text_dim=4096, freq_dim=256)


def vae_config():
    from wan_core.configs import VAEConfig

    return VAEConfig()  # published: dim 96, z 16, mult (1, 2, 4, 4)


def _parse_shape(text: str) -> tuple[int, int, int]:
    parts = tuple(int(p) for p in text.lower().split("x"))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected FxHxW (e.g. 3x16x16), got {text!r}")
    return parts  # type: ignore[return-value]


# --------------------------------------------------------------------------- memory

def _status_kib(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in KiB (0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- weight files

def write_weights(workdir: Path, layers: int, seed: int) -> None:
    """Official-layout files for our loaders and diffusers-layout files for theirs."""
    sys.path.insert(0, str(ROOT / "tests"))
    import factory

    dit = factory.dit_official(dit_config(layers), seed)
    factory.save_safetensors(dit, workdir / "dit_official.safetensors")
    factory.save_safetensors(factory.dit_to_diffusers(dit), workdir / "dit_diffusers.safetensors")
    del dit
    vae = factory.vae_official(vae_config(), seed)
    factory.save_safetensors(vae, workdir / "vae_official.safetensors")
    factory.save_safetensors(factory.vae_to_diffusers(vae), workdir / "vae_diffusers.safetensors")


# --------------------------------------------------------------------------- worker

def _load(case: str, side: str, workdir: Path, layers: int):
    """Model on CPU in fp32, eval mode, as each side's users would load it."""
    import torch
    from safetensors.torch import load_file

    if side == "ours":
        from wan_core.loaders import load_dit, load_vae

        if case == "dit":
            return load_dit(workdir / "dit_official.safetensors").eval()
        return load_vae(workdir / "vae_official.safetensors").eval()

    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    sd = load_file(str(workdir / f"{case}_diffusers.safetensors"))
    if case == "dit":
        cfg = dit_config(layers)
        # diffusers' own Wan 2.1 T2V config (qk norm across heads, affine norm3)
        model = WanTransformer3DModel(
            patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads,
            attention_head_dim=cfg.head_dim, in_channels=cfg.in_dim, out_channels=cfg.out_dim,
            text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim,
            num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
            eps=cfg.eps, rope_max_seq_len=1024)
    else:
        from wan_core.configs import VAE_LATENT_MEAN, VAE_LATENT_STD

        cfg = vae_config()
        model = AutoencoderKLWan(
            base_dim=cfg.dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
            num_res_blocks=cfg.num_res_blocks, attn_scales=[],
            temperal_downsample=list(cfg.temporal_downsample), dropout=0.0,
            latents_mean=list(VAE_LATENT_MEAN), latents_std=list(VAE_LATENT_STD))
    # copied into the model's own parameters (no assign): the weights then live in ordinary
    # memory like ours, not in pages of the mmap-ed file that count only once touched
    model.load_state_dict(sd, strict=True)
    del sd
    return model.eval().to(torch.float32)


def _call(case: str, side: str, model, args: argparse.Namespace):
    """(zero-argument function running one forward/decode, its name for the table)."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(args.seed + 1)
    if case == "dit":
        cfg = model.cfg if side == "ours" else dit_config(args.layers)
        f, h, w = args.latent
        x = torch.randn(1, cfg.in_dim, f, h, w, generator=g)
        t = torch.tensor([700.0])
        context = torch.randn(1, args.text_tokens, cfg.text_dim, generator=g)
        if side == "ours":
            return lambda: model(x, t, context)
        padded = F.pad(context, (0, 0, 0, cfg.text_len - context.shape[1]))  # ours pads inside
        return lambda: model(x, t, padded, return_dict=False)[0]
    f, h, w = args.vae_latent
    z = torch.randn(1, 16, f, h, w, generator=g)
    if side == "ours":
        return lambda: model.decode(z, normalized=False)
    return lambda: model.decode(z).sample


def memory_worker(args: argparse.Namespace) -> None:
    """Peak RSS of one (network, side) in this fresh process; prints one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    _, case, side = args.worker.split(":")
    workdir = Path(args.workdir)
    model = _load(case, side, workdir, args.layers)
    load_peak = _status_kib("VmHWM")
    fn = _call(case, side, model, args)
    loaded = _status_kib("VmRSS")
    reset = _reset_peak()
    with torch.no_grad():
        fn()         # first call: allocator warm-up
        out = fn()   # and one in steady state
    peak = _status_kib("VmHWM")
    torch.save(out.detach().float().contiguous(), workdir / f"{case}_{side}_out.pt")
    print(json.dumps({"load_peak_mib": load_peak / 1024, "loaded_mib": loaded / 1024,
                      "peak_mib": peak / 1024, "extra_mib": (peak - loaded) / 1024,
                      "peak_reset": reset, "out_shape": list(out.shape)}))


def timing_worker(args: argparse.Namespace) -> None:
    """Both sides of one network in this process, called in alternation (the order flips each
    round) so that load from other processes on a shared machine hits both alike."""
    import torch

    torch.set_num_threads(args.threads)
    case = args.worker.split(":")[1]
    workdir = Path(args.workdir)
    fns = {side: _call(case, side, _load(case, side, workdir, args.layers), args) for side in SIDES}
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    with torch.no_grad():
        for side in SIDES:
            fns[side]()  # warm-up
        for i in range(args.repeats):
            for side in (SIDES if i % 2 == 0 else SIDES[::-1]):
                start = time.perf_counter()
                fns[side]()
                times[side].append(time.perf_counter() - start)
    print(json.dumps({side: {"times_s": t, "median_s": statistics.median(t), "min_s": min(t)}
                      for side, t in times.items()} | {"threads": torch.get_num_threads()}))


# --------------------------------------------------------------------------- driver

def _run_worker(task: str, workdir: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", task,
           "--workdir", str(workdir), "--layers", str(args.layers), "--repeats", str(args.repeats),
           "--threads", str(args.threads), "--seed", str(args.seed),
           "--latent", "x".join(map(str, args.latent)), "--text-tokens", str(args.text_tokens),
           "--vae-latent", "x".join(map(str, args.vae_latent))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"{task} worker failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _max_abs_diff(workdir: Path, case: str) -> tuple[float, float]:
    import torch

    a = torch.load(workdir / f"{case}_ours_out.pt")
    b = torch.load(workdir / f"{case}_diffusers_out.pt")
    return (a - b).abs().max().item(), b.abs().max().item()


def _table(results: dict) -> str:
    head = (f"{'network':<34} {'ours s':>8} {'diffusers s':>11} {'ratio':>6}   "
            f"{'loaded MiB ours/diff':>20} {'peak MiB ours/diff':>19} {'extra MiB ours/diff':>20}"
            f"   {'max|diff|':>9}")
    rows = [head, "-" * len(head)]
    for case in (c for c in CASES if c in results):
        r = results[case]
        o, d = r["ours"], r["diffusers"]
        rows.append(f"{r['label']:<34} {o['median_s']:>8.3f} {d['median_s']:>11.3f} {r['ratio']:>6.2f}   "
                    f"{o['loaded_mib']:>10.0f}/{d['loaded_mib']:<9.0f} "
                    f"{o['peak_mib']:>9.0f}/{d['peak_mib']:<9.0f} {o['extra_mib']:>10.0f}/{d['extra_mib']:<9.0f}"
                    f"   {r['max_abs_diff']:>9.1e}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--layers", type=int, default=2, help="DiT blocks (1.3B has 30)")
    p.add_argument("--latent", type=_parse_shape, default=(3, 16, 32), help="DiT latent FxHxW")
    p.add_argument("--text-tokens", type=int, default=32, help="real text tokens (padded to 512)")
    p.add_argument("--vae-latent", type=_parse_shape, default=(2, 8, 8), help="VAE latent FxHxW")
    p.add_argument("--repeats", type=int, default=3, help="timed calls after one warm-up (median)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=CASES, help="run one network only")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        (timing_worker if args.worker.startswith("time:") else memory_worker)(args)
        return 0

    cases = (args.only,) if args.only else CASES
    started = time.perf_counter()
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="wan_bench_") as tmp:
        workdir = Path(tmp)
        write_weights(workdir, args.layers, args.seed)
        for case in cases:
            r = {side: _run_worker(f"mem:{case}:{side}", workdir, args) for side in SIDES}
            timing = _run_worker(f"time:{case}", workdir, args)
            for side in SIDES:
                r[side].update(timing[side])
            r["ratio"] = r["ours"]["median_s"] / r["diffusers"]["median_s"]
            r["peak_ratio"] = r["ours"]["peak_mib"] / r["diffusers"]["peak_mib"]
            r["max_abs_diff"], r["max_abs_ref"] = _max_abs_diff(workdir, case)
            if case == "dit":
                f, h, w = args.latent
                r["label"] = f"DiT fwd 1536/{args.layers}L {f}x{h}x{w} ({f * h * w // 4} tok)"
            else:
                f, h, w = args.vae_latent
                r["label"] = f"VAE decode 96 {f}x{h}x{w} -> {4 * f - 3}x{8 * h}x{8 * w}"
            results[case] = r
    total = time.perf_counter() - started
    if args.json:
        print(json.dumps({"results": results, "threads": args.threads, "repeats": args.repeats,
                          "total_s": total}, indent=1))
        return 0
    print(_table(results))
    reset = all(results[c][s]["peak_reset"] for c in results for s in SIDES)
    print(f"(median of {args.repeats} alternating calls after 1 warm-up each, {args.threads} threads, fp32 CPU; peak = VmHWM "
          f"{'reset after loading' if reset else 'of the whole process'}; extra = peak - RSS after loading)")
    summary = "; ".join(f"{c.upper()} {results[c]['ratio']:.2f}x time, {results[c]['peak_ratio']:.2f}x peak RSS"
                        for c in results)
    verdict = all(results[c]["ratio"] <= 1.0 and results[c]["peak_ratio"] <= 1.0 for c in results)
    print(f"summary: ours/diffusers {summary} -> {'not slower, not bigger' if verdict else 'GOAL NOT MET'} "
          f"(total {total:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
