"""How many rows of a weight are sketched at once: a memory budget, not the matrix, sets the workspace.

Every step of sketching one linear (k-means per row-group, error feedback, table refit) treats
each output row on its own; only the Hessian and its factor are shared by all rows. So the rows
are sketched in chunks whose workspace (float copies, int64 codes, refit gathers: about
``WORKSPACE_BYTES_PER_WEIGHT`` bytes per weight of the chunk) fits a budget, instead of growing
with the matrix: a 70B MLP matrix (28672 x 8192) would need 15 GB at once. (k-means chunks its rows
more finely on its own, see :data:`.kmeans.CHUNK_ELEMENTS`.) Chunks are whole multiples of
``ROW_QUANTUM`` rows, so that BLAS picks the same kernel for every chunk and a row's result does
not depend on the chunk size.
"""

from __future__ import annotations

import re

DEFAULT_MAX_MEMORY = 1 << 30
ROW_QUANTUM = 64
WORKSPACE_BYTES_PER_WEIGHT = 64


def row_chunks(out_features: int, in_features: int, max_memory: int | None = None) -> list[slice]:
    """Row ranges whose sketching workspace fits ``max_memory`` bytes (``None``: the default budget)."""
    budget = DEFAULT_MAX_MEMORY if max_memory is None else max_memory
    rows = budget // max(1, in_features * WORKSPACE_BYTES_PER_WEIGHT)
    rows = max(ROW_QUANTUM, rows // ROW_QUANTUM * ROW_QUANTUM)
    return [slice(start, min(start + rows, out_features)) for start in range(0, out_features, rows)]


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_memory(text: str) -> int:
    """Bytes from ``"2GiB"``, ``"1.5GB"``, ``"800M"`` or ``"1073741824"`` (``ValueError`` otherwise)."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a memory size (expected e.g. 2GiB, 1.5GB, 800MB or a number of bytes)")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    binary = "i" in unit
    letter = unit.replace("i", "").replace("b", "")
    scale = (1 << (10 * "kmgt".index(letter) + 10)) if binary and letter else _UNITS[letter]
    value = int(number * scale)
    if value < 1:
        raise ValueError(f"{text!r}: a memory size must be at least 1 byte")
    return value
