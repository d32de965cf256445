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


def sketch_memory(
    model, targets: dict, nsamples: int, seqlen: int, max_memory: int | None = None, dense_bytes: int = 2
) -> dict[str, int]:
    """Bytes the streaming sketcher holds at its peak for ``model`` (built on the meta device).

    The terms of ``README``'s table: one decoder block in float32, the workspace of its largest
    linear (bounded by ``max_memory``), the Hessian matrices of the widest input (calibrated: the
    collected sum, its scaled copy and the factors, at most five ``[in, in]`` float32 at once), the
    calibration activations (inputs and outputs of a block, float32; zero with
    ``--offload-activations``) and the largest tensor outside the blocks (copied through once).
    """
    from .driver import find_blocks

    blocks_name, blocks = find_blocks(model, targets)
    block_params = max(sum(p.numel() for p in block.parameters()) for block in blocks)
    inside = [m for name, m in targets.items() if name.startswith(blocks_name + ".")]
    widest = max(m.in_features for m in inside)
    largest = max(m.in_features * m.out_features for m in inside)
    budget = DEFAULT_MAX_MEMORY if max_memory is None else max_memory
    outside = [p.numel() for name, p in model.named_parameters() if not name.startswith(blocks_name + ".")]
    hidden = model.config.hidden_size
    return {
        "block_float32_bytes": 4 * block_params,
        "workspace_bytes": min(budget, largest * WORKSPACE_BYTES_PER_WEIGHT) + 100 * (1 << 20),
        "hessian_bytes": 5 * 4 * widest * widest if nsamples else 0,
        "activation_bytes": 2 * nsamples * seqlen * hidden * 4,
        "largest_outside_bytes": max(outside, default=0) * dense_bytes,
    }


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
