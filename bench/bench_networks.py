"""CPU benchmark: our networks against every peer, same config, same weights, one run.

    python bench/bench_networks.py            # table + one-line summary
    python bench/bench_networks.py --json     # machine-readable results
    WAN21_SRC=/tmp/wan21 python bench/bench_networks.py --latent 5x30x52   # + official Wan 2.1

Peers per network: DiT forward, VAE decode and VAE encode against diffusers and the official
Wan 2.1 code; the umT5 and CLIP encoders against transformers and the official code (CLIP:
the visual tower of its ``clip_xlm_roberta_vit_h_14``, called as ``CLIPModel.visual`` calls it,
``use_31_block=True``). The official code is read from an exported tree of ``Wan-Video/Wan2.1`` named by the
environment variable ``WAN21_SRC`` (``wan/modules``; never part of this repository); without
it that peer is skipped with the reason printed. Its ``flash_attention`` is replaced by SDPA
in float32 (CPU; the only change, made in this process only), its ``ftfy`` import (tokenizer
only) by an empty module. "ratio" is ours / the fastest peer.

GPU (``--device cuda --dtype bf16``, written for a lent device, not run on the CPU-only
machine it was written on): inputs and models on the device, every timed call between two
``torch.cuda.synchronize()``, "peak" = ``torch.cuda.max_memory_allocated`` after a reset;
``--attention sage|flash`` picks our DiT's kernel, ``--keep-flash`` keeps the official
flash-attn call; the DiT adds two of our sides: ``ours_fp8`` (scaled fp8 e4m3fn weights
through ``torch._scaled_mm``, compute capability >= 8.9) and ``ours_compiled`` (per-block
``torch.compile``, compiled during the warm-up call).

Our DiT side is a :class:`wan_core.runner.DiTRunner` call after one warm-up with the same
text: the steady state of a sampling step, whose cross-attention K/V of the text are computed
once per run (``ours_plain`` is the bare ``WanDiT.forward`` computing them on every call).

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

Time: one process per network loads every side, warms each up once, then calls them
``--repeats`` times in rotation (the order turns each round) and reports the median (and
min) per side. Rotating in one process keeps the ratios meaningful on a shared machine
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
for _p in (ROOT, ROOT / "bench"):  # run as a script from anywhere: wan_core lives in the repo root
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from benchlib import import_official, official_src, reset_peak, status_kib  # noqa: E402
CASES = ("dit", "vae", "vae_encode", "t5", "clip")
#: every side per network; "official" needs WAN21_SRC
PEERS: dict[str, tuple[str, ...]] = {
    "dit": ("ours", "ours_plain", "diffusers", "official"),
    "vae": ("ours", "diffusers", "official"),
    "vae_encode": ("ours", "diffusers", "official"),
    "t5": ("ours", "ours_plain", "transformers", "official"),
    "clip": ("ours", "transformers", "official"),
}
#: our GPU-only DiT variants (``--device cuda``): fp8 e4m3fn weights through torch._scaled_mm
#: (compute capability >= 8.9), and per-block torch.compile (inductor)
GPU_SIDES: dict[str, tuple[str, ...]] = {"dit": ("ours_fp8", "ours_compiled")}
OURS = ("ours", "ours_plain", "ours_fp8", "ours_compiled")


def sides(case: str, device: str = "cpu") -> tuple[str, ...]:
    """The sides run for ``case``: official only where WAN21_SRC names an exported tree; our
    GPU-only variants on a CUDA device."""
    have = official_src() is not None
    extra = GPU_SIDES.get(case, ()) if device.startswith("cuda") else ()
    return tuple(s for s in PEERS[case] + extra if s != "official" or have)


def _dtype(args: argparse.Namespace):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]


def _sync(args: argparse.Namespace) -> None:
    import torch

    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- configs

def dit_config(layers: int):
    from wan_core.configs import DiTConfig

    # the published 1.3B widths (t2v_1_3B in the official wan/configs: dim 1536, 12 heads, ffn 8960), fewer blocks
    return DiTConfig(dim=1536, ffn_dim=8960, num_layers=layers, text_dim=4096, freq_dim=256)


def vae_config():
    from wan_core.configs import VAEConfig

    return VAEConfig()  # published: dim 96, z 16, mult (1, 2, 4, 4)


def t5_config(layers: int):
    from wan_core.configs import T5Config

    # umT5-XXL widths (dim 4096, 64 heads, ffn 10240), fewer layers, a smaller vocabulary
    # (only the embedding lookup depends on it)
    return T5Config(vocab=32128, num_layers=layers)


def clip_config(layers: int):
    from wan_core.configs import CLIPVisionConfig

    return CLIPVisionConfig(num_layers=layers)  # ViT-H/14 widths, fewer blocks


def _parse_shape(text: str) -> tuple[int, int, int]:
    parts = tuple(int(p) for p in text.lower().split("x"))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected FxHxW (e.g. 3x16x16), got {text!r}")
    return parts  # type: ignore[return-value]


# --------------------------------------------------------------------------- memory

# --------------------------------------------------------------------------- weight files

def write_weights(workdir: Path, cases: tuple[str, ...], args: argparse.Namespace) -> None:
    """Official-layout files for our loaders and the official code, converted files for
    diffusers / transformers; only for the networks in ``cases``."""
    sys.path.insert(0, str(ROOT / "tests"))
    import factory

    nets = {"vae" if c == "vae_encode" else c for c in cases}
    builders = {
        "dit": (lambda: factory.dit_official(dit_config(args.layers), args.seed), "diffusers", factory.dit_to_diffusers),
        "vae": (lambda: factory.vae_official(vae_config(), args.seed), "diffusers", factory.vae_to_diffusers),
        "t5": (lambda: factory.t5_official(t5_config(args.t5_layers), args.seed), "transformers", factory.t5_to_hf),
        "clip": (lambda: factory.clip_official(clip_config(args.clip_layers), args.seed, with_textual=False),
                 "transformers", factory.clip_to_hf),
    }
    for net in sorted(nets):
        build, peer, convert = builders[net]
        sd = build()
        factory.save_safetensors(sd, workdir / f"{net}_official.safetensors")
        factory.save_safetensors(convert(sd), workdir / f"{net}_{peer}.safetensors")
        del sd


# --------------------------------------------------------------------------- worker

def _load(case: str, side: str, workdir: Path, args: argparse.Namespace):
    """Model on CPU in fp32, eval mode, as each side's users would load it."""
    import torch
    from safetensors.torch import load_file

    net = "vae" if case == "vae_encode" else case
    half = args.dtype != "fp32"
    if side in OURS:
        from wan_core.loaders import load_dit, load_vae

        if net == "dit":
            path = workdir / "dit_official.safetensors"
            if side == "ours_fp8":   # scaled fp8 storage, bf16 compute, torch._scaled_mm
                from wan_core.layers import enable_fp8_matmul

                model = load_dit(path, weight_dtype="fp8_e4m3fn", compute_dtype=torch.bfloat16,
                                 attention=args.attention).eval().to(args.device)
                enable_fp8_matmul(model, args.device)
                return model
            model = load_dit(path, dtype=_dtype(args) if half else None, attention=args.attention)
            model = model.eval().to(args.device)
            if side == "ours_compiled":
                from wan_core.compile import compile_blocks

                compile_blocks(model)
            return model
        if net == "vae":
            return load_vae(workdir / "vae_official.safetensors").eval().to(args.device)
        sd = load_file(str(workdir / f"{net}_official.safetensors"))
        if net == "t5":
            from wan_core.text_encoder import UMT5Encoder

            model = UMT5Encoder(t5_config(args.t5_layers))
        else:
            from wan_core.clip_vision import CLIPVisionTower

            model = CLIPVisionTower(clip_config(args.clip_layers))
            sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
        model.load_state_dict(sd, strict=True)
        if half:   # the network's own precision policy (its float32 parameters stay float32)
            model.precision.cast_storage(model, _dtype(args))
        return model.eval().to(args.device)

    if side == "official":
        sd = load_file(str(workdir / f"{net}_official.safetensors"))
        if net == "clip":   # the visual tower of clip_xlm_roberta_vit_h_14, as the official CLIPModel builds it
            c = clip_config(args.clip_layers)
            model = import_official("modules.clip", keep_flash=args.keep_flash).VisionTransformer(
                image_size=c.image_size, patch_size=c.patch_size, dim=c.width, mlp_ratio=c.mlp_dim // c.width,
                out_dim=c.out_dim, num_heads=c.num_heads, num_layers=c.num_layers, pool_type="token",
                pre_norm=True, post_norm=False, activation="gelu", norm_eps=c.eps)
            sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
        elif net == "dit":
            cfg = dit_config(args.layers)
            model = import_official("modules.model", keep_flash=args.keep_flash).WanModel(
                model_type="t2v", patch_size=cfg.patch_size, text_len=cfg.text_len, in_dim=cfg.in_dim,
                dim=cfg.dim, ffn_dim=cfg.ffn_dim, freq_dim=cfg.freq_dim, text_dim=cfg.text_dim,
                out_dim=cfg.out_dim, num_heads=cfg.num_heads, num_layers=cfg.num_layers, eps=cfg.eps)
        elif net == "vae":
            cfg = vae_config()
            model = import_official("modules.vae").WanVAE_(
                dim=cfg.dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult), num_res_blocks=cfg.num_res_blocks,
                attn_scales=[], temperal_downsample=list(cfg.temporal_downsample), dropout=0.0)
        else:
            c = t5_config(args.t5_layers)
            model = import_official("modules.t5").T5Encoder(c.vocab, c.dim, c.dim_attn, c.dim_ffn, c.num_heads,
                                                    c.num_layers, c.num_buckets, shared_pos=False, dropout=0.0)
        model.load_state_dict(sd, strict=True)
        del sd
        # float32 weights; with --dtype bf16/fp16 it runs under torch.autocast, as its pipelines do
        return model.eval().to(args.device, torch.float32)

    sd = load_file(str(workdir / f"{net}_{side}.safetensors"))
    if net == "dit":
        from diffusers import WanTransformer3DModel

        cfg = dit_config(args.layers)
        # diffusers' own Wan 2.1 T2V config (qk norm across heads, affine norm3)
        model = WanTransformer3DModel(
            patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads,
            attention_head_dim=cfg.head_dim, in_channels=cfg.in_dim, out_channels=cfg.out_dim,
            text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim,
            num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
            eps=cfg.eps, rope_max_seq_len=1024)
    elif net == "vae":
        from diffusers import AutoencoderKLWan

        from wan_core.configs import VAE_LATENT_MEAN, VAE_LATENT_STD

        cfg = vae_config()
        model = AutoencoderKLWan(
            base_dim=cfg.dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
            num_res_blocks=cfg.num_res_blocks, attn_scales=[],
            temperal_downsample=list(cfg.temporal_downsample), dropout=0.0,
            latents_mean=list(VAE_LATENT_MEAN), latents_std=list(VAE_LATENT_STD))
    elif net == "t5":
        from transformers import UMT5Config, UMT5EncoderModel

        c = t5_config(args.t5_layers)
        hc = UMT5Config(vocab_size=c.vocab, d_model=c.dim, d_kv=c.dim_attn // c.num_heads, d_ff=c.dim_ffn,
                        num_layers=c.num_layers, num_heads=c.num_heads, relative_attention_num_buckets=c.num_buckets,
                        relative_attention_max_distance=c.max_distance, layer_norm_epsilon=c.eps,
                        feed_forward_proj="gated-gelu", dropout_rate=0.0)
        model = UMT5EncoderModel(hc)
        model.load_state_dict(sd, strict=False)   # encoder.embed_tokens is tied to shared
        return model.eval().to(args.device, _dtype(args))
    else:
        from transformers import CLIPVisionConfig as HFCLIPVisionConfig
        from transformers import CLIPVisionModelWithProjection

        c = clip_config(args.clip_layers)
        hc = HFCLIPVisionConfig(hidden_size=c.width, intermediate_size=c.mlp_dim, num_hidden_layers=c.num_layers,
                                num_attention_heads=c.num_heads, image_size=c.image_size, patch_size=c.patch_size,
                                hidden_act="gelu", layer_norm_eps=c.eps, projection_dim=c.out_dim)
        hc._attn_implementation = "sdpa"
        model = CLIPVisionModelWithProjection(hc)
    # copied into the model's own parameters (no assign): the weights then live in ordinary
    # memory like ours, not in pages of the mmap-ed file that count only once touched
    model.load_state_dict(sd, strict=True)
    del sd
    return model.eval().to(args.device, _dtype(args))


def _call(case: str, side: str, model, args: argparse.Namespace):
    """:func:`_call_on` with the inputs on ``--device``; the official code under
    ``torch.autocast`` for a half ``--dtype`` (its own pipelines' way)."""
    import contextlib

    import torch

    fn = _call_on(case, side, model, args)
    if side != "official" or args.dtype == "fp32":
        return fn
    device_type = torch.device(args.device).type

    def autocast_call():
        with torch.autocast(device_type, dtype=_dtype(args)) if device_type == "cuda" else contextlib.nullcontext():
            return fn()
    return autocast_call


def _call_on(case: str, side: str, model, args: argparse.Namespace):
    """A zero-argument function running one forward / decode / encode; all sides of a case
    return the same quantity (compared as ``max|diff|``)."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(args.seed + 1)
    dev = args.device
    if case == "dit":
        cfg = dit_config(args.layers)
        f, h, w = args.latent
        x = torch.randn(1, cfg.in_dim, f, h, w, generator=g).to(dev)
        t = torch.tensor([700.0], device=dev)
        context = torch.randn(1, args.text_tokens, cfg.text_dim, generator=g).to(dev)
        if side in ("ours", "ours_fp8", "ours_compiled"):   # a sampling step: the runner, its text K/V kept
            from wan_core.runner import DiTRunner

            runner = DiTRunner(model, context_cache=True)
            runner.begin_run(1)
            return lambda: runner(x, t, context, branch="cond")
        if side == "ours_plain":
            return lambda: model(x, t, context)
        if side == "official":
            return lambda: model([x[0]], t, [context[0]], f * h * w // 4)[0][None]
        padded = F.pad(context, (0, 0, 0, cfg.text_len - context.shape[1]))  # ours pads inside
        return lambda: model(x, t, padded, return_dict=False)[0]
    if case == "vae":
        f, h, w = args.vae_latent
        z = torch.randn(1, 16, f, h, w, generator=g).to(dev)
        if side == "ours":
            return lambda: model.decode(z, normalized=False)
        if side == "official":
            # z / 1 + 0: raw latents, as ours; clamped like its WanVAE.decode wrapper (and ours)
            return lambda: model.decode(z, [0.0, 1.0]).clamp_(-1.0, 1.0)
        return lambda: model.decode(z).sample
    if case == "vae_encode":
        f, h, w = args.vae_latent
        video = (torch.rand(1, 3, 4 * (f - 1) + 1, 8 * h, 8 * w, generator=g) * 2 - 1).to(dev)
        if side == "ours":
            return lambda: model.encode(video, normalize=False)
        if side == "official":
            return lambda: model.encode(video, [0.0, 1.0])   # the mean, un-normalized
        return lambda: model.encode(video).latent_dist.mode()
    if case == "t5":
        c = t5_config(args.t5_layers)
        ids = torch.randint(4, c.vocab, (1, c.text_len), generator=g)
        mask = torch.ones(1, c.text_len, dtype=torch.int64)
        ids[0, args.text_tokens:], mask[0, args.text_tokens:] = 0, 0   # padded to 512 as upstream
        ids, mask = ids.to(dev), mask.to(dev)
        n = args.text_tokens
        if side == "ours":   # wan_core.text_encoder.encode_text: the padding is not computed
            return lambda: model(ids[:, :n])
        if side in ("ours_plain", "official"):   # 512 tokens, as the official T5EncoderModel
            return lambda: model(ids, mask)[:, :n]
        return lambda: model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :n]
    c = clip_config(args.clip_layers)
    pixels = torch.randn(1, 3, c.image_size, c.image_size, generator=g).to(dev, _dtype(args))
    if side == "ours":
        return lambda: model(pixels)
    if side == "official":   # CLIPModel.visual: the output of the first 31 blocks
        return lambda: model(pixels, use_31_block=True)
    return lambda: model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]


def memory_worker(args: argparse.Namespace) -> None:
    """Peak RSS (on a GPU: peak allocated device memory) of one (network, side) in this fresh
    process; prints one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    _, case, side = args.worker.split(":")
    workdir = Path(args.workdir)
    cuda = args.device.startswith("cuda")
    model = _load(case, side, workdir, args)
    _sync(args)

    def now(field: str) -> int:   # KiB
        if not cuda:
            return status_kib(field)
        return (torch.cuda.max_memory_allocated() if field == "VmHWM" else torch.cuda.memory_allocated()) // 1024

    load_peak = now("VmHWM")
    fn = _call(case, side, model, args)
    loaded = now("VmRSS")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        reset = True
    else:
        reset = reset_peak()
    with torch.no_grad():
        fn()         # first call: allocator warm-up (and, ours, the per-run text K/V)
        out = fn()   # and one in steady state
    _sync(args)
    peak = now("VmHWM")
    torch.save(out.detach().float().cpu().contiguous(), workdir / f"{case}_{side}_out.pt")
    print(json.dumps({"load_peak_mib": load_peak / 1024, "loaded_mib": loaded / 1024,
                      "peak_mib": peak / 1024, "extra_mib": (peak - loaded) / 1024,
                      "peak_reset": reset, "out_shape": list(out.shape)}))


def timing_worker(args: argparse.Namespace) -> None:
    """Every side of one network in this process, called in rotation (the order turns each
    round) so that load from other processes on a shared machine hits all alike."""
    import torch

    torch.set_num_threads(args.threads)
    case = args.worker.split(":")[1]
    workdir = Path(args.workdir)
    order = sides(case, args.device)
    fns = {side: _call(case, side, _load(case, side, workdir, args), args) for side in order}
    times: dict[str, list[float]] = {side: [] for side in order}
    with torch.no_grad():
        for side in order:
            fns[side]()  # warm-up (compiled blocks: the compilation)
        for i in range(args.repeats):
            k = i % len(order)
            for side in order[k:] + order[:k]:
                _sync(args)
                start = time.perf_counter()
                fns[side]()
                _sync(args)
                times[side].append(time.perf_counter() - start)
    print(json.dumps({side: {"times_s": t, "median_s": statistics.median(t), "min_s": min(t)}
                      for side, t in times.items()} | {"threads": torch.get_num_threads()}))


# --------------------------------------------------------------------------- driver

def _run_worker(task: str, workdir: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", task,
           "--workdir", str(workdir), "--layers", str(args.layers), "--repeats", str(args.repeats),
           "--threads", str(args.threads), "--seed", str(args.seed), "--t5-layers", str(args.t5_layers),
           "--clip-layers", str(args.clip_layers),
           "--latent", "x".join(map(str, args.latent)), "--text-tokens", str(args.text_tokens),
           "--vae-latent", "x".join(map(str, args.vae_latent)), "--device", args.device, "--dtype", args.dtype,
           "--attention", args.attention] + (["--keep-flash"] if args.keep_flash else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"{task} worker failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _max_abs_diff(workdir: Path, case: str, side: str) -> float:
    """max|ours - side| of the memory runs' outputs."""
    import torch

    a = torch.load(workdir / f"{case}_ours_out.pt")
    b = torch.load(workdir / f"{case}_{side}_out.pt")
    return (a - b).abs().max().item()


def _label(case: str, args: argparse.Namespace) -> str:
    if case == "dit":
        f, h, w = args.latent
        return f"DiT fwd 1536/{args.layers}L {f}x{h}x{w} ({f * h * w // 4} tok)"
    f, h, w = args.vae_latent
    if case == "vae":
        return f"VAE decode {f}x{h}x{w} -> {4 * f - 3}x{8 * h}x{8 * w}"
    if case == "vae_encode":
        return f"VAE encode {4 * f - 3}x{8 * h}x{8 * w} -> {f}x{h}x{w}"
    if case == "t5":
        return f"umT5 4096/{args.t5_layers}L 512 tok ({args.text_tokens} real)"
    return f"CLIP ViT-H/14 {args.clip_layers}L 224px"


def _table(results: dict) -> str:
    head = (f"{'network':<38} {'side':<12} {'median s':>9} {'min s':>8} {'vs best':>8}   "
            f"{'loaded MiB':>10} {'peak MiB':>9} {'extra MiB':>9}   {'max|d ours|':>11}")
    rows = [head, "-" * len(head)]
    for case in (c for c in CASES if c in results):
        r = results[case]
        for n, side in enumerate(r["sides"]):
            o = r[side]
            rows.append(f"{r['label'] if n == 0 else '':<38} {side:<12} {o['median_s']:>9.3f} {o['min_s']:>8.3f} "
                        f"{o['median_s'] / r['best_peer_s']:>8.2f}   " + (
                            f"{o['loaded_mib']:>10.0f} {o['peak_mib']:>9.0f} {o['extra_mib']:>9.0f}   "
                            f"{o['max_abs_diff']:>11.1e}" if "peak_mib" in o else f"{'(--no-memory)':>43}"))
        rows.append(f"{'':<38} -> ours / best peer ({r['best_peer']}) = {r['ratio']:.3f}")
    return "\n".join(rows)


#: Issue 17's goals: ours / the best peer at most this
GOALS = {"dit": 0.90, "vae": 0.85, "vae_encode": 1.0, "t5": 1.0, "clip": 1.0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--layers", type=int, default=2, help="DiT blocks (1.3B has 30)")
    p.add_argument("--t5-layers", type=int, default=2, help="umT5 blocks (24 published)")
    p.add_argument("--clip-layers", type=int, default=32,
                   help="CLIP blocks (32 published; Wan reads the penultimate block's output, which ours "
                        "stops at, while transformers runs them all)")
    p.add_argument("--latent", type=_parse_shape, default=(3, 16, 32), help="DiT latent FxHxW")
    p.add_argument("--text-tokens", type=int, default=32, help="real text tokens (padded to 512)")
    p.add_argument("--vae-latent", type=_parse_shape, default=(2, 8, 8), help="VAE latent FxHxW")
    p.add_argument("--repeats", type=int, default=3, help="timed calls after one warm-up (median)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: on a GPU our fp8 (_scaled_mm) and "
                   "compiled DiT sides run too, times are synchronized and 'peak' is torch.cuda.max_memory_allocated")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="weights / compute dtype (GPU runs: bf16); the official code runs float32 weights under "
                        "torch.autocast of this dtype, as its pipelines do")
    p.add_argument("--attention", choices=("sdpa", "auto", "sage", "flash"), default="sdpa",
                   help="our DiT's attention backend (sage / flash: CUDA with the package installed)")
    p.add_argument("--keep-flash", action="store_true",
                   help="the official code keeps its flash-attn call (a GPU with flash-attn) instead of SDPA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=CASES, action="append", help="run these networks only (repeatable)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-side peak-RSS processes")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        (timing_worker if args.worker.startswith("time:") else memory_worker)(args)
        return 0

    cases = tuple(args.only) if args.only else CASES
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            p.error(f"--device {args.device}: this torch has no CUDA device (torch {torch.__version__})")
    if official_src() is None:
        print("official Wan 2.1 peer skipped: set WAN21_SRC to an exported Wan-Video/Wan2.1 tree "
              "(the directory holding wan/modules/model.py)")
    started = time.perf_counter()
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="wan_bench_") as tmp:
        workdir = Path(tmp)
        write_weights(workdir, cases, args)
        for case in cases:
            order = sides(case, args.device)
            r: dict = {"sides": list(order), "label": _label(case, args)}
            timing = _run_worker(f"time:{case}", workdir, args)
            for side in order:
                r[side] = dict(timing[side])
                if not args.no_memory:
                    r[side].update(_run_worker(f"mem:{case}:{side}", workdir, args))
            if not args.no_memory:
                for side in order:
                    r[side]["max_abs_diff"] = _max_abs_diff(workdir, case, side)
            peers = [s for s in order if s not in OURS]
            best = min(peers, key=lambda s: r[s]["median_s"])
            r["best_peer"], r["best_peer_s"] = best, r[best]["median_s"]
            r["ratio"] = r["ours"]["median_s"] / r["best_peer_s"]
            results[case] = r
    total = time.perf_counter() - started
    if args.json:
        print(json.dumps({"results": results, "threads": args.threads, "repeats": args.repeats,
                          "total_s": total, "load_avg": os.getloadavg()}, indent=1))
        return 0
    print(_table(results))
    where = f"{args.threads} threads, {args.dtype} CPU" if args.device == "cpu" else f"{args.dtype} {args.device}"
    print(f"(median of {args.repeats} calls in rotation after 1 warm-up each, {where}, "
          f"load average {os.getloadavg()[0]:.1f}; peak = VmHWM after loading; extra = peak - RSS after loading)")
    summary = "; ".join(f"{c} {results[c]['ratio']:.2f}x (goal <= {GOALS[c]:.2f})" for c in results)
    verdict = all(results[c]["ratio"] <= GOALS[c] for c in results)
    print(f"summary: ours / best peer: {summary} -> {'goals met' if verdict else 'GOAL NOT MET'} "
          f"(total {total:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
