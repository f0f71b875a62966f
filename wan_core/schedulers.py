"""Flow-matching noise schedules and the samplers that walk them (UniPC, DPM++ 2M, Euler).

Wan 2.1 is a rectified-flow model: a latent at noise level ``sigma`` (0..1) is
``x = (1 - sigma) * x0 + sigma * noise`` and the DiT predicts the velocity
``v = noise - x0``, so the clean-latent estimate is ``x0 = x - sigma * v``.

Schedules (:func:`flow_schedule`) reproduce the official Wan 2.1 generate.py exactly:

- ``"unipc"`` (official default): ``sigma = linspace(sigma_max, 0, steps + 1)[:-1]`` with
  ``sigma_max = float32(0.999)``, shifted by ``shift*s / (1 + (shift-1)*s)``, 0 appended.
- ``"dpm++"``: the official ``get_sampling_sigmas``: ``linspace(1, 0, steps + 1)[:steps]``,
  shifted, 0 appended; the first sigma is exactly 1.
- ``"euler"``: no official counterpart; it uses the DPM++ sigmas (start at pure noise).

In every case the model is fed ``int64(sigma * 1000)`` computed in float64 (truncated, as
the official schedulers store their timesteps), e.g. 50 steps / shift 5 under UniPC gives
999, 995, 991, ..., 241, 172, 92. The solvers themselves run on float32 sigmas.

Samplers share one k-diffusion-style signature::

    sample_xxx(model, x, schedule, callback=None, interrupt=None) -> x

``model(x, timestep) -> v`` with ``x`` the float32 latent ``[B, 16, T', H/8, W/8]`` (any
shape works; dim 0 is the batch) and ``timestep`` an int64 ``[B]`` tensor on ``x.device``.
Solver history lives in local variables of each call: no module state, no classes.

Numerics mirror the official FlowUniPCMultistepScheduler / FlowDPMSolverMultistepScheduler:
latents, velocities and x0 estimates are float32 (float64 input stays float64), the
per-step coefficients are float32 0-d CPU tensors computed with the same operations in the
same order, so on CPU the trajectories match the official ones bit for bit.

Partial denoising (V2V, ``denoise < 1``) follows diffusers' strength convention: build the
full ``steps`` schedule and keep its last ``round(steps * denoise)`` steps (at least one),
with fresh solver history; the input latent is noised to the first kept sigma with
:func:`noise_latent`. diffusers truncates ``int(steps * strength)`` (100 * 0.29 -> 28); we
round half up. ComfyUI's KSampler differs: it builds ``int(steps / denoise)`` steps and
runs the last ``steps`` of them, so there ``steps`` counts model calls.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

NUM_TRAIN_TIMESTEPS = 1000
# float32(1 - 1/1000) read back as a double: the official UniPC scheduler takes sigma_max
# from its float32 training sigmas, so its linspace starts here, not at 0.999.
UNIPC_SIGMA_MAX = 0.9990000128746033
# First unshifted sigma of each solver's schedule (see the module docstring).
_SIGMA_MAX: dict[str, float] = {"unipc": UNIPC_SIGMA_MAX, "dpm++": 1.0, "euler": 1.0}

ModelFn = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[dict[str, Any]], None]
Interrupt = Callable[[], None]


@dataclass(frozen=True, eq=False)
class Schedule:
    """Noise levels for one sampling run.

    sigmas: ``[N + 1]`` float32 on the CPU, strictly decreasing from ``sigmas[0] <= 1`` to
        ``sigmas[N] == 0``; step ``i`` moves the latent from ``sigmas[i]`` to ``sigmas[i+1]``.
    timesteps: ``[N]`` int64 on the CPU, what the model is fed at step ``i`` (0..1000).
    solver: the sampler the schedule was built for (``"unipc"``, ``"dpm++"``, ``"euler"``).
    """

    sigmas: Tensor
    timesteps: Tensor
    solver: str

    @property
    def steps(self) -> int:
        """Number of model evaluations N."""
        return int(self.timesteps.shape[0])


def _linspace64(start: float, stop: float, num: int) -> Tensor:
    """numpy.linspace in float64, reproduced operation by operation.

    ``torch.linspace`` computes the upper half from the end point, which differs in the last
    bit; after ``* 1000`` and truncation that can move an official timestep by one.
    """
    step = (stop - start) / (num - 1)
    y = torch.arange(num, dtype=torch.float64) * step + start
    y[-1] = stop
    return y


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """Resolution shift ``shift*s / (1 + (shift-1)*s)``; shift > 1 spends more steps at
    high noise."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_sigmas(steps: int, shift: float, sigma_max: float = 1.0,
                sigma_min: float = 0.0) -> Tensor:
    """Shifted flow-matching sigmas, ``[steps + 1]`` float64 on the CPU, last entry 0.

    ``linspace(sigma_max, sigma_min, steps + 1)[:-1]``, shifted, then 0 appended, as both
    official schedulers do (UniPC with ``sigma_max = UNIPC_SIGMA_MAX``, DPM++ with 1.0).
    Kept in float64 because the official timesteps are truncated from the float64 values.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not shift > 0:
        raise ValueError(f"shift must be positive, got {shift}")
    sigmas = shift_sigmas(_linspace64(sigma_max, sigma_min, steps + 1)[:-1], shift)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def denoise_steps(steps: int, denoise: float) -> int:
    """How many of the last schedule steps a partial denoise runs: ``round(steps * denoise)``.

    Rounds half up and never returns less than 1, so any denoise > 0 changes the latent.
    """
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must be in (0, 1], got {denoise}; "
                         "use 1.0 to sample from pure noise")
    return max(1, min(steps, math.floor(steps * denoise + 0.5)))


def flow_schedule(steps: int, shift: float, solver: str = "unipc",
                  denoise: float = 1.0) -> Schedule:
    """The official Wan 2.1 schedule for ``solver``, optionally cut for partial denoising.

    steps: model evaluations of the full schedule; shift: e.g. 5.0 (T2V), 3.0 (I2V 480p);
    denoise: 1.0 samples from pure noise, 0.5 keeps the last half of the steps (see
    :func:`denoise_steps`); noise the input latent with :func:`noise_latent` at ``sigmas[0]``.
    """
    if solver not in _SIGMA_MAX:
        raise ValueError(f"unknown solver {solver!r}; expected one of {sorted(_SIGMA_MAX)}")
    sigmas64 = flow_sigmas(steps, shift, _SIGMA_MAX[solver])
    # Truncation toward zero, like numpy's astype(int64) in the official set_timesteps.
    timesteps = (sigmas64[:-1] * NUM_TRAIN_TIMESTEPS).to(torch.int64)
    start = steps - denoise_steps(steps, denoise)
    return Schedule(sigmas64[start:].to(torch.float32), timesteps[start:], solver)


def noise_latent(latent: Tensor, noise: Tensor, sigma: float | Tensor) -> Tensor:
    """Noise a clean latent to level ``sigma``: ``(1 - sigma) * latent + sigma * noise``.

    For V2V pass ``schedule.sigmas[0]``; same arithmetic as diffusers' ``add_noise``.
    """
    sigma = torch.as_tensor(sigma, dtype=latent.dtype, device=latent.device)
    return (1 - sigma) * latent + sigma * noise


# --------------------------------------------------------------------------------------
# shared plumbing


def _work_dtype(x: Tensor) -> torch.dtype:
    """float32 like the official schedulers; float64 input keeps float64."""
    return torch.promote_types(x.dtype, torch.float32)


def _log_snr(sigma: Tensor) -> Tensor:
    """lambda = log(alpha) - log(sigma) with alpha = 1 - sigma; -inf at sigma 1, +inf at 0."""
    return torch.log(1 - sigma) - torch.log(sigma)


def _prepare(x: Tensor, schedule: Schedule) -> tuple[Tensor, Tensor, Tensor]:
    """Working copies: (x in the working dtype, float32 CPU sigmas, int64 timesteps on x's device).

    Sigmas stay on the CPU as in the official schedulers: the per-step coefficients are
    0-d CPU tensors, which multiply device tensors without a host-device sync.
    """
    if x.dim() == 0:
        raise ValueError("x must have a batch dimension, e.g. [B, 16, T', H/8, W/8]")
    return (x.to(_work_dtype(x)), schedule.sigmas.to("cpu", torch.float32),
            schedule.timesteps.to(x.device))


def _velocity(model: ModelFn, x: Tensor, timestep: Tensor, interrupt: Interrupt | None) -> Tensor:
    """``interrupt()`` (may raise), then the model's velocity in x's dtype; timestep ``[B]``."""
    if interrupt is not None:
        interrupt()
    return model(x, timestep.repeat(x.shape[0])).to(x.dtype)


def _report(callback: Callback | None, i: int, total: int, x: Tensor, sigma: Tensor,
            timestep: Tensor, denoised: Tensor) -> None:
    """Callback after step ``i``: ``x`` is the latent at ``sigmas[i+1]``, ``denoised`` the x0
    estimate made at ``sigma = sigmas[i]`` (the tensors themselves: do not modify them)."""
    if callback is not None:
        callback({"i": i, "total": total, "x": x, "sigma": sigma, "timestep": timestep,
                  "denoised": denoised})


# --------------------------------------------------------------------------------------
# samplers


def sample_euler(model: ModelFn, x: Tensor, schedule: Schedule,
                 callback: Callback | None = None, interrupt: Interrupt | None = None) -> Tensor:
    """First-order flow Euler: ``x <- x + (sigma_next - sigma) * v``.

    x: noisy latent at ``schedule.sigmas[0]``; returns the latent at sigma 0 in x's dtype.
    """
    out_dtype, n = x.dtype, schedule.steps
    x, s, t = _prepare(x, schedule)
    for i in range(n):
        v = _velocity(model, x, t[i], interrupt)
        denoised = x - s[i] * v
        x = x + (s[i + 1] - s[i]) * v
        _report(callback, i, n, x, s[i], t[i], denoised)
    return x.to(out_dtype)


def sample_dpmpp_2m(model: ModelFn, x: Tensor, schedule: Schedule,
                    callback: Callback | None = None, interrupt: Interrupt | None = None) -> Tensor:
    """DPM-Solver++ 2M (midpoint), as the official FlowDPMSolverMultistepScheduler.

    Data-prediction multistep solver in log-SNR ``lambda``. Step 0 and the last step are
    first order (no history; the final sigma is 0, where the update returns x0 exactly).
    With the official schedule sigmas[0] = 1 (lambda = -inf), which makes the second step
    first order too: the official code computes ``D1 = (1 / r) * (...)`` with ``r = inf``.

    x: noisy latent at ``schedule.sigmas[0]``; returns the latent at sigma 0 in x's dtype.
    """
    out_dtype, n = x.dtype, schedule.steps
    x, s, t = _prepare(x, schedule)
    lam = [_log_snr(s[i]) for i in range(n + 1)]
    x0_prev: Tensor | None = None
    for i in range(n):
        x0 = x - s[i] * _velocity(model, x, t[i], interrupt)
        h = lam[i + 1] - lam[i]
        # alpha_t * (e^{-h} - 1): the weight of x0 in the exponential-integrator step.
        c = (1 - s[i + 1]) * (torch.exp(-h) - 1.0)
        x_next = (s[i + 1] / s[i]) * x - c * x0
        if x0_prev is not None and i < n - 1:
            r = (lam[i] - lam[i - 1]) / h
            d1 = (1.0 / r) * (x0 - x0_prev)
            x_next = x_next - 0.5 * c * d1
        x0_prev = x0
        x = x_next
        _report(callback, i, n, x, s[i], t[i], x0)
    return x.to(out_dtype)


def _unipc_coefficients(h: Tensor, rk: Tensor | None, order: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(h_phi_1, B_h, rhos_c)`` of the bh2 UniC-p step with ``p = order`` (1 or 2).

    ``hh = -h`` (data prediction), ``h_phi_1 = expm1(hh)``, ``B_h = expm1(hh)`` (bh2);
    ``rhos_c`` solves ``R rho = b`` with ``R = [rk^0; rk^1]`` (order 2) as the official
    code does, in float32; order 1 uses the fixed 0.5.
    """
    hh = -h
    h_phi_1 = torch.expm1(hh)
    b_h = torch.expm1(hh)
    if order == 1:
        return h_phi_1, b_h, torch.tensor([0.5])
    h_phi_k = h_phi_1 / hh - 1
    rks = torch.stack([rk, torch.ones(())])
    rows, b, factorial = [], [], 1
    for k in range(1, order + 1):
        rows.append(torch.pow(rks, k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, torch.linalg.solve(torch.stack(rows), torch.stack(b))


def sample_unipc(model: ModelFn, x: Tensor, schedule: Schedule,
                 callback: Callback | None = None, interrupt: Interrupt | None = None) -> Tensor:
    """UniPC, order 2, bh2, predict-x0, lower_order_final: the official Wan 2.1 default.

    Each step evaluates the model once at ``sigmas[i]`` and
    1. (i > 0) corrects the latent the previous predictor produced (UniC), re-stepping
       from the previous latent with the new x0 estimate; its order is the previous
       predictor's (1 after step 0, else 2);
    2. predicts the latent at ``sigmas[i+1]`` (UniP) with order ``min(2, i + 1, N - i)``:
       first order at the start (no history) and at the final step, where sigma 0 makes
       the update return the x0 estimate exactly. No corrector follows the final step.
    The callback's ``x`` is the predictor's latent (step 1 of the next iteration corrects it).

    x: noisy latent at ``schedule.sigmas[0]`` (must be < 1: log-SNR is infinite at 1);
    returns the latent at sigma 0 in x's dtype.
    """
    if not float(schedule.sigmas[0]) < 1.0:
        raise ValueError("UniPC needs sigmas[0] < 1 (its log-SNR is infinite at sigma 1); "
                         "build the schedule with flow_schedule(..., solver='unipc')")
    out_dtype, n = x.dtype, schedule.steps
    x, s, t = _prepare(x, schedule)
    lam = [_log_snr(s[i]) for i in range(n + 1)]
    x0_hist: list[Tensor] = []   # x0 estimates of the last two steps, oldest first
    x_last: Tensor | None = None  # latent the previous predictor started from
    order_last = 0
    for i in range(n):
        x0 = x - s[i] * _velocity(model, x, t[i], interrupt)

        if x_last is not None:  # UniC: redo step i-1 -> i using x0 at sigma i
            m0 = x0_hist[-1]
            h = lam[i] - lam[i - 1]
            rk = (lam[i - 2] - lam[i - 1]) / h if order_last == 2 else None
            h_phi_1, b_h, rhos = _unipc_coefficients(h, rk, order_last)
            rhos = rhos.to(x.dtype)
            x = s[i] / s[i - 1] * x_last - (1 - s[i]) * h_phi_1 * m0
            corr = 0
            if rk is not None:
                corr = rhos[0] * ((x0_hist[-2] - m0) / rk)
            x = x - (1 - s[i]) * b_h * (corr + rhos[-1] * (x0 - m0))

        x0_hist = (x0_hist + [x0])[-2:]
        order = min(2, i + 1, n - i)
        x_last = x
        # UniP: step i -> i+1 from x0 (and the previous x0 for order 2).
        h = lam[i + 1] - lam[i]
        hh = -h
        h_phi_1 = torch.expm1(hh)
        b_h = torch.expm1(hh)
        x_next = s[i + 1] / s[i] * x - (1 - s[i + 1]) * h_phi_1 * x0
        if order == 2:
            rk = (lam[i - 1] - lam[i]) / h
            d1 = (x0_hist[-2] - x0) / rk
            # rhos_p is fixed at 0.5 for order 2 (official "simplified version").
            x_next = x_next - (1 - s[i + 1]) * b_h * (0.5 * d1)
        order_last = order
        x = x_next
        _report(callback, i, n, x, s[i], t[i], x0)
    return x.to(out_dtype)


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "unipc": sample_unipc,
    "dpm++": sample_dpmpp_2m,
    "euler": sample_euler,
}


def get_sampler(name: str) -> Callable[..., Tensor]:
    """The sampler registered as ``name`` (``"unipc"``, ``"dpm++"``, ``"euler"``)."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(
            f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)} "
            "(build its schedule with flow_schedule(steps, shift, solver=name))") from None
