"""SketchedLinear: a linear layer stored as frozen packed codes plus trainable lookup tables."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from .config import SketchConfig, packed_width, unpacked_width
from .kernels.reference import dequantize
from .ops import lut_linear
from .sharding import register_sharding_hooks


class FrozenCodes(nn.Parameter):
    """Packed uint8 codes as a ``Parameter`` that never requires grad.

    A ``Parameter`` so that FSDP2 and ZeRO-3 shard it (they shard parameters only, and codes are most
    of the bytes); uint8 rather than a float view of the bytes (``bnb_4bit_quant_storage``), because
    float parameters get cast by mixed precision and DeepSpeed, which would corrupt codes. Like
    bitsandbytes' ``Params4bit`` it is a ``Parameter`` subclass: ``requires_grad_(True)``, which
    ``model.requires_grad_(True)`` and PEFT's ``modules_to_save`` call on every parameter, leaves it
    frozen instead of raising "only Tensors of floating point dtype can require gradients".
    """

    def __new__(cls, data: torch.Tensor | None = None, requires_grad: bool = False) -> FrozenCodes:
        return super().__new__(cls, data, requires_grad=False)

    def requires_grad_(self, requires_grad: bool = True) -> FrozenCodes:
        return self

    def __reduce_ex__(self, protocol: int) -> tuple:
        return FrozenCodes, (self.data,)


def frozen_codes(value: torch.Tensor | None) -> torch.Tensor | None:
    """``value`` as :class:`FrozenCodes`, sharing its storage; a ``DTensor`` (FSDP2's shard, whose
    identity FSDP2 tracks) or ``None`` is returned as it is."""
    if value is None or isinstance(value, FrozenCodes) or type(value) not in (torch.Tensor, nn.Parameter):
        return value
    return FrozenCodes(value.detach())


class CodesAndTables(Protocol):
    codes: torch.Tensor
    tables: torch.Tensor


class SketchedLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W[r, c] = tables[r, c // (in / gpr), codes[r, c]]``.

    ``codes`` (packed, see :mod:`spallm_plugins.format`) is a :class:`FrozenCodes` uint8 ``Parameter``
    rather than a buffer: FSDP2 and DeepSpeed ZeRO-3 shard parameters only, and codes are most of a
    sketched model's bytes, so a buffer would be replicated on every rank (``docs/design-sharding.md``).
    Frozen, it is never trained: ``requires_grad_(True)`` leaves it alone, optimizers built from the
    trainable parameters never see it, and a plain tensor assigned to it (a checkpoint loader's
    ``setattr``, ``load_state_dict(assign=True)``) is made frozen codes again. ``tables`` is the trainable
    ``Parameter``: fine-tuning a sketched model trains exactly the table values. ``state_dict()`` is
    format v1 either way (same keys, uint8 codes), also when sharded (:mod:`spallm_plugins.sharding`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int = 4,
        groups_per_row: int = 1,
        bias: bool = False,
        table_dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        SketchConfig(bits=bits, groups_per_row=groups_per_row).check_in_features(in_features, type(self).__name__)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.groups_per_row = bits, groups_per_row
        self.tables = nn.Parameter(
            torch.zeros(out_features, groups_per_row, 1 << bits, dtype=table_dtype, device=device)
        )
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=table_dtype, device=device))
        else:
            self.register_parameter("bias", None)
        # registered last, so state_dict() keeps format v1's key order (tables, bias, codes)
        self.codes = FrozenCodes(
            torch.zeros(out_features, packed_width(in_features, bits), dtype=torch.uint8, device=device)
        )
        # False once sharded (sharding.check_sharded): the backend's codes layout is then made per call
        self.cache_prepared = True
        register_sharding_hooks(self, ("codes", "tables", "bias"))

    @classmethod
    def empty_like(cls, linear: nn.Linear, config: SketchConfig, device=None) -> SketchedLinear:
        """An uninitialised SketchedLinear with the shapes ``config`` gives ``linear`` (to load into)."""
        return cls(
            linear.in_features,
            linear.out_features,
            config.bits,
            config.groups_per_row,
            bias=linear.bias is not None,
            table_dtype=config.torch_table_dtype(),
            device=device if device is not None else linear.weight.device,
        )

    @classmethod
    def from_result(
        cls, result: CodesAndTables, config: SketchConfig, bias: torch.Tensor | None = None
    ) -> SketchedLinear:
        """The layer holding a sketch's ``codes`` and ``tables`` (built by the sketcher, which imports this).

        ``result``: anything with packed ``codes [out, in*bits/8]`` and ``tables [out, gpr, 2**bits]``
        (e.g. :class:`spallm_plugins.sketch.SketchResult`); ``bias`` keeps its own dtype. The tensors
        are taken over, not copied, so sketching never holds two copies of a layer.
        """
        out_features, groups_per_row, num_codes = result.tables.shape
        if (groups_per_row, num_codes) != (config.groups_per_row, config.num_codes):
            raise ValueError(
                f"tables of shape {list(result.tables.shape)} do not match groups_per_row={config.groups_per_row}, "
                f"bits={config.bits}"
            )
        in_features = unpacked_width(result.codes.shape[1], config.bits)
        with torch.device("meta"):
            layer = cls(in_features, out_features, config.bits, config.groups_per_row, bias=False)
        layer.codes = FrozenCodes(result.codes)
        layer.tables = nn.Parameter(result.tables, requires_grad=True)
        layer.bias = None if bias is None else nn.Parameter(bias.detach())
        return layer

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, frozen_codes(value) if name == "codes" else value)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight ``[out, in]`` these codes and tables represent."""
        return dequantize(self.codes, self.tables, self.bits, dtype)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A dense ``nn.Linear`` with the dequantized weight (exactly what this layer computes)."""
        dtype = dtype or self.tables.dtype
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=self.codes.device, dtype=dtype
        )
        with torch.no_grad():
            linear.weight.copy_(self.dequantize(dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lut_linear(x, self.codes, self.tables, self.bias, self.bits, cache=self.cache_prepared)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"groups_per_row={self.groups_per_row}, bias={self.bias is not None}, table_dtype={self.tables.dtype}"
        )
