"""Write the example workflows: UI format in ``workflows/``, API format in ``workflows/api/``.

Each graph is written once below; both files come from it, so the UI and API versions
cannot drift. Run ``python workflows/build_workflows.py`` after changing a graph and commit
the JSON (``tests/unit/test_workflows.py`` checks the files, not this script). ComfyUI only
serves ``workflows/*.json``; this script is not part of the pack at run time.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Core nodes used by the examples: (inputs in definition order as (name, type, widget?), outputs).
# An upload combo (LoadImage, LoadVideo) is followed by the frontend's "upload" widget.
CORE = {
    "Note": ([("text", "STRING", True)], []),
    "LoadImage": ([("image", "COMBO", True), ("upload", "IMAGEUPLOAD", True)], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "LoadVideo": ([("file", "COMBO", True), ("upload", "IMAGEUPLOAD", True)], [("VIDEO", "VIDEO")]),
    "GetVideoComponents": ([("video", "VIDEO", False)], [("images", "IMAGE"), ("audio", "AUDIO"), ("fps", "FLOAT")]),
    "ImageFromBatch": ([("image", "IMAGE", False), ("batch_index", "INT", True), ("length", "INT", True)],
                       [("IMAGE", "IMAGE")]),
    "ImageScale": ([("image", "IMAGE", False), ("upscale_method", "COMBO", True), ("width", "INT", True),
                    ("height", "INT", True), ("crop", "COMBO", True)], [("IMAGE", "IMAGE")]),
    "CreateVideo": ([("images", "IMAGE", False), ("fps", "FLOAT", True), ("audio", "AUDIO", False)],
                    [("VIDEO", "VIDEO")]),
    "SaveVideo": ([("video", "VIDEO", False), ("filename_prefix", "STRING", True), ("format", "COMBO", True),
                   ("codec", "COMBO", True)], []),
    "ImagePadForOutpaint": ([("image", "IMAGE", False), ("left", "INT", True), ("top", "INT", True),
                             ("right", "INT", True), ("bottom", "INT", True), ("feathering", "INT", True)],
                            [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "SaveImage": ([("images", "IMAGE", False), ("filename_prefix", "STRING", True)], []),
    "CLIPLoader": ([("clip_name", "COMBO", True), ("type", "COMBO", True), ("device", "COMBO", True)],
                   [("CLIP", "CLIP")]),
    "CLIPTextEncode": ([("text", "STRING", True), ("clip", "CLIP", False)], [("CONDITIONING", "CONDITIONING")]),
    "VAELoader": ([("vae_name", "COMBO", True)], [("VAE", "VAE")]),
    "VAEDecode": ([("samples", "LATENT", False), ("vae", "VAE", False)], [("IMAGE", "IMAGE")]),
    "EmptyHunyuanLatentVideo": ([("width", "INT", True), ("height", "INT", True), ("length", "INT", True),
                                 ("batch_size", "INT", True)], [("LATENT", "LATENT")]),
    "KSampler": ([("model", "MODEL", False), ("seed", "INT", True), ("steps", "INT", True), ("cfg", "FLOAT", True),
                  ("sampler_name", "COMBO", True), ("scheduler", "COMBO", True), ("positive", "CONDITIONING", False),
                  ("negative", "CONDITIONING", False), ("latent_image", "LATENT", False), ("denoise", "FLOAT", True)],
                 [("LATENT", "LATENT")]),
}
UI_ONLY = {"Note"}  # frontend-only nodes: not part of an API graph
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

HF = "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/tree/main/split_files"
T5 = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
VAE = "wan_2.1_vae.safetensors"
CLIP = "clip_vision_h.safetensors"
NEG = ""  # empty: the official default negative prompt of the model type
# core CLIPTextEncode has no default negative prompt: the official Wan 2.1 one, spelled out
OFFICIAL_NEGATIVE = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
                     "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
                     "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")


def _pack_specs() -> dict[str, tuple[list, list]]:
    """Our nodes' inputs/outputs in the CORE format, read from the pack itself."""
    sys.modules.setdefault("folder_paths", types.SimpleNamespace(get_filename_list=lambda key: []))
    pack = sys.modules.get("wancore_pack")
    if pack is None:
        spec = importlib.util.spec_from_file_location("wancore_pack", ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        pack = importlib.util.module_from_spec(spec)
        sys.modules["wancore_pack"] = pack
        spec.loader.exec_module(pack)
    out = {}
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        d = cls.INPUT_TYPES()
        inputs = []
        for section in ("required", "optional"):
            for name, (kind, _opts) in d.get(section, {}).items():
                kind = "COMBO" if isinstance(kind, list) else kind
                inputs.append((name, kind, kind in WIDGET_TYPES))
        out[node_id] = (inputs, list(zip(cls.RETURN_NAMES, cls.RETURN_TYPES)))
    return out


def control_after(name: str, kind: str) -> bool:
    """The frontend adds a control widget after an INT named seed / noise_seed (or with
    control_after_generate; our only such input is the sampler's seed)."""
    return kind == "INT" and name in ("seed", "noise_seed")


class Graph:
    def __init__(self, specs: dict):
        self.specs, self.nodes, self.links = specs, [], []

    def add(self, node_type: str, pos: tuple[int, int], widgets: dict | None = None, inputs: dict | None = None,
            size: tuple[int, int] = (320, 160), title: str | None = None) -> int:
        """A node; ``widgets`` by name (all widget inputs), ``inputs`` name -> (node id, output slot)."""
        widgets, inputs = dict(widgets or {}), dict(inputs or {})
        spec_in, spec_out = self.specs[node_type]
        node_id = len(self.nodes) + 1
        values, sockets = [], []
        for name, kind, is_widget in spec_in:
            if is_widget:
                if name == "upload":
                    values.append("image")
                    continue
                values.append(widgets.pop(name))
                if control_after(name, kind):
                    values.append("fixed")
            else:
                link = None
                if name in inputs:
                    src, slot = inputs.pop(name)
                    link = len(self.links) + 1
                    self.links.append([link, src, slot, node_id, len(sockets), kind])
                sockets.append({"name": name, "type": kind, "link": link})
        assert not widgets and not inputs, (node_type, widgets, inputs)
        node = {"id": node_id, "type": node_type, "pos": list(pos), "size": list(size), "flags": {},
                "order": node_id - 1, "mode": 0, "inputs": sockets,
                "outputs": [{"name": n, "type": t, "links": []} for n, t in spec_out],
                "properties": {"Node name for S&R": node_type}, "widgets_values": values}
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node_id

    def ui(self) -> dict:
        nodes = json.loads(json.dumps(self.nodes))
        for link in self.links:
            nodes[link[1] - 1]["outputs"][link[2]]["links"].append(link[0])
        for n in nodes:
            for o in n["outputs"]:
                o["links"] = o["links"] or None
        return {"id": "00000000-0000-4000-8000-000000000000", "revision": 0, "last_node_id": len(nodes),
                "last_link_id": len(self.links), "nodes": nodes, "links": self.links, "groups": [], "config": {},
                "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}

    def api(self) -> dict:
        out = {}
        for n in self.nodes:
            if n["type"] in UI_ONLY:
                continue
            spec_in, _ = self.specs[n["type"]]
            values = list(n["widgets_values"])
            inputs = {}
            for name, kind, is_widget in spec_in:
                if is_widget:
                    v = values.pop(0)
                    if name == "upload":
                        continue
                    inputs[name] = v
                    if control_after(name, kind):
                        values.pop(0)
            for i, s in enumerate(n["inputs"]):
                if s["link"] is not None:
                    link = self.links[s["link"] - 1]
                    inputs[s["name"]] = [str(link[1]), link[2]]
            out[str(n["id"])] = {"class_type": n["type"], "inputs": inputs,
                                 "_meta": {"title": n.get("title", n["type"])}}
        return out


# ---------------------------------------------------------------------------------------- graphs

def _note(g: Graph, text: str) -> None:
    g.add("Note", (0, -260), {"text": text}, size=(760, 220))


def _files(model: str, clip: bool = False) -> str:
    lines = [f"Download (from {HF}):",
             f"- diffusion_models/{model} -> ComfyUI/models/diffusion_models/",
             f"- text_encoders/{T5} -> ComfyUI/models/text_encoders/",
             f"- vae/{VAE} -> ComfyUI/models/vae/"]
    if clip:
        lines.append(f"- clip_vision/{CLIP} -> ComfyUI/models/clip_vision/")
    return "\n".join(lines)


def _loaders(g: Graph, model: str, clip: bool = False, weight_dtype: str = "auto"):
    dit = g.add("WanCoreLoadDiT", (0, 0), {"model_name": model, "weight_dtype": weight_dtype, "attention": "sdpa"})
    te = g.add("WanCoreLoadTextEncoder", (0, 180), {"text_encoder_name": T5, "weight_dtype": "auto"})
    vae = g.add("WanCoreLoadVAE", (0, 340), {"vae_name": VAE, "weight_dtype": "fp32"})
    cv = g.add("WanCoreLoadCLIPVision", (0, 480), {"clip_name": CLIP, "weight_dtype": "auto"}) if clip else None
    return dit, te, vae, cv


def _text(g: Graph, te: int, prompt: str, model_type: str, memory: int | None = None) -> int:
    inputs = {"text_encoder": (te, 0)}
    if memory is not None:
        inputs["memory"] = (memory, 0)
    return g.add("WanCoreTextEncode", (360, 0), {"positive": prompt, "negative": NEG, "model_type": model_type},
                 inputs, size=(400, 260))


def _sample_and_save(g: Graph, dit: int, text: int, embeds: int, vae: int, *, steps: int, shift: float,
                     seed: int = 42, denoise: float = 1.0, latent: int | None = None, prefix: str,
                     image: bool = False, memory: int | None = None, extra: dict | None = None) -> int:
    """Sampler, decode and save; ``extra``: more sampler sockets (context, guidance). Returns the decode node."""
    inputs = {"model": (dit, 0), "text_embeds": (text, 0), "video_embeds": (embeds, 0), **(extra or {})}
    if latent is not None:
        inputs["latent"] = (latent, 0)
    decode_inputs = {"vae": (vae, 0)}
    if memory is not None:
        inputs["memory"] = decode_inputs["memory"] = (memory, 0)
    s = g.add("WanCoreSampler", (800, 0), {"seed": seed, "steps": steps, "cfg": 5.0, "shift": shift,
                                           "sampler": "unipc", "denoise": denoise}, inputs, size=(320, 260))
    d = g.add("WanCoreDecode", (1160, 0), {"tiling": "auto", "tile_size": 512, "tile_overlap": 64},
              dict(decode_inputs, latent=(s, 0)))
    if image:
        g.add("SaveImage", (1520, 0), {"filename_prefix": prefix}, {"images": (d, 0)}, size=(400, 400))
        return d
    _save_video(g, d, prefix, (1520, 0))
    return d


def _save_video(g: Graph, images: int, prefix: str, pos: tuple[int, int]) -> None:
    v = g.add("CreateVideo", pos, {"fps": 16.0}, {"images": (images, 0)}, size=(240, 80))
    g.add("SaveVideo", (pos[0] + 280, pos[1]), {"filename_prefix": prefix, "format": "auto", "codec": "auto"},
          {"video": (v, 0)}, size=(400, 400))


def t2v(specs, model: str, name: str, note: str, weight_dtype: str = "auto",
        vram_budget_gb: float | None = None) -> Graph:
    """Text-to-video; ``vram_budget_gb``: add WanCore Memory Options with that budget, feeding
    the sampler, text encode and decode."""
    g = Graph(specs)
    _note(g, note + "\n\n" + _files(model))
    dit, te, vae, _ = _loaders(g, model, weight_dtype=weight_dtype)
    memory = None
    if vram_budget_gb is not None:
        memory = g.add("WanCoreMemoryOptions", (0, 640), {"vram_budget_gb": vram_budget_gb, "resident_blocks": -1,
                                                          "text_encoder_on_cpu": "auto", "vae_tile": "auto",
                                                          "vae_tile_size": 512}, size=(320, 200))
    text = _text(g, te, "A white cat walks slowly across a sunlit garden, realistic style, soft light.", "t2v",
                 memory)
    size = g.add("WanCoreEmptyVideoEmbeds", (360, 300), {"width": 832, "height": 480, "frames": 81})
    _sample_and_save(g, dit, text, size, vae, steps=50, shift=5.0, prefix=f"WanCore/{name}", memory=memory)
    return g


def i2v(specs, model: str, name: str, width: int, height: int, shift: float, note: str, end: bool = False) -> Graph:
    g = Graph(specs)
    _note(g, note + "\n\n" + _files(model, clip=True) + "\nPut your start image" + (" and end image" if end else "")
          + " in ComfyUI/input/ (or drop it on Load Image); give width/height the image's aspect ratio.")
    dit, te, vae, cv = _loaders(g, model, clip=True)
    first = g.add("LoadImage", (360, 300), {"image": "example.png"}, size=(300, 320), title="Start image")
    inputs = {"vae": (vae, 0), "clip_vision": (cv, 0), "start_image": (first, 0)}
    if end:
        inputs["end_image"] = (g.add("LoadImage", (360, 660), {"image": "example.png"}, size=(300, 320),
                                     title="End image"), 0)
    embeds = g.add("WanCoreImageToVideoEncode", (360, 1000) if end else (360, 660),
                   {"width": width, "height": height, "frames": 81}, inputs)
    kind = "flf2v" if end else "i2v"
    text = _text(g, te, "The cat turns its head towards the camera and blinks, gentle breeze.", kind)
    _sample_and_save(g, dit, text, embeds, vae, steps=50 if end else 40, shift=shift, prefix=f"WanCore/{name}")
    return g


def v2v(specs) -> Graph:
    model = "wan2.1_t2v_1.3B_bf16.safetensors"
    g = Graph(specs)
    _note(g, "Video-to-video with Wan 2.1 T2V 1.3B: the input video is cut to 33 frames (4n+1), scaled to "
          "832x480, encoded, noised to 'denoise' and sampled again. Lower denoise keeps more of the input.\n\n"
          + _files(model) + "\nPut your video in ComfyUI/input/ (or drop it on Load Video).")
    dit, te, vae, _ = _loaders(g, model)
    video = g.add("LoadVideo", (360, 300), {"file": "example.mp4"}, size=(300, 320))
    parts = g.add("GetVideoComponents", (360, 660), {}, {"video": (video, 0)}, size=(240, 100))
    clip = g.add("ImageFromBatch", (360, 800), {"batch_index": 0, "length": 33}, {"image": (parts, 0)})
    scaled = g.add("ImageScale", (360, 960), {"upscale_method": "lanczos", "width": 832, "height": 480,
                                              "crop": "center"}, {"image": (clip, 0)})
    latent = g.add("WanCoreEncode", (360, 1140), {"tiling": "auto", "tile_size": 512, "tile_overlap": 64},
                   {"vae": (vae, 0), "images": (scaled, 0)})
    text = _text(g, te, "A white cat walks slowly across a sunlit garden, oil painting style.", "t2v")
    size = g.add("WanCoreEmptyVideoEmbeds", (360, 1320), {"width": 832, "height": 480, "frames": 33})
    _sample_and_save(g, dit, text, size, vae, steps=50, shift=5.0, denoise=0.7, latent=latent, prefix="WanCore/v2v")
    return g


def t2i(specs) -> Graph:
    model = "wan2.1_t2v_1.3B_bf16.safetensors"
    g = Graph(specs)
    _note(g, "Text-to-image with Wan 2.1 T2V 1.3B: one frame (frames = 1).\n\n" + _files(model))
    dit, te, vae, _ = _loaders(g, model)
    text = _text(g, te, "A white cat sitting in a sunlit garden, realistic photo, soft light.", "t2v")
    size = g.add("WanCoreEmptyVideoEmbeds", (360, 300), {"width": 832, "height": 480, "frames": 1})
    _sample_and_save(g, dit, text, size, vae, steps=50, shift=5.0, prefix="WanCore/t2i", image=True)
    return g


def _context(g: Graph, pos: tuple[int, int], schedule: str = "static", overlap: int = 48) -> int:
    return g.add("WanCoreContextOptions", pos, {"context_frames": 81, "overlap": overlap, "schedule": schedule,
                                                "fuse": "pyramid", "global_positions": False, "freenoise": True},
                 size=(320, 220))


def long_t2v(specs, loop: bool = False) -> Graph:
    """T2V 1.3B beyond 81 frames with context windows (``loop``: a seamless 161-frame loop)."""
    model = "wan2.1_t2v_1.3B_bf16.safetensors"
    frames = 161 if loop else 257
    g = Graph(specs)
    what = (f"A seamless loop with Wan 2.1 T2V 1.3B, 832x480, {frames} frames: context windows of 81 frames with "
            "the 'looped' schedule denoise the end and the start together, so the last frame leads into the first."
            if loop else
            f"Text-to-video with Wan 2.1 T2V 1.3B, 832x480, {frames} frames (16 s at 16 fps) with context windows: "
            "the video is denoised in overlapping windows of 81 frames (what Wan was trained on), blended over 48 "
            "frames, so memory stays that of one 81-frame window.")
    _note(g, what + "\n\n" + _files(model))
    dit, te, vae, _ = _loaders(g, model)
    text = _text(g, te, "A white cat walks slowly across a sunlit garden, then lies down in the grass, realistic "
                 "style, soft light.", "t2v")
    size = g.add("WanCoreEmptyVideoEmbeds", (360, 300), {"width": 832, "height": 480, "frames": frames})
    ctx = _context(g, (360, 500), "looped" if loop else "static", 32 if loop else 48)
    _sample_and_save(g, dit, text, size, vae, steps=50, shift=5.0, prefix="WanCore/loop" if loop else "WanCore/t2v_257",
                     extra={"context": (ctx, 0)})
    return g


def i2v_extend(specs, times: int = 3) -> Graph:
    """I2V 480p, then ``times`` chained WanCore Extend Video nodes."""
    model = "wan2.1_i2v_480p_14B_fp8_e4m3fn.safetensors"
    g = Graph(specs)
    _note(g, f"Image-to-video with Wan 2.1 I2V 14B 480p, extended {times} times: each WanCore Extend Video "
          "continues the video from its last 17 frames (kept while sampling; the model also starts from the last "
          f"frame) and cross-fades them, adding 64 frames each: 81 + {times} x 64 = {81 + times * 64} frames.\n\n"
          + _files(model, clip=True) + "\nPut your start image in ComfyUI/input/ (or drop it on Load Image).")
    dit, te, vae, cv = _loaders(g, model, clip=True)
    first = g.add("LoadImage", (360, 300), {"image": "example.png"}, size=(300, 320), title="Start image")
    embeds = g.add("WanCoreImageToVideoEncode", (360, 660), {"width": 832, "height": 480, "frames": 81},
                   {"vae": (vae, 0), "clip_vision": (cv, 0), "start_image": (first, 0)})
    text = _text(g, te, "The cat turns its head towards the camera, stands up and walks away, gentle breeze.", "i2v")
    video = _sample_and_save(g, dit, text, embeds, vae, steps=40, shift=3.0, prefix="WanCore/i2v_480p")
    for k in range(times):
        video = g.add("WanCoreExtendVideo", (1160, 300 + 420 * k),
                      {"frames": 81, "overlap": 17, "seed": 43 + k, "steps": 40, "cfg": 5.0, "shift": 3.0,
                       "sampler": "unipc"},
                      {"model": (dit, 0), "vae": (vae, 0), "text_embeds": (text, 0), "video": (video, 0),
                       "clip_vision": (cv, 0)}, size=(320, 380), title=f"Extend {k + 1}")
    _save_video(g, video, "WanCore/i2v_480p_extended", (1520, 300 + 420 * (times - 1)))
    return g


def _core_text(g: Graph, prompt: str, negative: str) -> tuple[int, int]:
    """Core Load CLIP (umT5, type wan) and CLIPTextEncode for the prompt and the negative prompt."""
    clip = g.add("CLIPLoader", (0, 180), {"clip_name": T5, "type": "wan", "device": "default"})
    pos = g.add("CLIPTextEncode", (360, 0), {"text": prompt}, {"clip": (clip, 0)}, size=(400, 200),
                title="Prompt")
    neg = g.add("CLIPTextEncode", (360, 240), {"text": negative}, {"clip": (clip, 0)}, size=(400, 200),
                title="Negative prompt")
    return pos, neg


def _core_decode_and_save(g: Graph, latent: int, prefix: str) -> None:
    vae = g.add("VAELoader", (0, 340), {"vae_name": VAE})
    images = g.add("VAEDecode", (1160, 0), {}, {"samples": (latent, 0), "vae": (vae, 0)}, size=(240, 80))
    _save_video(g, images, prefix, (1520, 0))


def t2v_core_encoders(specs) -> Graph:
    """Core text encoder and VAE around our sampler."""
    model = "wan2.1_t2v_1.3B_bf16.safetensors"
    g = Graph(specs)
    _note(g, "Text-to-video with Wan 2.1 T2V 1.3B, mixing core nodes with ours: core Load CLIP (umT5, type wan) "
          "and CLIPTextEncode for the prompts, WanCore Text Embeds From Conditioning, WanCore Sampler (official "
          "schedule, our memory plan), core Load VAE and VAE Decode. The negative prompt is not filled in for you "
          "here: the official one is given.\n\n" + _files(model))
    dit = g.add("WanCoreLoadDiT", (0, 0), {"model_name": model, "weight_dtype": "auto", "attention": "sdpa"})
    pos, neg = _core_text(g, "A white cat walks slowly across a sunlit garden, realistic style, soft light.",
                          OFFICIAL_NEGATIVE)
    text = g.add("WanCoreTextEmbedsFromConditioning", (360, 480), {}, {"positive": (pos, 0), "negative": (neg, 0)},
                 size=(320, 80))
    size = g.add("WanCoreEmptyVideoEmbeds", (360, 600), {"width": 832, "height": 480, "frames": 81})
    s = g.add("WanCoreSampler", (800, 0), {"seed": 42, "steps": 50, "cfg": 5.0, "shift": 5.0, "sampler": "unipc",
                                           "denoise": 1.0},
              {"model": (dit, 0), "text_embeds": (text, 0), "video_embeds": (size, 0)}, size=(320, 260))
    _core_decode_and_save(g, s, "WanCore/t2v_core_encoders")
    return g


def t2v_ksampler(specs) -> Graph:
    """Our DiT through core KSampler."""
    model = "wan2.1_t2v_1.3B_bf16.safetensors"
    g = Graph(specs)
    _note(g, "Text-to-video with Wan 2.1 T2V 1.3B through core KSampler: WanCore DiT To Model turns our loaded "
          "DiT into a core MODEL (flow matching, shift 5), so core samplers, ModelSamplingSD3 and core LoRA / "
          "model-patching nodes work with it. Core KSampler's schedules are not the official Wan ones (WanCore "
          "Sampler's are), and our memory plan does not apply on this path.\n\n" + _files(model))
    dit = g.add("WanCoreLoadDiT", (0, 0), {"model_name": model, "weight_dtype": "auto", "attention": "sdpa"})
    core = g.add("WanCoreDiTToModel", (0, 500), {"shift": 5.0}, {"model": (dit, 0)}, size=(320, 80))
    pos, neg = _core_text(g, "A white cat walks slowly across a sunlit garden, realistic style, soft light.",
                          OFFICIAL_NEGATIVE)
    latent = g.add("EmptyHunyuanLatentVideo", (360, 480), {"width": 832, "height": 480, "length": 81,
                                                           "batch_size": 1})
    s = g.add("KSampler", (800, 0), {"seed": 42, "steps": 30, "cfg": 5.0, "sampler_name": "uni_pc",
                                     "scheduler": "simple", "denoise": 1.0},
              {"model": (core, 0), "positive": (pos, 0), "negative": (neg, 0), "latent_image": (latent, 0)},
              size=(320, 300))
    _core_decode_and_save(g, s, "WanCore/t2v_ksampler")
    return g


VACE_13B = "wan2.1_vace_1.3B_fp16.safetensors"
VACE_14B = "wan2.1_vace_14B_fp16.safetensors"


def _vace(specs, kind: str) -> Graph:
    """Wan2.1-VACE 1.3B: ``kind`` "reference" (subjects from an image, no control video),
    "control" (a control video's frames) or "outpaint" (a video padded, the border generated)."""
    g = Graph(specs)
    what = {
        "reference": "Reference-to-video with Wan2.1-VACE 1.3B, 832x480, 81 frames: the subject of the reference "
                     "image (fitted onto white at the video size) appears in the video, no control video. For "
                     "several subjects, batch the images (each image of the batch is one reference).",
        "control": "Control video with Wan2.1-VACE 1.3B, 832x480, 81 frames: the video follows the control frames. "
                   "Here the control video is a video file cut to 81 frames and scaled to 832x480; for depth, pose "
                   "or edge control put any preprocessor pack's node (depth, pose, canny ...) between Upscale Image and "
                   "WanCore VACE Encode: its IMAGE output plugs straight into control_video.",
        "outpaint": "Outpainting with Wan2.1-VACE 1.3B: the source video (cut to 81 frames, scaled to 672x384) is "
                    "padded to 832x480 by core Pad Image for Outpainting, whose mask (1 = generate) marks the "
                    "border; VACE keeps the source pixels and generates the rest.",
    }[kind]
    _note(g, what + " Official: 50 steps, shift 16, cfg 5.\n\n" + _files(VACE_13B)
          + f"\nFor VACE 14B (better, 832x480 or 1280x720): diffusion_models/{VACE_14B} -> "
          "ComfyUI/models/diffusion_models/ and pick it in WanCore Load Diffusion Model.\n"
          + ("Put your reference image in ComfyUI/input/ (or drop it on Load Image)." if kind == "reference" else
             "Put your video in ComfyUI/input/ (or drop it on Load Video)."))
    dit, te, vae, _ = _loaders(g, VACE_13B)
    inputs = {"vae": (vae, 0)}
    if kind == "reference":
        ref = g.add("LoadImage", (360, 300), {"image": "example.png"}, size=(300, 320), title="Reference image")
        inputs["reference_images"] = (ref, 0)
        prompt = "A white cat plays with a ball of yarn on a wooden floor, realistic style, soft light."
    else:
        video = g.add("LoadVideo", (360, 300), {"file": "example.mp4"}, size=(300, 320))
        parts = g.add("GetVideoComponents", (360, 660), {}, {"video": (video, 0)}, size=(240, 100))
        clip = g.add("ImageFromBatch", (360, 800), {"batch_index": 0, "length": 81}, {"image": (parts, 0)})
        w, h = (832, 480) if kind == "control" else (672, 384)
        scaled = g.add("ImageScale", (360, 960), {"upscale_method": "lanczos", "width": w, "height": h,
                                                  "crop": "center"}, {"image": (clip, 0)})
        if kind == "control":
            inputs["control_video"] = (scaled, 0)
            prompt = "A white cat walks slowly across a sunlit garden, realistic style, soft light."
        else:
            pad = g.add("ImagePadForOutpaint", (360, 1140), {"left": 80, "top": 48, "right": 80, "bottom": 48,
                                                             "feathering": 0}, {"image": (scaled, 0)},
                        size=(320, 200))
            inputs.update(control_video=(pad, 0), control_mask=(pad, 1))
            prompt = "A wide view of a sunlit garden, a white cat walks across the grass, realistic style."
    embeds = g.add("WanCoreVACEEncode", (360, 660 if kind == "reference" else 1380),
                   {"width": 832, "height": 480, "frames": 81, "strength": 1.0, "start_percent": 0.0,
                    "end_percent": 1.0}, inputs, size=(320, 260))
    text = _text(g, te, prompt, "t2v")
    _sample_and_save(g, dit, text, embeds, vae, steps=50, shift=16.0, prefix=f"WanCore/vace_{kind}")
    return g


def vace_edge_control(specs) -> Graph:
    """Wan2.1-VACE 1.3B following the canny edges of a video, made by WanCore Control Preprocess."""
    g = Graph(specs)
    _note(g, "Edge control with Wan2.1-VACE 1.3B, 832x480, 81 frames: WanCore Control Preprocess turns the source "
          "video (cut to 81 frames, scaled to 832x480) into canny edges, white on black, and the new video follows "
          "them. Its mode scribble gives looser, sketch-like edges, grayscale keeps light and shade, blur only the "
          "layout. For depth or pose control put a preprocessor pack's node (depth, pose ...) in its place: its IMAGE "
          "output plugs into control_video the same way. Its padding and box widgets make an outpainting / "
          "inpainting mask (control_mask); the padded size must then be WanCore VACE Encode's width x height. "
          "Official: 50 steps, shift 16, cfg 5.\n\n" + _files(VACE_13B)
          + "\nPut your video in ComfyUI/input/ (or drop it on Load Video).")
    dit, te, vae, _ = _loaders(g, VACE_13B)
    video = g.add("LoadVideo", (360, 300), {"file": "example.mp4"}, size=(300, 320))
    parts = g.add("GetVideoComponents", (360, 660), {}, {"video": (video, 0)}, size=(240, 100))
    clip = g.add("ImageFromBatch", (360, 800), {"batch_index": 0, "length": 81}, {"image": (parts, 0)})
    scaled = g.add("ImageScale", (360, 960), {"upscale_method": "lanczos", "width": 832, "height": 480,
                                              "crop": "center"}, {"image": (clip, 0)})
    control = g.add("WanCoreControlPreprocess", (360, 1140),
                    {"mode": "canny", "low_threshold": 0.4, "high_threshold": 0.8, "blur_sigma": 1.0,
                     "scribble_threshold": 0.0, "pad_left": 0, "pad_top": 0, "pad_right": 0, "pad_bottom": 0,
                     "pad_fill": "grey", "box_x": 0, "box_y": 0, "box_width": 0, "box_height": 0},
                    {"image": (scaled, 0)}, size=(320, 440))
    embeds = g.add("WanCoreVACEEncode", (360, 1620),
                   {"width": 832, "height": 480, "frames": 81, "strength": 1.0, "start_percent": 0.0,
                    "end_percent": 1.0}, {"vae": (vae, 0), "control_video": (control, 0), "control_mask": (control, 1)},
                   size=(320, 260))
    text = _text(g, te, "A white cat walks slowly across a sunlit garden, realistic style, soft light.", "t2v")
    _sample_and_save(g, dit, text, embeds, vae, steps=50, shift=16.0, prefix="WanCore/vace_edge_control")
    return g


def _recipes(name: str):
    """A recipe module beside this file (``workflows/<name>.py``), loaded by path: this script
    runs as a file, not from a package."""
    spec = importlib.util.spec_from_file_location(f"wancore_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def graphs(specs) -> dict[str, Graph]:
    # the Wan 2.2 recipes: their own module, given this one's Graph, _note and file names
    graphs22 = _recipes("wan22_workflows").graphs22(types.SimpleNamespace(**globals()), specs)
    graphs_fun = _recipes("fun_workflows").graphs_fun(types.SimpleNamespace(**globals()), specs)   # Wan2.1-Fun
    graphs_multigpu = _recipes("multigpu_workflows").graphs_multigpu(types.SimpleNamespace(**globals()), specs)
    return {
        "wan_t2v_1.3B": t2v(specs, "wan2.1_t2v_1.3B_bf16.safetensors", "t2v_1.3B",
                            "Text-to-video with Wan 2.1 T2V 1.3B, 832x480, 81 frames (5 s at 16 fps). "
                            "Needs about 8 GB of VRAM."),
        "wan_t2v_14B_fp8_8GB": t2v(specs, "wan2.1_t2v_14B_fp8_e4m3fn.safetensors", "t2v_14B",
                                   "Text-to-video with Wan 2.1 T2V 14B from its fp8 file (14 GB download), 832x480, "
                                   "81 frames, on an 8 GB GPU. The weights stay fp8 (weight_dtype 'keep (file)', "
                                   "computed in bf16) and rest in system RAM (24 GB RAM or more); WanCore Memory "
                                   "Options plans for an 8 GiB budget: the DiT blocks that do not fit are streamed "
                                   "to the GPU one block ahead, umT5 runs on the CPU if it does not fit, and the "
                                   "VAE decodes in tiles if needed. The plan is logged in the console. Set "
                                   "vram_budget_gb to 0 to use whatever VRAM is free.",
                                   weight_dtype="keep (file)", vram_budget_gb=8.0),
        "wan_i2v_480p": i2v(specs, "wan2.1_i2v_480p_14B_fp8_e4m3fn.safetensors", "i2v_480p", 832, 480, 3.0,
                            "Image-to-video with Wan 2.1 I2V 14B 480p, 832x480, 81 frames (official: 40 "
                            "steps, shift 3)."),
        "wan_i2v_720p": i2v(specs, "wan2.1_i2v_720p_14B_fp8_e4m3fn.safetensors", "i2v_720p", 1280, 720, 5.0,
                            "Image-to-video with Wan 2.1 I2V 14B 720p, 1280x720, 81 frames (official: 40 "
                            "steps, shift 5)."),
        "wan_flf2v_720p": i2v(specs, "wan2.1_flf2v_720p_14B_fp8_e4m3fn.safetensors", "flf2v", 1280, 720, 16.0,
                              "First-last-frame-to-video with Wan 2.1 FLF2V 14B 720p, 1280x720, 81 frames "
                              "(official: 50 steps, shift 16).", end=True),
        "wan_v2v_1.3B": v2v(specs),
        "wan_t2i_1.3B": t2i(specs),
        "wan_t2v_1.3B_257_context_windows": long_t2v(specs),
        "wan_i2v_480p_extend_x3": i2v_extend(specs),
        "wan_t2v_1.3B_loop": long_t2v(specs, loop=True),
        "wan_t2v_1.3B_core_encoders": t2v_core_encoders(specs),
        "wan_t2v_1.3B_ksampler": t2v_ksampler(specs),
        "wan_vace_1.3B_reference_to_video": _vace(specs, "reference"),
        "wan_vace_1.3B_control_video": _vace(specs, "control"),
        "wan_vace_1.3B_outpainting": _vace(specs, "outpaint"),
        "wan_vace_1.3B_edge_control": vace_edge_control(specs),
        **graphs22,
        **graphs_fun,
        **graphs_multigpu,
    }


def all_specs() -> dict:
    return dict(CORE, **_pack_specs())


def main() -> None:
    specs = all_specs()
    for name, g in graphs(specs).items():
        (HERE / f"{name}.json").write_text(json.dumps(g.ui(), indent=1, ensure_ascii=False) + "\n")
        (HERE / "api" / f"{name}.json").write_text(json.dumps(g.api(), indent=1, ensure_ascii=False) + "\n")
        print(f"wrote workflows/{name}.json and workflows/api/{name}.json")


if __name__ == "__main__":
    main()
