"""``SpaLLMModel``: the PEFT tuner of the ``spallm`` method.

Everything that can go wrong is checked before the model is touched (``plan_injection``): target
types and widths, sketch settings against a sketched base, the codes fingerprint an adapter was
trained on, and, when loading, every tensor of the adapter file (names, shapes, dtypes, size). A
refused adapter leaves the model exactly as it was.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _ExcludedModule, check_target_module_exists
from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND
from torch import nn

from spallm_plugins.config import TABLE_DTYPES, SketchConfig, packed_width
from spallm_plugins.convert import is_excluded, set_submodule
from spallm_plugins.format import (
    ADAPTER_CODES_SUFFIX,
    ADAPTER_KEY_PREFIX,
    ADAPTER_TABLES_SUFFIX,
    ADAPTER_WEIGHTS_NAME,
    AdapterBaseMismatchError,
    CheckpointError,
    check_codes_fingerprint,
    codes_fingerprint,
    read_file_headers,
)
from spallm_plugins.hooks import architecture_for
from spallm_plugins.layer import SketchedLinear
from spallm_plugins.sketch import sketch_linear
from spallm_plugins.sketch.calibration import CalibrationError, CalibrationTexts, calibration_batch, load_calibration
from spallm_plugins.sketch.driver import sketch_model_calibrated

from .config import FROM_BASE
from .constants import PREFIX
from .layer import BASE_ADAPTER_NAME, SpaLLMLayer

__all__ = ["AdapterBaseMismatchError", "SpaLLMModel"]


@dataclass
class InjectionPlan:
    """What injecting one adapter will do, decided before any module is replaced."""

    sketch: SketchConfig
    targets: dict[str, nn.Module]  # module name -> the layer to adapt (nn.Linear or SketchedLinear)
    loading_from: str | None = None
    fingerprint: str | None = None
    calibrated: dict[str, Any] = field(default_factory=dict)  # name -> SketchedLinear sketched with data


def _adapter_base(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def _tuner_prefixes(model: nn.Module) -> list[str]:
    return [name + "." for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def _adapter_names_pre_forward_hook(module, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


class SpaLLMModel(BaseTuner):
    """Creates SpaLLM adapters (table sets) on a transformers model; used through ``get_peft_model``.

    Example::

        base = AutoModelForCausalLM.from_pretrained("sketched-smollm2")  # quant_method "spallm"
        model = get_peft_model(base, SpaLLMConfig(task_type="CAUSAL_LM"))
        model.print_trainable_parameters()  # only spallm_tables
    """

    prefix: str = PREFIX
    tuner_layer_cls = SpaLLMLayer
    target_module_mapping: dict[str, list[str]] = {}  # defaults come from the spallm_architectures hook

    # ---------------------------------------------------------------------------------------------
    # config and targets

    def _prepare_adapter_config(self, peft_config, model_config: dict):
        if peft_config.target_modules is None:
            spec = architecture_for(model_config.get("model_type"))
            peft_config.target_modules = set(spec.target_modules) if spec else INCLUDE_LINEAR_LAYERS_SHORTHAND
        if peft_config.target_modules == INCLUDE_LINEAR_LAYERS_SHORTHAND:
            peft_config.target_modules = self._all_linear_names(self.model)
        return peft_config

    @staticmethod
    def _all_linear_names(model: nn.Module) -> set[str]:
        """Last name components of every linear (dense or sketched) except the output layer."""
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = set()
        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, SketchedLinear)) and module is not output:
                names.add(name.rsplit(".", 1)[-1])
        return names

    @staticmethod
    def _check_target_module_exists(peft_config, key: str):
        """PEFT's matching; a target among ``modules_to_not_convert`` counts as excluded (and only a target,
        so that a ``target_modules`` typo still gets PEFT's "not found" message, not "no modules targeted")."""
        match = check_target_module_exists(peft_config, key)
        if match and not isinstance(match, _ExcludedModule) and is_excluded(key, peft_config.modules_to_not_convert):
            return _ExcludedModule()
        return match

    def _targets(self, model: nn.Module, peft_config) -> dict[str, nn.Module]:
        inside = _tuner_prefixes(model)
        found = {}
        for key, module in model.named_modules():
            if not key or any(key.startswith(p) for p in inside):
                continue
            match = self._check_target_module_exists(peft_config, key)
            if match and not isinstance(match, _ExcludedModule):
                found[key] = module
        return found

    # ---------------------------------------------------------------------------------------------
    # planning: every check before the model changes

    def plan_injection(self, model: nn.Module, adapter_name: str) -> InjectionPlan:
        config = self.peft_config[adapter_name]
        self._prepare_adapter_config(config, self.get_model_config(model))
        targets = self._targets(model, config)
        bases = {key: _adapter_base(m) for key, m in targets.items()}
        for key, base in bases.items():
            if not isinstance(base, (nn.Linear, SketchedLinear)):
                raise TypeError(
                    f"SpaLLM adapts linear layers; target {key} is a {type(base).__name__} "
                    "(narrow target_modules or add it to exclude_modules)"
                )
        sketched = {k: b for k, b in bases.items() if isinstance(b, SketchedLinear)}
        # nothing targeted: nothing to resolve from, and PEFT's inject_adapter says why (a typo in
        # target_modules, everything excluded) in its own words
        resolved = self._resolve_from_base(config, sketched, bases) if bases else {}
        sketch = config.sketch_config(**resolved)
        for key, base in bases.items():
            sketch.check_in_features(base.in_features, key)
        for name, value in resolved.items():
            setattr(config, name, value)  # saved explicitly in adapter_config.json
        plan = InjectionPlan(sketch=sketch, targets=bases, loading_from=getattr(config, "loading_from", None))
        if sketched:
            plan.fingerprint = self._fingerprint(sketched)
            if plan.loading_from or config.base_codes_fingerprint is not None:
                check_codes_fingerprint(
                    config.to_dict(),
                    plan.fingerprint,
                    adapter=plan.loading_from or f"adapter {adapter_name!r}",
                    base=getattr(model, "name_or_path", None) or "this model",
                )
        if plan.loading_from:
            self._check_adapter_file(plan, Path(plan.loading_from))
        elif sketch.calibration and len(sketched) < len(bases):
            texts = load_calibration(sketch.calibration)
            plan.calibrated = self._sketch_calibrated(
                model, sketch, texts, {k: b for k, b in bases.items() if k not in sketched}
            )
            config.calibration = texts.record  # adapter_config.json names the data by name and digest
        return plan

    def _fingerprint(self, sketched: dict[str, SketchedLinear]) -> str:
        """The codes fingerprint, hashed once per set of (unchanged) code tensors, not per adapter."""
        key = tuple((k, b.codes.data_ptr(), b.codes._version) for k, b in sorted(sketched.items()))
        cache = self.__dict__.setdefault("_spallm_fingerprints", {})
        if key not in cache:
            cache[key] = codes_fingerprint({k: b.codes for k, b in sketched.items()})
        return cache[key]

    @staticmethod
    def _resolve_from_base(config, sketched: dict[str, SketchedLinear], bases: dict[str, nn.Module]) -> dict[str, Any]:
        """bits / groups_per_row / table_dtype: from a sketched base (checked against the config).

        On a dense base, unset ``bits``/``groups_per_row`` take the core's defaults and an unset
        ``table_dtype`` the target weights' dtype, as PEFT's adapters follow their base weights.
        """
        if not sketched:
            defaults = SketchConfig()
            resolved = {k: getattr(defaults, k) for k in FROM_BASE if getattr(config, k) is None}
            if "table_dtype" in resolved:
                dtypes = sorted({str(b.weight.dtype).removeprefix("torch.") for b in bases.values()})
                if len(dtypes) == 1 and dtypes[0] in TABLE_DTYPES:
                    resolved["table_dtype"] = dtypes[0]
                else:
                    raise ValueError(
                        f"SpaLLMConfig.table_dtype is unset and the target weights have dtype(s) {dtypes}: set "
                        f"table_dtype to one of {TABLE_DTYPES}"
                    )
            return resolved
        seen = {}
        for key, base in sketched.items():
            here = {
                "bits": base.bits,
                "groups_per_row": base.groups_per_row,
                "table_dtype": str(base.tables.dtype).removeprefix("torch."),
            }
            for name, value in here.items():
                if seen.setdefault(name, (value, key))[0] != value:
                    raise ValueError(
                        f"sketched base layers disagree on {name}: {seen[name][1]} has {seen[name][0]}, "
                        f"{key} has {value}"
                    )
        resolved = {}
        for name, (value, key) in seen.items():
            given = getattr(config, name)
            if given is None:
                resolved[name] = value
            elif given != value:
                raise ValueError(
                    f"SpaLLMConfig.{name}={given!r} but the sketched base has {name}={value!r} (e.g. {key}); "
                    f"an adapter's tables live on the base's codes: leave {name} unset or set it to {value!r}"
                )
        return resolved

    def _check_adapter_file(self, plan: InjectionPlan, folder: Path) -> None:
        """Every tensor the adapter needs is in ``folder``'s file, with the right shape and dtype."""
        file = folder / ADAPTER_WEIGHTS_NAME
        headers = read_file_headers([file])
        stored = {name.removeprefix(ADAPTER_KEY_PREFIX): h for name, h in headers.items()}
        sketch = plan.sketch
        for key, base in plan.targets.items():
            tables = stored.get(key + ADAPTER_TABLES_SUFFIX)
            want = (base.out_features, sketch.groups_per_row, sketch.num_codes)
            if tables is None:
                raise CheckpointError(f"{file}: no tensor {ADAPTER_KEY_PREFIX}{key}.spallm_tables for target {key}")
            if tuple(tables.shape) != want:
                raise CheckpointError(
                    f"{file}: tensor {ADAPTER_KEY_PREFIX}{key}.spallm_tables has shape {list(tables.shape)}, expected "
                    f"{list(want)} (out_features, groups_per_row, 2**bits)"
                )
            if tables.dtype not in ("float16", "bfloat16", "float32"):
                raise CheckpointError(
                    f"{file}: tensor {ADAPTER_KEY_PREFIX}{key}.spallm_tables has dtype {tables.dtype}, expected a float"
                )
            codes = stored.get(key + ADAPTER_CODES_SUFFIX)
            if codes is None and not isinstance(base, SketchedLinear):
                raise CheckpointError(
                    f"{file}: no codes for {key}, which is dense in this model: the adapter was trained on a "
                    "sketched base; load that base (through the spallm quantizer) instead"
                )
            if codes is not None:
                want_codes = (base.out_features, packed_width(base.in_features, sketch.bits))
                if codes.dtype != "uint8" or tuple(codes.shape) != want_codes:
                    raise CheckpointError(
                        f"{file}: tensor {ADAPTER_KEY_PREFIX}{key}.spallm_codes is {codes.dtype} {list(codes.shape)}, "
                        f"expected uint8 {list(want_codes)}"
                    )

    @staticmethod
    def _sketch_calibrated(
        model: nn.Module, sketch: SketchConfig, texts: CalibrationTexts, dense: dict[str, nn.Linear]
    ) -> dict[str, Any]:
        """Sketch the dense targets with calibration data, leaving the model's own layers in place."""
        from transformers import AutoTokenizer

        source = getattr(model, "name_or_path", None)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        except Exception as err:
            raise CalibrationError(
                f"calibrated SpaLLM injection needs the base model's tokenizer, but {source!r} has none loadable "
                f"({err}); sketch the base first with `spallm sketch --calib` and adapt the sketched base"
            ) from None
        ids = calibration_batch(texts, tokenizer, sketch.nsamples, sketch.seqlen, sketch.seed)
        config = sketch.replace(target_modules=list(dense), modules_to_not_convert=[])
        device = next(model.parameters()).device
        try:
            sketch_model_calibrated(model, config, ids, device=device)
            return {name: model.get_submodule(name) for name in dense}
        finally:
            for name, linear in dense.items():
                set_submodule(model, name, linear)

    # ---------------------------------------------------------------------------------------------
    # injection

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        plan = self.plan_injection(model, adapter_name)
        plans = self.__dict__.setdefault("_spallm_plans", {})
        plans[adapter_name] = plan
        try:
            super().inject_adapter(
                model,
                adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
                state_dict=state_dict,
            )
        finally:
            plans.pop(adapter_name, None)
        config = self.peft_config[adapter_name]
        if config.base_codes_fingerprint is None and plan.fingerprint is not None:
            config.base_codes_fingerprint = plan.fingerprint

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        plan = self.__dict__["_spallm_plans"][adapter_name]
        base = _adapter_base(target)
        layer_init = self._layer_init(plan, current_key, base, peft_config)
        if isinstance(target, SpaLLMLayer):
            target.update_layer(adapter_name, inference_mode=peft_config.inference_mode, **layer_init)
            return
        new_module = SpaLLMLayer(target, adapter_name, inference_mode=peft_config.inference_mode, **layer_init)
        new_module.module_name = current_key  # named in merge errors
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _layer_init(plan: InjectionPlan, key: str, base: nn.Module, peft_config) -> dict[str, Any]:
        sketch = plan.sketch
        storage = sketch.torch_table_dtype()
        init = {"bits": sketch.bits, "storage_dtype": storage, "init_weights": peft_config.init_weights}
        if isinstance(base, SketchedLinear):
            return {**init, "tables": base.tables, "storage_dtype": base.tables.dtype}
        if plan.loading_from:  # values come from the adapter file right after injection
            shape = (base.out_features, sketch.groups_per_row, sketch.num_codes)
            codes = torch.zeros(base.out_features, packed_width(base.in_features, sketch.bits), dtype=torch.uint8)
            return {**init, "tables": torch.zeros(shape, dtype=storage), "codes": codes}
        sketched = plan.calibrated.get(key)
        if sketched is None:
            result = sketch_linear(base.weight, sketch, name=key)
            return {**init, "tables": result.tables, "codes": result.codes}
        return {**init, "tables": sketched.tables, "codes": sketched.codes}

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        """Put ``new_module`` in place (a sketched layer has no ``weight`` for PEFT's generic version)."""
        setattr(parent, child_name, new_module)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for name, param in model.named_parameters():
            if self.prefix not in name:
                param.requires_grad = False

    # ---------------------------------------------------------------------------------------------
    # mixed batches

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        known = set()
        for module in self.modules():
            if isinstance(module, SpaLLMLayer):
                known |= set(module.spallm_tables.keys())
        unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER_NAME} - known)
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}")
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:
            adapter_names = [n for n in adapter_names for _ in range(num_beams)]
        handles = []
        for module in self.modules():
            if isinstance(module, SpaLLMLayer):
                hook = partial(_adapter_names_pre_forward_hook, adapter_names=list(adapter_names))
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
