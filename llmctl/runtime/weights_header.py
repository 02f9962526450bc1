"""model.safetensors' header read by hand, with a bound, and checked against the model
before a tensor is read or the file mapped: a stray 8 GiB tensor, a wrong shape or dtype, or
alias metadata naming nothing is refused from the header alone, every mismatch listed."""

from __future__ import annotations

import json
import math
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..core.bounds import loads_json
from ..core.errors import preview
from ..core.files import file_kind
from .checkpoint_data import CheckpointError

HEADER_LIMIT = 100 << 20  # safetensors' own bound on its JSON header
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def read_header(file: Path) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """({tensor name: (dtype, shape)}, metadata) of a safetensors file, its header checked for
    form and for ending where the file ends."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{file} is truncated or corrupted ({why}); restore it from "
                                  "a good copy or use another checkpoint")

    info = file.stat()
    if not stat.S_ISREG(info.st_mode):  # opening a FIFO would block
        raise CheckpointError(f"{file} is {file_kind(info.st_mode)}, not a regular file")
    size = info.st_size
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or length > min(HEADER_LIMIT, size - 8):
            raise bad(f"a header of {length:,} bytes in a file of {size:,}")
        raw = f.read(length)
    try:
        header = loads_json(raw.decode("utf-8"), f"the header of {file}")
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise bad(f"its header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad(f"its metadata must map names to strings, got {preview(metadata)}")
    entries, end = {}, 0
    for name, entry in header.items():
        if not isinstance(entry, dict) or not _is_entry(entry):
            raise bad(f"tensor {preview(name)} has no dtype, shape and data offsets: "
                      f"{preview(entry)}")
        entries[name] = (entry["dtype"], tuple(entry["shape"]))
        end = max(end, entry["data_offsets"][1])
    if 8 + length + end != size:
        raise bad(f"its tensors end at byte {8 + length + end:,} of {size:,}")
    return entries, metadata


def _is_entry(entry: dict) -> bool:
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    return (isinstance(entry.get("dtype"), str) and isinstance(shape, list)
            and all(type(n) is int and n >= 0 for n in shape)
            and isinstance(offsets, list) and len(offsets) == 2
            and all(type(n) is int and n >= 0 for n in offsets) and offsets[0] <= offsets[1])


def parse_aliases(metadata: Mapping[str, str], file: Path) -> Any:
    """The tied-tensor aliases recorded in the metadata ({name: stored name}), unchecked."""
    try:
        return loads_json(metadata.get("aliases", "{}"), f"the 'aliases' metadata of {file}")
    except json.JSONDecodeError:
        return None


def header_problems(entries: Mapping[str, tuple[str, tuple[int, ...]]], aliases: Any,
                    shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """What in the stored tensors and their aliases does not fit the model's `shapes`."""
    if not isinstance(aliases, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v in entries
            for k, v in aliases.items()):
        return [f"its 'aliases' metadata must map tensor names to stored tensors, got "
                f"{preview(aliases)}"]
    found = {name: shape for name, (_, shape) in entries.items()}
    found.update({name: found[target] for name, target in aliases.items()})
    problems = [f"missing {name} {shape}" for name, shape in shapes.items() if name not in found]
    problems += [f"unexpected {name}" for name in found if name not in shapes]
    problems += [f"{name}: checkpoint has {found[name]}, model needs {shape}"
                 for name, shape in shapes.items() if name in found and found[name] != shape]
    problems += [f"{name}: dtype {dtype} is not a float"
                 for name, (dtype, _) in entries.items() if dtype not in FLOAT_DTYPES]
    return problems


def check_header(file: Path, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, str]:
    """The aliases of a safetensors file whose header fits `shapes`; a CheckpointError
    listing every mismatch otherwise."""
    entries, metadata = read_header(file)
    aliases = parse_aliases(metadata, file)
    problems = header_problems(entries, aliases, shapes)
    if problems:
        shown = "\n  ".join(problems[:10]) + (f"\n  ... {len(problems) - 10} more"
                                               if len(problems) > 10 else "")
        raise CheckpointError(f"weights in {file} do not fit the model its config.json "
                                 f"describes:\n  {shown}")
    return aliases


def stored_numbers(entries: Mapping[str, tuple[str, tuple[int, ...]]]) -> int:
    """How many numbers the tensors of a header hold."""
    return sum(math.prod(shape) for _, shape in entries.values())
