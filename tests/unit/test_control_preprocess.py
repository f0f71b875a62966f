"""Control preprocessing (wan_core.control_preprocess, WanCore Control Preprocess): canny equals
kornia called directly and finds a square's edges, grayscale is the ITU-R 601 formula, the
soft modes keep their ranges, pad / box masks have the exact geometry, chunking changes
nothing, the chunk plan covers the measured device memory, and bad options are refused
naming the value, before anything is allocated."""
from __future__ import annotations

import sys
import types

import kornia
import pytest
import torch

import nodepack
from wan_core import CONTROL_MODES, ControlOptions, limits, plan_control_chunks, preprocess_control
from wan_core import control_preprocess as cp
from wan_core.memsim import DeviceMemory

pytestmark = pytest.mark.usefixtures("one_thread")
ONE_FRAME = 1          # a budget below one frame: chunks of one frame
WHOLE = 1 << 40        # a budget above the video: one chunk


def _video(frames: int = 6, height: int = 48, width: int = 64, seed: int = 0) -> torch.Tensor:
    """A smooth random video with a bright square moving right: edges, gradients and flat parts."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(frames, 3, height // 8, width // 8, generator=g)
    video = torch.nn.functional.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)
    video = video.permute(0, 2, 3, 1).contiguous()
    for t in range(frames):
        video[t, 12:28, 8 + 2 * t:24 + 2 * t] = 1.0
    return video


def _square(height: int = 48, width: int = 48) -> torch.Tensor:
    """One frame: black with a white square at rows/cols 16..31."""
    frame = torch.zeros(1, height, width, 3)
    frame[:, 16:32, 16:32] = 1.0
    return frame


# ------------------------------------------------------------------------------------------ modes

def test_grayscale_is_the_itu_r_601_luma_in_three_channels():
    video = _video()
    out = preprocess_control(video, ControlOptions(mode="grayscale")).frames
    r, g, b = video.double().unbind(-1)
    luma = 0.299 * r + 0.587 * g + 0.114 * b
    assert out.shape == video.shape and out.dtype == torch.float32
    assert torch.equal(out[..., 0], out[..., 1]) and torch.equal(out[..., 0], out[..., 2])
    assert (out[..., 0].double() - luma).abs().max() < 1e-6   # measured 7.3e-8 (float32 rounding)
    # a wrong weight order (BGR) is far off
    assert (out[..., 0].double() - (0.114 * r + 0.587 * g + 0.299 * b)).abs().max() > 0.05


@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_canny_marks_each_side_of_a_square_on_a_pixel_next_to_the_step_and_nothing_in_flat_regions(sigma):
    edges = preprocess_control(_square(), ControlOptions(mode="canny", blur_sigma=sigma)).frames[0, ..., 0]
    assert set(edges.unique().tolist()) <= {0.0, 1.0}
    mid = slice(20, 28)   # the sides away from the (rounded) corners
    # the steps lie between pixels 15|16 and 31|32: each side is one unbroken line on one of the two
    for before, after in ((15, 16), (31, 32)):
        rows, cols = edges[[before, after], mid], edges[mid, [before, after]].T
        assert (rows.sum(0) == 1).all() and (cols.sum(0) == 1).all(), (before, sigma)
        assert rows.sum(1).max() == 8 and cols.sum(1).max() == 8     # on one pixel row, not zig-zagging
    if sigma == 0.0:
        # unblurred, the two pixels have equal magnitudes and NMS keeps the upper / left one (OpenCV's rule,
        # documented by kornia 0.9, the version this suite runs with; older kornia may break the tie otherwise)
        assert edges[15, mid].eq(1).all() and edges[31, mid].eq(1).all()
        assert edges[mid, 15].eq(1).all() and edges[mid, 31].eq(1).all()
    band = torch.zeros_like(edges, dtype=torch.bool)
    band[14:34, 14:34] = True
    band[18:30, 18:30] = False          # 2 pixels inside the square and more: flat, no edges
    assert edges[~band].sum() == 0      # nothing in the flat black surround or the flat white inside
    assert edges.sum() >= 4 * 14        # the whole outline (corners are cut diagonally)


def _kornia_per_frame(video: torch.Tensor, filter_fn) -> torch.Tensor:
    """``filter_fn`` called on each frame ``[1, 3, H, W]`` -> ``[T, H, W, 3]`` (1 channel repeated)."""
    out = [filter_fn(frame[None].permute(0, 3, 1, 2)) for frame in video]
    return torch.cat([o.expand(-1, 3, -1, -1) for o in out]).permute(0, 2, 3, 1)


def test_canny_equals_kornia_called_directly_and_chunking_changes_nothing():
    video = _video()
    options = ControlOptions(mode="canny", low_threshold=0.2, high_threshold=0.5, blur_sigma=1.0)
    expected = _kornia_per_frame(video, lambda x: kornia.filters.canny(x, 0.2, 0.5, kernel_size=(5, 5),
                                                                        sigma=(1.0, 1.0))[1])
    assert expected.sum() > 100                              # the video has edges
    per_frame = plan_control_chunks(tuple(video.shape), options, ONE_FRAME).device_bytes
    for budget in (ONE_FRAME, 2 * per_frame, 4 * per_frame, WHOLE):
        assert torch.equal(preprocess_control(video, options, budget_bytes=budget).frames, expected), budget
    # the default blur is ComfyUI Canny's 5x5, sigma 1; another sigma gives other edges
    assert not torch.equal(preprocess_control(video, ControlOptions(mode="canny", low_threshold=0.2,
                                                                    high_threshold=0.5, blur_sigma=2.0)).frames,
                           expected)


def test_canny_defaults_are_comfyui_canny_node_defaults():
    video = _video(frames=2)
    expected = _kornia_per_frame(video, lambda x: kornia.filters.canny(x, 0.4, 0.8)[1])   # the core node's call
    assert torch.equal(preprocess_control(video, ControlOptions()).frames, expected)


def test_scribble_is_zero_on_flat_regions_one_on_a_full_step_and_binary_with_a_threshold():
    step = torch.zeros(2, 32, 48, 3)
    step[:, :, 24:] = 1.0
    for sigma in (0.0, 1.0, 3.0):
        soft = preprocess_control(step, ControlOptions(mode="scribble", blur_sigma=sigma)).frames
        assert soft.shape == step.shape and soft.min() >= 0.0
        assert abs(float(soft.max()) - 1.0) < 1e-6, sigma          # scaled so a full step gives 1
        r = cp.blur_kernel_size(sigma) // 2 + 1
        assert soft[:, :, :24 - r].eq(0).all() and soft[:, :, 24 + r:].eq(0).all()   # flat: exactly 0
    video = _video()
    soft = preprocess_control(video, ControlOptions(mode="scribble")).frames
    assert 0.0 <= soft.min() and soft.max() <= 1.0 and 0.0 < soft.mean() < 0.5
    lines = preprocess_control(video, ControlOptions(mode="scribble", scribble_threshold=0.3)).frames
    assert set(lines.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(lines, (soft >= 0.3).float())
    assert torch.equal(preprocess_control(video, ControlOptions(mode="scribble"), budget_bytes=ONE_FRAME).frames,
                       soft)


def test_blur_is_kornia_gaussian_blur_with_replicated_borders_in_range():
    video = _video()
    out = preprocess_control(video, ControlOptions(mode="blur", blur_sigma=2.0)).frames
    direct = [kornia.filters.gaussian_blur2d(f[None].permute(0, 3, 1, 2), (9, 9), (2.0, 2.0), border_type="replicate")
              for f in video]
    assert torch.equal(out, torch.cat(direct).clamp(0, 1).permute(0, 2, 3, 1))
    assert out.shape == video.shape and 0.0 <= out.min() and out.max() <= 1.0
    assert abs(float(out.mean() - video.mean())) < 0.01
    assert torch.equal(preprocess_control(video, ControlOptions(mode="blur", blur_sigma=0.0)).frames, video)


# ------------------------------------------------------------------------------------------ pad and box

def test_padding_grey_and_the_mask_have_the_exact_geometry():
    video = _video(frames=3, height=16, width=32)
    result = preprocess_control(video, ControlOptions(mode="none", pad=(8, 16, 8, 0)))
    frames, mask = result.frames, result.mask
    assert frames.shape == (3, 32, 48, 3) and mask.shape == (1, 32, 48)
    assert torch.equal(frames[:, 16:32, 8:40], video)             # the frames, untouched, at (left, top)
    inside = torch.zeros(32, 48, dtype=torch.bool)
    inside[16:32, 8:40] = True
    assert frames[:, ~inside].eq(0.5).all()                       # grey padding
    assert mask[0, inside].eq(0).all() and mask[0, ~inside].eq(1).all()   # 1 = generate the padding
    plain = preprocess_control(video, ControlOptions(mode="none"))
    assert plain.mask.shape == (1, 16, 32) and plain.mask.eq(1).all()     # nothing padded: generate everything


def test_edge_padding_repeats_the_border_pixels_of_the_control_frames():
    video = _video(frames=2, height=16, width=32)
    frames = preprocess_control(video, ControlOptions(mode="grayscale", pad=(16, 0, 0, 16), pad_fill="edge")).frames
    grey = preprocess_control(video, ControlOptions(mode="grayscale")).frames
    assert frames.shape == (2, 32, 48, 3)
    assert torch.equal(frames[:, :16, 16:], grey)
    assert torch.equal(frames[:, :16, :16], grey[:, :, :1].expand(-1, -1, 16, -1))     # left: column 0 repeated
    assert torch.equal(frames[:, 16:, 16:], grey[:, -1:].expand(-1, 16, -1, -1))       # bottom: last row repeated


def test_a_box_is_grey_in_the_frames_and_one_in_the_mask_offset_by_the_padding():
    video = _video(frames=2, height=32, width=32)
    result = preprocess_control(video, ControlOptions(mode="none", pad=(16, 0, 0, 0), box=(4, 6, 10, 8)))
    box = torch.zeros(32, 48, dtype=torch.bool)
    box[6:14, 20:30] = True
    pad = torch.zeros(32, 48, dtype=torch.bool)
    pad[:, :16] = True
    assert result.frames[:, box].eq(0.5).all()
    assert torch.equal(result.frames[:, ~box & ~pad], video.reshape(2, -1, 3)[:, (~box[:, 16:]).reshape(-1)])
    assert result.mask[0, box | pad].eq(1).all() and result.mask[0, ~box & ~pad].eq(0).all()
    assert int(result.mask.sum()) == 32 * 16 + 10 * 8


# ------------------------------------------------------------------------------------------ validation

@pytest.mark.parametrize("kwargs, words", [
    (dict(mode="depth"), ["'depth'", "canny"]),
    (dict(low_threshold=0.9, high_threshold=0.5), ["low_threshold 0.9", "high_threshold 0.5"]),
    (dict(low_threshold=0.0), ["low_threshold 0"]),
    (dict(high_threshold=9.0), ["high_threshold 9", "8"]),
    (dict(low_threshold=float("nan")), ["low_threshold", "finite"]),
    (dict(blur_sigma=-1.0), ["blur_sigma -1", "16"]),
    (dict(blur_sigma=17.0), ["blur_sigma 17", "MAX_BLUR_SIGMA"]),
    (dict(scribble_threshold=1.5), ["scribble_threshold 1.5"]),
    (dict(pad=(8, 0, -8, 0)), ["pad (8, 0, -8, 0)"]),
    (dict(pad=(8, 0)), ["pad", "4 whole numbers"]),
    (dict(pad=(8.0, 0, 8, 0)), ["pad", "whole numbers"]),
    (dict(pad_fill="mirror"), ["'mirror'", "grey"]),
    (dict(box=(0, 0, 0, 8)), ["box (0, 0, 0, 8)", "width"]),
])
def test_bad_options_are_refused_naming_the_value(kwargs, words):
    with pytest.raises(ValueError) as err:
        ControlOptions(**kwargs)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


@pytest.mark.parametrize("shape, options, words", [
    ((5, 48, 64), ControlOptions(), ["[T, H, W, 3]", "(5, 48, 64)"]),
    ((limits.MAX_FRAMES + 4, 48, 64, 3), ControlOptions(), ["1029 frames", "MAX_FRAMES"]),
    ((5, 48, limits.MAX_SIZE + 16, 3), ControlOptions(), ["width 4112", "MAX_SIZE"]),
    ((5, 8, 64, 3), ControlOptions(), ["height 8", "16"]),
    ((5, 480, 832, 3), ControlOptions(pad=(10, 0, 0, 0)), ["padded width 842", "left 10", "use right 6", "multiple of 16"]),
    ((5, 480, 832, 3), ControlOptions(pad=(0, 8, 0, 16)), ["padded height 504", "bottom 24 or 8"]),
    ((5, 480, 4000, 3), ControlOptions(pad=(64, 0, 64, 0)), ["padded width 4128", "MAX_SIZE"]),
    ((5, 48, 64, 3), ControlOptions(box=(60, 0, 8, 8)), ["box (x 60", "64x48"]),
    ((5, 16, 64, 3), ControlOptions(blur_sigma=8.0), ["blur_sigma 8", "64x16"]),
])
def test_bad_videos_are_refused_from_the_shape_alone(shape, options, words):
    with pytest.raises(ValueError) as err:
        plan_control_chunks(shape, options)     # numbers only: nothing of that size is allocated
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_non_float_frames_and_untyped_options_are_refused():
    with pytest.raises(ValueError, match="floating-point.*uint8"):
        preprocess_control(torch.zeros(1, 16, 16, 3, dtype=torch.uint8), ControlOptions())
    with pytest.raises(ValueError, match="ControlOptions"):
        preprocess_control(torch.zeros(1, 16, 16, 3), {"mode": "canny"})


# ------------------------------------------------------------------------------------------ chunks, memory

def test_chunks_report_progress_and_an_exception_from_the_callback_stops_the_run():
    video = _video(frames=5)
    options = ControlOptions(mode="grayscale")
    ticks = []
    two = plan_control_chunks(tuple(video.shape), options, WHOLE)
    budget = two.frame_bytes + 2 * (two.device_bytes - two.frame_bytes) // 5    # room for 2 of the 5 frames
    preprocess_control(video, options, budget_bytes=budget, callback=lambda d, t: ticks.append((d, t)))
    assert ticks == [(2, 5), (4, 5), (5, 5)]

    def stop(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        preprocess_control(video, options, callback=stop)


def test_a_compute_device_other_than_the_frames_goes_through_the_chunk_buffer_with_the_same_result():
    # "cpu:0" is not equal to "cpu" as a torch.device: the path a GPU takes (chunk copied in, control
    # frames into a device buffer, one copy back into the result on the frames' device)
    video = _video(frames=5)
    options = ControlOptions(mode="scribble", pad=(0, 16, 0, 0), box=(2, 2, 8, 8))
    there = preprocess_control(video, options, device=torch.device("cpu", 0), budget_bytes=ONE_FRAME)
    here = preprocess_control(video, options)
    assert torch.equal(there.frames, here.frames) and torch.equal(there.mask, here.mask)
    assert there.frames.device == video.device


def test_an_81_frame_720p_video_is_planned_in_bounded_chunks():
    shape = (81, 720, 1280, 3)
    plan = plan_control_chunks(shape, ControlOptions())
    # 164 B/px to filter a frame (151 MB) + 24 B/px per frame of the chunk (22 MB)
    assert plan.frames == 17 and plan.device_bytes <= cp.DEFAULT_CHUNK_BYTES
    assert plan_control_chunks(shape, ControlOptions(mode="grayscale")).frames == 23
    huge = plan_control_chunks((2, 4096, 4096, 3), ControlOptions())
    assert huge.frames == 1 and huge.device_bytes > cp.DEFAULT_CHUNK_BYTES     # one frame is the least


class _RealMemory(DeviceMemory):
    """DeviceMemory on real tensors: scalars are read for real (kornia's hysteresis loops on them)."""

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types_, args, kwargs)


@pytest.mark.parametrize("options", [ControlOptions(), ControlOptions(mode="scribble", blur_sigma=3.0),
                                     ControlOptions(mode="grayscale", pad=(16, 0, 16, 16)),
                                     ControlOptions(mode="blur", blur_sigma=4.0),
                                     ControlOptions(mode="none", pad=(0, 16, 0, 0))])
def test_the_plan_covers_the_measured_memory_of_filtering_a_frame(options):
    video = _video(frames=4)
    plan = plan_control_chunks(tuple(video.shape), options, WHOLE)
    scale = cp._scribble_scale(options.blur_sigma, torch.device("cpu"))
    first = video[:1]                             # (a view made inside would count the video's storage)
    with _RealMemory("cpu") as mem:
        frame = first.clone()                     # the frame as copied to the device
        out = cp._control_frame(frame, options, scale)
        del frame, out
    # never below the measurement; at most 2x above (padding is planned as a step of its own)
    assert mem.peak <= plan.frame_bytes <= 2.0 * mem.peak, (mem.peak, plan.frame_bytes)
    with _RealMemory("cpu") as mem:              # the whole run: the result (on the CPU here) + one frame's work
        result = preprocess_control(video, options, budget_bytes=ONE_FRAME)
    # the video (its views count its storage), the result and the mask; no chunk copies on the CPU
    kept = video.numel() * 4 + result.frames.numel() * 4 + result.mask.numel() * 4
    assert mem.peak - kept <= plan.frame_bytes


# ------------------------------------------------------------------------------------------ the node

@pytest.fixture(scope="module")
def pack():
    return nodepack.load_pack()


def _node_args(**changes):
    args = dict(mode="canny", low_threshold=0.4, high_threshold=0.8, blur_sigma=1.0, scribble_threshold=0.0,
                pad_left=0, pad_top=0, pad_right=0, pad_bottom=0, pad_fill="grey", box_x=0, box_y=0, box_width=0,
                box_height=0)
    return dict(args, **changes)


def test_the_node_gives_the_engine_result_with_progress_and_its_widgets_use_the_engine_limits(pack, monkeypatch):
    ticks, checks = [], []

    class Bar:
        def __init__(self, total, node_id=None):
            self.node_id = node_id

        def update_absolute(self, value, total=None, preview=None):
            ticks.append((self.node_id, value, total))

    mm = types.SimpleNamespace(get_torch_device=lambda: torch.device("cpu"),
                               throw_exception_if_processing_interrupted=lambda: checks.append(1))
    monkeypatch.setitem(sys.modules, "comfy.utils", types.SimpleNamespace(ProgressBar=Bar))
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    video = _video(frames=3, height=32, width=32)
    node = pack.nodes.WanCoreControlPreprocess()
    frames, mask = node.preprocess(video, **_node_args(mode="scribble", pad_left=16, box_x=2, box_y=2, box_width=4,
                                                       box_height=4), unique_id="7")
    wc = pack.wan_core
    expected = wc.preprocess_control(video, wc.ControlOptions(mode="scribble", pad=(16, 0, 0, 0), box=(2, 2, 4, 4)))
    assert torch.equal(frames, expected.frames) and torch.equal(mask, expected.mask)
    assert frames.shape == (3, 32, 48, 3) and mask.shape == (1, 32, 48)
    assert ticks == [("7", 3, 3)] and checks == [1]
    with pytest.raises(ValueError, match="padded width 40"):
        node.preprocess(video, **_node_args(pad_left=8))
    # widget limits and choices are the engine's
    spec = pack.nodes.WanCoreControlPreprocess.INPUT_TYPES()["required"]
    assert tuple(spec["mode"][0]) == tuple(CONTROL_MODES) == tuple(wc.CONTROL_MODES)
    assert tuple(spec["pad_fill"][0]) == cp.PAD_FILLS
    assert spec["high_threshold"][1]["max"] == cp.MAX_CANNY_THRESHOLD
    assert spec["blur_sigma"][1]["max"] == cp.MAX_BLUR_SIGMA and spec["pad_left"][1]["max"] == cp.MAX_PAD
    defaults = wc.ControlOptions()
    assert (spec["low_threshold"][1]["default"], spec["high_threshold"][1]["default"],
            spec["blur_sigma"][1]["default"], spec["scribble_threshold"][1]["default"]) == (
        defaults.low_threshold, defaults.high_threshold, defaults.blur_sigma, defaults.scribble_threshold)
    validate = pack.nodes.WanCoreControlPreprocess.VALIDATE_INPUTS
    assert validate(low_threshold=0.4, high_threshold=0.8) is True
    assert "low_threshold (0.9)" in validate(low_threshold=0.9, high_threshold=0.8)
    assert "high_threshold 9.5" in validate(low_threshold=0.4, high_threshold=9.5)
