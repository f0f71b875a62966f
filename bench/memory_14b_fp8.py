"""Scale proof: a 14B I2V DiT in fp8 loads and runs one denoising step in < 20 GB of RAM.

1. Writes a random-weight DiT with the real I2V-14B shapes (40 blocks, dim 5120, ffn 13824,
   in_dim 36; official names) as a ComfyUI-style *scaled* fp8 e4m3fn safetensors file
   (~16.6 GB): block Linear weights fp8 + float32 ``scale_weight``, everything else bf16.
   The header is written first, then each tensor's bytes, one tensor (or 64 MB slice) at a
   time, so this process never holds more than a slice. fp8 values come from one random
   pool (256 MB of randn * 112 clamped to +-448, cast to e4m3fn) read at a rotating offset;
   the scale makes the real weights ~ randn / sqrt(fan_in).
2. In a fresh subprocess: ``load_dit(path, weight_dtype="fp8_e4m3fn")`` (fp8 stays fp8,
   no dequant/requant), ``BlockSwap(K, "cpu")`` (the CPU path of block swap: every streamed
   block is copied to a "device" copy and dropped after use), then ONE denoising step of
   ``sample()`` (1 step, cfg 1 -> one DiT forward) at latent 16x1x4x4 with random ``y``
   and ``clip_fea``, printing peak RSS (VmHWM) after each phase.
3. Deletes the file (unless --keep).

Usage: python bench/memory_14b_fp8.py [--dir /tmp/somewhere] [--resident 0] [--keep]
The directory defaults to a new temp dir; never point it inside the repository.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

from wan_core.configs import KNOWN_DIT

_SLICE = 64 << 20
_POOL = 128 << 20


def hwm() -> int:
    """Peak RSS of this process (VmHWM) in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _shapes(cfg) -> list[tuple[str, tuple[int, ...]]]:
    from wan_core.dit import WanDiT

    with torch.device("meta"):
        model = WanDiT(cfg)
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def _is_fp8(name: str, shape: tuple[int, ...]) -> bool:
    # ComfyUI scaled-fp8 rule: 2-D Linear weights inside blocks.N, no norms
    return name.startswith("blocks.") and name.endswith(".weight") and len(shape) == 2 and "norm" not in name


def _values(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    t = torch.randn(shape, generator=gen)
    if "norm" in name and name.endswith("weight"):
        return t.mul_(0.1).add_(1.0)
    if name.endswith("bias") or "norm" in name:
        return t.mul_(0.05)
    if "modulation" in name or "emb_pos" in name:
        return t.mul_(0.2)
    return t.mul_(math.prod(shape[1:]) ** -0.5)


def write_file(path: Path, cfg) -> dict:
    """Stream a scaled-fp8 safetensors file of ``cfg``'s shapes to ``path``."""
    entries, order, offset = {}, [], 0
    for name, shape in _shapes(cfg):
        if _is_fp8(name, shape):
            n = math.prod(shape)
            entries[name] = {"dtype": "F8_E4M3", "shape": list(shape), "data_offsets": [offset, offset + n]}
            order.append((name, shape, "fp8"))
            offset += n
            layer = name[: -len(".weight")]
            entries[layer + ".scale_weight"] = {"dtype": "F32", "shape": [], "data_offsets": [offset, offset + 4]}
            order.append((layer + ".scale_weight", shape, "scale"))
            offset += 4
        else:
            n = math.prod(shape) * 2
            entries[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
            order.append((name, shape, "bf16"))
            offset += n
    entries["scaled_fp8"] = {"dtype": "F8_E4M3", "shape": [0], "data_offsets": [offset, offset]}
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    gen = torch.Generator().manual_seed(0)
    pool = torch.randn(_POOL, generator=gen).mul_(112.0).clamp_(-448, 448).to(torch.float8_e4m3fn)
    pool_bytes = pool.view(torch.uint8).numpy()
    pos = 0
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)))
        fh.write(header)
        for name, shape, kind in order:
            if kind == "fp8":
                left = math.prod(shape)
                while left:
                    n = min(left, _SLICE, _POOL - pos)
                    fh.write(memoryview(pool_bytes[pos:pos + n]))
                    pos = (pos + n) % _POOL
                    left -= n
            elif kind == "scale":
                fh.write(struct.pack("<f", (math.prod(shape[1:]) ** -0.5) / 112.0))
            else:
                fh.write(_values(name, shape, gen).to(torch.bfloat16).view(torch.uint8).numpy().tobytes())
    return {"file_bytes": path.stat().st_size, "writer_peak_rss": hwm()}


_CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, {root!r})
from wan_core.loaders import load_dit
from wan_core.offload import BlockSwap
from wan_core.runner import DiTRunner
from wan_core.pipeline import SamplerSettings, sample
from wan_core.conditioning import TextEmbeds, ImageEmbeds
from wan_core import fp8
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
out = {{"start_rss": hwm()}}
t0 = time.time()
dit = load_dit({path!r}, weight_dtype="fp8_e4m3fn")
out["load_s"] = time.time() - t0
out["after_load_rss"] = hwm()
out["param_bytes"] = fp8.fp8_stats(dit)
swap = BlockSwap({resident}, "cpu").setup(dit)
out["device_bytes"] = [swap.device_bytes().resident, swap.device_bytes().streaming]
g = torch.Generator().manual_seed(0)
cfg = dit.cfg
text = TextEmbeds(torch.randn(64, cfg.text_dim, generator=g), torch.randn(64, cfg.text_dim, generator=g))
image = ImageEmbeds(torch.randn(20, 1, 4, 4, generator=g), torch.randn(257, cfg.clip_dim, generator=g),
                    width=32, height=32, frames=1)
t0 = time.time()
lat = sample(dit, text, SamplerSettings(steps=1, cfg=1.0, shift=3.0), image=image,
             runner=DiTRunner(dit, executor=swap))
out["step_s"] = time.time() - t0
out["finite"] = bool(torch.isfinite(lat).all())
out["latent_shape"] = list(lat.shape)
out["streamed_blocks"] = swap.streamed_blocks
out["final_rss"] = hwm()
swap.release()
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="where to write the ~16.6 GB file (default: a new temp dir)")
    ap.add_argument("--resident", type=int, default=0, help="blocks kept resident (K); default 0 = all streamed")
    ap.add_argument("--keep", action="store_true", help="keep the file afterwards")
    ap.add_argument("--layers", type=int, default=40, help="number of blocks (40 = the real model; fewer for a dry run)")
    args = ap.parse_args()
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="wan14b_fp8_"))
    if ROOT in folder.resolve().parents or folder.resolve() == ROOT:
        sys.exit("refusing to write the 16 GB file inside the repository; pass --dir elsewhere")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "wan2.1_i2v_14B_random_fp8_e4m3fn_scaled.safetensors"
    cfg = dataclasses.replace(KNOWN_DIT["I2V-14B"], num_layers=args.layers)
    free = shutil.disk_usage(folder).free
    print(f"writing {path} (free disk {free / 1e9:.0f} GB)", flush=True)
    try:
        t0 = time.time()
        stats = write_file(path, cfg)
        stats["write_s"] = time.time() - t0
        print(json.dumps(stats), flush=True)
        child = _CHILD.format(root=str(ROOT), path=str(path), resident=args.resident)
        res = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=3600,
                             env={**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)})
        if res.returncode:
            print(res.stderr[-4000:])
            sys.exit(res.returncode)
        run = json.loads(res.stdout.strip().splitlines()[-1])
        gb = 1e9
        print(json.dumps(run))
        print(f"file {stats['file_bytes'] / gb:.2f} GB written in {stats['write_s']:.0f} s "
              f"(writer peak RSS {stats['writer_peak_rss'] / gb:.2f} GB)")
        print(f"load {run['load_s']:.0f} s, peak RSS after load {run['after_load_rss'] / gb:.2f} GB; "
              f"one step (K={args.resident}, {run['streamed_blocks']} blocks streamed) {run['step_s']:.0f} s; "
              f"peak RSS {run['final_rss'] / gb:.2f} GB ({run['final_rss'] / 2**30:.2f} GiB); "
              f"finite={run['finite']}")
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
            if not args.dir:
                shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
