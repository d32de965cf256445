"""Checks of a sketched checkpoint against the model it belongs to (built on the meta device).

:func:`spallm_plugins.format.validate_checkpoint_files` checks what the files alone can tell; this
module adds what needs the architecture: that every linear the config selects is stored, with
exactly the shapes its layer needs. For transformers and PEFT users; vLLM checks the headers and
its own layer shapes.
"""

from __future__ import annotations

import os

from torch import nn

from .config import SketchConfig, packed_width
from .convert import resolve_targets
from .format import CODES_SUFFIX, TABLES_SUFFIX, CheckpointError, read_headers, validate_checkpoint_files
from .models import meta_model_from_config

ShapePair = tuple[tuple[int, ...], tuple[int, ...]]


def expected_shapes(model: nn.Module, config: SketchConfig) -> dict[str, ShapePair]:
    """``prefix -> (codes shape, tables shape)`` that ``config`` gives the targets of ``model``."""
    return {
        name: (
            (m.out_features, packed_width(m.in_features, config.bits)),
            (m.out_features, config.groups_per_row, config.num_codes),
        )
        for name, m in resolve_targets(model, config).items()
    }


def validate_against_model(
    shapes: dict[str, tuple[tuple[int, ...], str]], expected: dict[str, ShapePair], where: str
) -> None:
    """Every linear the config selects must be stored with exactly the shapes its layer needs."""
    stored = {n[: -len(CODES_SUFFIX)] for n in shapes if n.endswith(CODES_SUFFIX)}
    missing = sorted(set(expected) - stored)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{where}: no codes stored for sketched linear(s) {missing[:3]}{more}")
    extra = sorted(stored - set(expected))
    if extra:
        raise CheckpointError(f"{where}: tensor {extra[0]}{CODES_SUFFIX} belongs to no linear the config selects")
    for prefix, (codes_shape, tables_shape) in expected.items():
        for suffix, want in ((CODES_SUFFIX, codes_shape), (TABLES_SUFFIX, tables_shape)):
            got = tuple(shapes[prefix + suffix][0])
            if got != want:
                raise CheckpointError(
                    f"{where}: tensor {prefix}{suffix} has shape {list(got)}, expected {list(want)} "
                    f"from the model config"
                )


def validate_checkpoint(directory: str | os.PathLike, *, check_values: bool = True) -> tuple[SketchConfig, list[str]]:
    """Validate a sketched checkpoint folder without loading the codes.

    The file-level checks (:func:`~spallm_plugins.format.validate_checkpoint_files`: config keys and
    version, packed codes, table shapes and finite values, bias shapes and dtypes), then the shapes
    the model config (built on the meta device) needs. Returns the config and the sketched module
    prefixes; raises :class:`~spallm_plugins.format.CheckpointError` naming the file and tensor.
    ``check_values=False`` skips reading the tables, for callers that check the loaded values anyway.
    """
    config, prefixes = validate_checkpoint_files(directory, check_values=check_values)
    shapes = {n: (h.shape, h.dtype) for n, h in read_headers(directory).items()}
    model, _ = meta_model_from_config(directory)
    validate_against_model(shapes, expected_shapes(model, config), str(directory))
    return config, prefixes
