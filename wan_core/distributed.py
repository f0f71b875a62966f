"""Several processes (GPUs) for one video: sequence (context) parallelism and CFG parallelism.

Built on ``torch.distributed`` process groups and collectives only (gloo on the CPU, NCCL on
GPUs); no transport of our own.

Layout of the ``world = ulysses * ring * (2 if cfg_parallel else 1)`` ranks
(:class:`ParallelConfig`): global rank ``g = c * P + s`` with ``P = ulysses * ring`` the
sequence-parallel degree, ``c`` the CFG branch (0 conditional, 1 unconditional; always 0
without CFG parallelism) and ``s = r * ulysses + u`` the rank inside the sequence group
(``u`` its Ulysses index, ``r`` its ring index).

Sequence-parallel DiT call (:class:`SequenceParallelRunner`), for ``L`` tokens:

1. every rank runs ``dit.prepare`` (patch embedding, time, text, image; cheap next to the
   blocks), pads the tokens with zeros to ``L_pad = ceil(L / P) * P`` and keeps chunk ``s``
   of ``c = L_pad / P`` tokens; the RoPE tables are sliced the same way, so each rank rotates
   its tokens by their *global* positions (padding rows: cos 1, sin 0); with per-token
   timesteps (Wan 2.2 TI2V: ``e0`` ``[B, L, 6, dim]``) each rank keeps its tokens' rows of
   those too, padded the same way (only the last ranks' chunks are padded);
2. the blocks run on the chunk: modulation, cross-attention (the full text and image
   context on every rank) and FFN are per token; only self-attention mixes tokens and goes
   through :class:`SequenceParallelAttention`, handed to the blocks as explicit per-call data
   (``BlockInputs.self_attention``):

   - Ulysses: ``all_to_all`` in the Ulysses group turns q/k/v ``[B, c, H, D]`` into
     ``[B, ulysses * c, H / ulysses, D]`` (all tokens of the group, a slice of the heads);
   - Ring: the K/V block of each ring rank travels round the ring (``isend``/``irecv``);
     each block's attention is computed with an explicit softmax that also yields its
     log-sum-exp, and the partial results merge exactly by the online-softmax rule
     ``lse = logaddexp(lse_a, lse_b)``, ``o = o_a e^(lse_a - lse) + o_b e^(lse_b - lse)``;
   - the padding keys (the tail of the sequence) are cut off before attention, so they are
     excluded exactly (padding queries compute harmless values that are dropped);
   - the reverse ``all_to_all`` brings the heads back;
3. the head runs on the chunk; ``all_gather`` in the sequence group rebuilds its output
   ``[B, L, 64]``, unpatchified to the velocity.

CFG parallelism (:class:`CFGParallel`): the two halves of the world evaluate the conditional
and the unconditional branch of a step at once; ``all_gather`` in the pair group
``{s, P + s}`` hands both predictions to every rank, so every rank runs the same solver on
the same numbers and ends with the same latents.

Communication per DiT call and rank (``b`` bytes per element, ``d = dim``, ``N`` blocks):
Ulysses ``N * 4 * (U - 1)/U * L/P * d * b`` (q, k, v forward, output back), Ring
``N * 2 * (R - 1) * L/P * d * b`` (K and V round the ring), plus one ``all_gather`` of the
head output (``(P - 1) * L/P * 64 * 4`` bytes; the head is per token, so it runs on the chunk)
(:func:`comm_bytes_per_step`; measured equal in ``bench/multi_gpu.py``).

Sharded weights (:func:`shard_blocks`): FSDP2 ``fully_shard`` of every block over the
sequence group, so a rank keeps 1/P of the block weights and gathers a block just before it
runs. The run plan decides (``ParallelConfig.shard_weights`` "auto"): a rank's budget is
planned by :mod:`wan_core.parallel_plan` (whole weights, else sharded, else block swap) and
the sampling stage of :func:`wan_core.run_plan.prepare_run` (``parallel=``) shards.

Limits: step caches (TeaCache/MagCache) decide per rank and are refused with sequence
parallelism (their decisions would differ between ranks), and so are VACE models (their
hints are full-sequence); the ring's per-block attention is an explicit softmax on every
device, in query chunks of at most :data:`MAX_SCORES` scores (a flash kernel returning the
log-sum-exp would be faster on GPUs); every rank runs the text encoder, the image encode and
the VAE decode itself (same numbers, no communication; only rank 0's frames are written).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .attention import attention
from .dit import BlockInputs, RopeOptions, WanDiT
from .fp8 import is_fp8
from .offload import BlockSwap
from .runner import BlockExecutor, DiTRunner

__all__ = ["SHARD_WEIGHTS", "ParallelConfig", "ParallelGroups", "DistributedError", "make_groups", "init_process_group",
           "cli_parallel", "SequenceParallelAttention", "SequenceParallelRunner", "CFGParallel", "shard_tokens", "gather_tokens",
           "comm_bytes_per_step", "shard_blocks", "shardable_params", "is_sharded"]

#: Head counts of the published DiTs (for the error message; the check uses the model's own).
PUBLISHED_HEADS = "12 for Wan 2.1 1.3B, 40 for 14B"
SHARD_WEIGHTS: tuple[str, ...] = ("auto", "on", "off")
DEFAULT_TIMEOUT_S = 600.0


class DistributedError(RuntimeError):
    """A collective with the other ranks failed (a rank died, timed out or refused)."""


@dataclass(frozen=True)
class ParallelConfig:
    """How many processes share one video.

    ulysses: Ulysses degree U (all-to-all over attention heads; must divide the head count).
    ring: Ring degree R (K/V blocks passed round a ring). Sequence-parallel degree P = U * R.
    cfg_parallel: run the conditional and unconditional passes on two halves of the world.
    shard_weights: FSDP2-shard the DiT blocks over the sequence group (:func:`shard_blocks`):
        "auto" (the run plan shards when the whole DiT does not fit a rank's budget, before
        falling back to block swap; :mod:`wan_core.parallel_plan`), "on", "off".
    """

    ulysses: int = 1
    ring: int = 1
    cfg_parallel: bool = False
    shard_weights: str = "auto"

    def __post_init__(self) -> None:
        if self.ulysses < 1 or self.ring < 1:
            raise ValueError(f"ulysses and ring degrees must be >= 1; got ulysses={self.ulysses}, ring={self.ring}")
        if self.shard_weights not in SHARD_WEIGHTS:
            raise ValueError(f"shard_weights must be one of {', '.join(SHARD_WEIGHTS)}; got {self.shard_weights!r}")

    @property
    def sequence_degree(self) -> int:
        return self.ulysses * self.ring

    @property
    def world_size(self) -> int:
        return self.sequence_degree * (2 if self.cfg_parallel else 1)

    def check(self, world_size: int, num_heads: int | None = None) -> None:
        """Refuse a layout that does not fill ``world_size`` or split ``num_heads``."""
        if world_size != self.world_size:
            cfg = " x 2 (cfg parallel)" if self.cfg_parallel else ""
            raise ValueError(f"{world_size} processes were started but ulysses {self.ulysses} x ring {self.ring}{cfg} "
                             f"= {self.world_size}; start {self.world_size} processes (torchrun --nproc-per-node "
                             f"{self.world_size}) or change --ulysses/--ring/--cfg-parallel")
        if num_heads is not None and num_heads % self.ulysses:
            ok = [u for u in range(1, num_heads + 1) if num_heads % u == 0]
            raise ValueError(f"the Ulysses degree {self.ulysses} must divide the {num_heads} attention heads of this "
                             f"model ({PUBLISHED_HEADS}); choose one of {ok} and put the rest of the processes in "
                             "--ring")

    def describe(self) -> str:
        return (f"{self.world_size} processes: ulysses {self.ulysses} x ring {self.ring}"
                f"{' x cfg 2' if self.cfg_parallel else ''}")


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's place in the layout and its process groups (see the module docstring)."""

    config: ParallelConfig
    rank: int
    sequence_rank: int          # s, 0..P-1
    ulysses_rank: int           # u, 0..U-1
    ring_rank: int              # r, 0..R-1
    branch: int                 # c: 0 conditional, 1 unconditional (0 without CFG parallelism)
    sequence_group: object
    ulysses_group: object
    ring_group: object
    ring_peers: tuple[int, ...]  # global ranks of the ring group, by ring index
    cfg_group: object | None

    def wrap_runner(self, runner: DiTRunner) -> DiTRunner:
        """The runner for this rank: ``runner`` itself without sequence parallelism, else a
        :class:`SequenceParallelRunner` with the same block executor (block swap)."""
        if self.config.sequence_degree == 1:
            return runner
        if runner.step_cache is not None:
            raise ValueError("step caches (TeaCache/MagCache) decide per rank and cannot run with --ulysses/--ring; "
                             "turn the step cache off or use --cfg-parallel alone")
        return SequenceParallelRunner(runner.dit, self, runner.executor)

    def cfg_parallel(self) -> CFGParallel | None:
        """What :func:`wan_core.pipeline.sample` takes as ``cfg_parallel`` (None without it)."""
        return CFGParallel(self) if self.config.cfg_parallel else None


def _wrap(what: str, fn: Callable[[], object]) -> object:
    """Run a collective; a failure becomes a :class:`DistributedError` that says what to do."""
    try:
        return fn()
    except DistributedError:
        raise
    except (RuntimeError, ValueError) as exc:  # DistBackendError/DistNetworkError are RuntimeErrors
        rank = dist.get_rank() if dist.is_initialized() else "?"
        # the backend's first sentence, without its source location ("[.../pair.cc:537] Read error ...")
        cause = re.sub(r"^\[[^\]]*\]\s*", "", (str(exc).splitlines() or [""])[0]).split(". ")[0]
        raise DistributedError(f"rank {rank}: {what} with the other processes failed ({type(exc).__name__}: "
                               f"{cause}). Another rank has probably died or timed out; read its log. This rank "
                               "stops too.") from exc


def init_process_group(timeout_s: float = DEFAULT_TIMEOUT_S, backend: str | None = None) -> torch.device:
    """Join the world torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...).

    backend: default NCCL when CUDA is available, else gloo. Returns this rank's device
    (``cuda:LOCAL_RANK`` or ``cpu``). Does nothing but return the device when already joined.
    """
    cuda = torch.cuda.is_available() and backend != "gloo"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"), timeout=timedelta(seconds=timeout_s))
    return device


def make_groups(config: ParallelConfig, num_heads: int | None = None) -> ParallelGroups:
    """Validate ``config`` against the joined world and ``num_heads``, build every group.

    Every rank must call this with the same arguments (group creation is collective).
    """
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised; start under torchrun (wan_core.distributed."
                           "init_process_group) before building the parallel groups")
    world, rank = dist.get_world_size(), dist.get_rank()
    config.check(world, num_heads)
    u_deg, r_deg, p = config.ulysses, config.ring, config.sequence_degree
    branches = 2 if config.cfg_parallel else 1
    c, s = divmod(rank, p)
    r, u = divmod(s, u_deg)
    mine: dict[str, object] = {}
    # new_group is collective over the whole world: every rank creates every group, in order
    for cc in range(branches):
        ranks = [cc * p + i for i in range(p)]
        g = dist.new_group(ranks)
        if cc == c:
            mine["sequence"] = g
        for rr in range(r_deg):
            g = dist.new_group([cc * p + rr * u_deg + uu for uu in range(u_deg)])
            if (cc, rr) == (c, r):
                mine["ulysses"] = g
        for uu in range(u_deg):
            peers = [cc * p + rr * u_deg + uu for rr in range(r_deg)]
            g = dist.new_group(peers)
            if (cc, uu) == (c, u):
                mine["ring"], mine["peers"] = g, tuple(peers)
    cfg_group = None
    if config.cfg_parallel:
        for ss in range(p):
            g = dist.new_group([ss, p + ss])
            if ss == s:
                cfg_group = g
    return ParallelGroups(config, rank, s, u, r, c, mine["sequence"], mine["ulysses"], mine["ring"],
                          mine["peers"], cfg_group)


# --------------------------------------------------------------------------- attention


def _ulysses_scatter_heads(x: Tensor, group, degree: int) -> Tensor:
    """``[B, c, H, D]`` (tokens of this rank, all heads) -> ``[B, degree*c, H/degree, D]``."""
    b, n, h, d = x.shape
    send = x.reshape(b, n, degree, h // degree, d).permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)
    _wrap("the Ulysses all_to_all", lambda: dist.all_to_all_single(recv, send, group=group))
    # recv[j] holds the tokens of Ulysses rank j: rank order is token order
    return recv.permute(1, 0, 2, 3, 4).reshape(b, degree * n, h // degree, d)


def _ulysses_gather_heads(x: Tensor, group, degree: int) -> Tensor:
    """Inverse of :func:`_ulysses_scatter_heads`: ``[B, degree*c, H/degree, D]`` -> ``[B, c, H, D]``."""
    b, m, hh, d = x.shape
    n = m // degree
    send = x.reshape(b, degree, n, hh, d).permute(1, 0, 2, 3, 4).contiguous()
    recv = torch.empty_like(send)
    _wrap("the Ulysses all_to_all", lambda: dist.all_to_all_single(recv, send, group=group))
    return recv.permute(1, 2, 0, 3, 4).reshape(b, n, degree * hh, d)


#: Largest score matrix (elements, float32) one ring block builds at once: 2**26 = 256 MiB.
MAX_SCORES = 1 << 26


def block_attention_lse(q: Tensor, k: Tensor, v: Tensor, max_scores: int = MAX_SCORES) -> tuple[Tensor, Tensor]:
    """Softmax attention of ``q`` ``[B, Lq, H, D]`` over one key block ``[B, Lk, H, D]``.

    Returns the output ``[B, Lq, H, D]`` float32 and its log-sum-exp ``[B, H, Lq]`` float32
    (explicit softmax, so the LSE needed by the ring merge is exact on every device). Queries
    run in chunks so the score matrix stays under ``max_scores`` elements (rows are
    independent; only the GEMM rounding may change, <= 5e-7 measured).
    """
    b, lq, h, _ = q.shape
    rows = max(1, max_scores // max(1, b * h * k.shape[1]))
    if rows < lq:
        parts = [block_attention_lse(q[:, i:i + rows], k, v, max_scores) for i in range(0, lq, rows)]
        return torch.cat([o for o, _ in parts], dim=1), torch.cat([s for _, s in parts], dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()).mul_(q.shape[-1] ** -0.5)
    lse = torch.logsumexp(scores, dim=-1)
    probs = scores.sub_(lse[..., None]).exp_()   # in place: one [B, H, Lq, Lk] float32 alive, not three
    return torch.einsum("bhqk,bkhd->bqhd", probs, v.float()), lse


def merge_partial(out: Tensor, lse: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Online-softmax merge of two partial attentions over disjoint key sets (float32)."""
    new = torch.logaddexp(lse, lse_b)
    w_a = torch.exp(lse - new).transpose(1, 2)[..., None]     # [B, Lq, H, 1]
    w_b = torch.exp(lse_b - new).transpose(1, 2)[..., None]
    return out * w_a + out_b * w_b, new


@dataclass(frozen=True)
class SequenceParallelAttention:
    """Self-attention over the tokens of the whole sequence group (``BlockInputs.self_attention``).

    Called as ``op(q, k, v, backend)`` with this rank's chunk ``[B, c, H, D]`` (RoPE already
    applied); returns the chunk's output ``[B, c, H, D]`` in ``q.dtype``. ``tokens``: the real
    token count L (keys at or beyond it are padding and excluded).
    """

    groups: ParallelGroups
    tokens: int

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, backend: str) -> Tensor:
        g, cfg = self.groups, self.groups.config
        u_deg, r_deg = cfg.ulysses, cfg.ring
        if u_deg > 1:
            q, k, v = (_ulysses_scatter_heads(t, g.ulysses_group, u_deg) for t in (q, k, v))
        block = q.shape[1]   # tokens of one ring block = ulysses * c, contiguous positions

        def valid(ring_index: int) -> int:
            return max(0, min(block, self.tokens - ring_index * block))

        if r_deg == 1:
            n = valid(0)
            out = attention(q, k[:, :n], v[:, :n], backend)
        else:
            out = self._ring(q, k, v, valid).to(q.dtype)
        if u_deg > 1:
            out = _ulysses_gather_heads(out.contiguous(), g.ulysses_group, u_deg)
        return out

    def _ring(self, q: Tensor, k: Tensor, v: Tensor, valid: Callable[[int], int]) -> Tensor:
        g, r_deg = self.groups, self.groups.config.ring
        send_to = g.ring_peers[(g.ring_rank + 1) % r_deg]
        recv_from = g.ring_peers[(g.ring_rank - 1) % r_deg]
        kv = torch.stack((k, v)).contiguous()
        out = lse = None
        for step in range(r_deg):
            reqs = []
            if step < r_deg - 1:   # start passing this block on while it is used here
                nxt = torch.empty_like(kv)
                ops = [dist.P2POp(dist.isend, kv, send_to, g.ring_group),
                       dist.P2POp(dist.irecv, nxt, recv_from, g.ring_group)]
                reqs = _wrap("the ring K/V exchange", lambda: dist.batch_isend_irecv(ops))
            n = valid((g.ring_rank - step) % r_deg)
            if n:
                o_b, lse_b = block_attention_lse(q, kv[0, :, :n], kv[1, :, :n])
                out, lse = (o_b, lse_b) if out is None else merge_partial(out, lse, o_b, lse_b)
            for req in reqs:
                _wrap("the ring K/V exchange", req.wait)
            if reqs:
                kv = nxt
        assert out is not None  # ring block 0 always holds real tokens
        return out


# --------------------------------------------------------------------------- tokens


def _chunk_of(x: Tensor, chunk: int, index: int, fill: float = 0.0) -> Tensor:
    """Rows ``index * chunk`` .. ``(index + 1) * chunk`` of ``x`` along dim 1, the rows past its
    end filled with ``fill``: a copy, so the full tensor can be freed (only the last ranks'
    chunks are padded; nobody builds the padded full sequence)."""
    length = x.shape[1]
    start, stop = min(index * chunk, length), min((index + 1) * chunk, length)
    part = x[:, start:stop]
    if stop - start == chunk:
        return part.clone()
    return torch.cat([part, x.new_full((x.shape[0], chunk - (stop - start), *x.shape[2:]), fill)], dim=1)


def shard_tokens(tokens: Tensor, inputs: BlockInputs, groups: ParallelGroups) -> tuple[Tensor, BlockInputs]:
    """This rank's chunk ``[B, c, dim]`` of ``tokens`` ``[B, L, dim]`` (zero-padded to a
    multiple of P) and the block inputs for it: RoPE rows of the same global positions, the
    sequence-parallel self-attention, and with per-token timesteps (Wan 2.2 TI2V: ``e0``
    ``[B, L, 6, dim]``, ``e`` ``[B, L, dim]``) the same rows of those (padding rows zero;
    their outputs are dropped)."""
    p, s = groups.config.sequence_degree, groups.sequence_rank
    length = tokens.shape[1]
    chunk = math.ceil(length / p)
    cos, sin = inputs.rope
    # padding rows: no rotation (cos 1, sin 0); the tables are [L, 1, head_dim/2]
    rope = (_chunk_of(cos[None], chunk, s, 1.0)[0], _chunk_of(sin[None], chunk, s, 0.0)[0])
    local = dataclasses.replace(inputs, rope=rope, self_attention=SequenceParallelAttention(groups, length))
    if inputs.e0.dim() == 4:   # one timestep per token: each rank takes its tokens' rows
        local = dataclasses.replace(local, e0=_chunk_of(inputs.e0, chunk, s), e=_chunk_of(inputs.e, chunk, s))
    return _chunk_of(tokens, chunk, s), local


def gather_tokens(local: Tensor, groups: ParallelGroups, length: int) -> Tensor:
    """All chunks ``[B, c, features]`` of the sequence group, in order, without the padding: ``[B, L, features]``."""
    parts = [torch.empty_like(local) for _ in range(groups.config.sequence_degree)]
    _wrap("the token all_gather", lambda: dist.all_gather(parts, local.contiguous(), group=groups.sequence_group))
    return torch.cat(parts, dim=1)[:, :length]


class SequenceParallelRunner(DiTRunner):
    """:class:`~wan_core.runner.DiTRunner` whose blocks run on this rank's token chunk.

    Every rank of the sequence group calls it with the same arguments and gets the same full
    velocity. Block executors (block swap) plug in unchanged; step caches are refused.
    """

    def __init__(self, dit: WanDiT, groups: ParallelGroups, executor: BlockExecutor | None = None) -> None:
        super().__init__(dit, executor, None)
        groups.config.check(groups.config.world_size, dit.cfg.num_heads)
        if isinstance(executor, BlockSwap) and is_sharded(dit):
            raise ValueError("block swap cannot stream sharded blocks (shard_blocks): use one or the other")
        self.groups = groups

    def __call__(self, x: Tensor, t: Tensor, context: Tensor, clip_fea: Tensor | None = None,
                 y: Tensor | None = None, branch: str = "cond", *, rope: RopeOptions | None = None,
                 skip_blocks: Iterable[int] = (), vace_strength: float | None = None,
                 full_ref: Tensor | None = None) -> Tensor:
        if vace_strength is not None or self.dit.cfg.vace_layers:
            raise ValueError("VACE models do not run with sequence parallelism yet (their hints are full-sequence); "
                             "use --cfg-parallel alone or one process")
        if self.step_cache is not None:
            raise ValueError("step caches (TeaCache/MagCache) decide per rank and cannot run with sequence "
                             "parallelism; turn the step cache off or use --cfg-parallel alone")
        extra = {} if rope is None else {"rope": rope}
        if full_ref is not None:
            extra["full_ref"] = full_ref
        tokens, inputs = self.dit.prepare(x, t, context, clip_fea, y, **extra)
        skip = frozenset(int(i) for i in skip_blocks)
        n = len(self.dit.blocks)
        if not all(0 <= i < n for i in skip):
            raise ValueError(f"skip_blocks {sorted(skip)} must be block indices 0..{n - 1}")
        length, (f, h, w), ref = tokens.shape[1], inputs.grid, inputs.ref_tokens
        local, local_inputs = shard_tokens(tokens, dataclasses.replace(inputs, skip_blocks=skip), self.groups)
        del tokens, inputs   # the full sequence (and per-token timesteps) is not needed again
        local = self.executor.run(self.dit.blocks, local, local_inputs)
        # the head is per token: run it on the chunk and gather 64 features a token, not dim;
        # a Fun V1.1 reference frame's tokens lead the sequence and are dropped (dit.finish)
        out = gather_tokens(self.dit.head(local, local_inputs.e), self.groups, length)
        return self.dit.unpatchify(out[:, ref:], (f - 1, h, w) if ref else (f, h, w))


class CFGParallel:
    """Both CFG branches of a step at once on the two halves of the world.

    ``pair(cond_fn, uncond_fn) -> (cond, uncond)``: this rank evaluates its own branch
    (``groups.branch``) and exchanges it with its partner (``all_gather`` in the pair group).
    Passed to :func:`wan_core.pipeline.sample` as ``cfg_parallel``.
    """

    def __init__(self, groups: ParallelGroups) -> None:
        if groups.cfg_group is None:
            raise ValueError("CFGParallel needs groups built with ParallelConfig(cfg_parallel=True)")
        self.groups = groups

    def pair(self, cond_fn: Callable[[], Tensor], uncond_fn: Callable[[], Tensor]) -> tuple[Tensor, Tensor]:
        mine = (cond_fn if self.groups.branch == 0 else uncond_fn)().contiguous()
        both = [torch.empty_like(mine) for _ in range(2)]
        _wrap("the CFG all_gather", lambda: dist.all_gather(both, mine, group=self.groups.cfg_group))
        return both[0], both[1]


def cli_parallel(args) -> ParallelGroups | None:
    """``--ulysses/--ring/--cfg-parallel`` under torchrun -> this rank's groups (None: one process).

    Checks the layout against ``WORLD_SIZE`` before anything is loaded, joins the world (NCCL
    on GPUs, gloo with ``--device cpu``), gives each rank its own GPU (``cuda:LOCAL_RANK``
    when ``--device`` is auto/cuda) and quiets the log of every rank but 0.
    """
    config = ParallelConfig(args.ulysses, args.ring, args.cfg_parallel, args.shard_weights)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and config.world_size == 1:
        return None
    if "RANK" not in os.environ:
        raise ValueError(f"--ulysses/--ring/--cfg-parallel ask for {config.world_size} processes: start them with "
                         f"torchrun --nproc-per-node {config.world_size} -m wan_core generate ...")
    config.check(world)
    cpu = args.device == "cpu" or not torch.cuda.is_available()
    device = init_process_group(backend="gloo" if cpu else None)
    if device.type == "cuda" and args.device in ("auto", "cuda"):
        args.device = str(device)
    if dist.get_rank() != 0:
        import logging

        logging.getLogger().setLevel(logging.WARNING)
    return make_groups(config)


def comm_bytes_per_step(config: ParallelConfig, tokens: int, dim: int, layers: int, latent_elems: int,
                        activation_bytes: int = 2, guided: bool = True, head_features: int = 64,
                        sharded_bytes: int = 0) -> dict[str, int]:
    """Bytes one rank sends per sampling step (the formula of the module docstring).

    tokens: L (before padding); dim: model width; layers: DiT blocks; latent_elems: elements
    of one velocity ``[16, T', H/8, W/8]`` (float32, exchanged by CFG parallelism);
    activation_bytes: of the compute dtype (2 for bf16); guided: cfg != 1 (two branches);
    head_features: per token out of the head (patch 1x2x2 x 16 channels = 64);
    sharded_bytes: the blocks' bytes FSDP2 shards (:func:`shard_blocks`; 0 = whole weights):
    each DiT call all-gathers them, a rank sending its 1/P shard to the P - 1 others.
    Returns the parts ("ulysses", "ring", "gather", "fsdp", "cfg") and their "total".
    """
    u, r, p = config.ulysses, config.ring, config.sequence_degree
    chunk = math.ceil(tokens / p)
    calls = (1 if config.cfg_parallel else 2) if guided else 1
    parts = {
        # q, k, v out and the attention output back, each keeping 1/U of it at home
        "ulysses": layers * 4 * chunk * dim * activation_bytes * (u - 1) // u,
        # K and V of a ring block (U chunks, 1/U of the heads) passed on R - 1 times
        "ring": layers * 2 * (r - 1) * chunk * dim * activation_bytes,
        # the head's float32 output chunk (64 features a token) to every other rank of the group
        "gather": (p - 1) * chunk * head_features * 4 if p > 1 else 0,
        "fsdp": sharded_bytes * (p - 1) // p,
    }
    parts = {k: v * calls for k, v in parts.items()}
    parts["cfg"] = latent_elems * 4 if config.cfg_parallel and guided else 0
    parts["total"] = sum(parts.values())
    return parts


def shardable_params(block: nn.Module) -> tuple[set[nn.Parameter], set[nn.Parameter]]:
    """(sharded, kept whole) parameters of one block under :func:`shard_blocks`: the ones stored
    in the dtype of the Linear weights are sharded, the others (float32 norms and modulation of
    a bf16 model, fp8 scales, bf16 biases of an fp8 model) stay whole on every rank."""
    weight_dtype = block.self_attn.q.weight.dtype
    params = set(block.parameters())
    sharded = {p for p in params if p.dtype == weight_dtype}
    return sharded, params - sharded


def shard_blocks(dit: WanDiT, groups: ParallelGroups, device: torch.device | str = "cpu", *,
                 mesh=None) -> WanDiT:
    """Shard the DiT blocks' weights over the sequence group with FSDP2 (``fully_shard``).

    Each rank keeps 1/P of every block's Linear weights (the dtype they are stored in: bf16,
    fp16, fp32; fp8 stays fp8 and needs NCCL) and all-gathers a block's just before it runs,
    freeing them after (``reshard_after_forward``); the other parameters
    (:func:`shardable_params`) stay whole on every rank. Embeddings and head stay whole too
    (about 2 % of the 14B). The ranks of a sequence group run the same blocks at the same time
    (Skip Layer Guidance skips the same ones in a group), which FSDP's collectives need; CFG
    halves never share a collective. Not combinable with block swap (it moves whole blocks).
    ``mesh``: a ``DeviceMesh`` over ``groups.sequence_group`` (default: built here; the
    simulated GPU builds its own outside its fake tensors). Returns ``dit``, changed in place:
    it stays sharded. Every rank of the world calls it.
    """
    # FSDP and DeviceMesh cost ~2 s of import: only a sharded run pays it
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    device = torch.device(device)
    if groups.config.sequence_degree == 1:
        return dit
    if dist.get_backend(groups.sequence_group) == "gloo" and any(is_fp8(p.dtype) for p in dit.blocks.parameters()):
        raise ValueError("fp8 weights cannot be sharded over gloo (it has no float8 all_gather): shard them on GPUs "
                         "(NCCL) or store the DiT in bf16")
    mesh = mesh or DeviceMesh.from_group(groups.sequence_group, device.type)
    for block in dit.blocks:
        if any(p.device.type != device.type or device.index not in (None, p.device.index) for p in block.parameters()):
            block.to(device)   # one whole block on the device at a time; FSDP keeps this rank's shard
        _sharded, whole = shardable_params(block)
        fully_shard(block, mesh=mesh, reshard_after_forward=True, ignored_params=whole or None)
    return dit


def is_sharded(dit: WanDiT) -> bool:
    """Whether :func:`shard_blocks` has sharded ``dit``'s blocks (their weights are DTensors)."""
    return any(type(p).__name__ == "DTensor" for p in dit.blocks.parameters())   # no DTensor import (see above)
