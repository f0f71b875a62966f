"""Video extension: continue a video from its last frames, any number of times.

A continuation is a new clip whose first ``overlap`` pixel frames are the source video's last
``overlap`` frames (4n+1: a causal VAE encodes them to ``n + 1`` latent frames that line up
with the new clip's first latent frames). While sampling, those *known* latent frames are
pinned: they start as the source latents noised to the first sigma, and at every step their
velocity is replaced by ``(x - known) / sigma``, so the solver's clean estimate of them is the
source latents and they end exactly there (to float rounding), while the rest of the clip is
denoised around them (inpainting in time). I2V models additionally get the source's last
frame as their start image (``generate`` does this when no image is given).

The result is joined to the source with a linear cross-fade over the overlap
(:func:`join_videos`): frames before the overlap are the source's, after it the new clip's.
Chain by passing the result as the next ``extend`` video.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .configs import VAE_TIME_STRIDE

__all__ = ["check_overlap", "pin_known_frames", "noise_known_frames", "join_videos", "extension_inputs",
           "continue_video"]


def check_overlap(overlap: int, source_frames: int, frames: int) -> int:
    """Latent frames of an ``overlap`` of pixel frames (4n+1, shorter than both videos)."""
    if overlap < 1 or (overlap - 1) % VAE_TIME_STRIDE:
        raise ValueError(f"the extension overlap must be 4n+1 frames (1, 5, 9, 17, ...); got {overlap}")
    if overlap > source_frames or overlap >= frames:
        raise ValueError(f"the extension overlap ({overlap} frames) must fit in the source video ({source_frames} "
                         f"frames) and be shorter than the new clip ({frames} frames)")
    return (overlap - 1) // VAE_TIME_STRIDE + 1


def noise_known_frames(x: Tensor, known: Tensor, noise: Tensor, sigma: Tensor | float) -> Tensor:
    """Starting latents ``[16, T', h, w]``: the first ``known.shape[1]`` frames are ``known``
    noised to ``sigma`` with the run's own noise, the rest ``x`` unchanged."""
    k = known.shape[1] if known.ndim == 4 else 0
    if known.ndim != 4 or known.shape[0] != x.shape[0] or known.shape[2:] != x.shape[2:] or not 0 < k < x.shape[1]:
        raise ValueError(f"known latents {tuple(known.shape)} must be the first frames of the run's latents "
                         f"{tuple(x.shape)}: same channels and size, fewer frames")
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    start = (1 - sigma) * known.float() + sigma * noise[:, :k]
    return torch.cat([start.to(x.dtype), x[:, k:]], dim=1)


def pin_known_frames(model_fn: Callable[[Tensor, Tensor], Tensor], known: Tensor, sigmas: Tensor,
                     step_index: Callable[[], int]) -> Callable[[Tensor, Tensor], Tensor]:
    """Wrap a sampler model function so the first ``known.shape[1]`` latent frames (``known``
    ``[16, K, h, w]``) get the velocity ``(x - known) / sigma``: their x0 estimate is ``known``.

    sigmas: the schedule's float32 sigmas; step_index(): the 0-based step being evaluated.
    """
    k = known.shape[1]

    def pinned(xt: Tensor, timestep: Tensor) -> Tensor:
        v = model_fn(xt, timestep)
        sigma = sigmas[step_index()].to(xt.device)
        fixed = (xt[:, :, :k] - known.to(xt.device, xt.dtype)[None]) / sigma
        return torch.cat([fixed.to(v.dtype), v[:, :, k:]], dim=2)

    return pinned


def join_videos(source: Tensor, continuation: Tensor, overlap: int) -> Tensor:
    """Frames ``[T, H, W, 3]``: ``source`` then ``continuation``, cross-faded linearly over the
    ``overlap`` frames they share (the source's last, the continuation's first)."""
    if source.shape[1:] != continuation.shape[1:]:
        raise ValueError(f"the continuation is {tuple(continuation.shape[1:3])} but the source video is "
                         f"{tuple(source.shape[1:3])}: extend at the source's size")
    a, b = source[-overlap:].float(), continuation[:overlap].float()
    w = torch.linspace(0, 1, overlap + 2)[1:-1].view(-1, 1, 1, 1)   # strictly between the two videos
    return torch.cat([source[:-overlap].float(), a * (1 - w) + b * w, continuation[overlap:].float()])


@torch.no_grad()
def extension_inputs(dit, vae, video: Tensor, frames: int, overlap: int, clip_vision=None, *,
                     vae_tile: int | str | None = None):
    """What sampling a continuation needs: ``(known_latents, image_embeds or None, latent shape)``.

    Encodes the last ``overlap`` frames of ``video`` ``[T, H, W, 3]`` (0..1) with ``vae``
    (normalised latents ``[16, K, H/8, W/8]``) and, for I2V models, the I2V conditioning of the
    last frame (``clip_vision`` needed). Checks the overlap first (:func:`check_overlap`).
    ``vae_tile``: both encodes tiled in space with this tile (latent px; the image-encode
    stage's :class:`~wan_core.run_plan.EncodeTiling` ``.tile``), "auto"
    (:func:`~wan_core.vae_tiling.encode_tiled`'s rule), or None: untiled.
    """
    from .conditioning import encode_image_conditioning, image_to_tensor, latent_shape
    from .pipeline import video_to_tensor

    check_overlap(overlap, video.shape[0], frames)
    height, width = int(video.shape[1]), int(video.shape[2])
    shape = latent_shape(width, height, frames)
    source = video_to_tensor(video[-overlap:])
    if vae_tile is None:
        known = vae.encode(source)[0].float().cpu()
    else:
        from .vae_tiling import encode_tiled

        known = encode_tiled(vae, source, tile=vae_tile)[0].float().cpu()
    image = None
    if dit.cfg.has_image_input:
        if clip_vision is None:
            raise ValueError(f"{dit.cfg.variant} is an image-to-video model: extending needs CLIP vision for the "
                             "source's last frame.")
        image = encode_image_conditioning(vae, clip_vision, image_to_tensor(video[-1]), frames, width, height,
                                          vae_tile=vae_tile)
    return known, image, shape


@torch.no_grad()
def continue_video(dit, vae, text, video: Tensor, frames: int, overlap: int, settings, *, clip_vision=None,
                   runner=None, guidance=None, context=None, callback=None, interrupt=None) -> Tensor:
    """Loaded models + text embeddings -> ``video`` ``[T, H, W, 3]`` continued by ``frames``
    (``T + frames - overlap`` frames, 0..1), all on the models' devices in one go.

    :func:`extension_inputs`, :func:`wan_core.pipeline.sample` (``runner`` / ``guidance`` /
    ``context`` passed on), a whole-clip VAE decode and :func:`join_videos`. Callers that
    place each stage on a GPU (``generate(extend=...)``, the node) run the same steps per stage.
    """
    from .pipeline import frames_from_video, sample

    known, image, shape = extension_inputs(dit, vae, video, frames, overlap, clip_vision)
    latents = sample(dit, text, settings, shape=shape, image=image, runner=runner, guidance=guidance,
                     context=context, known_latents=known, callback=callback, interrupt=interrupt)
    return join_videos(video, frames_from_video(vae.decode(latents[None])), overlap)
