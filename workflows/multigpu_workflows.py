"""The multi-GPU example graph (WanCore Multi-GPU Options, issue 16).

``build_workflows.graphs()`` loads this file and calls :func:`graphs_multigpu` with its own
names (``b``: ``Graph``, ``_note``, ``_files``, ``_loaders``, ``_text``,
``_sample_and_save``), so there is one graph builder and no import cycle. Run
``python workflows/build_workflows.py`` to write the JSON."""
from __future__ import annotations

T2V_14B_FP8 = "wan2.1_t2v_14B_fp8_e4m3fn.safetensors"


def t2v_4_gpus(b, specs):
    """Wan 2.1 T2V 14B at 720p on four GPUs of one machine (Ulysses 4)."""
    g = b.Graph(specs)
    b._note(g, "Text-to-video with Wan 2.1 T2V 14B, 1280x720, 81 frames, on 4 GPUs of this machine: WanCore "
            "Multi-GPU Options starts one worker process per GPU on the first run (each loads its own copy of "
            "the model from the file, in system RAM: about 15 GB per GPU for this fp8 file) and keeps them for "
            "the next runs. Ulysses 4 splits every attention over the 40 heads. Other layouts: 2 GPUs "
            "'0,1' ulysses 2; 8 GPUs '0-7' ulysses 8, or ulysses 4 + cfg_parallel. The degrees must divide "
            "the heads (40 for 14B, 12 for 1.3B); use ring for the rest. Cancel stops all GPUs within a "
            "step.\n\n" + b._files(T2V_14B_FP8))
    dit, te, vae, _ = b._loaders(g, T2V_14B_FP8, weight_dtype="keep (file)")
    text = b._text(g, te, "A white cat walks slowly across a sunlit garden, realistic style, soft light.", "t2v")
    size = g.add("WanCoreEmptyVideoEmbeds", (360, 300), {"width": 1280, "height": 720, "frames": 81})
    gpus = g.add("WanCoreMultiGPUOptions", (0, 640), {"devices": "0,1,2,3", "ulysses": 4, "ring": 1,
                                                      "cfg_parallel": False}, size=(320, 160))
    b._sample_and_save(g, dit, text, size, vae, steps=50, shift=5.0, prefix="WanCore/t2v_14B_4_gpus",
                       extra={"multi_gpu": (gpus, 0)})
    return g


def graphs_multigpu(b, specs) -> dict:
    return {"wan_t2v_14B_720p_4_gpus": t2v_4_gpus(b, specs)}
