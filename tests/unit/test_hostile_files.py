"""Hostile and malformed checkpoint files: every one is refused with a CheckpointError that
names the file, never echoes its content, never reads outside the model folder and never
allocates what the file merely claims (issue 10, "files" classes)."""
from __future__ import annotations

import json
import os
import random
import resource
import struct
import time
from pathlib import Path

import pytest
import torch

import factory
from factory import raw_safetensors
from wan_core import NonFiniteError, inspect_checkpoint, load_dit, load_text_encoder, load_vae
from wan_core.configs import DiTConfig
from wan_core.fp8 import all_finite
from wan_core.files import MAX_DIM, MAX_JSON_DEPTH, MAX_JSON_ITEMS, CheckpointError, open_checkpoint
from wan_core.layouts import MAX_DIT_BLOCKS

SECRET = "S3CRET-MARKER-do-not-print-7f3a"
# A DiT small enough to load ~100 times in a few seconds (bf16: 0.9 MB).
MINI_DIT = DiTConfig(dim=128, ffn_dim=64, num_layers=2, text_dim=16, freq_dim=16)


def _entry(dtype: str = "F32", shape: list | None = None, offsets: list | None = None) -> dict:
    shape = [2] if shape is None else shape
    return {"dtype": dtype, "shape": shape, "data_offsets": [0, 8] if offsets is None else offsets}


def _write(path: Path, header: dict | bytes, data: bytes = b"\0" * 8, header_len: int | None = None) -> Path:
    path.write_bytes(raw_safetensors(header, data, header_len))
    return path


def _refused(path: Path | str, match: str | None = None) -> str:
    with pytest.raises(CheckpointError, match=match) as info:
        open_checkpoint(path)
    msg = str(info.value)
    assert Path(path).name in msg or str(path) in msg, msg
    return msg


def _mini_dit(tmp_path: Path, name: str = "mini.safetensors", **edits) -> dict[str, torch.Tensor]:
    sd = factory.make_checkpoint("dit", "official", cfg=MINI_DIT, dtype=torch.bfloat16)
    sd.update(edits)
    factory.save_safetensors(sd, tmp_path / name)
    return sd


# ----------------------------------------------------------------- files outside the model folder

def _shard(folder: Path, name: str, key: str = "w") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return factory.save_safetensors({key: torch.ones(2)}, folder / name)


@pytest.mark.parametrize("shard_name", [
    "../other/x.safetensors", "..", ".", "sub/x.safetensors", "/etc/passwd", "sub\\x.safetensors",
    "C:\\x.safetensors", "C:x.safetensors", "x.safetensors\0.txt", "",
])
def test_index_naming_a_file_outside_its_folder_is_refused(tmp_path: Path, shard_name: str) -> None:
    _shard(tmp_path / "other", "x.safetensors")
    _shard(tmp_path / "model" / "sub", "x.safetensors")
    index = tmp_path / "model" / "m.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": shard_name}}))
    _refused(index, "not a plain file name")


def test_index_naming_an_absolute_path_is_refused(tmp_path: Path) -> None:
    outside = _shard(tmp_path / "other", "x.safetensors")
    index = tmp_path / "model" / "m.safetensors.index.json"
    index.parent.mkdir()
    index.write_text(json.dumps({"weight_map": {"w": str(outside)}}))
    _refused(index, "not a plain file name")


def test_shard_that_links_outside_the_folder_is_refused(tmp_path: Path) -> None:
    outside = _shard(tmp_path / "other", "x.safetensors")
    model = tmp_path / "model"
    model.mkdir()
    (model / "m-00001-of-00001.safetensors").symlink_to(outside)
    (model / "m.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "m-00001-of-00001.safetensors"}}))
    _refused(model / "m.safetensors.index.json", "link to a file outside the model folder")
    # found by name pattern, without the index, too
    _refused(model / "m-00001-of-00001.safetensors", "link to a file outside the model folder")


def test_links_inside_the_folder_and_the_hugging_face_cache_are_accepted(tmp_path: Path) -> None:
    model = tmp_path / "model"
    _shard(model / "real", "x.safetensors")
    (model / "m-00001-of-00001.safetensors").symlink_to(model / "real" / "x.safetensors")
    with open_checkpoint(model / "m-00001-of-00001.safetensors") as tf:
        assert tf.keys() == ["w"]
    # huggingface_hub cache: snapshots/<rev>/<sub>/file -> ../../../blobs/<sha>
    repo = tmp_path / "models--Wan-AI--x"
    blob = _shard(repo / "blobs", "abc123")
    snap = repo / "snapshots" / "rev" / "transformer"
    snap.mkdir(parents=True)
    (snap / "m-00001-of-00001.safetensors").symlink_to(os.path.relpath(blob, snap))
    (repo / "blobs" / "idx").write_text(json.dumps({"weight_map": {"w": "m-00001-of-00001.safetensors"}}))
    (snap / "m.safetensors.index.json").symlink_to(os.path.relpath(repo / "blobs" / "idx", snap))
    with open_checkpoint(snap) as tf:
        assert tf.keys() == ["w"]


# ----------------------------------------------------------------- shard sets that disagree

def test_same_tensor_in_two_shards_is_refused(tmp_path: Path) -> None:
    _shard(tmp_path, "m-00001-of-00002.safetensors", "w")
    _shard(tmp_path, "m-00002-of-00002.safetensors", "w")
    _refused(tmp_path / "m-00002-of-00002.safetensors", "'w' is in two shards")   # no index
    index = tmp_path / "m.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "m-00001-of-00002.safetensors", "v": "m-00002-of-00002.safetensors"}}))
    _refused(index, "'w' is in two shards")


@pytest.mark.parametrize("weight_map", [
    {"w": "a.safetensors", "u": "a.safetensors", "v": "a.safetensors"},   # v is in b
    {"w": "b.safetensors", "u": "a.safetensors", "v": "b.safetensors"},   # w is in a, not b
    {"w": "a.safetensors", "v": "b.safetensors"},                         # a's u is not listed
])
def test_index_that_does_not_match_its_shards_is_refused(tmp_path: Path, weight_map: dict) -> None:
    factory.save_safetensors({"w": torch.ones(2), "u": torch.ones(1)}, tmp_path / "a.safetensors")
    _shard(tmp_path, "b.safetensors", "v")
    index = tmp_path / "m.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    _refused(index, "index and shards do not match")


@pytest.mark.parametrize("body", [
    '{"weight_map": ["a.safetensors"]}', '{"weight_map": "a.safetensors"}', '{"weight_map": {}}',
    '{"metadata": {}}', '["weight_map"]', '{"weight_map": {"w": 3}}', '{"weight_map": {"w": null}}',
    '{"weight_map": {"w": "a.safetensors", "w": "a.safetensors"}}', '{"weight_map": {"w": "a.safetensors"}',
    "[" * 100_000, '{"weight_map": {"w": "a.safetensors"}} and more', "\xff\xfe",
])
def test_malformed_index_is_refused(tmp_path: Path, body: str) -> None:
    _shard(tmp_path, "a.safetensors")
    index = tmp_path / "m.safetensors.index.json"
    index.write_bytes(body.encode("latin-1"))
    _refused(index)


def test_absurd_shard_numbers_and_huge_index_are_refused(tmp_path: Path) -> None:
    _shard(tmp_path, "m-00003-of-00002.safetensors")
    _refused(tmp_path / "m-00003-of-00002.safetensors", "not a valid shard number")
    _shard(tmp_path, "m-00001-of-99999.safetensors")
    _refused(tmp_path / "m-00001-of-99999.safetensors", "not a valid shard number")
    big = tmp_path / "big.safetensors.index.json"
    with open(big, "wb") as fh:
        fh.truncate(17 * 1024 * 1024)          # sparse: no disk used
    _refused(big, "the limit is")


# ----------------------------------------------------------------- malformed safetensors headers

@pytest.mark.parametrize("header, match", [
    ({"__metadata__": [1, 2], "w": _entry()}, "__metadata__"),
    ({"__metadata__": "text", "w": _entry()}, "__metadata__"),
    ({"__metadata__": {"a": 1}, "w": _entry()}, "__metadata__"),
    ({"__metadata__": {"a": {"b": "c"}}, "w": _entry()}, "__metadata__"),
    ([_entry()], "not a JSON object"),
    ("w", "not a JSON object"),
    ({"w": [1, 2]}, "is not an object"),
    ({"w": {"dtype": "F32", "shape": [2]}}, "lacks 'data_offsets'"),
    ({"w": _entry(dtype="F128")}, "dtype F128, which this loader does not read"),
    ({"w": _entry(dtype=7)}, "dtype that is not a string"),
    ({"w": _entry(shape=[-2])}, "shape with a size"),
    ({"w": _entry(shape=[2**40, 0])}, "shape with a size"),
    ({"w": _entry(shape=[MAX_DIM + 1, 0])}, "shape with a size"),
    ({"w": _entry(shape=[2.0])}, "shape with a size"),
    ({"w": _entry(shape=[True, 2])}, "shape with a size"),
    ({"w": _entry(shape=["2"])}, "shape with a size"),
    ({"w": _entry(shape=[1] * 9, offsets=[0, 4])}, "at most 8 sizes"),
    ({"w": _entry(shape={"a": 2})}, "not a list"),
    ({"w": _entry(offsets=[0, 8, 16])}, "data_offsets"),
    ({"w": _entry(offsets=[8, 0])}, "data_offsets"),
    ({"w": _entry(offsets=[-8, 0])}, "data_offsets"),
    ({"w": _entry(offsets=[0, "8"])}, "data_offsets"),
    ({"w": _entry(offsets=[0, 2**70])}, "claims"),
    ({"w": _entry(shape=[2**31, 2**31, 2**31])}, "claims"),
    ({"a": _entry(), "b": _entry()}, "overlap"),
    ({"a": _entry(shape=[4], offsets=[0, 16]), "b": _entry(shape=[2], offsets=[8, 16])}, "overlap"),
])
def test_malformed_header_is_a_checkpoint_error(tmp_path: Path, header, match: str) -> None:
    _refused(_write(tmp_path / "bad.safetensors", header, b"\0" * 16), match)


@pytest.mark.parametrize("body, match", [
    (b"[" * 100_000, f"nests 100000 levels deep \\(the limit is {MAX_JSON_DEPTH}\\)"),
    (b'{"w":' * 100_000, "nests 100000 levels deep"),
    (b'{"a": "' + b"[" * 100_000 + b'"}', "not an object"),     # brackets inside a string do not count
    (b'{"a": "\\\"[[[[[[[[[[[["}', "not an object"),              # nor after an escaped quote
    (b'{"a": [' + b"{}," * 2_100_000 + b"{}]}", f"JSON items \\(the limit is {MAX_JSON_ITEMS}\\)"),
    (b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "w": {}}', "names 'w' twice"),
    (b'{"__metadata__": {"a": "b", "a": "c"}}', "names 'a' twice"),
    (b'{"w": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 8]}}', "out of range"),
    (b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 8]}}', "out of range"),
    (b'{"w": \xff\xfe}', "not UTF-8"),
    (b"{not json", "not valid JSON"),
])
def test_hostile_json_is_a_checkpoint_error(tmp_path: Path, body: bytes, match: str) -> None:
    _refused(_write(tmp_path / "bad.safetensors", body), match)


@pytest.mark.parametrize("header_len", [0, 1, 2**63, 200 * 2**20, 10**6])
def test_header_length_beyond_the_file_or_the_limit_is_refused(tmp_path: Path, header_len: int) -> None:
    msg = _refused(_write(tmp_path / "bad.safetensors", {"w": _entry()}, header_len=header_len))
    assert "truncated" in msg or "not a valid safetensors file" in msg


def test_zero_byte_tensors_with_absurd_other_dims_are_refused_before_allocation(tmp_path: Path) -> None:
    f = _write(tmp_path / "bad.safetensors", {"w": _entry(shape=[0, 2**40], offsets=[0, 0])}, b"")
    _refused(f, "shape with a size")


# ----------------------------------------------------------------- layout detection

def test_one_zero_byte_tensor_cannot_build_ten_million_blocks(tmp_path: Path) -> None:
    _mini_dit(tmp_path, **{"blocks.10000000.self_attn.q.weight": torch.empty(0)})
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=f"numbered up to 10000000; at most {MAX_DIT_BLOCKS}"):
        load_dit(tmp_path / "mini.safetensors")
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("key, match", [
    ("blocks.x.self_attn.q.weight", "malformed DiT block number"),
    ("blocks.-1.self_attn.q.weight", "malformed DiT block number"),
    ("blocks.1e3.self_attn.q.weight", "malformed DiT block number"),
    ("blocks.01.self_attn.q.weight", "malformed DiT block number"),
    ("blocks.\u0663.self_attn.q.weight", "malformed DiT block number"),      # Arabic-Indic 3
    ("blocks.7", "malformed DiT block number"),
    ("blocks." + "9" * 5000 + ".x", "malformed DiT block number"),
    ("blocks.5.self_attn.q.weight", "not numbered contiguously from 0 \\(missing 2, 3, 4\\)"),
])
def test_malformed_block_numbers_are_refused(tmp_path: Path, key: str, match: str) -> None:
    _mini_dit(tmp_path, **{key: torch.zeros(1, dtype=torch.bfloat16)})
    with pytest.raises(CheckpointError, match=match):
        inspect_checkpoint(tmp_path / "mini.safetensors")


@pytest.mark.parametrize("key, value, match", [
    ("head.modulation", torch.zeros(2, 128), "expected 3 sizes"),
    ("patch_embedding.weight", torch.zeros(128, 16, 2, 2), "expected 5 sizes"),
    ("patch_embedding.weight", torch.zeros(0, 16, 1, 2, 2), "expected 5 sizes, each 1.."),
    ("patch_embedding.weight", torch.zeros(64, 16, 1, 2, 2), "inconsistent with the model width 128"),
    ("head.head.weight", torch.zeros(63, 128), "inconsistent with width 128 and patch size"),
    ("text_embedding.0.weight", torch.zeros(96, 16), "inconsistent with the model width"),
])
def test_dit_shapes_that_contradict_each_other_are_refused(tmp_path: Path, key: str, value, match: str) -> None:
    _mini_dit(tmp_path, **{key: value.to(torch.bfloat16)})
    with pytest.raises(CheckpointError, match=match):
        load_dit(tmp_path / "mini.safetensors")


def _vae(tmp_path: Path, drop: str = "", **edits) -> Path:
    sd = factory.make_checkpoint("vae", "official")
    sd = {k: v for k, v in sd.items() if not (drop and k.startswith(drop))}
    sd.update(edits)
    return factory.save_safetensors(sd, tmp_path / "vae.safetensors")


@pytest.mark.parametrize("drop, edits, match", [
    ("encoder.downsamples.", {}, "no encoder.downsamples"),
    ("encoder.downsamples.0.", {}, "not numbered contiguously"),
    ("encoder.downsamples.1.", {}, "not numbered contiguously"),
    ("", {"encoder.downsamples.99999999.residual.2.weight": torch.zeros(0)}, "numbered up to 99999999"),
    ("", {"encoder.downsamples.x.residual.2.weight": torch.zeros(1)}, "malformed VAE encoder downsample"),
    ("encoder.conv1.", {}, "lacks 'encoder.conv1.weight'"),
    ("", {"encoder.conv1.weight": torch.zeros(8, 3, 3, 3)}, "expected 5 sizes"),
    ("", {"encoder.downsamples.0.residual.2.weight": torch.zeros(12, 8, 3, 3, 3)}, "not a multiple of the base width"),
])
def test_malformed_vae_is_a_checkpoint_error(tmp_path: Path, drop: str, edits: dict, match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        load_vae(_vae(tmp_path, drop, **edits))


def test_vae_starting_with_a_resample_is_refused(tmp_path: Path) -> None:
    sd = factory.make_checkpoint("vae", "official")
    first = {k: v for k, v in sd.items() if k.startswith("encoder.downsamples.0.")}
    sd = {k: v for k, v in sd.items() if k not in first}
    sd["encoder.downsamples.0.resample.1.weight"] = torch.zeros(8, 8, 3, 3)
    factory.save_safetensors(sd, tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match="neither a residual block nor a resample after one"):
        load_vae(tmp_path / "vae.safetensors")


@pytest.mark.parametrize("kind, layout, key", [
    ("t5", "hf", "encoder.block.100000.layer.0.layer_norm.weight"),
    ("t5", "fp8_e4m3fn", "blocks.7000000.norm1.weight"),
    ("clip", "hf", "vision_model.encoder.layers.9999999.layer_norm1.weight"),
])
def test_huge_layer_numbers_in_text_and_clip_encoders_are_refused(tmp_path: Path, kind: str, layout: str,
                                                                  key: str) -> None:
    sd = factory.make_checkpoint(kind, layout)
    sd[key] = torch.zeros(0)
    factory.save_safetensors(sd, tmp_path / "enc.safetensors")
    with pytest.raises(CheckpointError, match="numbered up to"):
        inspect_checkpoint(tmp_path / "enc.safetensors")


# ----------------------------------------------------------------- .pth files

@pytest.mark.parametrize("content, match", [
    (b"hello, this is a text file\n", "not a PyTorch checkpoint"),
    (b"PK\x03\x04" + b"\0" * 100, "zip archive is incomplete"),
    (b"\x80\x02" + b"\0" * 100, "legacy"),
])
def test_pth_that_is_not_a_checkpoint_is_a_checkpoint_error(tmp_path: Path, content: bytes, match: str) -> None:
    (tmp_path / "x.pth").write_bytes(content)
    _refused(tmp_path / "x.pth", match)


@pytest.mark.parametrize("obj", [{1: torch.ones(2)}, [torch.ones(2)], {"w": 3}, {"w": torch.ones(2).to_sparse()}])
def test_pth_without_a_flat_dict_of_dense_named_tensors_is_refused(tmp_path: Path, obj) -> None:
    torch.save(obj, tmp_path / "x.pth")
    _refused(tmp_path / "x.pth")


def test_pth_with_compressed_records_is_refused_before_unpickling(tmp_path: Path) -> None:
    """A deflated record could inflate to any size (a zip bomb); torch.save never compresses."""
    import zipfile

    torch.save({"w": torch.ones(2)}, tmp_path / "plain.pth")
    with zipfile.ZipFile(tmp_path / "plain.pth") as src, \
            zipfile.ZipFile(tmp_path / "bomb.pth", "w", compression=zipfile.ZIP_DEFLATED) as out:
        for member in src.infolist():
            out.writestr(member.filename, src.read(member.filename))
    _refused(tmp_path / "bomb.pth", "compressed or oversized records")


def test_legacy_torch_save_is_refused(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    _refused(tmp_path / "old.pth", "legacy")


# ----------------------------------------------------------------- messages never echo content

def test_error_messages_never_contain_the_content_of_a_non_checkpoint_file(tmp_path: Path) -> None:
    body = (SECRET + "\n") * 50
    files = []
    for name in ("secret.safetensors", "secret.pth", "secret.bin", "secret.ckpt", "secret", "secret.txt",
                 "s.safetensors.index.json", "s-00001-of-00001.safetensors"):
        (tmp_path / name).write_text(body)
        files.append(tmp_path / name)
    # the secret as a header: as a dtype, in metadata, as an index entry
    files.append(_write(tmp_path / "dtype.safetensors", {"w": _entry(dtype=SECRET)}))
    files.append(_write(tmp_path / "meta.safetensors", {"__metadata__": {"k": [SECRET]}, "w": _entry()}))
    files.append(_write(tmp_path / "json.safetensors", b'{"w": "' + SECRET.encode() + b'" oops}'))
    (tmp_path / "idx.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "secret.safetensors"}}))
    files.append(tmp_path / "idx.safetensors.index.json")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "only.safetensors").write_text(body)
    files.append(tmp_path / "dir")
    first8 = str(struct.unpack("<Q", SECRET.encode()[:8])[0])
    for f in files:
        for call in (open_checkpoint, inspect_checkpoint, load_dit):
            with pytest.raises(CheckpointError) as info:
                call(f)
            msg = str(info.value)
            assert SECRET not in msg and SECRET[:8] not in msg and first8 not in msg, (f.name, msg)


def test_printed_names_are_shortened_and_printable(tmp_path: Path) -> None:
    name = "\x1b[31m" + "x" * 5000
    _write(tmp_path / "bad.safetensors", {name: _entry(dtype="F99")})
    msg = _refused(tmp_path / "bad.safetensors", "F99")
    assert "\x1b" not in msg and len(msg) < 400


# ----------------------------------------------------------------- folders

def test_a_diffusers_model_folder_opens_its_weights(tmp_path: Path) -> None:
    # Folder resolution does not depend on the key layout: official names keep this test
    # free of the (slow to import) diffusers converters.
    vae_dir = tmp_path / "Wan2.1-Diffusers" / "vae"
    factory.write_checkpoint(vae_dir, "vae", "official", name="diffusion_pytorch_model.safetensors")
    (vae_dir / "config.json").write_text("{}")
    assert load_vae(vae_dir).checkpoint_report.kind == "vae"
    # a sharded transformer/ folder: its index
    sd = factory.make_checkpoint("dit", "official", cfg=MINI_DIT, dtype=torch.bfloat16)
    names = sorted(sd)
    tdir = tmp_path / "Wan2.1-Diffusers" / "transformer"
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:]), 1):
        fname = f"diffusion_pytorch_model-{i:05d}-of-00002.safetensors"
        factory.save_safetensors({k: sd[k] for k in part}, tdir / fname)
        weight_map.update({k: fname for k in part})
    (tdir / "config.json").write_text("{}")
    (tdir / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert load_dit(tdir).checkpoint_report.kind == "dit"
    (tdir / "diffusion_pytorch_model.safetensors.index.json").unlink()
    assert inspect_checkpoint(tdir).kind == "dit"          # the shard set, found by name
    # text_encoder/ (no embedded tokenizer): the tokenizer comes from the sibling tokenizer/
    factory.write_checkpoint(tmp_path / "Wan2.1-Diffusers" / "text_encoder", "t5", "hf", name="model.safetensors")
    (tmp_path / "Wan2.1-Diffusers" / "tokenizer").mkdir()
    (tmp_path / "Wan2.1-Diffusers" / "tokenizer" / "spiece.model").write_bytes(factory.TINY_SPIECE.read_bytes())
    assert load_text_encoder(tmp_path / "Wan2.1-Diffusers" / "text_encoder").encode(["a cat"])[0].shape[-1] == 64
    (tmp_path / "Wan2.1-Diffusers" / "model_index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="diffusers pipeline folder; give the model's own subfolder "
                                              r"\(text_encoder, tokenizer, transformer, vae\)"):
        load_dit(tmp_path / "Wan2.1-Diffusers")


def test_ambiguous_or_empty_folders_are_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no weights file"):
        open_checkpoint(tmp_path / "empty")
    two = tmp_path / "two"
    _shard(two, "a.safetensors")
    _shard(two, "b.safetensors")
    with pytest.raises(CheckpointError, match="several weights files \\(a.safetensors, b.safetensors\\)"):
        open_checkpoint(two)
    (two / "a.safetensors.index.json").write_text("{}")
    (two / "b.safetensors.index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="several sharded checkpoints"):
        open_checkpoint(two)
    mixed = tmp_path / "mixed"          # one safetensors beside a .bin: the safetensors wins
    _shard(mixed, "model.safetensors")
    torch.save({"w": torch.ones(2)}, mixed / "model.bin")
    assert open_checkpoint(mixed).path.name == "model.safetensors"


# ----------------------------------------------------------------- non-finite weights

@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_dit_weight_is_refused_naming_the_tensor(tmp_path: Path, value: float) -> None:
    sd = factory.make_checkpoint("dit", "official", cfg=MINI_DIT)
    sd["blocks.1.self_attn.q.weight"][3, 5] = value
    sd["head.modulation"][0, 0, 0] = value
    factory.save_safetensors(sd, tmp_path / "nan.safetensors")
    with pytest.raises(NonFiniteError, match=r"nan\.safetensors: 2 tensor\(s\) hold NaN or Inf values: "
                                             r"'blocks\.1\.self_attn\.q\.weight', 'head\.modulation'") as info:
        load_dit(tmp_path / "nan.safetensors")
    assert isinstance(info.value, CheckpointError)


@pytest.mark.parametrize("layout, bad", [("fp8_e4m3fn", "nan"), ("fp8_e5m2", "inf"), ("fp8_e5m2", "nan"),
                                         ("scaled_fp8", "inf"), ("scaled_fp8", "1e38")])
def test_non_finite_fp8_weight_or_scale_is_refused(tmp_path: Path, layout: str, bad: str) -> None:
    sd = factory.make_checkpoint("dit", layout, cfg=MINI_DIT)
    key = "blocks.0.ffn.0.weight"
    if layout == "scaled_fp8":      # an Inf scale, or one that overflows the real weight
        sd["blocks.0.ffn.0.scale_weight"] = torch.tensor(float(bad))
    else:
        sd[key][0, 0] = float(bad)
    factory.save_safetensors(sd, tmp_path / "f8.safetensors")
    for dtype in (None, torch.bfloat16):             # kept fp8, and dequantised
        with pytest.raises(NonFiniteError, match=f"'{key}'"):
            load_dit(tmp_path / "f8.safetensors", dtype=dtype)


@pytest.mark.parametrize("fmt", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_finiteness_check_agrees_with_an_upcast_on_every_bit_pattern(fmt: torch.dtype) -> None:
    every = torch.arange(256, dtype=torch.uint8).view(fmt)
    finite = torch.isfinite(every.float())
    pad = torch.zeros(7, dtype=torch.uint8).view(fmt)
    for b in range(256):
        assert all_finite(torch.cat([pad, every[b:b + 1], pad])) == bool(finite[b]), hex(b)
    assert all_finite(every[finite], torch.tensor(1e-3))
    assert not all_finite(every[finite], torch.tensor(float("nan")))
    assert not all_finite(every[finite], torch.tensor(1e38))       # finite, but the product is not


def test_non_finite_vae_weight_is_refused(tmp_path: Path) -> None:
    sd = factory.make_checkpoint("vae", "official")
    sd["decoder.head.2.weight"][0, 0, 0, 0, 0] = float("inf")
    torch.save(sd, tmp_path / "vae.pth")
    with pytest.raises(NonFiniteError, match=r"vae\.pth: 1 tensor\(s\) hold NaN or Inf values: 'decoder\.head\.2\.weight'"):
        load_vae(tmp_path / "vae.pth")


def test_weights_that_overflow_the_storage_dtype_are_named(tmp_path: Path) -> None:
    sd = factory.make_checkpoint("vae", "official")
    sd["conv1.weight"][0, 0, 0, 0, 0] = 1e6                  # fine in float32, inf in float16
    factory.save_safetensors(sd, tmp_path / "vae.safetensors")
    load_vae(tmp_path / "vae.safetensors")
    with pytest.raises(NonFiniteError, match="overflow to Inf when stored as float16: 'conv1.weight'"):
        load_vae(tmp_path / "vae.safetensors", dtype=torch.float16)


# ----------------------------------------------------------------- fuzz

_ODD_VALUES = [-1, 0, 1, 2**31, 2**40, 2**64, 1.5, "7", None, True, [], {}, [1, [2]], "F32", "blocks.9"]


def _mutate_header(rng: random.Random, header: dict) -> dict | bytes:
    h = json.loads(json.dumps(header))
    names = [k for k in h if k != "__metadata__"]
    name = rng.choice(names)
    entry = h[name]
    op = rng.randrange(10)
    if op == 0:
        entry["shape"][rng.randrange(len(entry["shape"]))] = rng.choice(_ODD_VALUES) if entry["shape"] else 0
    elif op == 1:
        entry["dtype"] = rng.choice(["F16", "F32", "BF16", "F8_E4M3", "I64", "U8", "X", 3, None])
    elif op == 2:
        i = rng.randrange(2)
        entry["data_offsets"][i] = entry["data_offsets"][i] + rng.choice([-8, -1, 1, 2, 10**9, -10**9])
    elif op == 3:
        entry["data_offsets"] = list(h[rng.choice(names)]["data_offsets"])       # alias another tensor
    elif op == 4:
        h[rng.choice(["blocks.", "blocks.1", "blocks.x.", "blocks.64.", "blocks.1e9."]) + "y"] = entry
    elif op == 5:
        del h[name]
    elif op == 6:
        h["__metadata__"] = rng.choice(_ODD_VALUES)
    elif op == 7:
        entry[rng.choice(["dtype", "shape", "data_offsets"])] = rng.choice(_ODD_VALUES)
    elif op == 8:
        h[name] = rng.choice(_ODD_VALUES)
    else:
        entry["shape"] = entry["shape"][::-1] + ([1] if rng.random() < 0.5 else [])
    return h


def test_fuzzed_headers_only_ever_raise_checkpoint_error(tmp_path: Path) -> None:
    """300 seeded mutations of a real (tiny) DiT file: byte flips in the header and the data,
    JSON field mutations, truncations and bad length prefixes. Each either loads or raises
    CheckpointError, within bounded time and memory."""
    cfg = DiTConfig(dim=128, ffn_dim=32, num_layers=1, text_dim=16, freq_dim=16)    # 0.4 MB
    src = factory.write_checkpoint(tmp_path, "dit", "official", cfg=cfg, dtype=torch.bfloat16)
    data = src.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    rng = random.Random(1234)
    target = tmp_path / "fuzz.safetensors"
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    outcomes = {"loaded": 0, "refused": 0}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # tiny tensors: a busy thread pool only adds overhead
    try:
        _fuzz(rng, data, n, header, body, target, outcomes)
    finally:
        torch.set_num_threads(threads)
    elapsed = time.perf_counter() - t0
    growth_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert outcomes["refused"] > 150 and outcomes["loaded"] > 5, outcomes
    assert elapsed < 20, f"300 fuzz cases took {elapsed:.1f} s"
    assert growth_kb < 200 * 1024, f"peak RSS grew by {growth_kb / 1024:.0f} MB"


def _fuzz(rng: random.Random, data: bytes, n: int, header: dict, body: bytes, target: Path,
          outcomes: dict[str, int]) -> None:
    for case in range(300):
        kind = case % 5
        if kind == 0:          # byte flips in the header
            buf = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                buf[rng.randrange(8, 8 + n)] = rng.randrange(256)
        elif kind == 1:        # JSON-level mutation, sometimes with a stale length prefix
            mutated = _mutate_header(rng, header)
            buf = bytearray(raw_safetensors(mutated, body))
            if rng.random() < 0.2:
                buf[:8] = struct.pack("<Q", max(0, n + rng.choice([-5, -1, 1, 7])))
        elif kind == 2:        # truncation anywhere
            buf = bytearray(data[: rng.randrange(0, len(data))])
        elif kind == 3:        # bad length prefix
            buf = bytearray(data)
            buf[:8] = struct.pack("<Q", rng.choice([0, 1, n - 1, n + 1, len(data), 2**63, rng.randrange(2**64)]))
        else:                  # byte flips in the tensor data (NaN/Inf patterns among them)
            buf = bytearray(data)
            for _ in range(rng.randint(1, 3)):
                i = rng.randrange(8 + n, len(data) - 1) & ~1       # a whole bf16 value
                buf[i:i + 2] = rng.choice([b"\xc0\x7f", b"\x80\x7f", b"\x80\xff", bytes([rng.randrange(256)] * 2)])
        target.write_bytes(bytes(buf))
        try:
            load_dit(target)
            outcomes["loaded"] += 1
        except CheckpointError:
            outcomes["refused"] += 1
        except Exception as err:       # anything else is the bug this test looks for
            raise AssertionError(f"fuzz case {case} (mutation kind {kind}) raised {type(err).__name__}") from err
