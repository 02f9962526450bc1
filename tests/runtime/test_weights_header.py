"""model.safetensors' header, read by hand: the same entries as safetensors reads, and
every malformed header refused before a tensor is touched."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llmctl.runtime.checkpoint_data import CheckpointError
from llmctl.runtime.weights_header import check_header, read_header


@pytest.fixture
def weights(tmp_path):
    file = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(3, 4), "b": torch.ones(5, dtype=torch.bfloat16)}, str(file),
              metadata={"aliases": json.dumps({"c": "a"})})
    return file


def _with_header(file, edit) -> None:
    raw = file.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    file.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + length:])


def test_entries_are_safetensors_own(weights):
    entries, metadata = read_header(weights)
    with safe_open(str(weights), framework="pt") as f:
        assert entries == {name: (f.get_slice(name).get_dtype(),
                                  tuple(f.get_slice(name).get_shape()))
                           for name in f.keys()}  # noqa: SIM118
        assert metadata == f.metadata()
    assert check_header(weights, {"a": (3, 4), "b": (5,), "c": (3, 4)}) == {"c": "a"}


def test_every_mismatch_is_listed(weights):
    with pytest.raises(CheckpointError) as caught:
        check_header(weights, {"a": (4, 3), "d": (1,)})
    message = str(caught.value)
    for needle in ("a: checkpoint has (3, 4), model needs (4, 3)", "missing d (1,)",
                   "unexpected b", "unexpected c"):
        assert needle in message


@pytest.mark.parametrize("edit, needle", [
    (lambda h: h["a"].update(shape="3x4"), "has no dtype, shape and data offsets"),
    (lambda h: h["a"].update(shape=[-3, 4]), "has no dtype, shape and data offsets"),
    (lambda h: h["a"].update(data_offsets=[40, 8]), "has no dtype, shape and data offsets"),
    (lambda h: h.update(__metadata__={"aliases": 7}), "metadata must map names to strings"),
    (lambda h: h.update(__metadata__=[]), "metadata must map names to strings"),
    (lambda h: h["b"].update(data_offsets=[48, 50]), "its tensors end at byte"),
])
def test_malformed_headers_are_refused(weights, edit, needle):
    _with_header(weights, edit)
    with pytest.raises(CheckpointError, match=needle):
        read_header(weights)


def test_trailing_bytes_and_a_header_past_the_end(weights):
    with open(weights, "ab") as f:
        f.write(b"\0" * 16)
    with pytest.raises(CheckpointError, match="its tensors end at byte"):
        read_header(weights)
    weights.write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="a header of 1,099,511,627,776 bytes"):
        read_header(weights)
    weights.write_bytes(b"\x02\0\0\0\0\0\0\0[]")
    with pytest.raises(CheckpointError, match="not a JSON object"):
        read_header(weights)
