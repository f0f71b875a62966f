"""GGUF Wan DiT and umT5 files through the public loaders: storage, numbers, swap, LoRA, errors.

Files are written by tests/gguf_factory.py in ComfyUI-GGUF's / llama.cpp's conventions from
the tiny float32 models of tests/factory.py. Two references:

- the model holding the dequantized weights (``read_state_dict`` of the same file, stored in
  the same dtypes): a GGUF model must compute the very same numbers (bit for bit), which
  fails if a single key, shape record or kernel is wrong;
- the float32 model the file was quantized from: the output differs by the quantization
  error, measured here on these tiny random-weight models (relative L2 of the output,
  float32 compute, max over 4 inputs) and written next to each tolerance.
"""
from __future__ import annotations

import copy
import sys

import factory
import gguf
import gguf_factory as gf
import nodepack
import numpy as np
import pytest
import tiny
import torch
from gguf import GGMLQuantizationType as T
from safetensors.torch import save_file

from wan_core import LoraError, LoraSpec, apply_loras
from wan_core.checkpoint import inspect_checkpoint, read_state_dict
from wan_core.files import CheckpointError, open_checkpoint
from wan_core.gguf import GGUFFile
from wan_core.loaders import load_dit, load_text_encoder
from wan_core.offload import BlockSwap, module_bytes
from wan_core.planner import dit_sizes_from_module
from wan_core.quant import QuantEmbedding, QuantLinear, is_quantized
from wan_core.runner import DiTRunner

pytestmark = pytest.mark.usefixtures("one_thread")

Q4K = {"*": "Q4_K", "ffn.2": "Q8_0"}   # the tiny ffn.2 has 384 inputs, not a multiple of 256
# (variant, mix, tolerance, measured max relative error vs the float32 model)
ERRORS = [
    ("t2v", {"*": "F16"}, 1e-3, 3e-4), ("t2v", {"*": "Q8_0"}, 6e-3, 3.5e-3), ("t2v", {"*": "Q5_0"}, 4e-2, 2.8e-2),
    ("t2v", {"*": "Q4_0"}, 8e-2, 5.6e-2), ("t2v", Q4K, 6e-2, 4.2e-2),
    ("i2v", {"*": "Q8_0"}, 8e-3, 5.4e-3), ("i2v", {"*": "Q5_0"}, 6.5e-2, 4.6e-2), ("i2v", {"*": "Q4_0"}, 0.11, 8.1e-2),
    ("i2v", Q4K, 0.11, 7.8e-2),
]
PROMPTS = ["a cat walks on the grass, golden hour", "Ünïcödé   spaces\tand  ¼ fractions", "x"]


def _run(model, seed: int = 0):
    with torch.no_grad():
        return model(*tiny.dit_inputs(model.cfg, seed))


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def reference(tmp):
    """The float32 models the GGUF files are quantized from."""
    return {v: load_dit(factory.write_checkpoint(tmp, f"dit_{v}", "official")) for v in ("t2v", "i2v")}


_WRITTEN: dict[tuple, object] = {}


def _write(tmp, variant: str, mix: dict[str, str]):
    # i2v: patch embedding flattened with a comfy.gguf.orig_shape record; t2v: 5-D as fix_5d_tensors writes it
    key = (str(tmp), variant, tuple(sorted(mix.items())))
    if key not in _WRITTEN:
        _WRITTEN[key] = gf.write_dit(tmp, variant, mix, flat_patch=variant == "i2v")[0]
    return _WRITTEN[key]


def _dequantized(tmp, path, name: str):
    """The same model from a safetensors of the dequantized weights (F16/F32 tensors kept as they are),
    computing in float32 as the GGUF model does on the CPU (a plain file follows its F16 text embedding)."""
    sd, _ = read_state_dict(path, dtype=None)
    return load_dit(factory.save_safetensors(sd, tmp / name), compute_dtype=torch.float32)


# ----------------------------------------------------------------------------- DiT


@pytest.mark.parametrize("variant", ["t2v", "i2v"])
def test_dit_gguf_keeps_its_linears_quantized_and_detects_like_safetensors(tmp, reference, variant: str) -> None:
    path = _write(tmp, variant, Q4K)
    model = load_dit(path)
    assert model.cfg == reference[variant].cfg
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    per_block = 4 + 4 + 2 + (2 if variant == "i2v" else 0)   # self q k v o, cross q k v o, ffn.0/2 (+ k_img v_img)
    assert len(quantized) == model.cfg.num_layers * per_block
    for name, m in quantized.items():
        assert m.weight.dtype == torch.uint8 and not m.weight.requires_grad
        assert m.qtype == ("Q8_0" if name.endswith("ffn.2") else "Q4_K"), name
    assert not isinstance(model.text_embedding[0], QuantLinear)          # unquantized in the file: F16
    assert model.text_embedding[0].weight.dtype == torch.float16
    assert model.patch_embedding.weight.shape == (256, model.cfg.in_dim, 1, 2, 2)
    assert model.blocks[0].modulation.shape == (1, 6, 256)                # stored 2-D, restored
    assert model.patch_embedding.weight.dtype == model.time_projection[1].weight.dtype == torch.float32
    report = model.checkpoint_report.line()
    assert "Q4_K" in report and "Q8_0" in report and "gguf" in report


@pytest.mark.parametrize("variant", ["t2v", "i2v"])
def test_dit_gguf_computes_exactly_like_its_dequantized_weights(tmp, variant: str) -> None:
    path = _write(tmp, variant, Q4K)
    model, plain = load_dit(path), _dequantized(tmp, path, f"dq_{variant}.safetensors")
    assert not is_quantized(plain) and is_quantized(model)
    for seed in (0, 1):
        assert torch.equal(_run(model, seed), _run(plain, seed))


def test_gguf_dit_computes_in_float32_on_the_cpu_not_in_its_f16_embeddings_dtype(tmp) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from wan_core.layers import PrecisionPolicy

    model = load_dit(_write(tmp, "t2v", Q4K))
    assert model.text_embedding[0].weight.dtype == torch.float16       # unquantized in the file: F16
    assert model.resolved_compute_dtype() == torch.float32              # like fp8 storage on the CPU
    model.compute_dtype = torch.bfloat16                                # an explicit choice still wins
    assert model.resolved_compute_dtype() == torch.bfloat16
    # on CUDA (fake tensors: no GPU needed) quantized blocks give bf16, whatever device the blocks rest on
    with FakeTensorMode(allow_non_fake_inputs=True):
        embed = torch.empty(4, 4, dtype=torch.float16, device="cuda")
        blocks = torch.empty(4, 2, dtype=torch.uint8)
        assert PrecisionPolicy.compute_dtype(None, embed, blocks) == torch.bfloat16
        assert PrecisionPolicy.compute_dtype(None, embed, embed) == torch.float16   # plain fp16: unchanged


@pytest.mark.parametrize(("variant", "mix", "tol", "measured"), ERRORS,
                         ids=[f"{v}-{'+'.join(sorted(set(m.values())))}" for v, m, _, _ in ERRORS])
def test_dit_gguf_output_is_within_the_measured_quantization_error(tmp, reference, variant, mix, tol, measured) -> None:
    model = load_dit(_write(tmp, variant, mix), compute_dtype=torch.float32)
    worst = 0.0
    for seed in range(4):
        out, ref = _run(model, seed), _run(reference[variant], seed)
        worst = max(worst, ((out - ref).norm() / ref.norm()).item())
    assert worst < tol, f"relative error {worst:.4f} (measured {measured})"
    if mix["*"] != "F16":
        assert worst > measured / 3     # the quantized weights are really the ones used


def test_block_swap_with_gguf_is_bit_identical_and_streams_the_quantized_bytes(tmp) -> None:
    model = load_dit(_write(tmp, "i2v", Q4K))
    plain = _run(model)
    swap = BlockSwap(resident_blocks=0, compute_device="cpu")
    runner = DiTRunner(model, executor=swap)
    inputs = tiny.dit_inputs(model.cfg)
    with torch.no_grad():
        tokens, block_inputs = model.prepare(*inputs)
        out = model.finish(runner.executor.run(model.blocks, tokens, block_inputs), block_inputs)
    swap.release()
    assert torch.equal(out, plain)
    assert swap.streamed_bytes == sum(module_bytes(b) for b in model.blocks)
    quantized = [m for m in model.blocks[0].modules() if isinstance(m, QuantLinear)]
    q_bytes = sum(m.weight.numel() for m in quantized)
    assert 0 < q_bytes < sum(m.in_features * m.out_features for m in quantized)   # blocks travel, not floats


def test_planner_counts_the_bytes_as_stored_and_real_linear_sizes(tmp) -> None:
    model = load_dit(_write(tmp, "t2v", {"*": "Q4_0"}))
    sizes = dit_sizes_from_module(model)
    assert sizes.block_bytes == tuple(module_bytes(b) for b in model.blocks)
    assert sizes.largest_linear == 256 * 384 and sizes.upcast
    float_block = sum(p.numel() * 4 for p in model.blocks[0].parameters() if p.dtype != torch.uint8) + \
        sum(m.in_features * m.out_features * 4 for m in model.blocks[0].modules() if isinstance(m, QuantLinear))
    assert sizes.block_bytes[0] < float_block / 4          # Q4_0: 4.5 bits per weight


def test_a_gguf_model_refuses_a_storage_cast_that_would_destroy_its_blocks(tmp) -> None:
    model = load_dit(_write(tmp, "t2v", {"*": "Q4_0"}))
    with pytest.raises(ValueError, match="GGUF"):
        model.cast_storage(torch.bfloat16)


def _lora(tmp, model) -> factory.Path:
    g = torch.Generator().manual_seed(5)
    sd = {}
    for name in ("blocks.0.self_attn.q", "blocks.1.ffn.2", "blocks.0.cross_attn.k"):
        m = model.get_submodule(name)
        sd[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(4, m.in_features, generator=g) * 0.1
        sd[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(m.out_features, 4, generator=g) * 0.1
        sd[f"diffusion_model.{name}.alpha"] = torch.tensor(2.0)
    path = tmp / "lora.safetensors"
    save_file(sd, str(path))
    return path


def test_unmerged_lora_on_gguf_equals_the_lora_on_the_dequantized_model(tmp) -> None:
    path = _write(tmp, "t2v", Q4K)
    model, plain = load_dit(path), _dequantized(tmp, path, "dq_lora.safetensors")
    spec = [LoraSpec(_lora(tmp, model), 0.8)]
    before = _run(model)
    report = apply_loras(model, spec, mode="unmerged")
    assert len(report.matched) == 3 and not report.unmatched
    apply_loras(plain, spec, mode="unmerged")
    out = _run(model)
    assert not torch.equal(out, before)
    assert torch.equal(out, _run(plain))
    report.remove()
    assert torch.equal(_run(model), before)


def test_merging_a_lora_into_gguf_weights_is_refused_and_changes_nothing(tmp) -> None:
    model = load_dit(_write(tmp, "t2v", Q4K))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(LoraError, match="unmerged"):
        apply_loras(model, [LoraSpec(_lora(tmp, model), 1.0)], mode="merge")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_inspect_reports_the_quantization_per_tensor_group(tmp) -> None:
    det = inspect_checkpoint(_write(tmp, "t2v", Q4K))
    assert det.kind == "dit" and det.config.model_type == "t2v"
    assert det.quant.startswith("gguf")
    groups = dict(part.split(" ", 1) for part in det.quant[det.quant.index("(") + 1:-1].split(", "))
    assert groups["attention"].startswith("Q4_K") and groups["ffn"].startswith("Q4_K/Q8_0")
    assert "Q" not in groups["embeddings"] and "Q" not in groups["head"]


# ----------------------------------------------------------------------------- umT5

T5_ERRORS = [("F16", "F16", 3e-3, 1.2e-3), ("Q8_0", "Q8_0", 2.5e-2, 1.3e-2), ("Q5_0", "Q8_0", 0.14, 9.3e-2),
             ("Q4_0", "Q4_0", 0.3, 0.21)]


@pytest.fixture(scope="module")
def t5_reference(tmp):
    return load_text_encoder(factory.write_checkpoint(tmp, "t5", "hf_with_spiece"))


def test_umt5_gguf_rebuilds_the_embedded_tokenizer(tmp, t5_reference) -> None:
    path, _ = gf.write_t5(tmp, "Q8_0")
    te = load_text_encoder(path)
    assert te.tokenizer.vocab_size == t5_reference.tokenizer.vocab_size == 256     # [PADi] rows dropped
    for a, b in zip(te.tokenizer(PROMPTS), t5_reference.tokenizer(PROMPTS)):
        assert torch.equal(a, b)
    assert isinstance(te.model.token_embedding, QuantEmbedding)
    assert isinstance(te.model.blocks[0].ffn.fc2, QuantLinear)
    assert te.model.blocks[0].pos_embedding.embedding.weight.dtype == torch.float32


@pytest.mark.parametrize(("qtype", "embd", "tol", "measured"), T5_ERRORS, ids=[e[0] for e in T5_ERRORS])
def test_umt5_gguf_output_is_within_the_measured_quantization_error(tmp, t5_reference, qtype, embd, tol,
                                                                    measured) -> None:
    te = load_text_encoder(gf.write_t5(tmp, qtype, embd)[0])
    worst = max(((a - b).norm() / b.norm()).item() for a, b in zip(te.encode(PROMPTS), t5_reference.encode(PROMPTS)))
    assert worst < tol, f"relative error {worst:.4f} (measured {measured})"


def test_umt5_gguf_computes_exactly_like_its_dequantized_weights(tmp) -> None:
    path, _ = gf.write_t5(tmp, "Q5_1", "Q4_1", name="umt5_exact.gguf")
    te = load_text_encoder(path)
    sd, _ = read_state_dict(path, dtype=None)
    sd["spiece_model"] = torch.frombuffer(bytearray(factory.TINY_SPIECE.read_bytes()), dtype=torch.uint8)
    plain = load_text_encoder(factory.save_safetensors(sd, tmp / "umt5_dq.safetensors"))
    plain.model.compute_dtype = torch.float32
    for a, b in zip(te.encode(PROMPTS), plain.encode(PROMPTS)):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- bad input


@pytest.fixture()
def no_weight_reads(monkeypatch):
    def fail(self, t):
        raise AssertionError(f"weight '{t.name}' was read before the file was refused")
    monkeypatch.setattr(GGUFFile, "_raw", fail)


def _tiny_gguf(tmp, name: str, arch: str | None, tensors=None, fields=None):
    tensors = tensors or {"double_blocks.0.img_attn.qkv.weight": (np.ones((8, 32), np.float32), "Q8_0")}
    return gf.write_gguf(tmp / name, arch, tensors, fields)


@pytest.mark.parametrize(("arch", "words"), [("flux", "Flux"), ("hyvid", "HunyuanVideo"), ("llama", "language model")])
def test_a_gguf_of_another_architecture_is_refused_by_name(tmp, no_weight_reads, arch: str, words: str) -> None:
    path = _tiny_gguf(tmp, f"{arch}.gguf", arch)
    with pytest.raises(CheckpointError, match=words):
        load_dit(path)


def test_a_flux_gguf_without_architecture_is_refused_by_its_keys(tmp, no_weight_reads) -> None:
    with pytest.raises(CheckpointError, match="another family"):
        load_dit(_tiny_gguf(tmp, "flux_sdcpp.gguf", None))


def test_an_unsupported_quant_type_is_refused_naming_it(tmp, no_weight_reads) -> None:
    path = tmp / "iq4.gguf"
    w = gguf.GGUFWriter(path=None, arch="wan")
    w.add_tensor("blocks.0.self_attn.q.weight", np.zeros((4, 18 * 8), np.uint8), raw_dtype=T.IQ4_NL)
    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="IQ4_NL"):
        load_dit(path)


def test_a_tensor_type_unknown_to_gguf_is_refused(tmp, no_weight_reads) -> None:
    path = _write(tmp, "t2v", {"*": "Q8_0"})
    data = bytearray(path.read_bytes())
    # the type id (uint32) follows the dims of the first Q8_0 tensor's entry: patch it to 250
    name = b"blocks.0.self_attn.q.weight"
    at = data.index(name) + len(name) + 4 + 2 * 8
    assert int.from_bytes(data[at:at + 4], "little") == int(T.Q8_0)
    data[at:at + 4] = (250).to_bytes(4, "little")
    bad = tmp / "unknown_type.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="GGML type"):
        load_dit(bad)


def test_a_truncated_gguf_is_refused_before_any_weight_is_read(tmp, no_weight_reads) -> None:
    path = _write(tmp, "t2v", {"*": "Q4_0"})
    cut = tmp / "truncated.gguf"
    cut.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_dit(cut)
    head = tmp / "truncated_header.gguf"
    head.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="truncated"):
        load_dit(head)


def test_a_non_finite_block_scale_is_refused_naming_the_tensor(tmp) -> None:
    path = _write(tmp, "t2v", {"*": "Q8_0"})
    with open_checkpoint(path) as tf:
        offset = tf.tensors["blocks.1.ffn.0.weight"].offset
    data = bytearray(path.read_bytes())
    data[offset:offset + 2] = np.array([np.inf], dtype=np.float16).tobytes()    # d of the first Q8_0 block
    bad = tmp / "inf_scale.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="blocks.1.ffn.0.weight"):
        load_dit(bad)


def test_a_tokenizer_that_does_not_match_the_token_table_is_refused(tmp, no_weight_reads) -> None:
    path, _ = gf.write_t5(tmp, "Q8_0", name="umt5_vocab.gguf", vocab_rows=tiny.TINY_T5.vocab + 16)
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_text_encoder(path)


def test_a_dit_gguf_given_to_the_text_encoder_loader_names_its_loader(tmp, no_weight_reads) -> None:
    with pytest.raises(CheckpointError, match="diffusion"):
        load_text_encoder(_write(tmp, "t2v", {"*": "Q8_0"}))


# ----------------------------------------------------------------------------- nodes


def test_loader_nodes_list_gguf_files_of_their_folders(tmp, monkeypatch) -> None:
    pack = nodepack.load_pack()
    dit_dir, te_dir = tmp / "diffusion_models", tmp / "text_encoders"
    (dit_dir / "sub").mkdir(parents=True)
    te_dir.mkdir()
    (dit_dir / "sub" / "wan-q4_k_m.gguf").write_bytes(b"GGUF")
    (dit_dir / "wan.safetensors").write_bytes(b"x")
    (te_dir / "umt5-q8_0.gguf").write_bytes(b"GGUF")
    fake = nodepack.fake_folder_paths({"diffusion_models": dit_dir, "text_encoders": te_dir})
    listed = {"diffusion_models": ["wan.safetensors"], "text_encoders": []}   # ComfyUI filters out .gguf
    fake.get_filename_list = lambda key: listed.get(key, [])
    fake.get_folder_paths = lambda key: [str(dit_dir if key == "diffusion_models" else te_dir)]
    fake.folder_names_and_paths = {}
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    dit_files = pack.nodes.loaders.WanCoreLoadDiT.INPUT_TYPES()["required"]["model_name"][0]
    te_files = pack.nodes.loaders.WanCoreLoadTextEncoder.INPUT_TYPES()["required"]["text_encoder_name"][0]
    assert dit_files == ["sub/wan-q4_k_m.gguf", "wan.safetensors"]
    assert te_files == ["umt5-q8_0.gguf"]


def test_loader_nodes_load_gguf_files(tmp, monkeypatch) -> None:
    pack = nodepack.load_pack()
    folder = tmp / "node_models"
    folder.mkdir()
    dit_path = gf.write_dit(folder, "t2v", {"*": "Q5_0"}, name="wan-q5_0.gguf")[0]
    te_path = gf.write_t5(folder, "Q8_0", name="umt5-q8_0.gguf")[0]
    monkeypatch.setitem(sys.modules, "folder_paths",
                        nodepack.fake_folder_paths({"diffusion_models": folder, "text_encoders": folder}))
    (loaded,) = pack.nodes.loaders.WanCoreLoadDiT().load(dit_path.name, "auto", "sdpa")
    dit = getattr(loaded, "model", loaded)     # nodes.types.LoadedDiT (or the bare model)
    assert any(type(m).__name__ == "QuantLinear" for m in dit.modules())
    (te,) = pack.nodes.loaders.WanCoreLoadTextEncoder().load(te_path.name, "auto")
    assert type(te.model.token_embedding).__name__ == "QuantEmbedding"
    assert te.encode(["a cat"])[0].shape[-1] == tiny.TINY_T5.dim
