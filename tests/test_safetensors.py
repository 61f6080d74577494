"""smoe.io.safetensors: files agree with the safetensors package both ways, and every way a header can break the
format is refused with one error naming the file and the tensor."""

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from smoe.io.safetensors import (
    SafetensorsFile,
    load_tensors,
    save_tensors,
    write_safetensors,
    write_safetensors_streamed,
)

TENSORS = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(4),
           "d": torch.randn(2, 2).to(torch.float8_e4m3fn), "e": torch.zeros(0, 3), "f": torch.tensor(2.5),
           "g": torch.randn(2, 3).half(), "h": torch.tensor([True, False, True]),
           "i": torch.arange(6, dtype=torch.uint8).view(2, 3), "j": torch.randn(4).double()}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))


def test_files_we_write_load_identically_in_the_safetensors_package(tmp_path):
    save_tensors(tmp_path / "ours.safetensors", TENSORS, {"format": "pt", "note": "x"})
    loaded = load_file(tmp_path / "ours.safetensors")
    assert loaded.keys() == TENSORS.keys() and all(_same(loaded[k], TENSORS[k]) for k in TENSORS)
    with safe_open(tmp_path / "ours.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}


def test_files_the_safetensors_package_writes_load_identically(tmp_path):
    save_file(TENSORS, tmp_path / "theirs.safetensors", metadata={"format": "pt"})
    loaded = load_tensors(tmp_path / "theirs.safetensors")
    assert sorted(loaded) == sorted(TENSORS) and all(_same(loaded[k], TENSORS[k]) for k in TENSORS)
    with SafetensorsFile(tmp_path / "theirs.safetensors") as f:
        assert f.metadata == {"format": "pt"}
        for name in f.keys():  # the zero-copy path
            assert _same(f.view(name), TENSORS[name]), name
            f.release(name)


def test_load_tensors_copies_out_of_the_map_in_file_order(tmp_path):
    write_safetensors(tmp_path / "x.safetensors", [("z", torch.ones(2)), ("a", torch.zeros(3))])
    loaded = load_tensors(tmp_path / "x.safetensors")
    assert list(loaded) == ["z", "a"] and SafetensorsFile(tmp_path / "x.safetensors").metadata == {}
    loaded["z"] += 1  # its own memory, writable, alive after the file is closed
    assert loaded["z"].tolist() == [2.0, 2.0]


def test_writer_refuses_a_repeated_name(tmp_path):
    with pytest.raises(ValueError, match=r"x\.safetensors: a is given twice"):
        write_safetensors(tmp_path / "x.safetensors", [("a", torch.ones(1)), ("a", torch.ones(1))])


# --- hand-made headers -------------------------------------------------------------------------------------------


def _file(tmp_path, header, data: bytes = b"", raw: bytes | None = None):
    """A file with ``header`` (any JSON value, or ``raw`` bytes) followed by ``data``."""
    blob = raw if raw is not None else json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path = tmp_path / "hand.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def _refused(tmp_path, header, match, data=bytes(8), raw=None):
    with pytest.raises(ValueError, match=match):
        SafetensorsFile(_file(tmp_path, header, data, raw))


def test_a_well_formed_hand_made_file_opens(tmp_path):
    header = {"__metadata__": {"k": "v"}, "x": _entry(), "y": _entry("U8", (0,), (8, 8)),
              "z": _entry("I8", (3,), (8, 11))}
    with SafetensorsFile(_file(tmp_path, header, bytes(11))) as f:
        assert list(f.keys()) == ["x", "y", "z"] and f.metadata == {"k": "v"}


def test_header_that_is_an_array_is_refused(tmp_path):
    _refused(tmp_path, [1, 2], r"hand\.safetensors \(safetensors header\): expected an object at the top level")


def test_header_nested_too_deep_is_refused(tmp_path):
    _refused(tmp_path, None, r"hand\.safetensors \(safetensors header\): not valid JSON \(nested too deep\)",
             raw=b"[" * 100000 + b"]" * 100000)


def test_header_that_is_not_json_is_refused(tmp_path):
    _refused(tmp_path, None, r"hand\.safetensors \(safetensors header\): not valid JSON", raw=b"{nope")


@pytest.mark.parametrize("metadata", [["a"], {"k": 1}, None])
def test_metadata_must_map_strings_to_strings(tmp_path, metadata):
    _refused(tmp_path, {"__metadata__": metadata, "x": _entry()}, r"hand\.safetensors: __metadata__ must be an object")


def test_entry_must_be_an_object(tmp_path):
    _refused(tmp_path, {"x": [0, 8]}, r"hand\.safetensors: tensor 'x' must be an object")


@pytest.mark.parametrize("dtype", ["F17", None, 4])
def test_unknown_dtype_is_refused(tmp_path, dtype):
    _refused(tmp_path, {"x": _entry(dtype)}, r"hand\.safetensors: tensor 'x' has unsupported dtype")


@pytest.mark.parametrize("shape", [[-2], [True, 2], [2.0], ["2"], "2", None])
def test_shape_must_be_non_negative_integers(tmp_path, shape):
    _refused(tmp_path, {"x": {**_entry(), "shape": shape}}, r"hand\.safetensors: tensor 'x' has shape .*; expected")


@pytest.mark.parametrize("offsets", [[0], [0, 8, 8], [-8, 0], [0.0, 8], [False, 8], [8, 0], None])
def test_data_offsets_must_be_two_ordered_non_negative_integers(tmp_path, offsets):
    _refused(tmp_path, {"x": {**_entry(), "data_offsets": offsets}},
             r"hand\.safetensors: tensor 'x' has data_offsets .*; expected \[begin, end\]")


def test_byte_count_must_match_the_shape(tmp_path):
    _refused(tmp_path, {"x": _entry(shape=(3,))}, r"hand\.safetensors: tensor 'x' has 8 bytes for shape \[3\]")


def test_first_tensor_must_begin_at_the_start_of_the_data(tmp_path):
    _refused(tmp_path, {"x": _entry(offsets=(4, 12))}, r"tensor 'x' leaves a gap after the start of the data",
             data=bytes(12))


def test_overlapping_tensors_are_refused(tmp_path):
    _refused(tmp_path, {"x": _entry(), "y": _entry(offsets=(4, 12))}, r"tensor 'y' overlaps the end of 'x'",
             data=bytes(12))


def test_two_tensors_on_the_same_bytes_are_refused(tmp_path):
    _refused(tmp_path, {"x": _entry(), "y": _entry()}, r"hand\.safetensors: tensor '[xy]' overlaps the end of")


def test_a_hole_between_tensors_is_refused(tmp_path):
    _refused(tmp_path, {"x": _entry(), "y": _entry(offsets=(12, 20))}, r"tensor 'y' leaves a gap after the end of 'x'",
             data=bytes(20))


def test_trailing_bytes_are_refused(tmp_path):
    _refused(tmp_path, {"x": _entry()}, r"hand\.safetensors: 4 trailing bytes after the last tensor 'x'",
             data=bytes(12))


def test_truncated_data_is_refused(tmp_path):
    _refused(tmp_path, {"x": _entry(), "y": _entry(offsets=(8, 16))}, r"hand\.safetensors: truncated; y ends at byte",
             data=bytes(12))


def test_a_file_streams_in_chunks_and_data_that_disagrees_with_its_header_is_refused(tmp_path):
    x, y = torch.randn(4, 3), torch.arange(6, dtype=torch.int8)
    entries = [("x", torch.float32, (4, 3)), ("y", torch.int8, (6,))]
    write_safetensors_streamed(tmp_path / "a.safetensors", entries, [x[:1], torch.empty(0), x[1:], y[:2], y[2:]])
    loaded = load_file(tmp_path / "a.safetensors")
    assert torch.equal(loaded["x"], x) and torch.equal(loaded["y"], y)
    for data, message in [([x, y.float()], "the data for y"), ([x], "the data for y"), ([x, y, y], "more data"),
                          ([torch.randn(5, 3)], "the data for x")]:
        with pytest.raises(ValueError, match=message):
            write_safetensors_streamed(tmp_path / "b.safetensors", entries, data)
