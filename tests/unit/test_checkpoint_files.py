"""Opening checkpoint files: lazy safetensors reading, safe .pth loading, clear errors."""
from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from wan_core.files import CheckpointError, open_checkpoint


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(4, 3, generator=g),
        "b.bias": torch.randn(5, generator=g).to(torch.bfloat16),
        "c.fp8": torch.randn(2, 8, generator=g).to(torch.float8_e4m3fn),
        "d.e5m2": torch.randn(3, generator=g).to(torch.float8_e5m2),
        "e.ids": torch.arange(7, dtype=torch.int64),
        "f.bytes": torch.tensor([1, 2, 3], dtype=torch.uint8),
        "g.half": torch.randn(2, 2, generator=g).half(),
    }


def test_safetensors_reads_every_dtype_bit_for_bit(tmp_path: Path) -> None:
    sd = _tensors()
    save_file(sd, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    with open_checkpoint(tmp_path / "x.safetensors") as tf:
        assert set(tf.keys()) == set(sd)
        assert tf.metadata == {"format": "pt"}
        for k, v in sd.items():
            assert tf.shape(k) == tuple(v.shape) and tf.dtype(k) == v.dtype
            got = tf.read(k)
            assert got.dtype == v.dtype
            assert torch.equal(got.view(torch.uint8), v.view(torch.uint8))


def test_pth_loads_through_weights_only(tmp_path: Path) -> None:
    sd = _tensors()
    torch.save(sd, tmp_path / "x.pth")
    with open_checkpoint(tmp_path / "x.pth") as tf:
        for k, v in sd.items():
            assert torch.equal(tf.read(k).view(torch.uint8), v.view(torch.uint8))


def test_pth_wrapped_in_state_dict_key_is_unwrapped(tmp_path: Path) -> None:
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "x.pth")
    with open_checkpoint(tmp_path / "x.pth") as tf:
        assert tf.keys() == ["w"]


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_malicious_pickle_is_refused_and_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"w": torch.ones(2), "x": _Payload(str(marker))}, evil)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=r"evil\.pth: refused: this \.pth needs to run arbitrary code"):
        open_checkpoint(evil)
    assert not marker.exists()


def test_raw_pickle_with_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned2"
    evil = tmp_path / "evil_raw.pt"
    evil.write_bytes(pickle.dumps(_Payload(str(marker)), protocol=2))
    with pytest.raises(CheckpointError, match="evil_raw.pt"):
        open_checkpoint(evil)
    assert not marker.exists()


def test_truncated_safetensors_is_reported_before_reading(tmp_path: Path) -> None:
    save_file(_tensors(), str(tmp_path / "full.safetensors"))
    data = (tmp_path / "full.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: the file is truncated: .* \(10 missing\)"):
        open_checkpoint(cut)
    cut.write_bytes(data[:50])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: the file is truncated: its header alone"):
        open_checkpoint(cut)
    cut.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="too short to be a safetensors file"):
        open_checkpoint(cut)


def test_corrupt_header_and_empty_file_are_reported(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    body = b"{not json"
    bad.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: the safetensors header is not valid JSON"):
        open_checkpoint(bad)
    bad.write_bytes(struct.pack("<Q", 1 << 40) + b"x" * 16)
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        open_checkpoint(bad)
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    bad.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(CheckpointError, match="claims 8 bytes but its shape"):
        open_checkpoint(bad)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.safetensors: the file is empty"):
        open_checkpoint(empty)
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "nope.safetensors")


def test_truncated_pth_is_reported(tmp_path: Path) -> None:
    torch.save(_tensors(), tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pth: cannot read this \.pth .* truncated or corrupt"):
        open_checkpoint(tmp_path / "cut.pth")


def test_sharded_safetensors_open_as_one_file(tmp_path: Path) -> None:
    sd = _tensors()
    names = sorted(sd)
    parts = [names[:3], names[3:]]
    weight_map = {}
    for i, part in enumerate(parts, 1):
        fname = f"diffusion_pytorch_model-{i:05d}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, str(tmp_path / fname))
        weight_map.update({k: fname for k in part})
    index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for entry in (index, tmp_path / "diffusion_pytorch_model-00002-of-00002.safetensors"):
        with open_checkpoint(entry) as tf:
            assert set(tf.keys()) == set(sd)
            for k in names:
                assert torch.equal(tf.read(k).view(torch.uint8), sd[k].view(torch.uint8))
    (tmp_path / "diffusion_pytorch_model-00001-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="these parts are missing next to it: diffusion_pytorch_model-00001"):
        open_checkpoint(index)


def test_corrupt_gguf_is_a_checkpoint_error(tmp_path: Path) -> None:
    # GGUF itself is read by wan_core.gguf (tests/unit/test_gguf*.py); a broken one is refused here.
    f = tmp_path / "wan.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"wan\.gguf"):
        open_checkpoint(f)
