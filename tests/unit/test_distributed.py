"""Sequence (Ulysses, Ring, both) and CFG parallelism give the single-process numbers.

Spawned processes on gloo (CPU), one launch per world size running every case, each with a
deadline so nothing hangs. A tiny 4-head DiT (dim 128, head_dim 32, 2 blocks) samples 2
UniPC steps with cfg 5; every rank also runs the plain single-process sample() and compares
every DiT prediction (per branch), every step's x0 estimate and the final latents.
Measured (torch 2.13 CPU, float32, values up to |8|): CFG parallelism alone and Ulysses 2
are bit-identical (0); every Ring / Ulysses x Ring / Ulysses 4 case differs by <= 2.4e-6 in
a prediction and <= 1.2e-5 in an x0 estimate or the final latents (<= 1.5e-6 of the largest
value; cfg 5 multiplies the prediction's rounding): token chunks change the row blocking of
the GEMMs and the ring merges explicit-softmax blocks by log-sum-exp. Tolerance:
1e-5 x max(1, largest |value|).
"""
from __future__ import annotations

import json
import os
import socket
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from wan_core.distributed import ParallelConfig

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5
DEADLINE_S = 120.0


def _configs():
    from wan_core.configs import DiTConfig

    base = dict(dim=128, head_dim=32, ffn_dim=192, num_layers=2, text_dim=32, freq_dim=64, text_len=8)
    return {"t2v": DiTConfig(**base), "i2v": DiTConfig(**base, in_dim=36, model_type="i2v", clip_dim=32),
            # Wan 2.2 TI2V-5B's layout: 48 channels, image-to-video through per-token timesteps
            "ti2v": DiTConfig(**base, in_dim=48, out_dim=48, model_type="ti2v")}


# shapes: latent [16, T', h, w]; tokens T' * h/2 * w/2
EVEN = (16, 2, 4, 4)   # 8 tokens: divides 2 and 4
ODD = (16, 1, 6, 6)    # 9 tokens: divides neither 2 nor 4
TI2V_EVEN = (48, 2, 4, 4)   # TI2V image-to-video: latent frame 0 is the image, its 4 tokens at t = 0
TI2V_ODD = (48, 3, 2, 6)    # 9 tokens, the image's 3 of them at t = 0

CASES = {
    2: [("ulysses2", (2, 1, False), "t2v", EVEN, ""), ("ulysses2", (2, 1, False), "i2v", ODD, ""),
        ("ulysses2+blockswap+fp8", (2, 1, False), "i2v", EVEN, "swap,fp8"),
        ("ring2", (1, 2, False), "t2v", ODD, ""), ("ring2", (1, 2, False), "i2v", EVEN, ""),
        ("ring2+blockswap+fp8", (1, 2, False), "t2v", ODD, "swap,fp8"),
        ("cfg2", (1, 1, True), "t2v", ODD, ""), ("cfg2", (1, 1, True), "i2v", EVEN, ""),
        ("cfg2+blockswap+fp8", (1, 1, True), "t2v", EVEN, "swap,fp8"),
        ("ulysses2 per-token t", (2, 1, False), "ti2v", TI2V_EVEN, ""),
        ("ring2 per-token t+blockswap+fp8", (1, 2, False), "ti2v", TI2V_ODD, "swap,fp8"),
        ("ulysses2+sharded by the run plan", (2, 1, False), "i2v", ODD, "plan"),
        ("ring2+sharded", (1, 2, False), "t2v", EVEN, "shard,bf16")],
    4: [("ulysses2xring2", (2, 2, False), "t2v", ODD, ""), ("ulysses2xring2", (2, 2, False), "i2v", EVEN, ""),
        ("ulysses2xring2+blockswap+fp8", (2, 2, False), "i2v", ODD, "swap,fp8"),
        ("ulysses2xring2 per-token t", (2, 2, False), "ti2v", TI2V_ODD, ""),
        ("ulysses4", (4, 1, False), "i2v", ODD, ""), ("ulysses4+blockswap+fp8", (4, 1, False), "t2v", EVEN, "swap,fp8"),
        ("ring4", (1, 4, False), "t2v", ODD, ""), ("ring4+blockswap+fp8", (1, 4, False), "i2v", EVEN, "swap,fp8"),
        ("ulysses2+cfg", (2, 1, True), "i2v", ODD, "swap"), ("ring2+cfg", (1, 2, True), "t2v", EVEN, "fp8")],
}


# --------------------------------------------------------------------------- worker side


def _model(variant: str, fp8: bool, bf16: bool = False):
    import factory
    from wan_core.dit import WanDiT

    cfg = _configs()[variant]
    sd = factory.dit_official(cfg, seed=3)
    if fp8:
        sd = factory.to_fp8(sd)
    with torch.device("meta"):
        dit = WanDiT(cfg, compute_dtype=torch.float32 if fp8 or bf16 else None)
    dit.load_state_dict(sd, strict=True, assign=True)
    return dit.cast_storage(torch.bfloat16).eval() if bf16 else dit.eval()


def _inputs(variant: str, shape):
    """Text, the I2V image conditioning (None otherwise) and the TI2V image latents ``z``
    ``[48, 1, h, w]`` (None otherwise)."""
    from wan_core.conditioning import ImageEmbeds, TextEmbeds

    g = torch.Generator().manual_seed(5)
    text = TextEmbeds(torch.randn(5, 32, generator=g), torch.randn(3, 32, generator=g))
    image = z = None
    if variant == "i2v":
        y = torch.randn(20, *shape[1:], generator=g)
        image = ImageEmbeds(y=y, clip_fea=torch.randn(4, 32, generator=g), width=shape[3] * 8,
                            height=shape[2] * 8, frames=(shape[1] - 1) * 4 + 1)
    if variant == "ti2v":
        z = torch.randn(48, 1, *shape[2:], generator=g)
    return text, image, z


class _Recording:
    """Mixin recording every (branch, prediction) of a runner."""

    def __call__(self, *args, **kw):
        out = super().__call__(*args, **kw)
        self.seen.append((kw.get("branch", "cond"), out.clone()))
        return out


def _sample(dit, variant, shape, runner, cfg_parallel=None, die_at: int | None = None):
    from wan_core.pipeline import SamplerSettings, sample
    from wan_core.ti2v import FirstFrameRunner

    text, image, z = _inputs(variant, shape)
    if z is not None:   # per-token timesteps: the image frame's tokens at t = 0, the others at t
        runner = FirstFrameRunner(runner, z)
    x0s = []

    def callback(info):
        x0s.append(info.x0.clone())
        if die_at is not None and info.step == die_at:
            os._exit(3)   # a rank that dies mid-run, without any goodbye to the others

    settings = SamplerSettings(steps=2, cfg=5.0, shift=5.0, sampler="unipc", seed=11)
    out = sample(dit, text, settings, shape=None if image else shape, image=image, runner=runner,
                 callback=callback, cfg_parallel=cfg_parallel, known_latents=z)
    return out, x0s


def _max_diff(a, b) -> float:
    return float((a - b).abs().max())


def _run_case(case, cache):
    from wan_core.distributed import CFGParallel, SequenceParallelRunner, is_sharded, make_groups, shard_blocks
    from wan_core.offload import BlockSwap
    from wan_core.run_plan import RunOptions, prepare_run
    from wan_core.runner import DiTRunner

    name, (u, r, cfgp), variant, shape, opts = case
    fp8, swap, bf16, plan = "fp8" in opts, "swap" in opts, "bf16" in opts, "plan" in opts
    shard = "shard" in opts or plan
    key = (variant, shape, fp8, bf16, shard)   # a sharded model is changed: never shared
    if key not in cache:
        dit = _model(variant, fp8, bf16)
        ref_runner = type("Ref", (_Recording, DiTRunner), {})(dit)
        ref_runner.seen = []
        ref, ref_x0 = _sample(dit, variant, shape, ref_runner)
        cache[key] = (dit, ref, ref_x0, ref_runner.seen)
    dit, ref, ref_x0, ref_seen = cache[key]
    groups = make_groups(ParallelConfig(u, r, cfgp, "on" if plan else "auto"), dit.cfg.num_heads)
    if plan:   # the run plan decides (shard_weights "on") and its sampling stage shards the blocks
        with prepare_run(dit, shape, RunOptions(), "cpu", parallel=groups) as run_plan, run_plan.sampling() as inner:
            assert run_plan.placement.sharded and is_sharded(dit)
            runner = type("SP", (_Recording, SequenceParallelRunner), {})(dit, groups, inner.executor)
            runner.seen = []
            out, x0s = _sample(dit, variant, shape, runner, CFGParallel(groups) if cfgp else None)
        return _compare(groups, cfgp, runner.seen, ref_seen, out, ref, x0s, ref_x0)
    if shard:
        shard_blocks(dit, groups)
        assert type(dit.blocks[0].self_attn.q.weight).__name__ == "DTensor"
    executor = BlockSwap(1, "cpu") if swap else None
    if u * r > 1:
        runner = type("SP", (_Recording, SequenceParallelRunner), {})(dit, groups, executor)
    else:
        runner = type("Plain", (_Recording, DiTRunner), {})(dit, executor)
    runner.seen = []
    out, x0s = _sample(dit, variant, shape, runner, CFGParallel(groups) if cfgp else None)
    return _compare(groups, cfgp, runner.seen, ref_seen, out, ref, x0s, ref_x0)


def _compare(groups, cfgp, seen, ref_seen, out, ref, x0s, ref_x0) -> dict:
    """Max |diff| of every prediction of this rank's branches, every x0 estimate and the final
    latents against the single-process run, and the size of the numbers."""
    mine = [o for b, o in ref_seen if not cfgp or b == ("cond", "uncond")[groups.branch]]
    assert len(mine) == len(seen) and len(x0s) == len(ref_x0)
    return {"pred": max(_max_diff(a, b) for a, (_, b) in zip(mine, seen)),
            "x0": max(_max_diff(a, b) for a, b in zip(ref_x0, x0s)), "final": _max_diff(ref, out),
            "scale": max(float(ref.abs().max()), *(float(o.abs().max()) for o in mine))}


def _worker(rank: int, world: int, port: int, out_dir: str, job: str) -> None:
    import torch.distributed as dist

    from wan_core.distributed import DistributedError, SequenceParallelRunner, make_groups, shard_blocks

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    result: dict = {}
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
        cache: dict = {}
        for case in CASES[world]:
            result[f"{case[0]} {case[2]} {case[3]} {case[4]}"] = _run_case(case, cache)
        try:
            make_groups(ParallelConfig(1, 1, False), 4)
        except ValueError as exc:
            result["mismatch"] = str(exc)
        if world == 2:
            try:
                shard_blocks(_model("t2v", True), make_groups(ParallelConfig(2), 4))
            except ValueError as exc:
                result["fp8_shard"] = str(exc)
        if job == "die":   # last: rank 1 exits after step 1 of a ring run
            Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
            dit = _model("t2v", False)
            groups = make_groups(ParallelConfig(1, 2, False), dit.cfg.num_heads)
            try:
                _sample(dit, "t2v", ODD, SequenceParallelRunner(dit, groups), die_at=1 if rank == 1 else None)
                result["error"] = None
            except DistributedError as exc:
                result["error"] = str(exc)
    except BaseException:  # noqa: BLE001 - carried to the parent as text
        result["traceback"] = traceback.format_exc()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    os._exit(0)   # no destroy_process_group: a dead peer must not make teardown hang


def _launch(world: int, tmp_path: Path, job: str) -> tuple[list[dict], list[int | None]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, world, port, str(tmp_path), job)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + DEADLINE_S
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    codes = []
    for p in procs:
        if p.is_alive():   # never leave a hung rank behind
            p.kill()
            p.join(5)
        codes.append(p.exitcode)
    results = []
    for r in range(world):
        f = tmp_path / f"rank{r}.json"
        results.append(json.loads(f.read_text()) if f.exists() else {})
    return results, codes


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    """One launch of 2 processes: every world-2 case, then rank 1 dies in a ring run."""
    return _launch(2, tmp_path_factory.mktemp("world2"), "die")


@pytest.mark.parametrize("world", [2, 4])
def test_parallel_runs_equal_the_single_process_run(world, tmp_path, request):
    if world == 2:
        results, codes = request.getfixturevalue("world2")
        codes = [0, 0]   # rank 1 exits with 3 on purpose at the end (see the next test)
    else:
        results, codes = _launch(world, tmp_path, "cases")
    assert codes == [0] * world, (codes, results)
    for rank, res in enumerate(results):
        assert "traceback" not in res, res.get("traceback")
        assert "must divide" not in res["mismatch"] and f"{world} processes were started" in res["mismatch"]
        for name, diffs in res.items():
            if not isinstance(diffs, dict):   # "mismatch", "error"
                continue
            # relative to the size of the numbers (|v| up to ~8 here): splitting the tokens changes
            # the row blocking of every GEMM, i.e. float32 rounding, nothing more
            scale = max(1.0, diffs.pop("scale"))
            assert max(diffs.values()) <= TOL * scale, (rank, name, diffs, scale)
    for name, diffs in results[0].items():   # the figures, with -s
        print(name, diffs)


def test_fp8_weights_are_not_sharded_over_gloo(world2):
    assert "fp8 weights cannot be sharded over gloo" in world2[0][0]["fp8_shard"]


def test_a_rank_that_dies_stops_the_others_with_a_clear_error(world2):
    results, codes = world2
    assert codes[1] == 3 and codes[0] == 0, codes
    assert "traceback" not in results[0], results[0].get("traceback")
    assert results[0]["error"] and "Another rank has probably died" in results[0]["error"]


def test_ring_blocks_merged_by_log_sum_exp_equal_one_attention():
    from wan_core.distributed import block_attention_lse, merge_partial

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 37, 4, 16, generator=g) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    parts = [block_attention_lse(q, k[:, a:b], v[:, a:b]) for a, b in ((0, 11), (11, 30), (30, 37))]
    out, lse = parts[0]
    for o, s in parts[1:]:
        out, lse = merge_partial(out, lse, o, s)
    assert (out - ref).abs().max() < 2e-6   # measured 4.8e-7
    assert torch.allclose(lse, torch.logsumexp(torch.einsum("bqhd,bkhd->bhqk", q, k) / 4, -1), atol=2e-6)
    chunked, chunked_lse = block_attention_lse(q, k, v, max_scores=4 * 37 * 5)   # 5 query rows at a time
    assert (chunked - block_attention_lse(q, k, v)[0]).abs().max() < 2e-6 and chunked_lse.shape == (1, 4, 37)


def test_ulysses_degree_must_divide_the_heads():
    with pytest.raises(ValueError, match="must divide the 40 attention heads.*12 for Wan 2.1 1.3B, 40 for 14B"):
        ParallelConfig(ulysses=3).check(3, 40)
    ParallelConfig(ulysses=8).check(8, 40)
    with pytest.raises(ValueError, match=r"choose one of \[1, 2, 3, 4, 6, 12\]"):
        ParallelConfig(ulysses=8).check(8, 12)


def test_world_size_must_match_the_layout():
    with pytest.raises(ValueError, match=r"3 processes were started but ulysses 2 x ring 1 x 2 \(cfg parallel\) = 4"):
        ParallelConfig(2, 1, True).check(3)
    ParallelConfig(2, 2, True).check(8, 40)
    with pytest.raises(ValueError, match="must be >= 1"):
        ParallelConfig(0, 1)


# --------------------------------------------------------------------------- command line


def _generate_args(models, out: Path) -> list[str]:
    m = models
    return ["generate", "--dit", str(m.dit_t2v), "--vae", str(m.vae), "--text-encoder", str(m.text_encoder),
            "--prompt", "a cat", "--size", "48x32", "--frames", "5", "--steps", "2", "--device", "cpu",
            "--out", str(out)]


@pytest.mark.slow   # ~16 s loaded; bench/multi_gpu.py runs the same command
def test_torchrun_cli_writes_the_single_process_video(tmp_path):
    import subprocess
    import sys

    from wan_core.selftest import write_selftest_models
    from wan_core.video import read_video

    root = Path(__file__).resolve().parents[2]
    models = write_selftest_models(tmp_path / "models")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    from wan_core.cli import main

    assert main(_generate_args(models, tmp_path / "one.mp4")) == 0   # the single-process run, in this process
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "wan_core",
                          *_generate_args(models, tmp_path / "two.mp4"), "--ring", "2", "--shard-weights", "on"],
                         cwd=root, capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr
    assert two.stderr.count("2/2") == 1 and two.stderr.count("loaded wan_tiny_t2v") == 1   # rank 1 is quiet
    assert two.stdout.count("wrote ") == 1
    # rank 0 prints the run plan once: the rank's plan, the blocks sharded over the two ranks
    assert two.stderr.count("wan_core plan: sampling") == 1, two.stderr
    assert "DiT blocks sharded over the sequence group (FSDP2)" in two.stderr
    # the frames equal the single-process ones up to float32 rounding (ring attention merges blocks by
    # log-sum-exp, ~1e-6 relative; the latents are compared at 1e-5 in the tests above). After 8-bit
    # rounding one value may move a step, which H.264 spreads over its block: measured max 8/255 at a
    # few pixels, mean 0.015/255. A wrong rank split would move the mean by whole steps.
    one, two_frames = read_video(tmp_path / "one.mp4"), read_video(tmp_path / "two.mp4")
    assert one.shape == two_frames.shape
    diff = (one - two_frames).abs()
    assert diff.mean() <= 0.25 / 255 and (diff > 2 / 255).float().mean() <= 0.005, (diff.max(), diff.mean())


def test_cli_parallel_flags_without_torchrun_say_how_to_start(tmp_path, monkeypatch, capsys):
    from wan_core.cli import main

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    argv = ["generate", "--dit", "d.safetensors", "--vae", "v.safetensors", "--text-encoder", "t.safetensors",
            "--prompt", "a cat", "--ulysses", "2", "--cfg-parallel", "--out", str(tmp_path / "x.mp4")]
    assert main(argv) == 2
    assert "torchrun --nproc-per-node 4 -m wan_core generate" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    assert main(argv) == 2
    assert "3 processes were started but ulysses 2 x ring 1 x 2 (cfg parallel) = 4" in capsys.readouterr().err
