"""GGUF weights: per-call dequantization cost, device memory plans, host RAM of a 14B load.

Three measurements (ratios are taken within the same run):

1. ``speed``: one Linear ``[out, in]`` applied to ``[tokens, in]`` float32 on the CPU, per
   GGML type: the float32 Linear (reference), :class:`wan_core.quant.QuantLinear`
   (dequantize with the torch kernels, then matmul), and the ``gguf`` package's numpy
   dequantizer + the same matmul; plus the dequantization alone, torch vs numpy.
2. ``vram``: I2V-14B 480p x 81 frames at Q4_K_M, Q5_K_M and Q8_0 (ComfyUI-GGUF's mixes:
   K_M puts the attention ``v`` and ``ffn.2`` in Q6_K) with an 8 GB budget: the planner's DiT
   plan from the sizes as the loader stores them, and (``--simulate``) the DiT step simulated
   on a fake GPU (:mod:`wan_core.memsim`) with the real QuantLinear code.
3. ``ram``: writes a real-shape 14B Q4_K_M DiT GGUF with random valid blocks to ``--tmp``
   (free disk checked first; deleted afterwards), loads it with ``load_dit`` in a fresh
   process and reports its peak RSS (goal: <= 12 GB).

Usage: python bench/gguf_bench.py [speed] [vram] [ram] [--simulate] [--variant T2V-14B] [--tmp /tmp]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from wan_core.configs import KNOWN_DIT  # noqa: E402
from wan_core.quant import FORMATS, QuantLinear, dequantize  # noqa: E402

GiB = 1 << 30
_BLOCK_LINEAR = re.compile(r"^blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.([qkvo]|k_img|v_img)|ffn\.[02])\.weight$")
# ComfyUI-GGUF's llama-quantize rules for Wan (tools/lcpp.patch, img_tensor_get_type)
MIXES = {"Q4_K_M": ("Q4_K", "Q6_K"), "Q5_K_M": ("Q5_K", "Q6_K"), "Q8_0": ("Q8_0", "Q8_0")}


def qtype_of(name: str, mix: str) -> str | None:
    """GGML type of a DiT tensor in a ComfyUI-GGUF file of ``mix`` (None: not quantized)."""
    if not _BLOCK_LINEAR.match(name):
        return None
    base, high = MIXES[mix]
    return high if name.endswith((".v.weight", "ffn.2.weight")) else base


def file_type_of(name: str, shape: tuple[int, ...], mix: str) -> str:
    q = qtype_of(name, mix)
    if q is not None:
        return q
    return "F32" if len(shape) != 2 or "modulation" in name else "F16"


def random_blocks(qtype: str, nbytes: int, rng: np.random.Generator) -> np.ndarray:
    """Valid random blocks (finite fp16 scales) of ``nbytes`` bytes."""
    fmt = FORMATS[qtype]
    raw = np.frombuffer(rng.bytes(nbytes), dtype=np.uint8).copy().reshape(-1, fmt.type_size)
    fields = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q2_K": (80, 82),
              "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}[qtype]
    for off in fields:
        scale = (rng.standard_normal(raw.shape[0]) * 1e-3).astype(np.float16)
        raw[:, off:off + 2] = scale.view(np.uint8).reshape(-1, 2)
    return raw.reshape(-1)


# ----------------------------------------------------------------------------- speed


def bench_speed(out_f: int, in_f: int, tokens: int, repeat: int) -> None:
    import gguf

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = torch.randn(tokens, in_f)
    w = torch.randn(out_f, in_f) / in_f ** 0.5

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times) * 1e3

    with torch.no_grad():
        print(f"CPU, {torch.get_num_threads()} threads; Linear [{out_f}, {in_f}] on [{tokens}, {in_f}] float32; "
              f"best of {repeat}")
        print(f"{'type':<6} {'bpw':>5} {'fp32 Linear':>11} {'QuantLinear':>11} {'ratio':>6} {'numpy+mm':>9} "
              f"{'ratio':>6} | {'deq torch':>9} {'deq numpy':>9} {'numpy/torch':>11}")
        for qtype, fmt in FORMATS.items():
            raw = random_blocks(qtype, out_f * fmt.row_bytes(in_f), rng).reshape(out_f, -1)
            layer = QuantLinear(in_f, out_f, qtype, bias=False)
            layer.weight = torch.nn.Parameter(torch.from_numpy(raw), requires_grad=False)
            ref = best(lambda: F.linear(x, w))      # re-measured per row: a shared machine drifts
            t_q = best(lambda: layer(x))
            ggml = gguf.GGMLQuantizationType[qtype]
            t_np = best(lambda: F.linear(x, torch.from_numpy(gguf.quants.dequantize(raw, ggml))))
            d_t = best(lambda: dequantize(layer.weight, qtype, (out_f, in_f)))
            d_np = best(lambda: gguf.quants.dequantize(raw, ggml))
            print(f"{qtype:<6} {fmt.bits_per_weight:>5.2f} {ref:>9.1f}ms {t_q:>9.1f}ms {t_q / ref:>6.2f} "
                  f"{t_np:>7.1f}ms {t_np / ref:>6.2f} | {d_t:>7.1f}ms {d_np:>7.1f}ms {d_np / d_t:>11.2f}", flush=True)


# ----------------------------------------------------------------------------- vram


def gguf_dit_sizes(cfg, mix: str):
    """:class:`wan_core.planner.DiTSizes` of a DiT loaded from a ComfyUI-GGUF file of ``mix``,
    as ``load_dit(path)`` stores it: blocks as quantized, float32-policy tensors float32,
    the other unquantized ones as in the file (F32 1-D, F16 2-D)."""
    from wan_core.dit import WanDiT, keeps_fp32
    from wan_core.planner import DiTSizes

    with torch.device("meta"):
        model = WanDiT(cfg)
    per_block = [0] * cfg.num_layers
    other = largest = 0
    for name, p in model.named_parameters():
        q = qtype_of(name, mix)
        if q is not None:
            size = p.shape[0] * FORMATS[q].row_bytes(p.shape[1])
        elif keeps_fp32(name):
            size = p.numel() * 4
        else:
            size = p.numel() * (2 if file_type_of(name, tuple(p.shape), mix) == "F16" else 4)
        if name.startswith("blocks."):
            per_block[int(name.split(".")[1])] += size
            if q is not None:
                largest = max(largest, p.numel())
        else:
            other += size
    return DiTSizes(name=f"{cfg.variant} {mix}", block_bytes=tuple(per_block), other_bytes=other, dim=cfg.dim,
                    ffn_dim=cfg.ffn_dim, num_heads=cfg.num_heads, largest_linear=largest, upcast=True,
                    in_dim=cfg.in_dim, out_dim=cfg.out_dim)


def fake_gguf_dit(cfg, mix: str):
    """memsim's fake DiT with the block Linears replaced by QuantLinears of ``mix`` (fake bytes)."""
    from wan_core.layers import CastLinear
    from wan_core.memsim import fake_dit

    dit = fake_dit(cfg, "bf16")
    for name, m in list(dit.named_modules()):
        q = qtype_of(f"{name}.weight", mix)
        if q is None or not isinstance(m, CastLinear):
            continue
        new = QuantLinear(m.in_features, m.out_features, q, bias=m.bias is not None, device="cpu")
        parent, _, child = name.rpartition(".")
        setattr(dit.get_submodule(parent), child, new)
    return dit


def bench_vram(simulate: bool, budget_gib: float = 8.0, variant: str = "I2V-14B") -> None:
    from wan_core.planner import plan_memory, tokens_for

    cfg = KNOWN_DIT[variant]
    w, h, frames = 832, 480, 81
    tokens = tokens_for(w, h, frames)
    print(f"{variant} {w}x{h}x{frames} ({tokens} tokens), budget {budget_gib:g} GiB, sdpa")
    print(f"{'mix':<7} {'DiT GiB':>8} {'block MiB':>9} {'K':>6} {'planned DiT peak':>16} {'simulated':>10} "
          f"{'ratio':>6}")
    for mix in MIXES:
        sizes = gguf_dit_sizes(cfg, mix)
        plan = plan_memory(int(budget_gib * GiB), sizes, tokens, attention="sdpa")
        planned = plan.dit_peak_bytes - plan.reserve_bytes
        sim_txt, ratio = "-", ""
        if simulate:
            from wan_core.memsim import FakeGPU, SimJob, simulate_dit_step

            t0 = time.time()
            with FakeGPU() as gpu:
                dit = fake_gguf_dit(cfg, mix)
                stage = simulate_dit_step(gpu, dit, SimJob(variant, "bf16", w, h, frames), plan.resident_blocks)
            sim_txt, ratio = f"{stage.peak / GiB:.2f} GiB", f"{planned / stage.peak:.3f} ({time.time() - t0:.0f}s)"
        print(f"{mix:<7} {sizes.total_bytes / GiB:>8.2f} {max(sizes.block_bytes) / 2**20:>9.0f} "
              f"{plan.resident_blocks:>2}/{plan.num_blocks} {planned / GiB:>12.2f} GiB {sim_txt:>10} {ratio}",
              flush=True)


# ----------------------------------------------------------------------------- ram


def write_big_gguf(path: Path, variant: str, mix: str) -> int:
    """Stream a real-shape DiT GGUF of random valid blocks to ``path``; returns its size."""
    import gguf
    import factory

    cfg = KNOWN_DIT[variant]
    shapes = factory.official_shapes("dit", cfg)
    types = {n: file_type_of(n, s, mix) for n, s in shapes.items()}
    w = gguf.GGUFWriter(path=None, arch="wan")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, shape in shapes.items():
        t = types[name]
        if t in FORMATS:
            nbytes = shape[0] * FORMATS[t].row_bytes(shape[1])
            w.add_tensor_info(name, (shape[0], nbytes // shape[0]), np.dtype(np.uint8), nbytes,
                              raw_dtype=gguf.GGMLQuantizationType[t])
        else:
            dt = np.dtype(np.float16 if t == "F16" else np.float32)
            w.add_tensor_info(name, shape, dt, int(np.prod(shape)) * dt.itemsize)
    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        t = types[name]
        if t in FORMATS:
            data = random_blocks(t, shape[0] * FORMATS[t].row_bytes(shape[1]), rng).reshape(shape[0], -1)
        else:
            dt = np.float16 if t == "F16" else np.float32
            data = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dt)
        w.write_tensor_data(data)
        del data
    w.close()
    return path.stat().st_size


_LOAD = """
import resource, sys, time
sys.path.insert(0, {root!r})
import torch
from wan_core.loaders import load_dit
from wan_core.offload import module_bytes
t = time.time()
dit = load_dit({path!r})
print("load_s", time.time() - t)
print("params_bytes", module_bytes(dit))
print("peak_rss_bytes", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def bench_ram(tmp: Path, variant: str, mix: str = "Q4_K_M") -> None:
    need = 14 * GiB
    free = shutil.disk_usage(tmp).free
    if free < need:
        print(f"ram: skipped, {free / GiB:.1f} GiB free in {tmp}, need {need / GiB:.0f}")
        return
    path = tmp / f"wan_bench_{variant}_{mix}.gguf"
    try:
        t0 = time.time()
        size = write_big_gguf(path, variant, mix)
        print(f"wrote {path.name}: {size / GiB:.2f} GiB in {time.time() - t0:.0f} s", flush=True)
        run = subprocess.run([sys.executable, "-c", _LOAD.format(root=str(ROOT), path=str(path))],
                             capture_output=True, text=True)
        if run.returncode:
            print(run.stdout, run.stderr[-3000:])
            return
        vals = dict(line.split() for line in run.stdout.splitlines() if line.split()[0] in
                    ("load_s", "params_bytes", "peak_rss_bytes"))
        rss, params = int(vals["peak_rss_bytes"]), int(vals["params_bytes"])
        print(f"load_dit: {float(vals['load_s']):.0f} s; parameters {params / GiB:.2f} GiB; peak RSS "
              f"{rss / GiB:.2f} GiB ({rss / 1e9:.2f} GB; goal <= 12 GB: {'met' if rss <= 12e9 else 'NOT met'})")
    finally:
        path.unlink(missing_ok=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parts", nargs="*", default=["speed", "vram", "ram"])
    ap.add_argument("--simulate", action="store_true", help="also simulate the DiT step on a fake GPU (minutes)")
    ap.add_argument("--variant", default="T2V-14B", help="DiT written for the RAM measurement")
    ap.add_argument("--tmp", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")))
    ap.add_argument("--shape", type=int, nargs=3, default=(3072, 3072, 512), metavar=("OUT", "IN", "TOKENS"))
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    if "speed" in args.parts:
        bench_speed(*args.shape, args.repeat)
    if "vram" in args.parts:
        bench_vram(args.simulate)
    if "ram" in args.parts:
        bench_ram(args.tmp, args.variant)
    return 0


if __name__ == "__main__":
    sys.exit(main())
