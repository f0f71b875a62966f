"""The Wan 2.2 example graphs (A14B text and image to video, TI2V-5B).

``build_workflows.graphs()`` loads this file and calls :func:`graphs22` with its own names
(``b``: ``Graph``, ``_note``, ``T5``, ``VAE``, ``NEG``), so there is one graph builder and
no import cycle. Run ``python workflows/build_workflows.py`` to write the JSON."""
from __future__ import annotations

HF22 = "https://huggingface.co/Comfy-Org/Wan_2.2_ComfyUI_Repackaged/tree/main/split_files"
VAE22 = "wan2.2_vae.safetensors"
TI2V = "wan2.2_ti2v_5B_fp16.safetensors"
EXPERTS = {kind: (f"wan2.2_{kind}_high_noise_14B_fp8_scaled.safetensors",
                  f"wan2.2_{kind}_low_noise_14B_fp8_scaled.safetensors") for kind in ("t2v", "i2v")}
PROMPT_T2V = "A white cat walks slowly across a sunlit garden, realistic style, soft light."
PROMPT_I2V = "The cat turns its head towards the camera and blinks, gentle breeze."
NEGATIVE_NOTE = ("The negative prompt left empty is the official one (Wan 2.2 uses the Wan 2.1 T2V text for every "
                 "model, hence model_type t2v in WanCore Text Encode).")


def _files22(b, models: list[str], vae: str) -> str:
    lines = [f"Download (from {HF22}):"]
    lines += [f"- diffusion_models/{m} -> ComfyUI/models/diffusion_models/" for m in models]
    lines += [f"- text_encoders/{b.T5} -> ComfyUI/models/text_encoders/", f"- vae/{vae} -> ComfyUI/models/vae/"]
    return "\n".join(lines)


def _common(b, g, dit_names: tuple[str, ...], vae: str, weight_dtype: str, prompt: str):
    """Loaders (one per DiT), the text encoder, the VAE and the prompt node."""
    titles = ("High-noise expert", "Low-noise expert") if len(dit_names) == 2 else (None,)
    dits = [g.add("WanCoreLoadDiT", (0, 190 * i), {"model_name": name, "weight_dtype": weight_dtype,
                                                   "attention": "sdpa"}, title=title)
            for i, (name, title) in enumerate(zip(dit_names, titles))]
    y = 190 * len(dits)
    te = g.add("WanCoreLoadTextEncoder", (0, y), {"text_encoder_name": b.T5, "weight_dtype": "auto"})
    vae_node = g.add("WanCoreLoadVAE", (0, y + 160), {"vae_name": vae, "weight_dtype": "fp32"})
    text = g.add("WanCoreTextEncode", (360, 0), {"positive": prompt, "negative": b.NEG, "model_type": "t2v"},
                 {"text_encoder": (te, 0)}, size=(400, 260))
    return dits, vae_node, text


def _sample(g, dits: list[int], text: int, embeds: int, vae: int, *, steps: int, shift: float, cfg: float,
            fps: float, prefix: str, memory: int | None = None) -> None:
    """Sampler (with the low-noise expert and WanCore MoE Options for a pair), decode, save."""
    inputs = {"model": (dits[0], 0), "text_embeds": (text, 0), "video_embeds": (embeds, 0)}
    decode_inputs = {"vae": (vae, 0)}
    if memory is not None:
        inputs["memory"] = decode_inputs["memory"] = (memory, 0)
    if len(dits) == 2:
        moe = g.add("WanCoreMoEOptions", (800, 300), {"boundary": 0.0, "cfg_high_noise": -1.0,
                                                       "cfg_low_noise": -1.0}, size=(320, 130))
        inputs.update(low_noise_model=(dits[1], 0), moe=(moe, 0))
    s = g.add("WanCoreSampler", (800, 0), {"seed": 42, "steps": steps, "cfg": cfg, "shift": shift,
                                           "sampler": "unipc", "denoise": 1.0}, inputs, size=(320, 280))
    d = g.add("WanCoreDecode", (1160, 0), {"tiling": "auto", "tile_size": 512, "tile_overlap": 64},
              dict(decode_inputs, latent=(s, 0)))
    v = g.add("CreateVideo", (1520, 0), {"fps": fps}, {"images": (d, 0)}, size=(240, 80))
    g.add("SaveVideo", (1800, 0), {"filename_prefix": prefix, "format": "auto", "codec": "auto"},
          {"video": (v, 0)}, size=(400, 400))


_PAIR_NOTE = ("The two experts load like any model (two WanCore Load Diffusion Model nodes): the high-noise one "
              "into WanCore Sampler's 'model', the low-noise one into 'low_noise_model'. The sampler switches at "
              "the published boundary (shown on the node and in the console) and keeps only one expert on the "
              "GPU at a time; WanCore MoE Options holds the boundary and each expert's guidance (0 / -1: the "
              "published values), so the sampler's own cfg is not used. ")


def t2v_a14b(b, specs):
    g = b.Graph(specs)
    high, low = EXPERTS["t2v"]
    b._note(g, "Text-to-video with Wan 2.2 T2V-A14B (two 14B experts) from the fp8 files, 832x480, 81 frames, on an "
          "8 GB GPU: the weights stay fp8 (weight_dtype 'keep (file)', computed in bf16) and rest in system RAM "
          "(32 GB or more: two 14 GB experts); WanCore Memory Options plans each expert for an 8 GiB budget (blocks "
          "that do not fit stream one block ahead, umT5 on the CPU if needed, VAE tiles). Official: 40 steps, shift "
          "12, guidance 4.0 (high noise) / 3.0 (low noise), boundary 0.875; 1280x720 needs more VRAM or more "
          "streaming. " + _PAIR_NOTE + NEGATIVE_NOTE + "\n\n" + _files22(b, [high, low], b.VAE))
    dits, vae, text = _common(b, g, (high, low), b.VAE, "keep (file)", PROMPT_T2V)
    memory = g.add("WanCoreMemoryOptions", (0, 720), {"vram_budget_gb": 8.0, "resident_blocks": -1,
                                                      "text_encoder_on_cpu": "auto", "vae_tile": "auto",
                                                      "vae_tile_size": 512}, size=(320, 200))
    size = g.add("WanCoreEmptyVideoEmbeds", (360, 300), {"width": 832, "height": 480, "frames": 81})
    _sample(g, dits, text, size, vae, steps=40, shift=12.0, cfg=4.0, fps=16.0, prefix="WanCore/wan22_t2v_A14B",
            memory=memory)
    return g


def i2v_a14b(b, specs):
    g = b.Graph(specs)
    high, low = EXPERTS["i2v"]
    b._note(g, "Image-to-video with Wan 2.2 I2V-A14B (two 14B experts, fp8 files), 832x480, 81 frames: the start "
          "image is encoded by the Wan 2.1 VAE only (WanCore Image To Video Encode (Wan 2.2): no CLIP vision). "
          "Official: 40 steps, shift 5, guidance 3.5 / 3.5, boundary 0.900, 1280x720. " + _PAIR_NOTE
          + NEGATIVE_NOTE + "\n\n" + _files22(b, [high, low], b.VAE)
          + "\nPut your start image in ComfyUI/input/ (or drop it on Load Image); give width/height its aspect ratio.")
    dits, vae, text = _common(b, g, (high, low), b.VAE, "keep (file)", PROMPT_I2V)
    image = g.add("LoadImage", (360, 300), {"image": "example.png"}, size=(300, 320), title="Start image")
    embeds = g.add("WanCoreImageToVideoEncode22", (360, 660), {"width": 832, "height": 480, "frames": 81},
                   {"vae": (vae, 0), "start_image": (image, 0)})
    _sample(g, dits, text, embeds, vae, steps=40, shift=5.0, cfg=3.5, fps=16.0, prefix="WanCore/wan22_i2v_A14B")
    return g


def ti2v_5b(b, specs, with_image: bool):
    g = b.Graph(specs)
    what = ("Image-to-video with Wan 2.2 TI2V-5B: the start image (scaled to cover 1280x704 and center-cropped) "
            "is the first frame, encoded by the Wan 2.2 VAE through WanCore Image To Video Encode (Wan 2.2); use "
            "704x1280 for a portrait image." if with_image else
            "Text-to-video with Wan 2.2 TI2V-5B and the Wan 2.2 VAE (48 channels, 16x16 compression).")
    b._note(g, what + " 1280x704, 121 frames (5 s at 24 fps; sizes multiples of 32). Official: 50 steps, shift 5, "
          "cfg 5. About 10 GB in bf16; on smaller GPUs connect WanCore Memory Options. The LATENT is ComfyUI's "
          "Wan 2.2 format (core VAE Decode with the Wan 2.2 VAE reads it). " + NEGATIVE_NOTE + "\n\n"
          + _files22(b, [TI2V], VAE22)
          + ("\nPut your start image in ComfyUI/input/ (or drop it on Load Image)." if with_image else ""))
    dits, vae, text = _common(b, g, (TI2V,), VAE22, "auto", PROMPT_I2V if with_image else PROMPT_T2V)
    if with_image:
        image = g.add("LoadImage", (360, 300), {"image": "example.png"}, size=(300, 320), title="Start image")
        embeds = g.add("WanCoreImageToVideoEncode22", (360, 660), {"width": 1280, "height": 704, "frames": 121},
                       {"vae": (vae, 0), "start_image": (image, 0)})
    else:
        embeds = g.add("WanCoreEmptyVideoEmbeds", (360, 300), {"width": 1280, "height": 704, "frames": 121})
    _sample(g, dits, text, embeds, vae, steps=50, shift=5.0, cfg=5.0, fps=24.0,
            prefix=f"WanCore/wan22_ti2v_5B_{'i2v' if with_image else 't2v'}")
    return g


def graphs22(b, specs) -> dict:
    """The Wan 2.2 graphs by file name (``b``: the builder's names, see the module docstring)."""
    return {
        "wan22_t2v_A14B_fp8_8GB": t2v_a14b(b, specs),
        "wan22_i2v_A14B": i2v_a14b(b, specs),
        "wan22_ti2v_5B_t2v": ti2v_5b(b, specs, with_image=False),
        "wan22_ti2v_5B_i2v": ti2v_5b(b, specs, with_image=True),
    }
