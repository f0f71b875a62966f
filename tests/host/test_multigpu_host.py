"""WanCore Multi-GPU Options inside a real ComfyUI server: the worker pool from a node graph.

The server runs on the CPU, so the pool's processes are two CPU ranks on gloo ("cpu,cpu",
Ulysses 2): the graph's video equals the one-process video, Cancel stops the workers and the
next run works, and the workers never run ComfyUI's main.py (it would parse the server's
arguments again, run prestartup scripts and import ComfyUI's model management: its "Total
VRAM" line would appear once per worker in the log).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hosttools  # noqa: E402
from hosttools import node_id, tiny, video_frames  # noqa: E402

hosttools.require_comfyui()
pytestmark = pytest.mark.host

_OPTIONS = {"class_type": "WanCoreMultiGPUOptions",
            "inputs": {"devices": "cpu,cpu", "ulysses": 2, "ring": 1, "cfg_parallel": False}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = hosttools.base_directory(tmp_path_factory.mktemp("comfy"), "multigpu_probe.py", "NODE_CLASS_MAPPINGS = {}\n")
    with hosttools.comfyui(base) as srv:
        yield srv


def _with_pool(prompt: dict) -> dict:
    prompt["300"] = dict(_OPTIONS)
    prompt[node_id(prompt, "WanCoreSampler")]["inputs"]["multi_gpu"] = ["300", 0]
    return prompt


def test_a_multi_gpu_graph_gives_the_one_process_video_and_workers_skip_comfyuis_main(server):
    prompt = tiny("wan_t2v_1.3B", steps=3, seed=11)
    save = node_id(prompt, "SaveVideo")
    prompt[save]["inputs"]["filename_prefix"] = "one_process"
    plain, _ = server.run(prompt)
    pooled_prompt = _with_pool(prompt)
    pooled_prompt[save]["inputs"]["filename_prefix"] = "pooled"
    pooled, events = server.run(pooled_prompt)
    errors = [e for e in events if e["type"] == "execution_error"]
    assert not errors, errors[0]["data"].get("exception_message")
    a = video_frames(server, plain["outputs"][save]["images"][0])
    b = video_frames(server, pooled["outputs"][save]["images"][0])
    assert torch.equal(a, b)   # Ulysses 2 gives the one-process latents bit for bit on the CPU
    log = server.log.read_text(errors="replace")
    assert "[wan_core worker 0 cpu]" in log               # the workers' log reaches the console
    assert log.count("Total VRAM") == 1, log[-3000:]       # ComfyUI's start-up ran once: in the server


def test_cancel_stops_the_pool_and_the_next_run_works(server):
    steps = 30
    prompt = _with_pool(tiny("wan_t2v_1.3B", steps=steps, seed=12))
    sampler, save = node_id(prompt, "WanCoreSampler"), node_id(prompt, "SaveVideo")
    prompt[save]["inputs"]["filename_prefix"] = "cancelled"
    seen = []

    def on_event(event):
        if event["type"] == "progress" and event["data"]["node"] == sampler:
            seen.append(event["data"]["value"])
            if len(seen) == 2:
                assert server.post("/interrupt", {})[0] == 200

    events = server.wait(server.queue(prompt), on_event)
    assert events[-1]["type"] == "execution_interrupted", events[-1]
    assert 2 <= max(seen) < steps, seen
    prompt[sampler]["inputs"]["steps"] = 2
    prompt[save]["inputs"]["filename_prefix"] = "after_cancel"
    after, events = server.run(prompt)
    assert after["status"]["status_str"] == "success", [e for e in events if e["type"] == "execution_error"]
