"""Every Wan 2.2 default we use equals the official one. The expected values are written
here from the official repository (Wan-Video/Wan2.2), file by file:

- ``wan/configs/shared_config.py``: ``sample_neg_prompt`` (below), ``sample_fps = 16``,
  ``frame_num = 81``, ``num_train_timesteps = 1000``;
- ``wan/configs/wan_t2v_A14B.py``: ``sample_shift = 12.0``, ``sample_steps = 40``,
  ``boundary = 0.875``, ``sample_guide_scale = (3.0, 4.0)  # low noise, high noise``;
- ``wan/configs/wan_i2v_A14B.py``: ``sample_shift = 5.0``, ``sample_steps = 40``,
  ``boundary = 0.900``, ``sample_guide_scale = (3.5, 3.5)``; no negative-prompt override
  (Wan 2.1 I2V prefixed "镜头晃动，"; Wan 2.2 does not);
- ``wan/configs/wan_ti2v_5B.py``: ``sample_fps = 24``, ``sample_shift = 5.0``,
  ``sample_steps = 50``, ``sample_guide_scale = 5.0``, ``frame_num = 121``,
  ``vae_stride = (4, 16, 16)``, ``patch_size = (1, 2, 2)``;
- ``wan/configs/__init__.py``: ``SUPPORTED_SIZES['ti2v-5B'] = ('704*1280', '1280*704')``,
  ``MAX_AREA_CONFIGS['1280*704'] = 1280 * 704``; ``generate.py``: ``--size`` default
  ``1280*720`` (A14B; ``SIZE_CONFIGS`` gives (width, height)), ``--sample_solver unipc``,
  steps / shift / guidance / frames from the config when not given;
- ``wan/text2video.py`` / ``image2video.py``: the high-noise expert while
  ``t >= boundary * num_train_timesteps``; ``image2video.py`` ``max_area=720 * 1280``,
  ``textimage2video.py`` ``max_area=704 * 1280``.
"""
from __future__ import annotations

import inspect

from wan_core.conditioning import NEGATIVE_PROMPT
from wan_core.generate22 import A14B_VIDEO_DEFAULTS, generate_a14b, generate_ti2v
from wan_core.moe import A14B_DEFAULTS, MOE_I2V_A14B, MOE_T2V_A14B, NUM_TRAIN_TIMESTEPS
from wan_core.ti2v import TI2V_DEFAULTS, TI2V_SIZE_STEP, ti2v_latent_shape

OFFICIAL_NEG_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，"
    "最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，"
    "画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")


def _defaults(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_the_negative_prompt_is_the_wan22_sample_neg_prompt():
    assert NEGATIVE_PROMPT == OFFICIAL_NEG_PROMPT
    # both generators fall back to it (no I2V prefix in Wan 2.2)
    src = inspect.getsource(inspect.getmodule(generate_a14b))
    assert "negative or NEGATIVE_PROMPT" in src and "NEGATIVE_PROMPT_I2V" not in src


def test_a14b_sampling_defaults_equal_the_official_configs():
    t2v, t2v_shift, t2v_steps = A14B_DEFAULTS["t2v"]
    i2v, i2v_shift, i2v_steps = A14B_DEFAULTS["i2v"]
    assert (t2v, t2v_shift, t2v_steps) == (MOE_T2V_A14B, 12.0, 40)
    assert (t2v.boundary, t2v.cfg_low, t2v.cfg_high) == (0.875, 3.0, 4.0)
    assert (i2v, i2v_shift, i2v_steps) == (MOE_I2V_A14B, 5.0, 40)
    assert (i2v.boundary, i2v.cfg_low, i2v.cfg_high) == (0.900, 3.5, 3.5)
    assert NUM_TRAIN_TIMESTEPS == 1000
    assert t2v.is_high_noise(875) and not t2v.is_high_noise(874.999)
    assert i2v.is_high_noise(900) and not i2v.is_high_noise(899)


def test_a14b_video_defaults_equal_the_official_ones():
    assert A14B_VIDEO_DEFAULTS == {"frames": 81, "fps": 16, "width": 1280, "height": 720, "max_area": 720 * 1280}
    d = _defaults(generate_a14b)
    assert d["frames"] == 81 and d["max_area"] == 720 * 1280 and d["sampler"] == "unipc"
    assert d["steps"] is None and d["shift"] is None and d["moe"] is None   # -> A14B_DEFAULTS per model


def test_ti2v_defaults_equal_the_official_config():
    assert TI2V_DEFAULTS == {"steps": 50, "shift": 5.0, "cfg": 5.0, "frames": 121, "fps": 24, "width": 1280,
                             "height": 704, "max_area": 704 * 1280}
    assert TI2V_SIZE_STEP == 2 * 16
    d = _defaults(generate_ti2v)
    assert (d["steps"], d["shift"], d["cfg"], d["frames"], d["max_area"], d["sampler"]) == (
        50, 5.0, 5.0, 121, 704 * 1280, "unipc")
    assert d["width"] is None and d["height"] is None   # 1280x704 for T2V, the official rule for I2V
    for w, h in ((1280, 704), (704, 1280)):             # SUPPORTED_SIZES['ti2v-5B']
        assert ti2v_latent_shape(w, h, 121) == (48, 31, h // 16, w // 16)
