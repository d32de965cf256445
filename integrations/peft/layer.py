"""``SpaLLMLayer``: a target linear whose lookup tables are replaced by the active adapter's.

SpaLLM replaces, it does not add: each adapter is a complete table set ``spallm_tables[name]``
(``[out, groups_per_row, 2**bits]``) over codes that are either the sketched base's (shared by all
adapters, never copied) or the adapter's own ``sketched_codes[name]`` (a dense base, sketched at
injection; saved as ``spallm_codes``, format v1). One adapter is active per layer; ``adapter_names=``
picks a table set per sample.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from spallm_plugins.kernels.reference import dequantize, flat_indices
from spallm_plugins.layer import SketchedLinear, frozen_codes
from spallm_plugins.ops import lut_linear
from spallm_plugins.sharding import register_sharding_hooks

BASE_ADAPTER_NAME = "__base__"  # PEFT's name for "no adapter" in adapter_names=
MIXED_BATCH_WEIGHT_BYTES = 256 << 20  # per-sample weights gathered at once in a mixed batch
HALF_DTYPES = (torch.float16, torch.bfloat16)
CODES_NAME = "sketched_codes"  # where a dense base's adapter codes live: outside PEFT's adapter prefix
SAVED_CODES_NAME = "spallm_codes"  # their name in state dicts and adapter files (format v1)


def format_tables(tables: torch.Tensor, storage_dtype: torch.dtype) -> torch.Tensor:
    """``tables`` with values rounded to ``storage_dtype``, keeping their dtype and an identity gradient.

    PEFT trains adapter weights in float32 while the format stores tables as float16/bfloat16. The
    forward always uses stored-precision values (a straight-through rounding), so what was trained
    is exactly what is saved in the base's dtype, merged, or served: no drift at merge time.
    """
    if tables.dtype == storage_dtype or (storage_dtype == torch.float32 and tables.dtype in HALF_DTYPES):
        return tables
    rounded = tables.detach().to(storage_dtype).to(tables.dtype)
    if not (torch.is_grad_enabled() and tables.requires_grad):
        return rounded
    return tables + (rounded - tables.detach())


class CodesDict(nn.ParameterDict):
    """Adapter name -> frozen uint8 codes; whatever is stored becomes :class:`FrozenCodes` (PEFT's
    ``assign=True`` loading sets plain ``Parameter`` objects)."""

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, frozen_codes(value) if isinstance(value, torch.Tensor) else value)


class SavedCodesName(nn.Module):
    """``spallm_codes``: a child without parameters of its own that shows ``sketched_codes`` under the name its
    keys have in state dicts. PEFT tells a tuner layer's keys from the base's by the layer's children's names
    (``get_base_model_state_dict``), and DCP walks state-dict keys as attribute paths: both find the codes
    through it, while the parameters are named once, outside PEFT's adapter prefix."""

    def __init__(self, codes: CodesDict) -> None:
        super().__init__()
        object.__setattr__(self, "codes", codes)  # not a submodule: no second name for the parameters

    def __getattr__(self, name: str) -> Any:
        if name in self.__dict__["codes"]:
            return self.__dict__["codes"][name]
        return super().__getattr__(name)

    def __getitem__(self, name: str) -> nn.Parameter:
        return self.codes[name]

    def __contains__(self, name: object) -> bool:
        return name in self.codes

    def __iter__(self) -> Any:
        return iter(self.codes)

    def __len__(self) -> int:
        return len(self.codes)


def _rename_keys(state_dict: dict[str, Any], prefix: str, old: str, new: str) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + old + ".")]:
        state_dict[prefix + new + key[len(prefix + old) :]] = state_dict.pop(key)


def _save_codes_as_v1(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: dict) -> None:
    _rename_keys(state_dict, prefix, CODES_NAME, SAVED_CODES_NAME)


def _load_codes_from_v1(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    _rename_keys(state_dict, prefix, SAVED_CODES_NAME, CODES_NAME)


class SpaLLMLayer(nn.Module, BaseTunerLayer):
    """Wraps an ``nn.Linear`` (dense base) or a ``SketchedLinear`` (sketched base)."""

    adapter_layer_names = ("spallm_tables",)
    # A dense base's adapter codes are neither: PEFT casts and moves the entries of other_param_names to
    # the base layer's float dtype, marks adapter_layer_names trainable, and treats every parameter named
    # with its prefix (spallm_) as an adapter weight (dtype, NaN and gradient rules). They live in
    # sketched_codes and are renamed to spallm_codes only in state dicts, so PEFT still saves them.
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, SketchedLinear)):
            raise TypeError(f"SpaLLM adapts nn.Linear or SketchedLinear layers, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.spallm_tables = nn.ParameterDict({})
        # frozen uint8 Parameters, not buffers, so that FSDP2 / ZeRO-3 shard them (by rows, like the
        # tables) instead of replicating a dense base's codes on every rank; never in the optimizer
        self.sketched_codes = CodesDict({})
        self.spallm_codes = SavedCodesName(self.sketched_codes)
        self.bits: dict[str, int] = {}
        self.storage_dtype: dict[str, torch.dtype] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self._merged_base: torch.Tensor | None = None  # base tables/weight replaced by merge()
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.module_name = "?"  # the qualified name, set by SpaLLMModel
        self.cache_prepared = True  # False once sharded (spallm_plugins.sharding.check_sharded)
        # sharded (FSDP2), the adapter's tables still save and load as full format-v1 tensors; its
        # rows must be sharded like the base codes they index
        aligned = ("base_layer.codes",) if isinstance(base_layer, SketchedLinear) else ()
        # renamed before the sharding hooks load and after they gather: they see the parameters' names
        self.register_load_state_dict_pre_hook(_load_codes_from_v1)
        register_sharding_hooks(self, ("spallm_tables", CODES_NAME), aligned=aligned)
        self.register_state_dict_post_hook(_save_codes_as_v1)
        self.update_layer(adapter_name, **kwargs)

    @property
    def is_sketched_base(self) -> bool:
        return isinstance(self.get_base_layer(), SketchedLinear)

    def update_layer(
        self,
        adapter_name: str,
        *,
        tables: torch.Tensor,
        bits: int,
        storage_dtype: torch.dtype,
        codes: torch.Tensor | None = None,
        init_weights: bool = True,
        inference_mode: bool = False,
        **kwargs: Any,
    ) -> None:
        """Add a table set (and codes when the base has none to share)."""
        base = self.get_base_layer()
        expected = (self.out_features, tables.shape[1], 1 << bits)
        if tuple(tables.shape) != expected:
            raise ValueError(f"adapter {adapter_name!r}: tables shape {list(tables.shape)}, expected {list(expected)}")
        if codes is None and not isinstance(base, SketchedLinear):
            raise ValueError(f"adapter {adapter_name!r}: a dense base layer needs the adapter's own codes")
        if codes is None and bits != base.bits:
            raise ValueError(f"adapter {adapter_name!r}: bits={bits} but the base layer's codes are {base.bits}-bit")
        device = (base.codes if isinstance(base, SketchedLinear) else base.weight).device
        tables = tables.detach().to(device).clone()
        if not init_weights:
            scale = tables.float().abs().mean().clamp_min(1e-3)
            noise = torch.randn(tables.shape, generator=torch.Generator().manual_seed(len(self.spallm_tables)))
            tables = (tables.float() + 0.1 * scale * noise.to(device)).to(tables.dtype)
        self.spallm_tables[adapter_name] = nn.Parameter(tables)
        if codes is not None:
            codes = codes.detach().to(device=device, dtype=torch.uint8).clone()
            self.sketched_codes[adapter_name] = frozen_codes(codes)
        self.bits[adapter_name] = bits
        self.storage_dtype[adapter_name] = storage_dtype
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def codes_for(self, adapter_name: str) -> torch.Tensor:
        if adapter_name in self.sketched_codes:
            return self.sketched_codes[adapter_name]
        return self.get_base_layer().codes

    def tables_for(self, adapter_name: str) -> torch.Tensor:
        """The adapter's tables at storage precision (what forward, merge and save agree on)."""
        return format_tables(self.spallm_tables[adapter_name], self.storage_dtype[adapter_name])

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            self.unmerge()
        super().delete_adapter(adapter_name)
        if adapter_name in self.sketched_codes:
            del self.sketched_codes[adapter_name]
        self.bits.pop(adapter_name, None)
        self.storage_dtype.pop(adapter_name, None)

    # ---------------------------------------------------------------------------------------------
    # merge

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Write one adapter's tables into the base layer (a dense base gets the dequantized weight).

        Lossless: the base then computes exactly what the adapter computed. ``unmerge`` restores it.
        """
        adapter_names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.spallm_tables]
        if not adapter_names:
            return
        if len(adapter_names) > 1 or self.merged:
            raise ValueError(
                f"SpaLLM replaces a layer's tables, so only one adapter can be merged into a layer; "
                f"asked to merge {adapter_names} (already merged: {self.merged_adapters})"
            )
        name = adapter_names[0]
        base = self.get_base_layer()
        tables = self.tables_for(name).detach()
        if safe_merge and not torch.isfinite(tables).all():
            raise ValueError(
                f"NaNs detected in the merged weights. The adapter {name} seems to be broken "
                f"(non-finite tables in layer {self.module_name}; nothing was merged)"
            )
        if isinstance(base, SketchedLinear) and name not in self.sketched_codes:
            self._merged_base = base.tables.data
            base.tables.data = tables.to(base.tables.dtype)
        elif isinstance(base, SketchedLinear):
            raise ValueError(
                f"adapter {name!r} carries its own codes for a sketched base layer; merging would need new "
                "codes in the base: save it and use `spallm merge` on its dense base instead"
            )
        else:
            self._merged_base = base.weight.data
            base.weight.data = dequantize(self.codes_for(name), tables, self.bits[name], base.weight.dtype)
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        self.merged_adapters.pop()
        base = self.get_base_layer()
        if isinstance(base, SketchedLinear):
            base.tables.data = self._merged_base.to(base.tables.device)
        else:
            base.weight.data = self._merged_base.to(base.weight.device)
        self._merged_base = None

    # ---------------------------------------------------------------------------------------------
    # forward

    def _single_active(self) -> str | None:
        active = [a for a in self.active_adapters if a in self.spallm_tables]
        if len(active) > 1:
            raise ValueError(
                f"SpaLLM adapters {active} are all active on one layer, but each is a complete table set that "
                "replaces the layer's tables and two cannot be summed: activate one (set_adapter) or pick one per "
                "sample with adapter_names="
            )
        return active[0] if active else None

    def _adapter_forward(self, x: torch.Tensor, name: str) -> torch.Tensor:
        # Computed in the activations' dtype, as the base layer does: the weight is gathered from
        # (float32) tables straight into x.dtype, so a merged layer computes exactly the same.
        tables = self.tables_for(name)
        cache = self.cache_prepared and getattr(self.get_base_layer(), "cache_prepared", True)
        return lut_linear(x, self.codes_for(name), tables, self.get_base_layer().bias, self.bits[name], cache=cache)

    def _base_weight(self, dtype: torch.dtype) -> torch.Tensor:
        base = self.get_base_layer()
        return base.dequantize(dtype) if isinstance(base, SketchedLinear) else base.weight.to(dtype)

    def _mixed_batch_forward(self, x: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        """One forward in which sample ``i`` uses table set ``adapter_names[i]``.

        The distinct table sets of the batch are gathered into weights in one pass (one ``gather``
        over stacked tables when they share codes), then each sample is multiplied by its own weight
        in a batched matmul: no loop over the batch or over adapters.
        """
        if len(adapter_names) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(adapter_names)} entries but the batch has {x.shape[0]} samples")
        if self.merged:
            raise ValueError("Cannot pass adapter_names while an adapter is merged: call unmerge_adapter() first")
        present = [n if n in self.spallm_tables else BASE_ADAPTER_NAME for n in adapter_names]
        unique = list(dict.fromkeys(present))
        if unique == [BASE_ADAPTER_NAME]:
            return self.base_layer(x)
        slot = torch.tensor([unique.index(n) for n in present], device=x.device)
        dtype = x.dtype
        adapters = [n for n in unique if n != BASE_ADAPTER_NAME]
        codes = {id(self.codes_for(n)) for n in adapters} | (
            {id(self.get_base_layer().codes)} if BASE_ADAPTER_NAME in unique and self.is_sketched_base else set()
        )
        bits = {self.bits[n] for n in adapters}
        if len(codes) == 1 and len(bits) == 1 and (self.is_sketched_base or BASE_ADAPTER_NAME not in unique):
            sets = [self.get_base_layer().tables if n == BASE_ADAPTER_NAME else self.tables_for(n) for n in unique]
            stacked = torch.stack([t.to(dtype) for t in sets])  # [sets, out, gpr, 2**bits]
            n_sets, out, gpr, k = stacked.shape
            idx = flat_indices(self.codes_for(adapters[0]), bits.pop(), gpr)
            weights = torch.gather(stacked.view(n_sets, out * gpr, k), 2, idx.expand(n_sets, -1, -1))
            weights = weights.view(n_sets, out, -1)
        else:
            weights = torch.stack(
                [
                    self._base_weight(dtype)
                    if n == BASE_ADAPTER_NAME
                    else dequantize(self.codes_for(n), self.tables_for(n), self.bits[n], dtype)
                    for n in unique
                ]
            )
        xs = x.reshape(x.shape[0], -1, x.shape[-1]).to(dtype)
        per_sample = max(1, MIXED_BATCH_WEIGHT_BYTES // max(weights[0].numel() * weights.element_size(), 1))
        chunks = [
            torch.bmm(xs[i : i + per_sample], weights[slot[i : i + per_sample]].transpose(1, 2))
            for i in range(0, xs.shape[0], per_sample)
        ]
        y = torch.cat(chunks)
        bias = self.get_base_layer().bias
        if bias is not None:
            y = y + bias.to(dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, adapter_names)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        name = self._single_active()
        if name is None:
            return self.base_layer(x, *args, **kwargs)
        return self._adapter_forward(x, name)

    def __repr__(self) -> str:
        return "spallm." + super().__repr__()
