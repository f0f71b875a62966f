"""The VAE's temporal feature cache: streaming chunk by chunk equals processing the whole
stream at once, memory stays bounded, shapes follow 4n+1 <-> n+1, and the API contract
(normalisation, on_frame, re-entrancy, meta construction, no buffers) holds.

"At once" means the same layers given the whole stream and no cache: causal convs then pad
the past with zeros, the temporal downsample keeps frame 0 and runs its stride-2 windows
over the full stream, the temporal upsample keeps frame 0 single and runs its causal conv
over frames 1... The layer tests below check those three definitions against direct
computations with ``F.conv3d`` (the from-scratch reference), and the network tests check
that the official chunking (encode 1, 4, 4, ...; decode one latent frame at a time) gives
the same numbers. Measured max abs difference chunked vs whole, fp32 CPU, torch 2.13:
encode <= 1.3e-6, decode <= 4.6e-6 at 24x16 (CPU conv kernels differ with the frame count:
summation order), exactly 0 at 40x24; outputs are O(1). Tolerance 5e-5; a cache bug moves
the decode by ~1.5 (measured: history zeroed 1.8, history cut to one frame 1.5).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tiny import TINY_VAE
from wan_core.configs import VAEConfig
from wan_core.vae import (CausalConv3d, FeatureCache, Resample, WanVAE, denormalize_latents,
                          normalize_latents)

TOL = 5e-5
H, W = 40, 24           # shape tests: multiples of 8 but not of 16, odd latent sizes (5 x 3)
SMALL = (24, 16)        # everything else: latent 3 x 2 keeps each file fast on 2 cores


@pytest.fixture(scope="module")
def vae(tiny_vae) -> WanVAE:
    return tiny_vae


def _video(frames: int, seed: int = 0, batch: int = 1, size: tuple[int, int] = SMALL) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, *size, generator=g) * 2 - 1


def _latents(frames: int, seed: int = 0, size: tuple[int, int] = SMALL) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, frames, size[0] // 8, size[1] // 8, generator=g)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


# ---------------------------------------------------------------- layers vs from-scratch

def _stream(layer, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    cache, out, start = FeatureCache(), [], 0
    for n in sizes:
        cache.begin_chunk()
        out.append(layer(x[:, :, start:start + n], cache))
        start += n
    assert start == x.shape[2]
    return torch.cat(out, dim=2)


def _per_frame_conv2d(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    b, c, t, h, w = x.shape
    y = conv(x.transpose(1, 2).reshape(b * t, c, h, w))
    return y.view(b, t, *y.shape[1:]).transpose(1, 2)


@torch.no_grad()
def test_causal_conv_streamed_in_any_chunks_equals_zero_padded_conv():
    torch.manual_seed(0)
    conv = CausalConv3d(4, 5, 3, padding=1)
    x = torch.randn(1, 4, 7, 6, 5)
    expected = F.conv3d(F.pad(x, (0, 0, 0, 0, 2, 0)), conv.weight, conv.bias, padding=(0, 1, 1))
    assert _max_err(conv(x), expected) < TOL
    for sizes in ([1, 2, 1, 3], [1] * 7, [7], [3, 4]):
        assert _max_err(_stream(conv, x, sizes), expected) < TOL


@torch.no_grad()
def test_temporal_downsample_keeps_frame_0_then_strides_over_the_stream():
    torch.manual_seed(1)
    down = Resample(4, "downsample3d")
    x = torch.randn(1, 4, 9, 8, 6)
    spatial = _per_frame_conv2d(F.pad(x, (0, 1, 0, 1)), down.resample[1])
    tc = down.time_conv
    expected = torch.cat([spatial[:, :, :1],
                          F.conv3d(spatial, tc.weight, tc.bias, stride=(2, 1, 1))], dim=2)
    assert expected.shape[2] == 5
    assert _max_err(down(x), expected) < TOL
    for sizes in ([1, 4, 4], [1, 8], [5, 4]):
        assert _max_err(_stream(down, x, sizes), expected) < TOL


@torch.no_grad()
def test_temporal_upsample_keeps_frame_0_single_then_doubles_causally():
    torch.manual_seed(2)
    up = Resample(4, "upsample3d")
    x = torch.randn(1, 4, 4, 3, 5)
    tc = up.time_conv
    doubled = F.conv3d(F.pad(x[:, :, 1:], (0, 0, 0, 0, 2, 0)), tc.weight, tc.bias)  # [1, 8, 3, ...]
    pairs = doubled.view(1, 2, 4, 3, 3, 5)
    frames = [x[:, :, :1]] + [pairs[:, k, :, j:j + 1] for j in range(3) for k in range(2)]
    upsampled = F.interpolate(torch.cat(frames, dim=2), scale_factor=(1, 2, 2), mode="nearest")
    expected = _per_frame_conv2d(upsampled, up.resample[1])
    assert expected.shape == (1, 2, 7, 6, 10)
    assert _max_err(up(x), expected) < TOL
    for sizes in ([1, 1, 1, 1], [1, 3], [2, 2]):
        assert _max_err(_stream(up, x, sizes), expected) < TOL


# ---------------------------------------------------------------- whole network

@pytest.mark.parametrize("chunk_frames", [4, 8])
def test_chunked_encode_equals_whole_stream_encode(vae, chunk_frames):
    video = _video(9)
    with torch.no_grad():
        whole = vae.conv1(vae.encoder(video)).chunk(2, dim=1)[0]
    got = vae.encode(video, normalize=False, chunk_frames=chunk_frames)
    assert got.shape == (1, 16, 3, 3, 2)
    assert _max_err(got, whole) < TOL


@pytest.fixture(scope="module")
def whole_decode(vae) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw latents [1, 16, 3, 3, 2] and their decode as one stream without a cache."""
    raw = _latents(3)
    with torch.no_grad():
        return raw, vae.decoder(vae.conv2(raw)).clamp(-1, 1)


@pytest.mark.parametrize("per_chunk", [1, 2, 3])
def test_chunked_decode_equals_whole_stream_decode(vae, whole_decode, per_chunk):
    raw, whole = whole_decode
    assert whole.shape == (1, 3, 9, *SMALL)
    chunks = list(vae.iter_decode(raw, normalized=False, latent_frames_per_chunk=per_chunk))
    assert chunks[0].shape[2] == 4 * per_chunk - 3
    assert _max_err(torch.cat(chunks, dim=2), whole) < TOL


def test_decode_equals_whole_stream_decode(vae, whole_decode):
    raw, whole = whole_decode
    assert _max_err(vae.decode(raw, normalized=False), whole) < TOL


def test_decode_is_causal_in_time(vae):
    raw = _latents(3)
    changed = raw.clone()
    changed[:, :, 2] += 1.0
    a, b = vae.decode(raw, normalized=False), vae.decode(changed, normalized=False)
    assert torch.equal(a[:, :, :5], b[:, :, :5])        # latent frames 0, 1 -> pixel frames 0..4
    assert _max_err(a[:, :, 5:], b[:, :, 5:]) > 1e-3


def test_encode_is_causal_in_time(vae):
    video = _video(13)
    changed = video.clone()
    changed[:, :, 5] = -changed[:, :, 5]                 # first frame of latent frame 2
    a, b = vae.encode(video, normalize=False), vae.encode(changed, normalize=False)
    assert torch.equal(a[:, :, :2], b[:, :, :2])
    assert _max_err(a[:, :, 2], b[:, :, 2]) > 1e-3


def test_feature_cache_memory_does_not_grow_with_length(vae):
    raw = _latents(4)
    cache, sizes = FeatureCache(), []
    with torch.no_grad():
        for i in range(4):
            vae.decode_chunk(raw[:, :, i:i + 1], cache)
            sizes.append(cache.nbytes)
    assert sizes[2] == sizes[3] > sizes[0] > 0   # full after 2 latent frames, then flat
    video = _video(9)
    cache, sizes = FeatureCache(), []
    with torch.no_grad():
        for start, stop in ((0, 1), (1, 5), (5, 9)):
            vae.encode_chunk(video[:, :, start:stop], cache)
            sizes.append(cache.nbytes)
    assert sizes[1] == sizes[2] > sizes[0] > 0


# ---------------------------------------------------------------- shapes

@pytest.mark.parametrize("frames", [1, 5, 9])
def test_4n_plus_1_frames_round_trip_through_n_plus_1_latent_frames(vae, frames):
    latents = vae.encode(_video(frames, size=(H, W)))
    assert latents.shape == (1, 16, (frames - 1) // 4 + 1, H // 8, W // 8)
    video = vae.decode(latents)
    assert video.shape == (1, 3, frames, H, W)
    assert video.abs().max() <= 1.0


@pytest.mark.parametrize("latent_frames", [1, 2, 3])
def test_decode_gives_4t_minus_3_frames(vae, latent_frames):
    video = vae.decode(_latents(latent_frames, size=(H, W)))
    assert video.shape == (1, 3, 4 * latent_frames - 3, H, W)


def test_single_image_encodes_to_one_latent_frame_and_back(vae):
    image = _video(1, size=(H, W))
    latents = vae.encode(image)
    assert latents.shape == (1, 16, 1, 5, 3)
    assert vae.decode(latents).shape == image.shape


def test_batch_items_are_independent(vae):
    pair = _video(5, batch=2)
    both = vae.encode(pair, normalize=False)
    assert _max_err(both[1:], vae.encode(pair[1:], normalize=False)) < TOL
    decoded = vae.decode(both, normalized=False)
    assert _max_err(decoded[:1], vae.decode(both[:1], normalized=False)) < TOL


# ---------------------------------------------------------------- API contract

def test_normalisation_round_trips_and_matches_the_flags(vae):
    video = _video(5)
    raw = vae.encode(video, normalize=False)
    normalized = vae.encode(video)
    assert _max_err(normalized, normalize_latents(raw)) < 1e-6
    assert _max_err(denormalize_latents(normalize_latents(raw)), raw) < 1e-5
    assert _max_err(vae.decode(normalized), vae.decode(raw, normalized=False)) < TOL


def test_on_frame_is_called_once_per_latent_frame(vae):
    calls: list[tuple[int, int]] = []
    vae.decode(_latents(3), on_frame=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_raising_in_on_frame_aborts_the_decode(vae):
    class Interrupted(Exception):
        pass

    def stop(done: int, total: int) -> None:
        if done == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        vae.decode(_latents(4), on_frame=stop)


def test_two_decode_streams_can_interleave(vae):
    """The module holds no stream state: two paused generators do not disturb each other."""
    a, b = _latents(2, seed=1), _latents(2, seed=2)
    gen_a, gen_b = vae.iter_decode(a), vae.iter_decode(b)
    chunks_a, chunks_b = [], []
    for _ in range(2):
        chunks_a.append(next(gen_a))
        chunks_b.append(next(gen_b))
    assert torch.equal(torch.cat(chunks_a, dim=2), vae.decode(a))
    assert torch.equal(torch.cat(chunks_b, dim=2), vae.decode(b))


def test_a_cache_belongs_to_one_network(vae):
    cache = FeatureCache()
    with torch.no_grad():
        vae.encode_chunk(_video(1), cache)
        with pytest.raises(RuntimeError, match="one network"):
            vae.decode_chunk(_latents(1), cache)


def test_builds_on_meta_without_buffers():
    with torch.device("meta"):
        model = WanVAE(VAEConfig())
    assert list(model.buffers()) == []
    assert all(p.is_meta for p in model.parameters())
    assert set(model.state_dict()) == {n for n, _ in model.named_parameters()}


def test_inputs_follow_the_parameters_dtype(vae):
    assert vae.encode(_video(1).double()).dtype == torch.float32
    assert vae.decode(_latents(1).double()).dtype == torch.float32
    half = WanVAE(TINY_VAE)
    half.load_state_dict(vae.state_dict())
    half = half.to(torch.bfloat16)
    video = _video(1)
    latents, reference = half.encode(video), vae.encode(video)
    assert latents.dtype == torch.bfloat16
    assert _max_err(latents.float(), reference) < 0.05 * reference.abs().max()
    assert half.decode(latents).dtype == torch.bfloat16


@pytest.mark.parametrize("shape, message", [
    ((1, 3, 6, 40, 24), "4n\\+1"),
    ((1, 3, 5, 36, 24), "multiples of 8"),
    ((1, 4, 5, 40, 24), "expected \\[B, 3"),
])
def test_bad_video_shapes_are_explained(vae, shape, message):
    with pytest.raises(ValueError, match=message):
        vae.encode(torch.zeros(shape))


def test_latents_with_the_wrong_channel_count_are_explained(vae):
    with pytest.raises(ValueError, match="z_dim=16"):
        vae.decode(torch.zeros(1, 4, 2, 3, 2))
