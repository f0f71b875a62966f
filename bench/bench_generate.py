"""CPU benchmark: the whole T2V job, ``wan_core.generate()`` against the official Wan 2.1 pipeline.

    WAN21_SRC=/tmp/wan21 python bench/bench_generate.py              # both sides
    python bench/bench_generate.py                                   # ours only (reason printed)
    WAN21_SRC=/tmp/wan21 python bench/bench_generate.py --json --steps 20 --size 128x96

One job = text encode (prompt + negative prompt) -> ``--steps`` UniPC steps with classifier-free
guidance (two DiT calls per step) -> VAE decode, on tiny random-weight models in the official
layouts (``tests/factory.py``: DiT ``tests/tiny.TINY_DIT_T2V`` widths, VAE ``TINY_VAE``,
umT5 ``TINY_T5`` with the tiny sentencepiece model ``tests/data/tiny_spiece.model``), same
seed, size, frames, shift and guidance on both sides, fp32, ``--threads`` CPU threads.

Ours: ``wan_core.generate(dit=..., vae=..., text_encoder=...)`` with the models loaded by our
loaders from the official-layout files. Official: ``wan.text2video.WanT2V.generate`` of the
exported ``Wan-Video/Wan2.1`` tree named by ``WAN21_SRC`` (never part of this repository), its
own loop unchanged; the instance gets the attributes ``WanT2V.__init__`` sets, with the
components built by the official constructors on the CPU: ``T5EncoderModel`` (its ``umt5_xxl``
factory returns the tiny ``T5Encoder``; the checkpoint is a ``.pth`` it ``torch.load``-s; its
``HuggingfaceTokenizer`` loads the tiny spiece through ``AutoTokenizer``), ``WanVAE`` (its
``_video_vae`` builds the tiny width), ``WanModel(...)`` + ``load_state_dict`` (in place of
``from_pretrained``, which needs a diffusers config folder). The changes, all in the bench
process only: ``flash_attention`` -> float32 SDPA (with the key-length mask where one is
given), ``torch.cuda.current_device`` answered 0 while ``t5.py`` is imported, the ``wan``,
``wan.modules``, ``wan.utils``, ``wan.distributed`` packages entered without their
``__init__`` (which pull configs and optional packages), ``offload_model=False`` and
``t5_cpu=True`` (no CUDA calls). The official ``torch.cuda.amp.autocast`` contexts are left
as they are (disabled on a CPU-only machine, with a warning).

Time: one process loads both sides, runs one warm-up job each, then ``--repeats`` rounds in
rotation (the order turns each round, so load from other processes on a shared machine hits
both alike); the median per side is printed. Memory (Linux): each side also runs in its own
fresh process: load, read ``VmRSS`` ("loaded") and ``VmHWM``, reset the high-water mark
(``/proc/self/clear_refs``, where permitted), one job, ``VmHWM`` again: "job peak" is the
peak during the job, "peak RSS" the whole process's, loading included. The frames of those
memory runs are compared: ``max|ours - official|`` on ``[T, H, W, 3]`` in 0..1.

On a shared 2-core machine under load, 2 threads can stall in OpenMP barriers (one job seen
at 0.16 s and at 7 s in the same minute); ``--threads 1`` gives steadier figures there.
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
for p in (ROOT, ROOT / "tests", ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from benchlib import import_official, official_src, reset_peak, status_kib  # noqa: E402

PROMPT = "a cat walks on the grass, realistic style"
NEGATIVE = "static, blurry, worst quality"
SPIECE = ROOT / "tests" / "data" / "tiny_spiece.model"


# --------------------------------------------------------------------------- weights

def write_weights(workdir: Path, seed: int) -> None:
    """Official-layout .safetensors for our loaders; the same tensors as .pth for the
    official constructors (which ``torch.load``); the tokenizer folder for AutoTokenizer."""
    import shutil

    import torch

    import factory
    import tiny

    dit = factory.dit_official(tiny.TINY_DIT_T2V, seed)
    vae = factory.vae_official(tiny.TINY_VAE, seed + 1)
    t5 = factory.t5_official(tiny.TINY_T5, seed + 2)
    for name, sd in (("dit", dit), ("vae", vae), ("t5", t5)):
        factory.save_safetensors(sd, workdir / f"{name}.safetensors")
        torch.save(sd, workdir / f"{name}.pth")
    tok = workdir / "tokenizer"
    tok.mkdir(exist_ok=True)
    shutil.copy(SPIECE, tok / "spiece.model")
    (tok / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 0}))


# --------------------------------------------------------------------------- sides

def _ours(workdir: Path):
    import torch

    from wan_core.loaders import load_dit, load_text_encoder, load_vae
    from wan_core.pipeline import generate

    te = load_text_encoder(workdir / "t5.safetensors", dtype=torch.float32, tokenizer_path=SPIECE)
    vae = load_vae(workdir / "vae.safetensors")
    dit = load_dit(workdir / "dit.safetensors", dtype=torch.float32)

    def job(a) -> torch.Tensor:
        return generate(dit=dit, vae=vae, text_encoder=te, prompt=PROMPT, negative_prompt=NEGATIVE,
                        width=a.width, height=a.height, frames=a.frames, steps=a.steps, cfg=a.cfg,
                        shift=a.shift, sampler="unipc", seed=a.seed, device=a.device)
    return job


def _import_official(src: Path):
    """``wan.text2video`` and the modules it drives, from the exported tree (benchlib)."""
    model = import_official("modules.model", src)     # first: patches flash attention before text2video
    t5 = import_official("modules.t5", src)
    return import_official("text2video", src), t5, import_official("modules.vae", src), model


def _official(workdir: Path, device: str = "cpu"):
    import functools
    from unittest import mock

    import torch

    import tiny

    src = official_src("wan/text2video.py")
    assert src is not None
    t2v_mod, t5_mod, vae_mod, model_mod = _import_official(src)
    c = tiny.TINY_T5

    def tiny_umt5(encoder_only=True, return_tokenizer=False, dtype=torch.float32, device="cpu", **kw):
        return t5_mod.T5Encoder(c.vocab, c.dim, c.dim_attn, c.dim_ffn, c.num_heads, c.num_layers,
                                c.num_buckets, shared_pos=False, dropout=0.0).to(dtype=dtype, device=device)

    cpu = torch.device(device)   # "cpu" by default; the names stay the official ones
    with mock.patch.object(t5_mod, "umt5_xxl", tiny_umt5):
        text_encoder = t5_mod.T5EncoderModel(text_len=512, dtype=torch.float32, device=cpu,
                                             checkpoint_path=str(workdir / "t5.pth"),
                                             tokenizer_path=str(workdir / "tokenizer"))
    v = tiny.TINY_VAE
    with mock.patch.object(vae_mod, "_video_vae", functools.partial(vae_mod._video_vae, dim=v.dim)):
        vae = vae_mod.WanVAE(z_dim=v.z_dim, vae_pth=str(workdir / "vae.pth"), device=cpu)
    d = tiny.TINY_DIT_T2V
    dit = model_mod.WanModel(model_type="t2v", patch_size=d.patch_size, text_len=d.text_len, in_dim=d.in_dim,
                             dim=d.dim, ffn_dim=d.ffn_dim, freq_dim=d.freq_dim, text_dim=d.text_dim,
                             out_dim=d.out_dim, num_heads=d.num_heads, num_layers=d.num_layers, eps=d.eps)
    dit.load_state_dict(torch.load(workdir / "dit.pth", map_location="cpu"), strict=True)
    dit.eval().requires_grad_(False).to(cpu)

    # the attributes WanT2V.__init__ sets (config t2v-1.3B, one process; the umT5 on the device
    # on a GPU as WanT2V's default t5_cpu=False, float32 weights: the tiny models are random)
    pipe = t2v_mod.WanT2V.__new__(t2v_mod.WanT2V)
    pipe.device, pipe.config, pipe.rank, pipe.t5_cpu = cpu, None, 0, cpu.type == "cpu"
    pipe.num_train_timesteps, pipe.param_dtype = 1000, torch.float32
    pipe.text_encoder, pipe.vae, pipe.model = text_encoder, vae, dit
    pipe.vae_stride, pipe.patch_size, pipe.sp_size = (4, 8, 8), (1, 2, 2), 1
    pipe.sample_neg_prompt = NEGATIVE

    def job(a) -> torch.Tensor:
        video = pipe.generate(PROMPT, size=(a.width, a.height), frame_num=a.frames, shift=a.shift,
                              sample_solver="unipc", sampling_steps=a.steps, guide_scale=a.cfg,
                              n_prompt=NEGATIVE, seed=a.seed, offload_model=False)
        # [3, T, H, W] in -1..1 -> [T, H, W, 3] in 0..1, as ours returns
        return video.float().add(1).div(2).clamp(0, 1).permute(1, 2, 3, 0).contiguous().cpu()
    return job


def _quiet(a: argparse.Namespace):
    import logging
    import warnings

    import torch

    warnings.filterwarnings("ignore")   # the official autocast contexts warn on a CPU-only machine
    logging.disable(logging.WARNING)
    torch.set_num_threads(a.threads)
    return torch


def _load(side: str, workdir: Path, a: argparse.Namespace):
    return _ours(workdir) if side == "ours" else _official(workdir, a.device)


def _sync(a: argparse.Namespace) -> None:
    import torch

    if a.device.startswith("cuda"):
        torch.cuda.synchronize()


def memory_worker(a: argparse.Namespace) -> None:
    """One side in this fresh process: load, one job, peak RSS; saves the frames."""
    torch = _quiet(a)
    workdir = Path(a.workdir)
    start = time.perf_counter()
    job = _load(a.worker, workdir, a)
    load_s = time.perf_counter() - start
    loaded = status_kib("VmRSS")
    load_peak = status_kib("VmHWM")
    reset = reset_peak()
    cuda = a.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        out = job(a)
    torch.save(out, workdir / f"{a.worker}_frames.pt")
    print(json.dumps({"load_s": load_s, "loaded_mib": loaded / 1024,
                      "device_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
                      "job_peak_mib": status_kib("VmHWM") / 1024 if reset else None,
                      "peak_rss_mib": max(load_peak, status_kib("VmHWM")) / 1024,
                      "peak_reset": reset, "frames_shape": list(out.shape)}))


def timing_worker(a: argparse.Namespace) -> None:
    """Every side in this process, one warm-up job each, then ``--repeats`` rounds in rotation
    (the order turns each round) so that load from other processes on a shared machine hits
    all sides alike (timing the sides in separate processes one after the other moved the
    official median between 0.3 s and 5 s on a loaded 2-core machine)."""
    torch = _quiet(a)
    workdir = Path(a.workdir)
    order = a.sides.split(",")
    jobs = {side: _load(side, workdir, a) for side in order}
    times: dict[str, list[float]] = {side: [] for side in order}
    with torch.no_grad():
        for side in order:
            jobs[side](a)
        for i in range(a.repeats):
            k = i % len(order)
            for side in order[k:] + order[:k]:
                _sync(a)
                start = time.perf_counter()
                jobs[side](a)
                _sync(a)
                times[side].append(time.perf_counter() - start)
    print(json.dumps({side: {"times_s": t, "median_s": statistics.median(t)} for side, t in times.items()}))


def _run(task: str, workdir: Path, a: argparse.Namespace, sides: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", task, "--workdir", str(workdir),
           "--sides", ",".join(sides),
           "--size", f"{a.width}x{a.height}", "--frames", str(a.frames), "--steps", str(a.steps),
           "--cfg", str(a.cfg), "--shift", str(a.shift), "--seed", str(a.seed),
           "--repeats", str(a.repeats), "--threads", str(a.threads), "--device", a.device]
    env = dict(os.environ, TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"{task} worker failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="64x48", help="WxH of the video (default 64x48, the selftest size)")
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--shift", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N] (both sides on the GPU; the "
                    "flash -> SDPA replacement of the official code stays; 'device peak' = max_memory_allocated)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--sides", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.width, a.height = (int(x) for x in a.size.lower().split("x"))
    if a.worker:
        timing_worker(a) if a.worker == "timing" else memory_worker(a)
        return 0

    if a.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            ap.error(f"--device {a.device}: this torch has no CUDA device (torch {torch.__version__})")
    sides = ["ours"]
    if official_src("wan/text2video.py") is None:
        print("official Wan 2.1 pipeline skipped: set WAN21_SRC to an exported Wan-Video/Wan2.1 tree "
              "(the folder holding wan/text2video.py); running ours only")
    else:
        sides.append("official")
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="wan_bench_generate_") as tmp:
        workdir = Path(tmp)
        write_weights(workdir, a.seed)
        # a fresh interpreter per side for memory, so one side's peak RSS never includes the other's
        for side in sides:
            results[side] = _run(side, workdir, a, sides)
        for side, r in _run("timing", workdir, a, sides).items():
            results[side].update(r)
        if "official" in results:
            import torch

            ours = torch.load(workdir / "ours_frames.pt")
            theirs = torch.load(workdir / "official_frames.pt")
            results["max_abs_diff"] = (float((ours - theirs).abs().max()) if ours.shape == theirs.shape
                                       else f"shapes differ: {list(ours.shape)} vs {list(theirs.shape)}")
    if a.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"T2V job, tiny models, {a.width}x{a.height}, {a.frames} frames, {a.steps} UniPC steps, cfg {a.cfg}, "
          f"shift {a.shift}, seed {a.seed}, fp32, {a.threads} threads; median of {a.repeats} after a warm-up "
          "(rotated in one process)")
    print(f"{'side':10s} {'median s':>9s} {'times s':>24s} {'load s':>7s} {'loaded MiB':>11s} "
          f"{'job peak MiB':>13s} {'peak RSS MiB':>13s}")
    for side in sides:
        r = results[side]
        times = " ".join(f"{t:.2f}" for t in r["times_s"])
        job_peak = f"{r['job_peak_mib']:.0f}" if r["job_peak_mib"] is not None else "n/a"
        print(f"{side:10s} {r['median_s']:9.3f} {times:>24s} {r['load_s']:7.2f} {r['loaded_mib']:11.0f} "
              f"{job_peak:>13s} {r['peak_rss_mib']:13.0f}")
    if "official" in results:
        ratio = results["ours"]["median_s"] / results["official"]["median_s"]
        diff = results["max_abs_diff"]
        diff = diff if isinstance(diff, str) else f"{diff:.3g}"
        print(f"time ratio ours/official: {ratio:.2f}x; max|ours - official| of the frames (0..1): {diff}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
