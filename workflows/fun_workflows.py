"""The Wan2.1-Fun example graphs (VideoX-Fun Control and InP, 1.3B).

``build_workflows.graphs()`` loads this file and calls :func:`graphs_fun` with its own names
(``b``: ``Graph``, ``_note``, ``_files``, ``_loaders``, ``_text``, ``_save_video``), so there is
one graph builder and no import cycle. Run ``python workflows/build_workflows.py`` to write the
JSON. Settings are VideoX-Fun's published ones (examples/wan2.1_fun/predict_*.py): 50 steps,
guidance 6, shift 3 at 480p with UniPC."""
from __future__ import annotations

FUN_CONTROL_13B = "wan2.1_fun_control_1.3B_bf16.safetensors"
FUN_INP_13B = "wan2.1_fun_inp_1.3B_bf16.safetensors"
SETTINGS = {"steps": 50, "cfg": 6.0, "shift": 3.0, "sampler": "unipc", "denoise": 1.0}
_OTHER_FILES = ("The same graph runs the 14B models and the V1.1 releases (alibaba-pai/Wan2.1-Fun-V1.1-1.3B-Control "
                "etc., diffusion_pytorch_model.safetensors renamed): the model kind is read from the file.")


def _sample(b, g, dit: int, text: int, embeds: int, vae: int, prefix: str) -> None:
    s = g.add("WanCoreSampler", (800, 0), {"seed": 42, **SETTINGS},
              {"model": (dit, 0), "text_embeds": (text, 0), "video_embeds": (embeds, 0)}, size=(320, 260))
    d = g.add("WanCoreDecode", (1160, 0), {"tiling": "auto", "tile_size": 512, "tile_overlap": 64},
              {"vae": (vae, 0), "latent": (s, 0)})
    b._save_video(g, d, prefix, (1520, 0))


def fun_control(b, specs):
    """Wan2.1-Fun Control 1.3B following a control video, from a start image."""
    g = b.Graph(specs)
    b._note(g, "Control video with Wan2.1-Fun Control 1.3B (VideoX-Fun), 832x480, 81 frames: the video follows the "
            "control frames and starts from the start image. Here the control video is a video file cut to 81 "
            "frames and scaled to 832x480; for depth, pose or edges put a preprocessor node (WanCore Control "
            "Preprocess, or any depth / pose pack) between Upscale Image and WanCore Fun Control Encode: its IMAGE "
            "output plugs straight into control_video. V1.1 models also take a reference_image (subject / style). "
            "VideoX-Fun's settings: 50 steps, cfg 6, shift 3 at 480p (5 at 720p).\n\n"
            + b._files(FUN_CONTROL_13B, clip=True)
            + "\n" + _OTHER_FILES + "\nPut your video and start image in ComfyUI/input/ (or drop them on Load Video "
            "and Load Image).")
    dit, te, vae, cv = b._loaders(g, FUN_CONTROL_13B, clip=True)
    video = g.add("LoadVideo", (360, 300), {"file": "example.mp4"}, size=(300, 320))
    parts = g.add("GetVideoComponents", (360, 660), {}, {"video": (video, 0)}, size=(240, 100))
    clip = g.add("ImageFromBatch", (360, 800), {"batch_index": 0, "length": 81}, {"image": (parts, 0)})
    scaled = g.add("ImageScale", (360, 960), {"upscale_method": "lanczos", "width": 832, "height": 480,
                                              "crop": "center"}, {"image": (clip, 0)})
    start = g.add("LoadImage", (0, 640), {"image": "example.png"}, size=(300, 320), title="Start image")
    embeds = g.add("WanCoreFunControlEncode", (360, 1140), {"width": 832, "height": 480, "frames": 81},
                   {"vae": (vae, 0), "control_video": (scaled, 0), "start_image": (start, 0), "clip_vision": (cv, 0)},
                   size=(320, 200))
    text = b._text(g, te, "A white cat walks slowly across a sunlit garden, realistic style, soft light.", "t2v")
    _sample(b, g, dit, text, embeds, vae, "WanCore/fun_control")
    return g


def fun_inp(b, specs):
    """Wan2.1-Fun InP 1.3B from a first and a last frame (WanCore Image To Video Encode)."""
    g = b.Graph(specs)
    b._note(g, "First-and-last-frame to video with Wan2.1-Fun InP 1.3B (VideoX-Fun), 832x480, 81 frames. Fun InP "
            "takes the I2V conditioning, so WanCore Image To Video Encode builds it; with an InP (I2V) model the "
            "sampler gives the model the start image's CLIP tokens only, as VideoX-Fun does. Leave end_image "
            "unconnected for image to video. VideoX-Fun's settings: 50 steps, cfg 6, shift 3 at 480p.\n\n"
            + b._files(FUN_INP_13B, clip=True) + "\n" + _OTHER_FILES
            + "\nPut your start and end images in ComfyUI/input/ (or drop them on Load Image).")
    dit, te, vae, cv = b._loaders(g, FUN_INP_13B, clip=True)
    first = g.add("LoadImage", (360, 300), {"image": "example.png"}, size=(300, 320), title="Start image")
    last = g.add("LoadImage", (360, 660), {"image": "example.png"}, size=(300, 320), title="End image")
    embeds = g.add("WanCoreImageToVideoEncode", (360, 1000), {"width": 832, "height": 480, "frames": 81},
                   {"vae": (vae, 0), "clip_vision": (cv, 0), "start_image": (first, 0), "end_image": (last, 0)})
    text = b._text(g, te, "The cat turns its head towards the camera and blinks, gentle breeze.", "t2v")
    _sample(b, g, dit, text, embeds, vae, "WanCore/fun_inp")
    return g


def graphs_fun(b, specs) -> dict:
    return {"wan_fun_control_1.3B": fun_control(b, specs), "wan_fun_inp_1.3B_first_last_frame": fun_inp(b, specs)}
