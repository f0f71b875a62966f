"""The memory plan of one rank when several processes share a video (:mod:`wan_core.distributed`).

Pure byte arithmetic beside :mod:`wan_core.planner` (same reserve, same activation model),
checked against the real code on the simulated GPU (:mod:`wan_core.memsim_parallel`,
``bench/multi_gpu.py``, ``tests/unit/test_parallel_plan.py``). For ``L`` tokens,
``P = ulysses * ring`` ranks per sequence group, chunk ``c = ceil(L / P)``, ``d = dim``,
``f = ffn_dim``, ``b`` bytes of the compute dtype, a rank's DiT step holds its weights plus the
larger of two phases:

- **prepare** (every rank embeds the whole latent, then keeps its chunk): the patch
  embedding and its token-major copy, ``2 * 4 L d``; with per-token timesteps (Wan 2.2
  TI2V) the full ``e`` / ``e0`` and the time MLP's hidden rows, ``8 * 4 L d``; the RoPE
  tables built in float64; the latent buffers and text context of the single-process model;
- **blocks** (on the chunk): the single-process activation estimate
  (:func:`wan_core.planner.dit_activation_bytes`) at ``c`` tokens, plus in the attention
  phase: Ulysses (U > 1) the all-to-all outputs beside their inputs and one send/receive
  pair, ``5 b d`` a token; Ring (R > 1) the K/V block in use and the one arriving
  (``4 b d``), the float32 partial outputs of the explicit-softmax merge (``8 d``) and one
  chunk of scores (at most ``distributed.MAX_SCORES`` float32); plus the
  gathered head output, ``3 * 4 * 64 L``.

Weights per rank, by placement (the plan takes the first that fits the budget minus the
reserve; ``ParallelConfig.shard_weights`` "on" / "off" forces or forbids sharding):

1. ``whole``: every weight on every rank (all blocks resident);
2. ``sharded`` (P > 1): FSDP2 (:func:`wan_core.distributed.shard_blocks`): the non-block
   weights and each block's unsharded parameters whole, its Linear weights 1/P (rows rounded
   up); in the block phase only, the gathered weights of the block running and the
   all-gather buffer (two blocks' shardable bytes); fp8 stays fp8;
3. ``swap``: block swap as in one process (K resident blocks + two streamed), with this
   rank's activations.

Under CFG parallelism a rank evaluates one guidance branch per step (the activations of
one pass, as with one process, whose passes run one after the other); the pair exchange is
two velocities.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .dit import WanDiT, keeps_fp32
from .distributed import MAX_SCORES, ParallelConfig, shardable_params
from .layers import CastLinear
from .offload import module_bytes
from .planner import DEFAULT_RESERVE, DIT_STEP_FIXED, GiB, DiTSizes, PlanError, _storage_bytes, dit_activation_bytes

__all__ = ["RankPlan", "BlockShards", "block_shards", "block_shards_for", "rank_activation_bytes", "plan_rank",
           "WEIGHT_PLACEMENTS"]

WEIGHT_PLACEMENTS: tuple[str, ...] = ("whole", "sharded", "swap")
HEAD_FEATURES = 64   # patch 1x2x2 x 16 channels (TI2V: 1x2x2 x 48 = 192, counted from out_dim)


@dataclass(frozen=True)
class BlockShards:
    """Each block's parameters that FSDP2 shards, as ``(bytes, rows)`` per parameter (a rank
    keeps ``ceil(rows / P)`` rows of each: FSDP2 pads dim 0 to a multiple of P), and the bytes
    it keeps whole (``whole``), per block."""

    sharded: tuple[tuple[tuple[int, int], ...], ...]
    whole: tuple[int, ...]

    def per_rank(self, degree: int) -> int:
        """Bytes a rank keeps of all blocks when sharded over ``degree`` ranks."""
        return sum(self.whole) + sum(nbytes // rows * math.ceil(rows / degree)
                                     for block in self.sharded for nbytes, rows in block)

    def block_bytes(self, index: int) -> int:
        """Sharded bytes of block ``index`` when gathered whole."""
        return sum(nbytes for nbytes, _rows in self.sharded[index])

    @property
    def largest_sharded(self) -> int:
        return max((self.block_bytes(i) for i in range(len(self.sharded))), default=0)

    @property
    def total_sharded(self) -> int:
        return sum(self.block_bytes(i) for i in range(len(self.sharded)))


def _rows(p) -> int:
    return p.shape[0] if p.dim() else 1


def block_shards(dit) -> BlockShards:
    """:class:`BlockShards` of a WanDiT (a loaded one, or one built on the meta device / the
    simulated GPU), by the rule of :func:`wan_core.distributed.shardable_params`."""
    sharded, whole = [], []
    for block in dit.blocks:
        shard, _whole = shardable_params(block)
        sharded.append(tuple(sorted((p.numel() * p.element_size(), _rows(p)) for p in shard)))
        whole.append(module_bytes(block) - sum(b for b, _r in sharded[-1]))
    return BlockShards(tuple(sharded), tuple(whole))


def block_shards_for(cfg, storage: str = "bf16") -> BlockShards:
    """:class:`BlockShards` of a DiT of ``cfg`` stored as ``storage`` (the loaders' rule, as
    :func:`wan_core.planner.dit_sizes`), from a meta build: nothing allocated or loaded. fp8:
    only the Linear weights (1 byte) are sharded, their scales and the bf16 biases stay whole;
    otherwise every parameter in the storage dtype is sharded, the float32-policy ones whole."""
    nbytes, fp8 = _storage_bytes(storage), storage.startswith("fp8")
    with torch.device("meta"):
        model = WanDiT(cfg)
    sharded, whole = [], []
    for i, block in enumerate(model.blocks):
        linear = {f"{n}.weight" for n, m in block.named_modules() if isinstance(m, CastLinear)}
        shard, w_bytes = [], 0
        for name, p in block.named_parameters():
            if keeps_fp32(f"blocks.{i}.{name}") and nbytes != 4:   # float32 storage: one dtype, all sharded
                w_bytes += p.numel() * 4
            elif name in linear or not fp8:
                shard.append((p.numel() * nbytes, _rows(p)))
                w_bytes += 4 if fp8 else 0   # the fp8 scale
            else:
                w_bytes += p.numel() * 2     # fp8 storage: biases in bf16
        sharded.append(tuple(sorted(shard)))
        whole.append(w_bytes)
    return BlockShards(tuple(sharded), tuple(whole))


def rank_activation_bytes(dit: DiTSizes, tokens: int, config: ParallelConfig, attention: str = "sdpa",
                          compute_bytes: int = 2, *, per_token_timesteps: bool = False, freq_dim: int = 256,
                          block_buffers: int = 0) -> int:
    """Device bytes of one rank's DiT step beyond its resident weights (module docstring): the
    larger of the prepare phase (whole sequence) and the block phase (its chunk, plus
    ``block_buffers``: weights present only while blocks run, FSDP2's gathered blocks)."""
    p, u, r = config.sequence_degree, config.ulysses, config.ring
    if p == 1:
        return dit_activation_bytes(dit, tokens, attention, compute_bytes) + block_buffers
    d, b, h = dit.dim, compute_bytes, dit.num_heads
    chunk = math.ceil(tokens / p)
    latent = 16 * (2 * dit.out_dim + dit.in_dim - dit.out_dim)
    context = (512 + 257) * 4 * b * d
    prepare = tokens * (2 * 4 * d + latent + 3 * 8 * dit.head_dim // 2) + context + DIT_STEP_FIXED
    if per_token_timesteps:
        prepare += tokens * (8 * 4 * d + 2 * 8 * freq_dim)
    extra = 0
    if u > 1:
        extra += 5 * b * d
    if r > 1:
        extra += 4 * b * d + 8 * d
    block_tokens = u * chunk                      # a ring block: the Ulysses group's tokens, h / U heads
    scores = min(MAX_SCORES, (h // u) * block_tokens * block_tokens) * 4 if r > 1 else 0
    # the attention phase grows by ``extra``; it adds to the FFN phase only where it exceeds it
    attention_phase = 20 * d + 2 * b * d + extra
    ffn_phase = 12 * d + b * d + 2 * b * dit.ffn_dim
    base = dit_activation_bytes(dit, chunk, attention, compute_bytes)
    grown = chunk * max(0, attention_phase - max(20 * d + 2 * b * d, ffn_phase)) + scores
    head = 3 * 4 * tokens * HEAD_FEATURES * max(1, dit.out_dim // 16)
    return max(prepare, base + grown + head + block_buffers)


@dataclass(frozen=True)
class RankPlan:
    """One rank's DiT placement and its estimate (bytes), for the layout ``config``."""

    config: ParallelConfig
    budget: int
    tokens: int                  # L of one DiT call
    chunk: int                   # tokens a rank computes: ceil(L / P)
    weights: str                 # one of WEIGHT_PLACEMENTS
    num_blocks: int
    resident_blocks: int         # whole blocks on the device (swap: K; whole and sharded: N)
    weight_bytes: int            # DiT weight bytes resident on the device (swap: with the two streamed blocks)
    activation_bytes: int        # the step's working set (sharded: with the gathered blocks)
    reserve_bytes: int = DEFAULT_RESERVE

    @property
    def peak_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes + self.reserve_bytes

    def describe(self) -> str:
        c = self.config
        p = c.sequence_degree
        if self.weights == "sharded":
            where = f"DiT blocks sharded over {p} ranks (FSDP2)"
        elif self.weights == "whole" or self.resident_blocks >= self.num_blocks:
            where = f"all {self.num_blocks} DiT blocks resident on each rank"
        else:
            where = (f"{self.resident_blocks}/{self.num_blocks} DiT blocks resident on each rank, "
                     f"{self.num_blocks - self.resident_blocks} streamed")
        share = f"{self.chunk} of {self.tokens} tokens a rank" if p > 1 else f"{self.tokens} tokens"
        branch = ", one CFG branch a rank" if c.cfg_parallel else ""
        return (f"{where} ({c.describe()}; {share}{branch}; per rank: weights {self.weight_bytes / GiB:.2f} GiB + "
                f"activations {self.activation_bytes / GiB:.2f} GiB + reserve {self.reserve_bytes / GiB:.2f} GiB = "
                f"planned peak {self.peak_bytes / GiB:.2f} GiB of {self.budget / GiB:.2f} GiB)")


def plan_rank(budget: int, dit: DiTSizes, tokens: int, config: ParallelConfig, shards: BlockShards | None = None, *,
              attention: str = "sdpa", compute_bytes: int = 2, per_token_timesteps: bool = False,
              resident_blocks: int | None = None, reserve: int = DEFAULT_RESERVE) -> RankPlan:
    """Choose this rank's DiT placement for ``budget`` bytes (module docstring): whole, else
    sharded (``shards`` needed; P > 1; not when ``config.shard_weights`` is "off"), else block
    swap with the most resident blocks that fit. ``resident_blocks``: the user's K (block
    swap, never sharded). ``config.shard_weights`` "on" shards whatever fits.

    Raises :class:`wan_core.PlanError` naming the smallest budget that would run."""
    if budget <= 0:
        raise PlanError(f"memory budget must be positive, got {budget} bytes")
    p, n = config.sequence_degree, dit.num_blocks
    chunk = math.ceil(tokens / p)
    room = budget - reserve
    blocks = dit.block_bytes

    def activations(weights: str) -> int:
        gathered = 2 * shards.largest_sharded if weights == "sharded" and shards is not None else 0
        return rank_activation_bytes(dit, tokens, config, attention, compute_bytes,
                                     per_token_timesteps=per_token_timesteps, block_buffers=gathered)

    def made(weights: str, k: int, weight_bytes: int) -> RankPlan:
        return RankPlan(config, budget, tokens, chunk, weights, n, k, weight_bytes, activations(weights), reserve)

    def swap_bytes(k: int) -> int:
        streamed = sum(sorted(blocks[k:], reverse=True)[:2]) if k < n else 0
        return dit.other_bytes - (dit.swap_streamed_bytes if k < n else 0) + sum(blocks[:k]) + streamed

    shard_ok = p > 1 and config.shard_weights != "off" and shards is not None and resident_blocks is None
    if config.shard_weights == "on" and not shard_ok:
        why = ("there is one rank per sequence group (use --ulysses/--ring)" if p == 1 else
               "resident_blocks asks for block swap" if resident_blocks is not None else "the block sizes are unknown")
        raise ValueError(f"shard_weights 'on' cannot shard the DiT here: {why}")
    sharded = dit.other_bytes + shards.per_rank(p) if shard_ok else None
    if resident_blocks is not None:
        k = min(resident_blocks, n)
        return made("whole" if k >= n else "swap", k, swap_bytes(k))
    if config.shard_weights == "on":
        options = [("sharded", n, sharded)]
    else:
        options = [("whole", n, swap_bytes(n))] + ([("sharded", n, sharded)] if shard_ok else [])
    for weights, k, need in options:
        if need + activations(weights) <= room:
            return made(weights, k, need)
    act = activations("swap")
    if config.shard_weights != "on":
        fits = [k for k in range(n) if swap_bytes(k) + act <= room]
        if fits:
            return made("swap", max(fits), swap_bytes(max(fits)))
    needs = [(need + activations(w), w) for w, _k, need in options]
    if config.shard_weights != "on":
        needs.append((swap_bytes(0) + act, "swap"))
    smallest, how = min(needs)
    minimum = smallest + reserve
    raise PlanError(
        f"a budget of {budget / GiB:.2f} GiB per rank cannot run {dit.name} at {tokens} tokens on "
        f"{config.describe()}: the minimum is {minimum / GiB:.2f} GiB per rank "
        f"({'sharded blocks' if how == 'sharded' else 'every block streamed' if how == 'swap' else 'whole weights'}, "
        f"reserve {reserve / GiB:.2f} included). Use more ranks (--ulysses/--ring), store the weights in fp8, or "
        "lower the resolution or frame count.")
