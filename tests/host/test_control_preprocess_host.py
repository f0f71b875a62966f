"""WanCore Control Preprocess against ComfyUI's own nodes, in ComfyUI's Python (no server).

- mode canny with the defaults = core *Canny* (``comfy_extras/nodes_canny.py``, low 0.4 / high
  0.8) on the same frames, bit for bit (both are kornia's canny; ours runs it frame by frame);
- mode none with padding (grey) = core *Pad Image for Outpainting* with feathering 0, image
  and mask, bit for bit.

Runs when COMFYUI_PATH points to a ComfyUI checkout (checked with 0.3.64), under
COMFYUI_PYTHON (default: this interpreter), which needs ComfyUI's requirements and ours.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.host

_SCRIPT = r"""
import importlib.util, json, sys
sys.argv = [sys.argv[0], "--cpu"]
comfy_path, root = sys.argv_paths
sys.path[:0] = [comfy_path]
import comfy.options
comfy.options.enable_args_parsing()
import torch
import nodes
from comfy_extras.nodes_canny import Canny

spec = importlib.util.spec_from_file_location("wancore_pack", root + "/__init__.py", submodule_search_locations=[root])
pack = importlib.util.module_from_spec(spec)
sys.modules["wancore_pack"] = pack
spec.loader.exec_module(pack)
node = pack.nodes.NODE_CLASS_MAPPINGS["WanCoreControlPreprocess"]()   # the V1 class the V3 node calls

g = torch.Generator().manual_seed(0)
low = torch.rand(4, 3, 6, 8, generator=g)
video = torch.nn.functional.interpolate(low, size=(48, 64), mode="bilinear").permute(0, 2, 3, 1).contiguous()
video[:, 12:30, 20:40] = 1.0
args = dict(mode="canny", low_threshold=0.4, high_threshold=0.8, blur_sigma=1.0, scribble_threshold=0.0,
            pad_left=0, pad_top=0, pad_right=0, pad_bottom=0, pad_fill="grey", box_x=0, box_y=0, box_width=0,
            box_height=0)
ours, ours_mask = node.preprocess(video, **args)
core = Canny.execute(video, 0.4, 0.8).result[0]
padded, mask = node.preprocess(video, **dict(args, mode="none", pad_left=16, pad_top=8, pad_right=0, pad_bottom=8))
core_padded, core_mask = nodes.ImagePadForOutpaint().expand_image(video, 16, 8, 0, 8, 0)
print(json.dumps({"canny_equal": torch.equal(ours, core), "edges": float(core.sum()),
                  "pad_equal": torch.equal(padded, core_padded), "mask_equal": torch.equal(mask, core_mask),
                  "shapes": [list(padded.shape), list(core_padded.shape), list(mask.shape), list(core_mask.shape)]}))
"""


def test_canny_and_padding_equal_comfyui_core_canny_and_pad_image_for_outpainting():
    comfy = os.environ.get("COMFYUI_PATH")
    if not comfy:
        pytest.skip("COMFYUI_PATH is not set (a ComfyUI checkout to test against)")
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    code = "import sys; sys.argv_paths = sys.argv[1:3]\n" + _SCRIPT
    res = subprocess.run([python, "-c", code, comfy, str(ROOT)], capture_output=True, text=True, timeout=300,
                         cwd=comfy)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["edges"] > 50, out              # the frames have edges
    assert out["canny_equal"], out
    assert out["pad_equal"] and out["mask_equal"], out
