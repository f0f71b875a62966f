"""Wan 2.2 A14B: two experts, switched by timestep (mixture of experts over the noise level).

The A14B models are two DiTs with the Wan 2.1-14B architecture: a **high-noise expert** for
the early steps and a **low-noise expert** for the rest. The official rule (Wan2.2
``text2video.py`` / ``image2video.py``): with ``boundary`` a fraction of the 1000 training
timesteps, the high-noise expert runs every step whose (integer) timestep ``t`` satisfies
``t >= boundary * 1000``, the low-noise expert the others; each expert has its own guidance
scale. Published values (``wan/configs/``):

============  ========  ==================  =====  =====
model         boundary  guide (low, high)   shift  steps
============  ========  ==================  =====  =====
T2V-A14B      0.875     (3.0, 4.0)          12.0   40
I2V-A14B      0.900     (3.5, 3.5)          5.0    40
============  ========  ==================  =====  =====

Since the timesteps only fall, the experts change once at most: :meth:`MoEOptions.switch_step`
says at which step. :class:`ExpertRunner` looks like a :class:`~wan_core.runner.DiTRunner` to
the sampler and forwards each call to the expert's own runner (own block swap, step cache,
context K/V: nothing crosses the switch); ``on_switch`` lets a run plan move the leaving
expert off the GPU and the arriving one on. ``sample(..., moe=MoESampling(...))`` uses it.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from torch import Tensor

from .lora import LoraError, LoraReport, LoraSpec, apply_loras
from .lora_files import Plan, check_loras
from .runner import DiTRunner
from .step_cache import WAN22_NO_TABLE

__all__ = ["MoEOptions", "ExpertPair", "ExpertRunner", "MoESampling", "MOE_T2V_A14B", "MOE_I2V_A14B",
           "A14B_DEFAULTS", "a14b_defaults", "moe_for", "check_experts", "check_pair_options", "check_pair_loras",
           "StagedRunner", "expert_stages", "apply_expert_loras"]

NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class MoEOptions:
    """When each expert runs and how strongly it is guided.

    boundary: fraction of the training timesteps (0..1]; the high-noise expert runs while
    ``t >= boundary * 1000``. cfg_low / cfg_high: the guidance scale of each expert.
    """

    boundary: float = 0.875
    cfg_low: float = 3.0
    cfg_high: float = 4.0

    def __post_init__(self) -> None:
        if not (0.0 < self.boundary <= 1.0) or not math.isfinite(self.boundary):
            raise ValueError(f"MoE boundary must be in (0, 1] (a fraction of 1000 timesteps); got {self.boundary}")
        for name in ("cfg_low", "cfg_high"):
            v = getattr(self, name)
            if not math.isfinite(v) or not 0.0 <= v <= 100.0:
                raise ValueError(f"MoE {name} must be a finite guidance scale in 0..100; got {v}")

    @property
    def boundary_timestep(self) -> float:
        return self.boundary * NUM_TRAIN_TIMESTEPS

    def is_high_noise(self, timestep: float | Tensor) -> bool:
        """True when the high-noise expert runs at ``timestep`` (a number or a tensor whose
        first element is the step's timestep)."""
        t = float(timestep.flatten()[0]) if isinstance(timestep, Tensor) else float(timestep)
        return t >= self.boundary_timestep

    def cfg_for(self, timestep: float | Tensor) -> float:
        return self.cfg_high if self.is_high_noise(timestep) else self.cfg_low

    def switch_step(self, timesteps: Sequence[float] | Tensor) -> int:
        """0-based index of the first step the low-noise expert runs (``len(timesteps)`` when
        the high-noise expert runs them all, 0 when it runs none)."""
        for i, t in enumerate(timesteps):
            if not self.is_high_noise(t):
                return i
        return len(timesteps)

    def describe(self, timesteps: Sequence[float] | Tensor) -> str:
        n, k = len(timesteps), self.switch_step(timesteps)
        return (f"MoE: high-noise expert steps 1..{k} (cfg {self.cfg_high:g}), low-noise expert steps "
                f"{k + 1}..{n} (cfg {self.cfg_low:g}); boundary t >= {self.boundary_timestep:g}")


MOE_T2V_A14B = MoEOptions(boundary=0.875, cfg_low=3.0, cfg_high=4.0)
MOE_I2V_A14B = MoEOptions(boundary=0.900, cfg_low=3.5, cfg_high=3.5)
# (options, shift, steps) of the official A14B configs
A14B_DEFAULTS: dict[str, tuple[MoEOptions, float, int]] = {
    "t2v": (MOE_T2V_A14B, 12.0, 40),
    "i2v": (MOE_I2V_A14B, 5.0, 40),
}


def a14b_defaults(dit_cfg) -> tuple[MoEOptions, float, int]:
    """``(moe options, shift, steps)`` published for the A14B model whose experts have
    ``dit_cfg`` (T2V: ``model_type`` "t2v", I2V: "i2v_noclip"); ValueError for other models."""
    kind = {"t2v": "t2v", "i2v_noclip": "i2v"}.get(dit_cfg.model_type)
    if kind is None or dit_cfg.out_dim != 16:
        raise ValueError(f"{dit_cfg.variant} is not a Wan 2.2 A14B expert (T2V or I2V): two experts switched by "
                         "noise level exist only for T2V-A14B and I2V-A14B.")
    return A14B_DEFAULTS[kind]


def moe_for(dit_cfg, boundary: float | None = None, cfg_high: float | None = None,
            cfg_low: float | None = None) -> MoEOptions:
    """The MoE settings of an A14B pair of ``dit_cfg``: the published ones
    (:func:`a14b_defaults`), each value given (not None) replacing its own."""
    base = a14b_defaults(dit_cfg)[0]
    return MoEOptions(boundary=base.boundary if boundary is None else float(boundary),
                      cfg_low=base.cfg_low if cfg_low is None else float(cfg_low),
                      cfg_high=base.cfg_high if cfg_high is None else float(cfg_high))


def check_experts(high, low) -> None:
    """Refuse two DiTs that cannot be a pair: different shapes, kinds or latent channels."""
    a, b = high.cfg, low.cfg
    same = (a.dim, a.ffn_dim, a.num_layers, a.in_dim, a.out_dim, a.text_dim, a.model_type, a.patch_size)
    other = (b.dim, b.ffn_dim, b.num_layers, b.in_dim, b.out_dim, b.text_dim, b.model_type, b.patch_size)
    if same != other:
        raise ValueError(f"the two experts of a Wan 2.2 A14B pair must have the same architecture; got "
                         f"high-noise {a.variant} and low-noise {b.variant}. Load the high_noise_model and "
                         "low_noise_model of one A14B model.")


@dataclass(frozen=True)
class ExpertPair:
    """The two DiTs of an A14B model (typed, so a pair never travels as a loose tuple)."""

    high: object    # WanDiT: the high-noise expert (early steps)
    low: object     # WanDiT: the low-noise expert (late steps)

    def __post_init__(self) -> None:
        check_experts(self.high, self.low)

    @property
    def cfg(self):
        return self.high.cfg


class ExpertRunner:
    """Runner over two experts' runners, choosing by the timestep of each call.

    Has the :class:`~wan_core.runner.DiTRunner` surface the sampler uses (``dit``, ``cfg``,
    ``begin_run``, ``begin_step``, calls). ``dit`` is the expert that ran last (the
    high-noise one before the first call). ``on_switch(leaving, arriving)`` is called with
    the two DiTs before the first call of an expert other than the last one used: a run plan
    moves weights there (only one expert needs to be on the GPU)."""

    def __init__(self, high: DiTRunner, low: DiTRunner, options: MoEOptions,
                 on_switch: Callable[[object, object], None] | None = None) -> None:
        check_experts(high.dit, low.dit)
        self.high, self.low, self.options, self.on_switch = high, low, options, on_switch
        self.active = high
        self.switches: list[int] = []   # steps (0-based) at which the expert changed, this run
        self.step = 0

    @property
    def dit(self):
        return self.active.dit

    @property
    def cfg(self):
        return self.active.dit.cfg

    def begin_run(self, total_steps: int) -> None:
        self.high.begin_run(total_steps)
        self.low.begin_run(total_steps)
        self.switches = []

    def begin_step(self, step: int) -> None:
        self.step = step
        self.high.begin_step(step)
        self.low.begin_step(step)

    def select(self, t: Tensor | float) -> DiTRunner:
        """The runner for timestep ``t``, switching (and calling ``on_switch``) when needed."""
        chosen = self.high if self.options.is_high_noise(t) else self.low
        if chosen is not self.active:
            if self.on_switch is not None:
                self.on_switch(self.active.dit, chosen.dit)
            self.active = chosen
            self.switches.append(self.step)
        return chosen

    def __call__(self, x: Tensor, t: Tensor, *args, **kwargs) -> Tensor:
        return self.select(t)(x, t, *args, **kwargs)


@dataclass(frozen=True)
class MoESampling:
    """What ``sample(..., moe=...)`` needs for a two-expert run: the low-noise expert (the
    high-noise one is the ``dit`` given to ``sample``), the rule, optionally the low-noise
    expert's own runner (block swap / step cache) and the switch hook of a run plan."""

    low_noise: object                           # WanDiT
    options: MoEOptions = MOE_T2V_A14B
    low_runner: DiTRunner | None = None
    on_switch: Callable[[object, object], None] | None = field(default=None, compare=False)

    def runner(self, high_runner: DiTRunner) -> ExpertRunner:
        low = self.low_runner if self.low_runner is not None else DiTRunner(self.low_noise)
        if low.dit is not self.low_noise:
            raise ValueError("MoESampling.low_runner wraps another model than low_noise")
        return ExpertRunner(high_runner, low, self.options, self.on_switch)


class StagedRunner:
    """A runner whose model is placed only while it is needed: the first call enters its run
    plan's sampling stage (:meth:`wan_core.run_plan.RunPlan.sampling`: device placement, block
    swap, LoRA, step cache) and :meth:`leave` exits it (the weights go back to their masters,
    the GPU copy is freed)."""

    def __init__(self, plan) -> None:
        self.plan, self.dit = plan, plan.dit
        self._stack: contextlib.ExitStack | None = None
        self._inner: DiTRunner | None = None
        self._total, self._step = 0, 0

    @property
    def active(self) -> bool:
        return self._inner is not None

    def enter(self) -> None:
        if self._inner is None:
            stack = contextlib.ExitStack()
            self._inner = stack.enter_context(self.plan.sampling())
            self._stack = stack
            self._inner.begin_run(self._total)
            self._inner.begin_step(self._step)

    def leave(self) -> None:
        if self._stack is not None:
            stack, self._stack, self._inner = self._stack, None, None
            stack.close()

    def begin_run(self, total_steps: int) -> None:
        self._total = total_steps
        if self._inner is not None:
            self._inner.begin_run(total_steps)

    def begin_step(self, step: int) -> None:
        self._step = step
        if self._inner is not None:
            self._inner.begin_step(step)

    def __call__(self, *args, **kwargs) -> Tensor:
        self.enter()
        assert self._inner is not None
        return self._inner(*args, **kwargs)


def check_pair_options(*options) -> None:
    """Refuse run options an A14B pair cannot honour: a step cache (no published Wan 2.2
    tables; a T2V-A14B expert has the T2V-14B shape, so only the pair tells)."""
    if any(o is not None and o.step_cache is not None for o in options):
        raise ValueError(WAN22_NO_TABLE.format(what="A Wan 2.2 A14B expert pair"))


def check_pair_loras(low_plan) -> None:
    """Check the low-noise expert's LoRA files (``low_plan.options.loras``) against it before
    the first step, as :func:`wan_core.lora.apply_loras` checks them: they are applied only at
    the switch, so a bad file must fail the run before anything ran or changed (all or
    nothing over the pair). The high-noise expert's are applied (and checked) when its stage
    is entered, before the first step. Raises :class:`wan_core.lora.LoraError`."""
    _check_lora_files(low_plan.dit, getattr(getattr(low_plan, "options", None), "loras", ()))


def _check_lora_files(dit, specs: Sequence[LoraSpec], strict: bool = False) -> None:
    if specs:
        found = Plan()
        try:
            check_loras(dit, list(specs), strict, found)
        finally:
            for tf in found.files:
                tf.close()


def apply_expert_loras(pair: ExpertPair, high: Sequence[LoraSpec], low: Sequence[LoraSpec], mode: str = "unmerged",
                       strict: bool = False, **options) -> tuple[LoraReport, LoraReport]:
    """:func:`wan_core.lora.apply_loras` on both experts of an A14B pair (LoRAs such as the
    distill ones are published per expert: ``high`` for the high-noise expert, ``low`` for the
    low-noise one) -> their two reports, all or nothing over the pair: every file of both
    experts is checked before either changes; with ``"unmerged"``, a failure on the
    low-noise expert removes the high-noise expert's hooks again. ``"merge"`` cannot be undone
    once done: a failure after the high-noise expert was merged (out of memory) raises a
    :class:`~wan_core.lora.LoraError` saying to reload it. ``options`` as for ``apply_loras``."""
    _check_lora_files(pair.high, high, strict)
    _check_lora_files(pair.low, low, strict)
    first = apply_loras(pair.high, high, mode, strict, **options)
    try:
        return first, apply_loras(pair.low, low, mode, strict, **options)
    except BaseException as exc:
        if mode != "merge":
            first.remove()
            raise
        if not first.matched:
            raise
        raise LoraError("the low-noise expert's LoRAs failed after the high-noise expert's were merged: the "
                        "high-noise expert is changed; reload it before retrying.") from exc


@contextlib.contextmanager
def expert_stages(high_plan, low_plan,
                  options: MoEOptions = MOE_T2V_A14B) -> Iterator[tuple[StagedRunner, MoESampling]]:
    """Sample an A14B pair with one expert on the device at a time.

    ``high_plan`` / ``low_plan``: :func:`wan_core.run_plan.prepare_run` of each expert for the
    same job (each expert gets its own placement, block swap, fp8/GGUF weights, LoRA, step
    cache). Yields ``(runner, moe)`` for ``sample(high, ..., runner=runner, moe=moe)``: the
    high-noise expert's stage is entered now (it runs first, and ``sample`` takes the device
    from it); at the switch its stage is left (offloaded) before the low-noise expert's is
    entered; both are left on exit::

        with prepare_run(high, job, opts, "cuda") as hp, prepare_run(low, job, opts, "cuda") as lp, \
                expert_stages(hp, lp, MOE_T2V_A14B) as (runner, moe):
            latents = sample(high, text, settings, shape=shape, runner=runner, moe=moe)
    """
    check_pair_options(getattr(high_plan, "options", None), getattr(low_plan, "options", None))
    check_pair_loras(low_plan)
    high, low = StagedRunner(high_plan), StagedRunner(low_plan)
    by_dit = {id(high.dit): high, id(low.dit): low}

    def swap(leaving, _arriving) -> None:
        by_dit[id(leaving)].leave()

    try:
        high.enter()
        yield high, MoESampling(low.dit, options, low_runner=low, on_switch=swap)  # type: ignore[arg-type]
    finally:
        high.leave()
        low.leave()
