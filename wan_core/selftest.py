"""``python -m wan_core selftest``: the whole product on tiny random weights, no downloads.

Writes tiny random-weight checkpoints (DiT T2V and I2V, VAE, umT5 with an embedded
tokenizer, CLIP vision) in the real published layouts into a temporary folder, loads them
through the public loaders, runs T2V and I2V end to end on the chosen device and prints the
timings. The weights are noise, so the video is too; what is checked is that every stage
runs, stays finite and is deterministic per seed.
"""
from __future__ import annotations

import io
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .configs import CLIPVisionConfig, DiTConfig, T5Config, VAEConfig

__all__ = ["SELFTEST_CONFIGS", "SELFTEST_SIZE", "write_selftest_models", "run_selftest"]

SELFTEST_SIZE = (64, 48)   # width, height of the selftest videos

_T5 = T5Config(vocab=512, dim=128, dim_attn=128, dim_ffn=256, num_heads=4, num_layers=2)
_CLIP = CLIPVisionConfig(image_size=112, patch_size=14, width=160, mlp_dim=320, num_layers=3, out_dim=64)
SELFTEST_CONFIGS = {
    "t2v": DiTConfig(dim=256, ffn_dim=512, num_layers=2, text_dim=_T5.dim, freq_dim=256),
    "i2v": DiTConfig(dim=256, ffn_dim=512, num_layers=2, in_dim=36, text_dim=_T5.dim, freq_dim=256,
                     model_type="i2v", clip_dim=_CLIP.width),
    "vae": VAEConfig(dim=8, z_dim=16),
    "t5": _T5,
    "clip": _CLIP,
}
_CORPUS = ["a cat walks on the grass, realistic style", "a white dog runs along the beach at sunset",
           "the camera pans across a quiet city street at night", "an astronaut rides a horse on the moon",
           "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量",
           "镜头晃动，镜头切换，一只猫在草地上走，写实风格"] * 8


def _randomize(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic, asymmetric random weights scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.state_dict().items():
        if "norm" in name or name.endswith("gamma"):
            t = 1 + 0.1 * torch.randn(p.shape, generator=g)
        elif name.endswith("bias") or "modulation" in name or "emb_pos" in name:
            t = 0.05 * torch.randn(p.shape, generator=g)
        else:
            fan_in = max(1, p.numel() // max(1, p.shape[0]))
            t = torch.randn(p.shape, generator=g) / math.sqrt(fan_in)
        out[name] = t.contiguous()
    return out


def _tiny_spiece() -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_CORPUS), model_writer=buf, vocab_size=160,
                                   model_type="unigram", pad_id=0, eos_id=1, bos_id=2, unk_id=3,
                                   character_coverage=1.0, hard_vocab_limit=False, num_threads=1,
                                   minloglevel=2)
    return buf.getvalue()


@dataclass(frozen=True)
class SelftestModels:
    dit_t2v: Path
    dit_i2v: Path
    vae: Path
    text_encoder: Path
    clip_vision: Path


def write_selftest_models(folder: str | Path, seed: int = 0) -> SelftestModels:
    """Write the tiny checkpoints into ``folder`` (ComfyUI-style names and layouts)."""
    from .clip_vision import CLIPVisionTower
    from .dit import WanDiT
    from .text_encoder import UMT5Encoder
    from .vae import WanVAE

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    c = SELFTEST_CONFIGS
    paths = SelftestModels(folder / "wan_tiny_t2v.safetensors", folder / "wan_tiny_i2v.safetensors",
                           folder / "wan_tiny_vae.safetensors", folder / "umt5_tiny.safetensors",
                           folder / "clip_vision_tiny.safetensors")
    with torch.device("meta"):
        models = {"t2v": WanDiT(c["t2v"]), "i2v": WanDiT(c["i2v"]), "vae": WanVAE(c["vae"]),
                  "t5": UMT5Encoder(c["t5"]), "clip": CLIPVisionTower(c["clip"])}
    prefix = "model.diffusion_model."
    save_file({prefix + k: v for k, v in _randomize(models["t2v"], seed).items()}, str(paths.dit_t2v))
    save_file({prefix + k: v for k, v in _randomize(models["i2v"], seed + 1).items()}, str(paths.dit_i2v))
    save_file(_randomize(models["vae"], seed + 2), str(paths.vae))
    t5 = _randomize(models["t5"], seed + 3)
    t5["spiece_model"] = torch.frombuffer(bytearray(_tiny_spiece()), dtype=torch.uint8)
    save_file(t5, str(paths.text_encoder))
    save_file({"visual." + k: v for k, v in _randomize(models["clip"], seed + 4).items()}, str(paths.clip_vision))
    return paths


def run_selftest(device: str = "cpu", out: str | None = None, frames: int = 9,
                 size: tuple[int, int] = SELFTEST_SIZE, steps: int = 4, seed: int = 0) -> dict[str, float]:
    """Run T2V and I2V on tiny random models; print and return timings (seconds)."""
    from .loaders import load_clip_vision, load_dit, load_text_encoder, load_vae
    from .pipeline import generate
    from .video import write_mp4

    times: dict[str, float] = {}
    width, height = size
    with tempfile.TemporaryDirectory(prefix="wan_core_selftest_") as tmp:
        t0 = time.perf_counter()
        paths = write_selftest_models(tmp, seed)
        times["write_models"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        te = load_text_encoder(paths.text_encoder, dtype=torch.float32, device=device)
        vae = load_vae(paths.vae, device=device)
        clip = load_clip_vision(paths.clip_vision, dtype=torch.float32, device=device)
        t2v = load_dit(paths.dit_t2v, dtype=torch.float32, device=device)
        i2v = load_dit(paths.dit_i2v, dtype=torch.float32, device=device)
        times["load"] = time.perf_counter() - t0
        common = dict(vae=vae, text_encoder=te, frames=frames, steps=steps, seed=seed, device=device)
        t0 = time.perf_counter()
        video = generate(dit=t2v, prompt="a cat walks on the grass", width=width, height=height, **common)
        times["t2v"] = time.perf_counter() - t0
        again = generate(dit=t2v, prompt="a cat walks on the grass", width=width, height=height, **common)
        if not torch.equal(video, again):
            raise RuntimeError("selftest: two T2V runs with the same seed differ")
        g = torch.Generator().manual_seed(seed)
        image = torch.rand(height * 2, width * 2, 3, generator=g)
        t0 = time.perf_counter()
        i2v_video = generate(dit=i2v, clip_vision=clip, image=image, prompt="the cat turns its head",
                             max_area=width * height, **common)
        times["i2v"] = time.perf_counter() - t0
    for name, v in (("t2v", video), ("i2v", i2v_video)):
        if not torch.isfinite(v).all() or v.shape[0] != frames:
            raise RuntimeError(f"selftest: {name} output is wrong: shape {tuple(v.shape)}")
    if out is not None:
        write_mp4(video, out)
        write_mp4(i2v_video, Path(out).with_name(Path(out).stem + "_i2v.mp4"))
    print(f"wan_core selftest on {device}: T2V {width}x{height}x{frames} and I2V, {steps} steps each: "
          + ", ".join(f"{k} {v:.2f}s" for k, v in times.items()) + (f"; wrote {out}" if out else "")
          + " -- OK")
    return times
