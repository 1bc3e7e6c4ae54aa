"""The streaming safetensors reader and writer against safetensors' own (bytes, tensors, hashes)."""

from __future__ import annotations

import hashlib
import struct

import pytest
import torch
from safetensors.torch import load_file, save

from library.utils.errors import UserError
from library.utils.safetensors_io import iter_tensors, read_header, read_tensors, save_safetensors
from tests.conftest import kohya_hashes

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]


def _random_state(seed: int, n: int = 30) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(n):
        dtype = DTYPES[int(torch.randint(len(DTYPES), (), generator=g))]
        shape = torch.randint(0, 5, (int(torch.randint(0, 4, (), generator=g)),), generator=g).tolist()
        state[f"k{int(torch.randint(100, (), generator=g))}.w{i}"] = (torch.randn(shape, generator=g) * 9).to(dtype)
    return state


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_files_are_safetensors_own_bytes(tmp_path, seed):
    state = _random_state(seed)
    path = tmp_path / "a.safetensors"
    # one metadata key: safetensors' writer orders several at random, so only one compares bytewise
    save_safetensors(state, path, {"ss_note": "é\n1"})
    assert path.read_bytes() == save(state, metadata={"ss_note": "é\n1"})
    for metadata in (None, {}):  # no metadata, and an empty one (written as such by both)
        save_safetensors(state, path, metadata)
        assert path.read_bytes() == save(state, metadata=metadata)
    back = read_tensors(path)
    assert list(back) == list(dict(iter_tensors(path)))
    for key, value in state.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


def test_hashes_are_kohyas_and_the_files_own(tmp_path):
    state = {f"lora.{i}.weight": torch.randn(200, 300) for i in range(6)}  # 1.4 MB: past the 1 MiB window
    meta = {"ss_network_dim": "4", "modelspec.title": "x" * 300, "sshs_model_hash": "stale"}
    path = tmp_path / "h.safetensors"
    save_safetensors(state, path, meta, model_hashes=True)
    written = read_header(path).metadata
    assert (written["sshs_model_hash"], written["sshs_legacy_hash"]) == kohya_hashes(state, meta)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert written["sshs_model_hash"] == hashlib.sha256(data[8 + n:]).hexdigest()  # AUTOMATIC1111's definition
    assert written["modelspec.title"] == "x" * 300


def test_hashes_with_a_header_past_one_mebibyte(tmp_path):
    state = {"w": torch.arange(1000, dtype=torch.float32)}
    meta = {"ss_dataset_dirs": "y" * (1 << 20)}  # the legacy window starts inside the header
    save_safetensors(state, tmp_path / "big.safetensors", meta, model_hashes=True)
    written = read_header(tmp_path / "big.safetensors").metadata
    assert (written["sshs_model_hash"], written["sshs_legacy_hash"]) == kohya_hashes(state, meta)


def test_cast_as_written(tmp_path):
    state = {"a": torch.randn(5, 3), "b": torch.arange(4), "c": torch.randn(2).to(torch.bfloat16)}
    save_safetensors(state, tmp_path / "c.safetensors", dtype=torch.float16)
    back = load_file(str(tmp_path / "c.safetensors"))
    assert back["a"].dtype == torch.float16 and torch.equal(back["a"], state["a"].half())
    assert torch.equal(back["b"], state["b"]) and back["c"].dtype == torch.float16
    assert state["a"].dtype == torch.float32  # the caller's tensors are untouched


def test_damaged_files_are_named(tmp_path):
    good = tmp_path / "g.safetensors"
    save_safetensors({"w": torch.randn(64, 64)}, good)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(UserError, match=r"cut\.safetensors.*past the end of the file"):
        read_tensors(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(struct.pack("<Q", 4) + b"nope")
    with pytest.raises(UserError, match=r"junk\.safetensors: not a safetensors file"):
        read_header(junk)
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"abc")
    with pytest.raises(UserError, match="too short"):
        read_header(short)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(UserError, match="corrupt safetensors header"):
        read_header(huge)


def test_cast_as_read_and_only_the_asked_prefixes(tmp_path):
    """dtype casts floating tensors as each is read (equal to casting afterwards; integers and
    tensors already in that dtype untouched); prefixes leave the other tensors unread."""
    state = {"unet.a": torch.randn(7, 5).half(), "unet.b": torch.arange(6), "unet.c": torch.randn(3).bfloat16(),
             "unet.big": torch.randn(40, 40).half(), "unet.d": torch.randn(4), "ema.a": torch.randn(9, 9).half(),
             "unet.empty": torch.zeros(0, 3).half()}
    path = tmp_path / "m.safetensors"
    save_safetensors(state, path)
    back = read_tensors(path, dtype=torch.float32, prefixes=("unet.",))
    assert set(back) == {k for k in state if k.startswith("unet.")}
    for key, value in back.items():
        expected = state[key].float() if state[key].is_floating_point() else state[key]
        assert value.dtype == expected.dtype and torch.equal(value, expected), key
    # the staging buffer is shared between reads: tensors read later must not change earlier ones
    assert torch.equal(back["unet.a"], state["unet.a"].float())
    assert set(read_tensors(path, prefixes=("ema.", "unet.c"))) == {"ema.a", "unet.c"}
    halves = dict(iter_tensors(path, dtype=torch.float16))
    assert halves["unet.d"].dtype == torch.float16 and torch.equal(halves["unet.d"], state["unet.d"].half())
