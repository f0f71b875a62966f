"""Flow-matching schedules and samplers against the official Wan 2.1 formulas and diffusers.

References
- Schedules: the official formulas (wan/utils/fm_solvers*.py, numpy float64) written out
  here in numpy, and diffusers 0.42.1 ``UniPCMultistepScheduler`` configured to match.
- Trajectories: diffusers' ``step()`` loop. diffusers deviates from the official Wan
  schedulers in two places, both worked around here rather than inherited:
  * ``UniPCMultistepScheduler(use_flow_sigmas=True).set_timesteps(steps)`` builds
    ``linspace(1, 1/1000)`` and subtracts 1e-6 from sigma 1 (official: ``linspace(0.999, 0)``
    with 0.999 read back from float32), so timesteps differ by one at many (steps, shift);
    passing the official unshifted sigmas via ``set_timesteps(sigmas=...)`` reproduces them.
  * ``DPMSolverMultistepScheduler(use_flow_sigmas=True)`` starts at shift(0.999) and its
    ``set_timesteps`` takes no sigmas (official DPM++ starts at sigma 1, timestep 1000), so
    the official sigmas/timesteps are installed on it after ``set_timesteps``; its step
    math is otherwise the official one.
Measured on CPU float32 (torch 2.13, diffusers 0.42.1): max |difference| 0.0 (bit-identical)
for every (solver, steps, shift) below, and also 0.0 against the official
FlowUniPCMultistepScheduler / FlowDPMSolverMultistepScheduler imported from the Wan repo in
a scratch script. The tolerance 1e-6 leaves room for other BLAS/libm builds only; dropping
the UniPC corrector or the DPM++ second-order term moves results by > 1e-2.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

from wan_core.schedulers import (
    SAMPLERS,
    UNIPC_SIGMA_MAX,
    denoise_steps,
    flow_schedule,
    flow_sigmas,
    get_sampler,
    noise_latent,
    sample_dpmpp_2m,
    sample_euler,
    sample_unipc,
)

# diffusers' DPM scheduler trips a numpy 2 DeprecationWarning in set_timesteps; not ours.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers")

ATOL = 1e-6  # measured 0.0 on CPU fp32, see module docstring
STEPS = (1, 2, 4, 10, 50)
SHIFTS = (1.0, 3.0, 5.0, 8.0)


# --- references -----------------------------------------------------------------------

def official_unipc_numpy(steps: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """FlowUniPCMultistepScheduler.set_timesteps(steps, shift=shift) written out in numpy."""
    sigma_max = float(np.float32(1 - 1 / 1000))
    s = np.linspace(sigma_max, 0.0, steps + 1)[:-1]
    s = shift * s / (1 + (shift - 1) * s)
    return np.concatenate([s, [0.0]]).astype(np.float32), (s * 1000).astype(np.int64)


def official_dpmpp_numpy(steps: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """get_sampling_sigmas + retrieve_timesteps(FlowDPMSolverMultistepScheduler) in numpy."""
    s = np.linspace(1, 0, steps + 1)[:steps]
    s = shift * s / (1 + (shift - 1) * s)
    return np.concatenate([s, [0.0]]).astype(np.float32), (s * 1000).astype(np.int64)


def diffusers_unipc(steps: int, shift: float) -> UniPCMultistepScheduler:
    sched = UniPCMultistepScheduler(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
        flow_shift=shift, solver_order=2, solver_type="bh2", predict_x0=True,
        lower_order_final=True, final_sigmas_type="zero")
    # Official unshifted sigmas; diffusers applies flow_shift to them.
    sched.set_timesteps(sigmas=np.linspace(UNIPC_SIGMA_MAX, 0.0, steps + 1)[:-1])
    return sched


def diffusers_dpmpp(steps: int, shift: float) -> DPMSolverMultistepScheduler:
    sched = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, algorithm_type="dpmsolver++", solver_order=2,
        solver_type="midpoint", prediction_type="flow_prediction", use_flow_sigmas=True,
        flow_shift=shift, lower_order_final=True, final_sigmas_type="zero")
    sched.set_timesteps(steps)
    sigmas, timesteps = official_dpmpp_numpy(steps, shift)
    sched.sigmas = torch.from_numpy(sigmas)
    sched.timesteps = torch.from_numpy(timesteps)
    return sched


def diffusers_loop(sched, model, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    for t in timesteps:
        x = sched.step(model(x, t[None]), t, x, return_dict=False)[0]
    return x


def toy_model(channels: int = 4, seed: int = 0):
    """A fixed nonlinear velocity field of x and the timestep (enough to exercise history)."""
    w = torch.randn(channels, channels, generator=torch.Generator().manual_seed(seed)) * 0.5

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t.to(x.dtype).reshape(-1, *[1] * (x.dim() - 1)) / 1000
        return torch.tanh(torch.einsum("ij,bj...->bi...", w, x)) * (1 + tt) + 0.3 * x - tt

    return model


def latent(seed: int, shape=(1, 4, 3, 5)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- schedules ------------------------------------------------------------------------

def test_unipc_sigma_max_is_0999_read_back_from_float32():
    assert UNIPC_SIGMA_MAX == float(torch.tensor(1 - 1 / 1000, dtype=torch.float32))


def test_unipc_50_steps_shift_5_gives_the_official_timesteps():
    sched = flow_schedule(50, 5.0, "unipc")
    t = sched.timesteps.tolist()
    assert len(t) == 50 and sched.sigmas.shape == (51,)
    assert t[:3] == [999, 995, 991] and t[-3:] == [241, 172, 92]
    assert sched.timesteps.dtype == torch.int64 and sched.sigmas.dtype == torch.float32
    assert sched.sigmas[-1] == 0 and bool((sched.sigmas[1:] < sched.sigmas[:-1]).all())


def test_dpmpp_schedule_starts_at_sigma_1_and_timestep_1000():
    sched = flow_schedule(40, 3.0, "dpm++")
    assert sched.sigmas[0] == 1.0 and sched.timesteps[0] == 1000 and sched.sigmas[-1] == 0


def test_euler_uses_the_dpmpp_schedule():
    a, b = flow_schedule(20, 5.0, "euler"), flow_schedule(20, 5.0, "dpm++")
    assert torch.equal(a.sigmas, b.sigmas) and torch.equal(a.timesteps, b.timesteps)


@pytest.mark.parametrize("shift", (1.0, 2.0, 3.0, 5.0, 6.0, 8.0, 12.0, 16.0))
def test_schedules_equal_the_official_formulas_bit_for_bit(shift):
    # Every step count up to 80: float64 linspace bits decide truncated timesteps, and
    # torch.linspace (end-anchored upper half) gets e.g. (5 steps, shift 1) wrong.
    for steps in range(1, 81):
        for solver, ref in (("unipc", official_unipc_numpy), ("dpm++", official_dpmpp_numpy)):
            sigmas, timesteps = ref(steps, shift)
            sched = flow_schedule(steps, shift, solver)
            assert torch.equal(sched.sigmas, torch.from_numpy(sigmas)), (solver, steps)
            assert torch.equal(sched.timesteps, torch.from_numpy(timesteps)), (solver, steps)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("shift", SHIFTS)
def test_unipc_schedule_equals_diffusers_given_official_sigmas(steps, shift):
    ref = diffusers_unipc(steps, shift)
    sched = flow_schedule(steps, shift, "unipc")
    assert torch.equal(sched.sigmas, ref.sigmas)
    assert torch.equal(sched.timesteps, ref.timesteps)


def test_flow_sigmas_is_float64_with_zero_appended():
    s = flow_sigmas(4, 1.0)
    assert s.dtype == torch.float64 and s.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError):
        flow_sigmas(0, 5.0)


# --- trajectories ---------------------------------------------------------------------

@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("shift", SHIFTS)
def test_unipc_trajectory_equals_diffusers_step_loop(steps, shift):
    model, x = toy_model(), latent(steps)
    ref_sched = diffusers_unipc(steps, shift)
    ref = diffusers_loop(ref_sched, model, x.clone(), ref_sched.timesteps)
    out = sample_unipc(model, x.clone(), flow_schedule(steps, shift, "unipc"))
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("shift", SHIFTS)
def test_dpmpp_2m_trajectory_equals_diffusers_step_loop(steps, shift):
    model, x = toy_model(), latent(steps)
    ref_sched = diffusers_dpmpp(steps, shift)
    ref = diffusers_loop(ref_sched, model, x.clone(), ref_sched.timesteps)
    out = sample_dpmpp_2m(model, x.clone(), flow_schedule(steps, shift, "dpm++"))
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)


def test_unipc_corrector_and_dpmpp_second_order_term_matter():
    # Guards the parity tests: a first-order solver (Euler) on the same schedule lands far
    # from both, so matching diffusers within ATOL is not an accident of the toy model.
    model, x = toy_model(), latent(3)
    unipc = sample_unipc(model, x.clone(), flow_schedule(10, 5.0, "unipc"))
    euler_u = sample_euler(model, x.clone(), flow_schedule(10, 5.0, "unipc"))
    dpm = sample_dpmpp_2m(model, x.clone(), flow_schedule(10, 5.0, "dpm++"))
    euler_d = sample_euler(model, x.clone(), flow_schedule(10, 5.0, "dpm++"))
    assert (unipc - euler_u).abs().max() > 1e-2 and (dpm - euler_d).abs().max() > 1e-2


def test_euler_step_is_x_plus_dsigma_times_velocity():
    model, x = toy_model(), latent(5)
    sched = flow_schedule(6, 3.0, "euler")
    ref = x.clone()
    for i in range(sched.steps):
        ref = ref + (sched.sigmas[i + 1] - sched.sigmas[i]) * model(ref, sched.timesteps[i:i + 1])
    torch.testing.assert_close(sample_euler(model, x.clone(), sched), ref, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_recovers_x0_on_a_straight_flow(name):
    # v = noise - x0 everywhere: the exact ODE path is a straight line, x0 estimates are
    # exact at every step, so every solver must end at x0.
    x0, noise = latent(1), latent(2)
    sched = flow_schedule(8, 5.0, name)
    x = noise_latent(x0, noise, sched.sigmas[0])
    out = get_sampler(name)(lambda x, t: noise - x0, x, sched)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_model_gets_float32_latent_and_int64_batch_timesteps_and_output_keeps_dtype(name):
    seen = []
    model = toy_model()

    def spy(x, t):
        seen.append((x.dtype, t.dtype, tuple(t.shape), t[0].item()))
        return model(x, t).to(torch.bfloat16)  # a bf16 model output is upcast

    sched = flow_schedule(5, 5.0, name)
    x = latent(4, shape=(2, 4, 3, 5)).to(torch.bfloat16)
    out = get_sampler(name)(spy, x, sched)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert [s[:3] for s in seen] == [(torch.float32, torch.int64, (2,))] * 5
    assert [s[3] for s in seen] == sched.timesteps.tolist()


# --- partial denoise, callback, interrupt, registry ------------------------------------

def test_denoise_1_is_the_full_schedule():
    full, same = flow_schedule(30, 5.0, "unipc"), flow_schedule(30, 5.0, "unipc", denoise=1.0)
    assert torch.equal(full.sigmas, same.sigmas) and torch.equal(full.timesteps, same.timesteps)


@pytest.mark.parametrize("solver", ("unipc", "dpm++"))
def test_denoise_half_keeps_the_last_half_of_the_steps(solver):
    full, half = flow_schedule(30, 5.0, solver), flow_schedule(30, 5.0, solver, denoise=0.5)
    assert half.steps == 15
    assert torch.equal(half.sigmas, full.sigmas[15:])
    assert torch.equal(half.timesteps, full.timesteps[15:])


def test_denoise_step_count_rounds_half_up_and_keeps_at_least_one_step():
    assert denoise_steps(5, 0.5) == 3 and denoise_steps(100, 0.29) == 29
    assert denoise_steps(20, 0.01) == 1 and denoise_steps(20, 1.0) == 20
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="denoise"):
            denoise_steps(20, bad)


def test_noise_latent_interpolates_at_sigma():
    x0, noise = latent(1), latent(2)
    torch.testing.assert_close(noise_latent(x0, noise, 0.25), 0.75 * x0 + 0.25 * noise)
    assert torch.equal(noise_latent(x0, noise, torch.tensor(0.0)), x0)


@pytest.mark.parametrize("solver", ("unipc", "dpm++"))
def test_partial_denoise_equals_diffusers_strength_loop(solver):
    # diffusers V2V: full schedule, start at timesteps[t_start] (found by value), fresh history.
    model, x0, noise = toy_model(), latent(1), latent(2)
    full = flow_schedule(20, 5.0, solver)
    part = flow_schedule(20, 5.0, solver, denoise=0.6)
    start = full.steps - part.steps
    x = noise_latent(x0, noise, part.sigmas[0])
    ref_sched = diffusers_unipc(20, 5.0) if solver == "unipc" else diffusers_dpmpp(20, 5.0)
    ref = diffusers_loop(ref_sched, model, x.clone(), ref_sched.timesteps[start:])
    torch.testing.assert_close(get_sampler(solver)(model, x.clone(), part), ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_callback_runs_once_per_step_with_step_info(name):
    sched = flow_schedule(7, 5.0, name, denoise=0.9)  # 6 steps
    calls = []
    out = get_sampler(name)(toy_model(), latent(1), sched, callback=calls.append)
    assert [c["i"] for c in calls] == list(range(6)) and {c["total"] for c in calls} == {6}
    assert [float(c["sigma"]) for c in calls] == sched.sigmas[:-1].tolist()
    assert [int(c["timestep"]) for c in calls] == sched.timesteps.tolist()
    assert torch.equal(calls[-1]["x"], out)  # the last step's x is the result
    # At the final step (sigma_next = 0) every solver returns its x0 estimate.
    assert torch.equal(calls[-1]["denoised"], out)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_interrupt_raising_stops_before_the_next_model_call(name):
    evaluations = []
    model = toy_model()

    def counting(x, t):
        evaluations.append(int(t[0]))
        return model(x, t)

    def interrupt():
        if len(evaluations) == 3:
            raise KeyboardInterrupt("stop")

    with pytest.raises(KeyboardInterrupt):
        get_sampler(name)(counting, latent(1), flow_schedule(10, 5.0, name), interrupt=interrupt)
    assert len(evaluations) == 3


def test_unipc_refuses_a_schedule_starting_at_sigma_1():
    with pytest.raises(ValueError, match="sigmas\\[0\\] < 1"):
        sample_unipc(toy_model(), latent(1), flow_schedule(4, 5.0, "dpm++"))


def test_sampler_registry_and_clear_error_for_unknown_names():
    assert set(SAMPLERS) == {"unipc", "dpm++", "euler"}
    assert get_sampler("unipc") is sample_unipc and get_sampler("dpm++") is sample_dpmpp_2m
    with pytest.raises(ValueError, match="unipc, dpm\\+\\+, euler"):
        get_sampler("ddim")
    with pytest.raises(ValueError, match="unknown solver"):
        flow_schedule(10, 5.0, "ddim")
