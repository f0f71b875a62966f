"""Limits on work: every run argument out of bounds is refused at once, naming the limit.

The maxima live in wan_core.limits; SamplerSettings, sample(), check_video_size, generate()
and the node widgets all apply the same numbers, before any model is loaded or tensor drawn.
"""
from __future__ import annotations

import math
import time

import pytest

import nodepack
from wan_core import SamplerSettings, check_run_arguments, check_video_size, default_settings, generate, sample
from wan_core import limits
from wan_core.schedulers import SAMPLERS

NAN, INF = float("nan"), float("inf")


class _Untouchable:
    """A model that fails the test if anything looks at it."""

    def __getattr__(self, name):
        raise AssertionError(f"the model was used ({name}) before the arguments were checked")


def _refused(match: str, fn, *args, **kwargs) -> None:
    start = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        fn(*args, **kwargs)
    assert time.perf_counter() - start < 0.5, "refusing a value must not start any work"


@pytest.mark.parametrize(("steps", "match"), [
    (0, "steps 0 is below 1"), (-1, "steps -1 is below 1"),
    (100_000_000, r"steps 100000000 is above the maximum 1000 \(MAX_STEPS"),
    (1001, r"above the maximum 1000 \(MAX_STEPS"),
    (1e8, "steps must be a whole number from 1 to 1000"), (2.5, "steps must be a whole number"),
    (True, "steps must be a whole number"), ("50", "steps must be a whole number"),
])
def test_steps_out_of_bounds_are_refused_naming_the_limit(steps, match) -> None:
    _refused(match, SamplerSettings, steps=steps)
    _refused(match, default_settings, "t2v", 832, 480, steps=steps)
    _refused(match, generate, dit=_Untouchable(), vae=None, text_encoder=None, prompt="x", steps=steps)


@pytest.mark.parametrize(("frames", "match"), [
    (80, r"frames 80 is not 4n\+1 \(1, 5, 9, \.\.\., 81\); use 77 or 81"),
    (1029, r"frames 1029 is above the maximum 1025 \(MAX_FRAMES"),
    (0, r"frames 0 is not 4n\+1"), (-3, r"frames -3 is not 4n\+1"), (81.0, "frames must be a whole number"),
    (10**12 + 1, r"above the maximum 1025 \(MAX_FRAMES"),
])
def test_frames_out_of_bounds_are_refused(frames, match) -> None:
    _refused(match, check_video_size, 832, 480, frames)
    _refused(match, check_run_arguments, frames=frames)
    _refused(match, generate, dit=_Untouchable(), vae=None, text_encoder=None, prompt="x", frames=frames)


@pytest.mark.parametrize(("width", "height", "match"), [
    (833, 480, "width 833 is not a multiple of 16 (at least 16); use 832 or 848"),
    (0, 480, "width 0 is not a multiple of 16 (at least 16); use 16 or 32"),
    (832, -16, "height -16 is not a multiple of 16"),
    (8192, 480, "width 8192 is above the maximum 4096 (MAX_SIZE"),
    (832, 10**9, "height 1000000000 is above the maximum 4096 (MAX_SIZE"),
    (832.0, 480, "width must be a whole number of pixels"),
])
def test_sizes_out_of_bounds_are_refused(width, height, match) -> None:
    import re

    _refused(re.escape(match), check_video_size, width, height, 81)
    _refused(re.escape(match), generate, dit=_Untouchable(), vae=None, text_encoder=None, prompt="x", width=width,
             height=height)


@pytest.mark.parametrize(("field", "value", "match"), [
    ("denoise", 0.0, "denoise must be above 0 and at most 1"), ("denoise", 1.5, "denoise must be above 0"),
    ("denoise", NAN, "denoise must be above 0"), ("denoise", -0.1, "denoise must be above 0"),
    ("cfg", NAN, "cfg must be a finite number from 0 to 100"), ("cfg", INF, "cfg must be a finite number"),
    ("cfg", -1.0, r"cfg -1 is outside 0\.\.100 \(MIN_CFG/MAX_CFG"), ("cfg", 100.5, "cfg 100.5 is outside"),
    ("shift", 0.0, r"shift 0 is outside \(0, 100\] \(MAX_SHIFT"), ("shift", -2.0, "shift -2 is outside"),
    ("shift", 101.0, r"shift 101 is outside \(0, 100\]"), ("shift", NAN, "shift must be a finite number"),
    ("seed", -1, r"seed must be a whole number from 0 to 2\*\*64-1 \(MAX_SEED"), ("seed", 2**64, "seed must be"),
    ("seed", 1.5, "seed must be a whole number"), ("sampler", "ddim", "unknown sampler 'ddim'"),
])
def test_sampler_settings_out_of_bounds_are_refused(field, value, match) -> None:
    _refused(match, SamplerSettings, **{field: value})
    _refused(match, check_run_arguments, **{field: value})
    _refused(match, generate, dit=_Untouchable(), vae=None, text_encoder=None, prompt="x", **{field: value})


@pytest.mark.parametrize("max_area", [0, 255, limits.MAX_AREA + 1, 832.5 * 480])
def test_max_area_out_of_bounds_is_refused(max_area) -> None:
    _refused("max_area must be a whole number of pixels", check_run_arguments, max_area=max_area)


def test_the_maxima_themselves_are_accepted() -> None:
    top = SamplerSettings(steps=limits.MAX_STEPS, cfg=limits.MAX_CFG, shift=limits.MAX_SHIFT, seed=limits.MAX_SEED,
                          denoise=1.0)
    low = SamplerSettings(steps=1, cfg=limits.MIN_CFG, shift=1e-3, seed=0, denoise=1e-3, sampler="euler")
    assert top.steps == 1000 and low.cfg == 0.0
    check_video_size(limits.MAX_SIZE, limits.MAX_SIZE, limits.MAX_FRAMES)
    check_video_size(limits.MIN_SIZE, limits.MIN_SIZE, 1)
    check_run_arguments(width=limits.MAX_SIZE, height=limits.MAX_SIZE, frames=limits.MAX_FRAMES,
                        max_area=limits.MAX_AREA, steps=limits.MAX_STEPS, cfg=limits.MAX_CFG, shift=limits.MAX_SHIFT,
                        sampler="dpm++", seed=limits.MAX_SEED, denoise=1.0)
    assert (limits.MAX_STEPS, limits.MAX_SIZE, limits.MAX_FRAMES, limits.MAX_SEED) == (1000, 4096, 1025, 2**64 - 1)
    assert (limits.MAX_FRAMES - 1) % 4 == 0 and limits.MAX_SIZE % 16 == 0 and math.isfinite(limits.MAX_CFG)


def test_sample_refuses_a_latent_shape_above_the_limits_before_drawing_noise() -> None:
    class Model:
        class cfg:  # noqa: N801 - stands in for DiTConfig
            has_image_input = False
            variant = model_type = "t2v"

    text = None  # never reached
    _refused(r"latent shape \(16, 300, 60, 104\) is above the limits: at most 257 latent frames", sample,
             Model(), text, SamplerSettings(steps=1), shape=(16, 300, 60, 104))
    _refused(r"at most 257 latent frames \(MAX_FRAMES 1025\) and 512 latent pixels per side", sample,
             Model(), text, SamplerSettings(steps=1), shape=(16, 1, 60, 10**6))


def test_sampler_names_match_the_registered_samplers() -> None:
    assert set(limits.SAMPLER_NAMES) == set(SAMPLERS)


def test_node_widgets_use_the_same_limits() -> None:
    pack = nodepack.load_pack()
    types = pack.nodes.types
    assert (types.MAX_SIZE, types.MAX_FRAMES, types.MAX_SEED, types.MAX_STEPS, types.MIN_CFG, types.MAX_CFG,
            types.MAX_SHIFT) == (limits.MAX_SIZE, limits.MAX_FRAMES, limits.MAX_SEED, limits.MAX_STEPS,
                                 limits.MIN_CFG, limits.MAX_CFG, limits.MAX_SHIFT)
    sampler = pack.nodes.WanCoreSampler.INPUT_TYPES()["required"]
    assert sampler["steps"][1]["max"] == limits.MAX_STEPS and sampler["steps"][1]["min"] == 1
    assert sampler["cfg"][1]["max"] == limits.MAX_CFG and sampler["cfg"][1]["min"] == limits.MIN_CFG
    assert sampler["shift"][1]["max"] == limits.MAX_SHIFT and sampler["seed"][1]["max"] == limits.MAX_SEED
    assert 0 < sampler["denoise"][1]["min"] and sampler["denoise"][1]["max"] == 1.0
    assert sampler["sampler"][0] == list(limits.SAMPLER_NAMES)
    size = pack.nodes.WanCoreEmptyVideoEmbeds.INPUT_TYPES()["required"]
    assert (size["width"][1]["min"], size["width"][1]["max"]) == (limits.MIN_SIZE, limits.MAX_SIZE)
    assert (size["height"][1]["min"], size["height"][1]["max"]) == (limits.MIN_SIZE, limits.MAX_SIZE)
    assert (size["frames"][1]["min"], size["frames"][1]["max"]) == (1, limits.MAX_FRAMES)
    err = pack.nodes.WanCoreEmptyVideoEmbeds.VALIDATE_INPUTS(width=832, height=480, frames=1029)
    assert isinstance(err, str) and "above the maximum 1025" in err
