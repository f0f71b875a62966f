"""Step caches for the DiT: TeaCache and MagCache, as :class:`wan_core.runner.StepCache`.

Both skip the transformer blocks on some sampling steps and reuse the *residual* of the
last step that ran them: ``residual = tokens_out - tokens_in`` (``[B, L, dim]`` float32)
and, on a skipped step, ``tokens = tokens_in + residual``. Patch/time/text embedding and the
head still run every time, so only the blocks are saved (they are > 99 % of the cost).
Every CFG branch ("cond", "uncond") has its own residual, accumulator and counters.

Rules shared by both (``_ResidualCache``):

- step 0 and the last step (``total_steps - 1``) always run the blocks; so does any step
  outside ``[start_step, end_step)`` and any step whose tokens do not match the stored
  residual's shape;
- a threshold ``<= 0`` never skips, so the output equals the uncached path bit for bit (the
  runner returns the blocks' own output on computed steps; the residual is only a copy);
- ``counts()`` / ``reused_steps()`` / ``summary()`` report computed vs reused per branch.

**TeaCache** (ali-vilab/TeaCache, ``TeaCache4Wan2.1/teacache_generate.py``): per branch,
accumulate ``poly(rel_l1(m_t, m_prev))`` where ``m`` is the time embedding ``e`` ``[B, dim]``
(mode "e", the official default) or the time projection ``e0`` ``[B, 6, dim]`` (mode "e0",
the official ``--use_ret_steps``), ``rel_l1 = mean|m_t - m_prev| / mean|m_prev|`` against the
previous *call* of that branch, ``poly`` the published 4th-degree fit for the variant
(highest degree first, ``np.poly1d`` order). Skip while the sum stays below the threshold;
reset it to 0 whenever the blocks run. Official retention: mode "e" always runs the first
step, "e0" the first 5; both are our ``start_step`` defaults. Deviation: the official "e0"
mode may skip the last step; we always run it.

**MagCache** (Zehong-Ma/MagCache, ``MagCache4Wan2.1/magcache_generate.py``): per branch,
multiply the published magnitude ratio of each step (mean over tokens of
``|residual_t| / |residual_{t-1}|``, calibrated on the real model) into ``ratio``, add
``|1 - ratio|`` to ``err``; skip while ``err < threshold`` and at most ``k`` steps in a row;
reset ``ratio = 1, err = 0`` whenever the blocks run. The ratio tables have 50 (T2V) or 40
(I2V) steps; other step counts use the official nearest-index interpolation
(:func:`interpolate_ratios`). Skipping starts at the official retention point
(call index ``2*step + branch >= int(2 * steps * retention_ratio)``) unless ``start_step``
is given. Deviation: the official code may skip the last step; we always run it.

Variant choice (no file names): the table follows ``DiTConfig.variant`` (T2V-1.3B, T2V-14B,
I2V-14B; FLF2V-14B, fine-tuned from I2V-14B-720P and without tables of its own, borrows the
I2V 720P ones). 480P and 720P I2V checkpoints have identical shapes, so with
``resolution="auto"`` the table is chosen at the first call from the patch grid: a frame
of at least :data:`I2V_720P_MIN_PATCHES` patches (geometric mean of 832x480 -> 1560 and
1280x720 -> 3600 patches) counts as 720P. A node that knows better (e.g. from the file name)
passes ``resolution="480p"`` / ``"720p"``. Custom shapes (tests) use the T2V-1.3B tables
when ``dim < 3072`` and the 14B ones otherwise; the summary says so.

Wan 2.2 (TI2V-5B, the A14B experts) has no published table here: the Wan 2.1 fits describe
other weights, so :func:`select_table` refuses those models (:func:`check_published_table`;
an A14B pair is refused by :func:`wan_core.moe.expert_stages`, since a T2V-A14B expert has
the T2V-14B shape). Custom coefficients / ratios (e.g. from :class:`MagCalibrator`) work.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .configs import DiTConfig
from .dit import BlockInputs

__all__ = ["TeaCache", "MagCache", "MagCalibrator", "CacheCounts", "TEACACHE_COEFFICIENTS", "MAGCACHE_RATIOS",
           "check_published_table", "WAN22_NO_TABLE",
           "I2V_720P_MIN_PATCHES", "interpolate_ratios", "select_table"]

# Published rescale polynomials, highest degree first; keys: mode -> table.
# Source: ali-vilab/TeaCache, TeaCache4Wan2.1/teacache_generate.py.
TEACACHE_COEFFICIENTS: dict[str, dict[str, tuple[float, ...]]] = {
    "e": {
        "T2V-1.3B": (2.39676752e+03, -1.31110545e+03, 2.01331979e+02, -8.29855975e+00, 1.37887774e-01),
        "T2V-14B": (-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404),
        "I2V-14B-480P": (-3.02331670e+02, 2.23948934e+02, -5.25463970e+01, 5.87348440e+00, -2.01973289e-01),
        "I2V-14B-720P": (-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683),
    },
    "e0": {
        "T2V-1.3B": (-5.21862437e+04, 9.23041404e+03, -5.28275948e+02, 1.36987616e+01, -4.99875664e-02),
        "T2V-14B": (-3.03318725e+05, 4.90537029e+04, -2.65530556e+03, 5.87365115e+01, -3.15583525e-01),
        "I2V-14B-480P": (2.57151496e+05, -3.54229917e+04, 1.40286849e+03, -1.35890334e+01, 1.32517977e-01),
        "I2V-14B-720P": (8.10705460e+03, 2.13393892e+03, -3.72934672e+02, 1.66203073e+01, -4.17769401e-02),
    },
}
TEACACHE_START_STEP = {"e": 1, "e0": 5}   # official ret_steps (in sampling steps)

# Published magnitude ratios, interleaved (cond, uncond) per step; the leading (1.0, 1.0) is
# the published padding for step 0. Calibrated with sdpa at 50 (T2V) / 40 (I2V) unipc steps.
# Source: Zehong-Ma/MagCache MagCache4Wan2.1/magcache_generate.py.
MAGCACHE_RATIOS: dict[str, tuple[float, ...]] = {
    "T2V-1.3B": (
        1.0, 1.0, 1.0124, 1.02213, 1.00166, 1.0041, 0.99791, 1.00061, 0.99682, 0.99762, 0.99634, 0.99685,
        0.99567, 0.99586, 0.99416, 0.99422, 0.99578, 0.99575, 0.9957, 0.99563, 0.99511, 0.99506, 0.99535,
        0.99531, 0.99552, 0.99549, 0.99541, 0.99539, 0.9954, 0.99536, 0.99489, 0.99485, 0.99518, 0.99514,
        0.99484, 0.99478, 0.99481, 0.99479, 0.99415, 0.99413, 0.99419, 0.99416, 0.99396, 0.99393, 0.99388,
        0.99386, 0.99349, 0.99349, 0.99309, 0.99304, 0.9927, 0.9927, 0.99228, 0.99226, 0.99171, 0.9917,
        0.99137, 0.99135, 0.99068, 0.99063, 0.99005, 0.99003, 0.98944, 0.98942, 0.98849, 0.98849, 0.98758,
        0.98757, 0.98644, 0.98643, 0.98504, 0.98503, 0.9836, 0.98359, 0.98202, 0.98201, 0.97977, 0.97978,
        0.97717, 0.97718, 0.9741, 0.97411, 0.97003, 0.97002, 0.96538, 0.96541, 0.9593, 0.95933, 0.95086,
        0.95089, 0.94013, 0.94019, 0.92402, 0.92414, 0.90241, 0.9026, 0.86821, 0.86868, 0.81838, 0.81939),
    "T2V-14B": (
        1.0, 1.0, 1.02504, 1.03017, 1.00025, 1.00251, 0.9985, 0.99962, 0.99779, 0.99771, 0.9966, 0.99658,
        0.99482, 0.99476, 0.99467, 0.99451, 0.99664, 0.99656, 0.99434, 0.99431, 0.99533, 0.99545, 0.99468,
        0.99465, 0.99438, 0.99434, 0.99516, 0.99517, 0.99384, 0.9938, 0.99404, 0.99401, 0.99517, 0.99516,
        0.99409, 0.99408, 0.99428, 0.99426, 0.99347, 0.99343, 0.99418, 0.99416, 0.99271, 0.99269, 0.99313,
        0.99311, 0.99215, 0.99215, 0.99218, 0.99215, 0.99216, 0.99217, 0.99163, 0.99161, 0.99138, 0.99135,
        0.98982, 0.9898, 0.98996, 0.98995, 0.9887, 0.98866, 0.98772, 0.9877, 0.98767, 0.98765, 0.98573,
        0.9857, 0.98501, 0.98498, 0.9838, 0.98376, 0.98177, 0.98173, 0.98037, 0.98035, 0.97678, 0.97677,
        0.97546, 0.97543, 0.97184, 0.97183, 0.96711, 0.96708, 0.96349, 0.96345, 0.95629, 0.95625, 0.94926,
        0.94929, 0.93964, 0.93961, 0.92511, 0.92504, 0.90693, 0.90678, 0.8796, 0.87945, 0.86111, 0.86189),
    "I2V-14B-480P": (
        1.0, 1.0, 0.98783, 0.98993, 0.97559, 0.97593, 0.98311, 0.98319, 0.98202, 0.98225, 0.9888, 0.98878,
        0.98762, 0.98759, 0.98957, 0.98971, 0.99052, 0.99043, 0.99383, 0.99384, 0.98857, 0.9886, 0.99065,
        0.99068, 0.98845, 0.98847, 0.99057, 0.99057, 0.98957, 0.98961, 0.98601, 0.9861, 0.98823, 0.98823,
        0.98756, 0.98759, 0.98808, 0.98814, 0.98721, 0.98724, 0.98571, 0.98572, 0.98543, 0.98544, 0.98157,
        0.98165, 0.98411, 0.98413, 0.97952, 0.97953, 0.98149, 0.9815, 0.9774, 0.97742, 0.97825, 0.97826,
        0.97355, 0.97361, 0.97085, 0.97087, 0.97056, 0.97055, 0.96588, 0.96587, 0.96113, 0.96124, 0.9567,
        0.95681, 0.94961, 0.94969, 0.93973, 0.93988, 0.93217, 0.93224, 0.91878, 0.91896, 0.90955, 0.90954,
        0.92617, 0.92616),
    "I2V-14B-720P": (
        1.0, 1.0, 0.99428, 0.99498, 0.98588, 0.98621, 0.98273, 0.98281, 0.99018, 0.99023, 0.98911, 0.98917,
        0.98646, 0.98652, 0.99454, 0.99456, 0.9891, 0.98909, 0.99124, 0.99127, 0.99102, 0.99103, 0.99215,
        0.99212, 0.99515, 0.99515, 0.99576, 0.99572, 0.99068, 0.99072, 0.99097, 0.99097, 0.99166, 0.99169,
        0.99041, 0.99042, 0.99201, 0.99198, 0.99101, 0.99101, 0.98599, 0.98603, 0.98845, 0.98844, 0.98848,
        0.98851, 0.98862, 0.98857, 0.98718, 0.98719, 0.98497, 0.98497, 0.98264, 0.98263, 0.98389, 0.98393,
        0.97938, 0.9794, 0.97535, 0.97536, 0.97498, 0.97499, 0.973, 0.97301, 0.96827, 0.96828, 0.96261,
        0.96263, 0.95335, 0.9534, 0.94649, 0.94655, 0.93397, 0.93414, 0.91636, 0.9165, 0.89088, 0.89109,
        0.8679, 0.86768),
}

# Patches per latent frame from which an I2V/FLF2V run counts as 720P: sqrt(1560 * 3600).
I2V_720P_MIN_PATCHES = 2370


WAN22_NO_TABLE = ("{what} has no published TeaCache/MagCache table in wan_core (the Wan 2.1 fits describe other "
                  "weights and would skip the wrong steps). Run without a step cache, or calibrate MagCache ratios "
                  "for this model with MagCalibrator and pass MagCache(ratios=...).")


def check_published_table(cfg: DiTConfig) -> None:
    """Refuse a Wan 2.2 model (TI2V-5B, I2V-A14B) for the published tables: ValueError saying
    what to do instead."""
    if cfg.model_type in ("ti2v", "i2v_noclip"):
        raise ValueError(WAN22_NO_TABLE.format(what=f"Wan 2.2 {cfg.variant}"))


def select_table(cfg: DiTConfig, grid: tuple[int, int, int] | None = None,
                 resolution: str = "auto") -> tuple[str | None, str]:
    """Which published table fits ``cfg``: ``(key, note)``; key None = undecided yet.

    ``grid`` is the patch grid ``(F', H', W')`` of the run (only I2V/FLF2V need it, and only
    with ``resolution="auto"``); ``note`` is "" for an exact match, else a short reason.
    """
    if resolution not in ("auto", "480p", "720p"):
        raise ValueError(f"resolution must be 'auto', '480p' or '720p', got {resolution!r}")
    check_published_table(cfg)
    variant = cfg.variant
    if not cfg.has_image_input:
        if variant in ("T2V-1.3B", "T2V-14B"):
            return variant, ""
        key = "T2V-1.3B" if cfg.dim < 3072 else "T2V-14B"
        return key, f"{variant} has no published table; nearest by width"
    note = "" if variant == "I2V-14B" else f"{variant} has no published table; using I2V-14B's"
    if cfg.model_type == "flf2v" and resolution == "auto":
        resolution = "720p"  # FLF2V-14B is fine-tuned from I2V-14B-720P and published at 720P
    if resolution == "auto":
        if grid is None:
            return None, note
        resolution = "720p" if grid[1] * grid[2] >= I2V_720P_MIN_PATCHES else "480p"
        note = "; ".join(n for n in (note, f"{resolution} chosen from {grid[1]}x{grid[2]} patches per frame") if n)
    return f"I2V-14B-{resolution.upper()}", note


def interpolate_ratios(table: Sequence[float], steps: int) -> list[float]:
    """Official nearest-index resampling of one branch's ratio table to ``steps`` entries:
    entry i is ``table[round(i * (n-1) / (steps-1))]`` (round half to even, as numpy)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    n = len(table)
    if steps == n:
        return list(table)
    if steps == 1:
        return [table[-1]]
    scale = (n - 1) / (steps - 1)
    return [table[round(i * scale)] for i in range(steps)]


def _polyval(coefficients: Sequence[float], x: float) -> float:
    out = 0.0
    for c in coefficients:  # Horner, highest degree first (np.poly1d order)
        out = out * x + c
    return out


@dataclass(frozen=True)
class CacheCounts:
    """Blocks evaluations of one branch in the last run."""

    computed: int
    reused: int

    @property
    def total(self) -> int:
        return self.computed + self.reused


@dataclass
class _Branch:
    residual: Tensor | None = None
    computed: int = 0
    reused_steps: list[int] = field(default_factory=list)
    acc: float = 0.0                 # TeaCache: accumulated rescaled distance
    prev: Tensor | None = None       # TeaCache: modulated input of the previous call
    ratio: float = 1.0               # MagCache: accumulated magnitude ratio
    err: float = 0.0                 # MagCache: accumulated error
    run: int = 0                     # MagCache: steps since the blocks last ran


class _ResidualCache:
    """Shared machinery: per-branch residuals, forced steps, counters, report."""

    name = "StepCache"

    def __init__(self, threshold: float, *, start_step: int | None, end_step: int | None,
                 residual_device: str | torch.device | None) -> None:
        self.threshold = float(threshold)
        self.start_step = None if start_step is None or start_step < 0 else start_step
        self.end_step = None if end_step is None or end_step < 0 else end_step
        self.residual_device = None if residual_device is None else torch.device(residual_device)
        self.total_steps = 0
        self._branches: dict[str, _Branch] = {}

    # -- runner.StepCache ------------------------------------------------------------

    def begin_run(self, total_steps: int) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total_steps = total_steps
        self._branches = {}
        self._on_begin_run()

    def should_compute(self, branch: str, step: int, tokens: Tensor, inputs: BlockInputs) -> bool:
        if self.total_steps < 1:
            raise RuntimeError(f"{self.name}: call DiTRunner.begin_run(total_steps) before sampling")
        st = self._branches.setdefault(branch, _Branch())
        end = self.total_steps - 1 if self.end_step is None else min(self.end_step, self.total_steps - 1)
        forced = (not self.may_skip or step == 0 or step >= end or st.residual is None
                  or st.residual.shape != tokens.shape)
        compute = self._decide(st, branch, step, inputs, forced)
        if compute:
            st.computed += 1
        else:
            st.reused_steps.append(step)
        return compute

    def store(self, branch: str, tokens_in: Tensor, tokens_out: Tensor) -> None:
        if not self.may_skip:
            return  # nothing will ever be reused: keep no residual (memory)
        res = tokens_out - tokens_in
        self._branches[branch].residual = res if self.residual_device is None else res.to(self.residual_device)

    def reuse(self, branch: str, tokens_in: Tensor) -> Tensor:
        return tokens_in + self._branches[branch].residual.to(tokens_in.device)

    def summary(self) -> str:
        parts = [f"{b} {c.computed}/{c.total} computed, {c.reused} reused" for b, c in self.counts().items()]
        return (f"{self.name}[{self._describe()}]: " + ("; ".join(parts) or "no evaluations")
                + f"; {100 * self.saved_fraction():.1f}% of DiT block evaluations saved")

    # -- report ------------------------------------------------------------------------

    def counts(self) -> dict[str, CacheCounts]:
        """Per branch ("cond", "uncond"): blocks computed vs reused in the last run."""
        return {b: CacheCounts(st.computed, len(st.reused_steps)) for b, st in self._branches.items()}

    def reused_steps(self, branch: str) -> list[int]:
        """0-based steps on which ``branch`` reused its residual."""
        st = self._branches.get(branch)
        return [] if st is None else list(st.reused_steps)

    def saved_fraction(self) -> float:
        """Reused / all block evaluations of the last run (0 when nothing ran)."""
        counts = self.counts().values()
        total = sum(c.total for c in counts)
        return sum(c.reused for c in counts) / total if total else 0.0

    # -- subclass hooks ----------------------------------------------------------------

    @property
    def may_skip(self) -> bool:
        return self.threshold > 0

    def _on_begin_run(self) -> None:
        pass

    def _decide(self, st: _Branch, branch: str, step: int, inputs: BlockInputs, forced: bool) -> bool:
        raise NotImplementedError

    def _describe(self) -> str:
        raise NotImplementedError


class TeaCache(_ResidualCache):
    """TeaCache for Wan 2.1 (see the module docstring).

    Args:
        threshold: ``rel_l1_thresh``; <= 0 never skips. Published speed-ups (mode "e"):
            1.3B 0.05 / 0.07 / 0.08 -> 1.5 / 1.6 / 2.0x; 14B 0.14 / 0.15 / 0.2 -> 1.45 / 1.8 / 2.0x.
        cfg: the DiT config the coefficient table is chosen from (ignored with ``coefficients``).
        coefficients: explicit rescale polynomial, highest degree first.
        mode: "e" (time embedding, official default) or "e0" (time projection,
            official ``use_ret_steps``; its own coefficients).
        start_step: first step that may be skipped (None / negative: 1 for "e", 5 for "e0").
        end_step: steps ``>= end_step`` always run (None / negative: only the last step).
        resolution: "auto", "480p" or "720p" (I2V/FLF2V table choice).
        residual_device: where residuals live between steps (None: with the tokens; "cpu"
            saves accelerator memory, 2 x L x dim x 4 bytes, for a copy per step).
    """

    name = "TeaCache"

    def __init__(self, threshold: float, *, cfg: DiTConfig | None = None,
                 coefficients: Sequence[float] | None = None, mode: str = "e", start_step: int | None = None,
                 end_step: int | None = None, resolution: str = "auto",
                 residual_device: str | torch.device | None = None) -> None:
        if mode not in TEACACHE_COEFFICIENTS:
            raise ValueError(f"TeaCache mode must be 'e' or 'e0', got {mode!r}")
        if cfg is None and coefficients is None:
            raise ValueError("TeaCache needs the model config (to pick published coefficients) or coefficients")
        default_start = start_step is None or start_step < 0
        super().__init__(threshold, start_step=TEACACHE_START_STEP[mode] if default_start else start_step,
                         end_step=end_step, residual_device=residual_device)
        self.mode, self.cfg, self.resolution = mode, cfg, resolution
        self._fixed = None if coefficients is None else tuple(float(c) for c in coefficients)
        if cfg is not None and self._fixed is None:
            select_table(cfg, None, resolution)  # validate early (custom coefficients need no table)
        self._on_begin_run()

    @classmethod
    def for_model(cls, dit, threshold: float, **options) -> TeaCache:
        """TeaCache with the published coefficients for ``dit`` (a WanDiT or a DiTConfig);
        ``options`` as in the constructor."""
        return cls(threshold, cfg=dit if isinstance(dit, DiTConfig) else dit.cfg, **options)

    @property
    def coefficients(self) -> tuple[float, ...] | None:
        """The polynomial in use (None until an ``auto`` I2V run has seen its first call)."""
        if self._fixed is not None:
            return self._fixed
        return None if self.table is None else TEACACHE_COEFFICIENTS[self.mode][self.table]

    def _on_begin_run(self) -> None:
        if self._fixed is not None:
            self.table, self.note = None, "custom coefficients"
        else:
            self.table, self.note = select_table(self.cfg, None, self.resolution)

    def _decide(self, st: _Branch, branch: str, step: int, inputs: BlockInputs, forced: bool) -> bool:
        if self.coefficients is None:
            self.table, self.note = select_table(self.cfg, inputs.grid, self.resolution)
        mod = (inputs.e0 if self.mode == "e0" else inputs.e).detach().float()
        skip = False
        if forced or step < self.start_step or st.prev is None or st.prev.shape != mod.shape:
            st.acc = 0.0
        else:
            rel = ((mod - st.prev).abs().mean() / st.prev.abs().mean()).item()
            st.acc += _polyval(self.coefficients, rel)
            if st.acc < self.threshold:
                skip = True
            else:
                st.acc = 0.0
        st.prev = mod.clone()  # official: compared with the previous call, skipped or not
        return not skip

    def _describe(self) -> str:
        table = self.table or "custom"
        end = "last" if self.end_step is None else self.end_step
        note = f" ({self.note})" if self.note else ""
        return f"{table}{note}, mode {self.mode}, thresh {self.threshold:g}, skip steps {self.start_step}..<{end}"


class MagCache(_ResidualCache):
    """MagCache for Wan 2.1 (see the module docstring).

    Args:
        threshold: ``magcache_thresh``, bound on the accumulated error; <= 0 never skips.
            Official default 0.12 (published E012K2R02: 2.2x, E012K4R02: 2.8x on 1.3B).
        k: ``magcache_K``, the most consecutive skipped steps per branch (official default 2).
        retention_ratio: fraction of the run that always computes (official default 0.2).
        start_step: explicit first skippable step; overrides ``retention_ratio`` (None /
            negative: use ``retention_ratio``).
        end_step: steps ``>= end_step`` always run (None / negative: only the last step).
        cfg / ratios: the DiT config the table is chosen from, or an explicit interleaved
            ``(cond, uncond)`` ratio table (the format of :meth:`MagCalibrator.table`).
        resolution, residual_device: as for :class:`TeaCache`.
    """

    name = "MagCache"

    def __init__(self, threshold: float = 0.12, *, k: int = 2, retention_ratio: float = 0.2,
                 start_step: int | None = None, end_step: int | None = None, cfg: DiTConfig | None = None,
                 ratios: Sequence[float] | None = None, resolution: str = "auto",
                 residual_device: str | torch.device | None = None) -> None:
        if cfg is None and ratios is None:
            raise ValueError("MagCache needs the model config (to pick published ratios) or ratios")
        if ratios is not None and (len(ratios) < 2 or len(ratios) % 2):
            raise ValueError(f"ratios must interleave (cond, uncond) per step: an even length >= 2, got {len(ratios)}")
        if not 0.0 <= retention_ratio <= 1.0:
            raise ValueError(f"retention_ratio must be in 0..1, got {retention_ratio}")
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        super().__init__(threshold, start_step=start_step, end_step=end_step, residual_device=residual_device)
        self.k, self.retention_ratio = int(k), float(retention_ratio)
        self.cfg, self.resolution = cfg, resolution
        self._fixed = None if ratios is None else tuple(float(r) for r in ratios)
        if cfg is not None:
            select_table(cfg, None, resolution)
        self._on_begin_run()

    @classmethod
    def for_model(cls, dit, threshold: float = 0.12, **options) -> MagCache:
        """MagCache with the published ratios for ``dit`` (a WanDiT or a DiTConfig)."""
        return cls(threshold, cfg=dit if isinstance(dit, DiTConfig) else dit.cfg, **options)

    @property
    def may_skip(self) -> bool:
        return self.threshold > 0 and self.k >= 1

    def step_ratios(self, branch: str = "cond") -> list[float] | None:
        """The per-step ratios used in this run for ``branch`` (interpolated to the step count)."""
        table = self._fixed if self._fixed is not None else (MAGCACHE_RATIOS[self.table] if self.table else None)
        if table is None or self.total_steps < 1:
            return None
        return interpolate_ratios(table[1 if branch.startswith("uncond") else 0::2], self.total_steps)

    def _on_begin_run(self) -> None:
        if self._fixed is not None:
            self.table, self.note = None, "custom ratios"
        else:
            self.table, self.note = select_table(self.cfg, None, self.resolution)
        self._ratios: dict[str, list[float]] = {}

    def _skip_from(self, branch: str, step: int) -> bool:
        if self.start_step is not None:
            return step >= self.start_step
        # official: the interleaved call counter 2*step + branch reaches int(2 * steps * ratio)
        return 2 * step + branch.startswith("uncond") >= int(2 * self.total_steps * self.retention_ratio)

    def _decide(self, st: _Branch, branch: str, step: int, inputs: BlockInputs, forced: bool) -> bool:
        if self._fixed is None and self.table is None:
            self.table, self.note = select_table(self.cfg, inputs.grid, self.resolution)
        if forced or not self._skip_from(branch, step):
            st.ratio, st.err, st.run = 1.0, 0.0, 0
            return True
        if branch not in self._ratios:
            self._ratios[branch] = self.step_ratios(branch)
        st.ratio *= self._ratios[branch][step]
        st.run += 1
        st.err += abs(1.0 - st.ratio)
        if st.err < self.threshold and st.run <= self.k:
            return False
        st.ratio, st.err, st.run = 1.0, 0.0, 0
        return True

    def _describe(self) -> str:
        table = self.table or "custom"
        note = f" ({self.note})" if self.note else ""
        start = f"start {self.start_step}" if self.start_step is not None else f"retention {self.retention_ratio:g}"
        return f"{table}{note}, thresh {self.threshold:g}, K {self.k}, {start}"


class MagCalibrator(_ResidualCache):
    """Never skips; records the MagCache magnitude ratios of this model and run.

    After a run, :meth:`table` is an interleaved ``(cond, uncond)`` ratio table (step 0
    padded with 1.0, as published) to pass as ``MagCache(ratios=...)``. Ratio of step t:
    mean over tokens of ``|r_t| / |r_{t-1}|`` for the block residual ``r`` (official
    ``magcache_calibration``).
    """

    name = "MagCalibrator"

    def __init__(self) -> None:
        super().__init__(0.0, start_step=None, end_step=None, residual_device=None)
        self._seen: dict[str, list[float]] = {}
        self._last: dict[str, Tensor] = {}

    def _on_begin_run(self) -> None:
        self._seen, self._last = {}, {}

    def _decide(self, st: _Branch, branch: str, step: int, inputs: BlockInputs, forced: bool) -> bool:
        return True

    def store(self, branch: str, tokens_in: Tensor, tokens_out: Tensor) -> None:
        res = (tokens_out - tokens_in).float()
        prev = self._last.get(branch)
        ratios = self._seen.setdefault(branch, [1.0])
        if prev is not None:
            ratios.append((res.norm(dim=-1) / prev.norm(dim=-1)).mean().item())
        self._last[branch] = res

    def table(self) -> tuple[float, ...]:
        """Interleaved (cond, uncond) ratios; a cond-only run (cfg 1) repeats cond."""
        cond = self._seen.get("cond")
        if not cond:
            raise RuntimeError("MagCalibrator: no conditional evaluations recorded yet")
        uncond = self._seen.get("uncond", cond)
        return tuple(v for pair in zip(cond, uncond) for v in pair)

    def _describe(self) -> str:
        return "calibration, never skips"
