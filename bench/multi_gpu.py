"""Several processes for one video: per-rank memory, communication per step, equality.

    python bench/multi_gpu.py                 # CPU, gloo: worlds 2 and 4, the CLI under torchrun
    python bench/multi_gpu.py --world 4 --steps 3 --json
    python bench/multi_gpu.py --vram          # per-rank planned vs simulated VRAM, published models (~5 min)

What runs (CPU, gloo, spawned processes, one thread each): a DiT with 8 heads (dim 512,
head_dim 64, ffn 1024, 4 blocks, text_len 64, random weights from tests/factory.py) samples
``--steps`` UniPC steps at cfg 5 of a latent ``[16, 3, 24, 24]`` (432 tokens) in every layout
of the world (Ulysses, Ring, Ulysses x Ring, with and without CFG parallelism), after the
single-process run in the same processes. Per layout and rank:

- peak RSS: ``VmHWM`` after resetting the high-water mark (``/proc/self/clear_refs``; the
  whole-process mark when not permitted) - the model is replicated on every rank, only the
  activations are split, so at this size the peak is dominated by the weights;
- bytes sent per step, counted at the ``torch.distributed`` calls of wan_core.distributed
  (all_to_all: the part leaving the rank; all_gather: the tensor to each peer; isend: the
  tensor) against :func:`wan_core.distributed.comm_bytes_per_step`;
- max |diff| of the final latents against the single-process run.

Then ``torchrun --nproc-per-node 2 -m wan_core generate ... --ring 2`` with the selftest's
tiny models is compared frame for frame with the single-process command.

GPUs: when run under torchrun on GPUs the same layouts apply (NCCL); speed-up at 2/4/8 GPUs
was NOT measured (no GPU was lent to this session). The expected volume for the 14B at
720p x 81 frames, Ulysses 8, bf16, is printed from the formula at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

SHAPE = (16, 3, 24, 24)
LAYOUTS = {2: [(2, 1, False), (1, 2, False), (1, 1, True)],
           4: [(4, 1, False), (1, 4, False), (2, 2, False), (2, 1, True), (1, 2, True)]}


def _config():
    from wan_core.configs import DiTConfig

    return DiTConfig(dim=512, head_dim=64, ffn_dim=1024, num_layers=4, text_dim=64, freq_dim=64, text_len=64)


def _hwm_reset() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class _Counter:
    """Bytes this rank sends through the torch.distributed calls wan_core.distributed makes."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.sent = 0
        self.dist = dist
        self.orig = {n: getattr(dist, n) for n in ("all_to_all_single", "all_gather", "batch_isend_irecv")}

        def a2a(out, inp, *a, group=None, **k):
            n = dist.get_world_size(group)
            self.sent += inp.nbytes * (n - 1) // n
            return self.orig["all_to_all_single"](out, inp, *a, group=group, **k)

        def gather(parts, t, *a, group=None, **k):
            self.sent += t.nbytes * (len(parts) - 1)
            return self.orig["all_gather"](parts, t, *a, group=group, **k)

        def p2p(ops):
            self.sent += sum(op.tensor.nbytes for op in ops if op.op is dist.isend)
            return self.orig["batch_isend_irecv"](ops)

        self.wrapped = {"all_to_all_single": a2a, "all_gather": gather, "batch_isend_irecv": p2p}

    def __enter__(self):
        for n, f in self.wrapped.items():
            setattr(self.dist, n, f)
        return self

    def __exit__(self, *exc):
        for n, f in self.orig.items():
            setattr(self.dist, n, f)


def _worker(rank: int, world: int, port: int, steps: int, out_dir: str) -> None:
    import factory
    import torch.distributed as dist

    from wan_core.conditioning import TextEmbeds
    from wan_core.distributed import ParallelConfig, comm_bytes_per_step, make_groups
    from wan_core.dit import WanDiT
    from wan_core.pipeline import SamplerSettings, sample
    from wan_core.runner import DiTRunner

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    cfg = _config()
    with torch.device("meta"):
        dit = WanDiT(cfg)
    dit.load_state_dict(factory.dit_official(cfg, seed=1), strict=True, assign=True)
    g = torch.Generator().manual_seed(2)
    text = TextEmbeds(torch.randn(12, cfg.text_dim, generator=g), torch.randn(8, cfg.text_dim, generator=g))
    settings = SamplerSettings(steps=steps, cfg=5.0, shift=5.0, seed=3)
    tokens = SHAPE[1] * SHAPE[2] // 2 * SHAPE[3] // 2
    rows = []
    with torch.no_grad():
        _hwm_reset()
        t0 = time.perf_counter()
        ref = sample(dit, text, settings, shape=SHAPE, runner=DiTRunner(dit))
        rows.append({"layout": "single process", "rank": rank, "peak_rss_mib": _hwm_mib(),
                     "s_per_step": (time.perf_counter() - t0) / steps, "sent_per_step": 0, "formula": 0,
                     "max_diff": 0.0})
        for u, r, c in LAYOUTS[world]:
            config = ParallelConfig(u, r, c)
            groups = make_groups(config, cfg.num_heads)
            dist.barrier()
            _hwm_reset()
            with _Counter() as count:
                t0 = time.perf_counter()
                out = sample(dit, text, settings, shape=SHAPE, runner=groups.wrap_runner(DiTRunner(dit)),
                             cfg_parallel=groups.cfg_parallel())
                elapsed = time.perf_counter() - t0
            formula = comm_bytes_per_step(config, tokens, cfg.dim, cfg.num_layers, ref.numel(), activation_bytes=4)
            rows.append({"layout": config.describe(), "rank": rank, "peak_rss_mib": _hwm_mib(),
                         "s_per_step": elapsed / steps, "sent_per_step": count.sent // steps,
                         "formula": formula["total"], "max_diff": float((out - ref).abs().max())})
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def run_world(world: int, steps: int) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_worker, args=(world, port, steps, d), nprocs=world, start_method="spawn")
        return [row for r in range(world) for row in json.loads(Path(d, f"rank{r}.json").read_text())]


def run_cli() -> dict:
    """The README command under torchrun (2 processes, --ring 2) against the single-process one."""
    from wan_core.selftest import write_selftest_models
    from wan_core.video import read_video

    with tempfile.TemporaryDirectory() as d:
        m = write_selftest_models(Path(d))
        args = ["generate", "--dit", str(m.dit_t2v), "--vae", str(m.vae), "--text-encoder", str(m.text_encoder),
                "--prompt", "a cat", "--size", "48x32", "--frames", "9", "--steps", "3", "--device", "cpu"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        t0 = time.perf_counter()
        one = subprocess.run([sys.executable, "-m", "wan_core", *args, "--out", f"{d}/one.mp4"], cwd=ROOT,
                             capture_output=True, text=True, env=env, timeout=600)
        t1 = time.perf_counter()
        two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                              "wan_core", *args, "--ring", "2", "--out", f"{d}/two.mp4"], cwd=ROOT,
                             capture_output=True, text=True, env=env, timeout=600)
        t2 = time.perf_counter()
        if one.returncode or two.returncode:
            raise SystemExit(f"CLI run failed:\n{one.stderr[-2000:]}\n{two.stderr[-2000:]}")
        diff = (read_video(f"{d}/one.mp4").float() - read_video(f"{d}/two.mp4").float()).abs().max()
        return {"single_s": t1 - t0, "torchrun_2_s": t2 - t1, "max_frame_diff_8bit": float(diff),
                "progress_bars": two.stderr.count("3/3")}


def expected_14b() -> dict:
    """Formula figures for Wan 2.1 14B, 1280x720, 81 frames (21 x 90 x 160 latent), bf16."""
    from wan_core.configs import KNOWN_DIT
    from wan_core.distributed import ParallelConfig, comm_bytes_per_step
    from wan_core.parallel_plan import block_shards_for

    tokens, latent = 21 * 45 * 80, 16 * 21 * 90 * 160
    sharded = block_shards_for(KNOWN_DIT["T2V-14B"], "bf16").total_sharded
    out = {}
    for name, config, shard in (("ulysses 8", ParallelConfig(8, 1), 0),
                                ("ulysses 8, sharded blocks", ParallelConfig(8, 1), sharded),
                                ("ulysses 4 x cfg 2", ParallelConfig(4, 1, True), 0),
                                ("ulysses 8 x ring 2", ParallelConfig(8, 2), 0)):
        parts = comm_bytes_per_step(config, tokens, 5120, 40, latent, sharded_bytes=shard)
        out[name] = {k: v / 1e9 for k, v in parts.items()}
    return out


# (name, DiT, storage, width, height, frames, (ulysses, ring, cfg parallel, shard_weights), GiB per rank)
VRAM_CASES = [
    ("14B bf16 720p, 8 ranks: ulysses 8", "T2V-14B", "bf16", 1280, 720, 81, (8, 1, False, "auto"), 24),
    ("14B bf16 720p, 8 ranks: ulysses 4 x cfg 2", "T2V-14B", "bf16", 1280, 720, 81, (4, 1, True, "auto"), 24),
    ("14B bf16 720p, 8 ranks: ulysses 8, no sharding", "T2V-14B", "bf16", 1280, 720, 81, (8, 1, False, "off"), 24),
    ("14B fp8 720p, 4 ranks: ulysses 4", "T2V-14B", "fp8_e4m3fn", 1280, 720, 81, (4, 1, False, "auto"), 12),
    ("14B fp8 480p, 2 ranks: ulysses 2", "T2V-14B", "fp8_e4m3fn", 832, 480, 81, (2, 1, False, "auto"), 8),
    ("1.3B bf16 480p, 4 ranks: ulysses 2 x ring 2", "T2V-1.3B", "bf16", 832, 480, 81, (2, 2, False, "auto"), 6),
]


def vram_rows(cases=VRAM_CASES) -> list[dict]:
    """Per-rank planned VRAM (wan_core.parallel_plan.plan_rank) vs the real code of rank 0 on the
    simulated GPU (wan_core.memsim_parallel), every block of the published models, one guided step."""
    import gc

    from wan_core.configs import KNOWN_DIT
    from wan_core.distributed import ParallelConfig
    from wan_core.memsim import FakeGPU, SimJob, fake_dit
    from wan_core.memsim_parallel import fake_world, shard_for_simulation, simulate_rank_step
    from wan_core.parallel_plan import block_shards_for, plan_rank
    from wan_core.planner import GiB, dit_sizes, tokens_for

    rows = []
    for name, variant, storage, w, h, frames, layout, gib in cases:
        cfg, config, job = KNOWN_DIT[variant], ParallelConfig(*layout), SimJob(variant, storage, w, h, frames)
        plan = plan_rank(gib * GiB, dit_sizes(cfg, storage), tokens_for(w, h, frames), config,
                         block_shards_for(cfg, storage))
        t0 = time.perf_counter()
        with fake_world(config, 0) as groups:
            if plan.weights == "sharded":
                with FakeGPU(device_type="cpu") as gpu:   # FSDP2 runs on a cpu-counting session (memsim_parallel)
                    dit = fake_dit(cfg, storage)
                    shard_for_simulation(dit, groups, gpu)
                    gc.collect()
                    stage = simulate_rank_step(gpu, dit, job, groups, sharded=True)
            else:
                with FakeGPU() as gpu:
                    stage = simulate_rank_step(gpu, fake_dit(cfg, storage), job, groups,
                                               resident_blocks=plan.resident_blocks)
        planned = plan.peak_bytes - plan.reserve_bytes
        rows.append({"case": name, "budget_gib": gib, "placement": plan.weights, "resident": plan.resident_blocks,
                     "chunk": plan.chunk, "tokens": plan.tokens, "planned_gib": planned / GiB,
                     "simulated_gib": stage.peak / GiB, "ratio": planned / stage.peak,
                     "left_gib": (gib * GiB - plan.reserve_bytes - stage.peak) / GiB, "sim_s": time.perf_counter() - t0,
                     "line": plan.describe()})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, nargs="+", default=[2, 4], choices=[2, 4])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--no-cli", action="store_true")
    ap.add_argument("--vram", action="store_true", help="only the per-rank planned vs simulated VRAM rows")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.vram:
        rows = vram_rows()
        if args.json:
            print(json.dumps(rows, indent=1))
            return
        print(f"{'case':48} {'GiB':>4} {'placement':>16} {'tokens/rank':>11} {'planned':>8} {'simulated':>9} "
              f"{'ratio':>6} {'left':>6}")
        for r in rows:
            where = r["placement"] if r["placement"] != "swap" else f"swap {r['resident']} resident"
            print(f"{r['case']:48} {r['budget_gib']:>4} {where:>16} {r['chunk']:>11} {r['planned_gib']:>7.2f}G "
                  f"{r['simulated_gib']:>8.2f}G {r['ratio']:>6.3f} {r['left_gib']:>5.2f}G")
        print("(planned = the rank's DiT step without the 0.5 GiB reserve; left = budget - reserve - simulated; "
              "not modelled: NCCL buffers, CUDA context, FSDP2 stream hold-back)")
        for r in rows:
            print(f"  {r['case']}: {r['line']}")
        return
    report = {"worlds": {w: run_world(w, args.steps) for w in args.world}, "expected_14b_720p81_GB": expected_14b()}
    if not args.no_cli:
        report["cli"] = run_cli()
    if args.json:
        print(json.dumps(report, indent=1))
        return
    for w, rows in report["worlds"].items():
        print(f"\nworld {w} (CPU, gloo, {SHAPE} latent, 8 heads, 4 blocks, fp32)")
        print(f"{'layout':34} {'rank':>4} {'peak RSS MiB':>12} {'s/step':>7} {'sent/step MB':>12} "
              f"{'formula MB':>10} {'max|diff|':>9}")
        for row in rows:
            print(f"{row['layout']:34} {row['rank']:>4} {row['peak_rss_mib']:>12.0f} {row['s_per_step']:>7.2f} "
                  f"{row['sent_per_step'] / 1e6:>12.3f} {row['formula'] / 1e6:>10.3f} {row['max_diff']:>9.1e}")
    print("\nexpected bytes sent per step and rank, Wan 2.1 14B 1280x720x81, bf16 (GB):")
    for name, parts in report["expected_14b_720p81_GB"].items():
        print(f"  {name:20} " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))
    if "cli" in report:
        print(f"\nCLI: {report['cli']}")
    print("GPU speed-up at 2/4/8 GPUs: not measured (no GPU in this session).")


if __name__ == "__main__":
    main()
