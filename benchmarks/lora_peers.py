"""The peers SpaLLM is measured against, built the way their papers build them (``finetune_bench.py`` and
``inference_bench.py`` in this folder).

- ``qlora``: the dense model loaded through ``transformers``' ``BitsAndBytesConfig`` as QLoRA does it (NF4,
  double quantisation of the absmax constants, a compute dtype), so every target linear is a real
  ``bitsandbytes.nn.Linear4bit`` (bitsandbytes' CPU backend without a GPU), then ``prepare_model_for_kbit_training``
  and LoRA on the same targets as SpaLLM.
- ``lora``: LoRA on the dense float32 model; ``full``: every parameter of the dense float32 model.
- ``spallm``: the PEFT method ``spallm`` (trainable tables) on a sketched checkpoint.

Both LoRA arms use the same :func:`lora_config` (rank matched to SpaLLM's trainable size, alpha ``2 * r``,
dropout 0.05 as in QLoRA).
"""

from __future__ import annotations

import os

import torch

from spallm_plugins.bench.inference import peak_rss_bytes, state_bytes  # noqa: F401 (the benchmarks' one source)

LORA_DROPOUT = 0.05  # QLoRA's value for models up to 13B
QLORA_INSTALL = "pip install 'spallm-plugins[peers]' (bitsandbytes)"


def targets_of(model) -> set[str]:
    """The linear names SpaLLM sketches in this architecture (LoRA adapts the same ones)."""
    from spallm_plugins.hooks import architecture_for

    return set(architecture_for(model.config.model_type).target_modules)


def lora_rank_matching(model, target_modules: set[str], table_values: int) -> int:
    """The LoRA rank whose ``r * (in + out)`` parameters over the same targets equal ``table_values``."""
    widths = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in target_modules and hasattr(module, "in_features"):
            widths += module.in_features + module.out_features
    return max(1, round(table_values / widths))


def lora_config(rank: int, targets: set[str], *, init_lora_weights: bool = True):
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank, lora_dropout=LORA_DROPOUT,
        target_modules=sorted(targets), init_lora_weights=init_lora_weights,
    )  # fmt: skip


def nf4_config(compute_dtype: torch.dtype = torch.float32):
    """QLoRA's quantisation: NF4 with double quantisation, computing in ``compute_dtype``."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )  # fmt: skip


def load_nf4(dense_dir: str | os.PathLike, compute_dtype: torch.dtype = torch.float32):
    """The dense model with its SpaLLM targets as bitsandbytes NF4 ``Linear4bit`` (the rest float32), on CPU."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ImportError(f"the QLoRA peer needs bitsandbytes ({err}); {QLORA_INSTALL}") from None
    from transformers import AutoConfig, AutoModelForCausalLM

    from spallm_plugins.hooks import architecture_for
    from spallm_plugins.models import load_tokenizer

    config = AutoConfig.from_pretrained(dense_dir)
    targets = set(architecture_for(config.model_type).target_modules)
    quant = nf4_config(compute_dtype)
    # quantise exactly SpaLLM's targets (lm_head and embeddings stay dense for both)
    skip = {name for name in ("lm_head",) if name not in targets}
    quant.llm_int8_skip_modules = sorted(skip)
    model = AutoModelForCausalLM.from_pretrained(
        dense_dir, quantization_config=quant, device_map="cpu", dtype=torch.float32
    )
    return model.eval(), load_tokenizer(dense_dir)


def nf4_linears(model) -> dict[str, torch.nn.Module]:
    import bitsandbytes as bnb

    return {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def keep_nf4_layout_for_training(model) -> None:
    """Stop bitsandbytes from repacking the NF4 weights of a model that is evaluated *between* training steps.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) converts a ``Linear4bit`` weight to its CPU inference layout
    on the first eval-mode forward without gradients (an lm-eval evaluation) and never converts it back: the
    next training forward runs its inference kernel, which has no autograd formula, so no gradient flows back
    through the frozen base to the layers below, silently (torch only warns). With this, evaluation and
    training use the same dequantise-and-matmul path. Call it before the first forward.
    """
    for layer in nf4_linears(model).values():
        layer.support_avx512bf16_for_cpu = False


def build(
    variant: str,
    dense_dir: str | os.PathLike,
    sketched_dir: str | os.PathLike | None = None,
    rank: int = 8,
    *,
    compute_dtype: torch.dtype = torch.float32,
    gradient_checkpointing: bool = False,
):
    """``(model, tokenizer)`` ready to train: ``spallm`` / ``qlora`` / ``lora`` (PEFT models) or ``full``."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    from spallm_plugins.integrations.peft import SpaLLMConfig
    from spallm_plugins.models import load_model
    from spallm_plugins.pipeline import load_sketched

    if variant == "spallm":
        if sketched_dir is None:
            raise ValueError("the spallm variant needs a sketched checkpoint")
        model, tokenizer = load_sketched(sketched_dir)
        return get_peft_model(model, SpaLLMConfig(task_type="CAUSAL_LM")), tokenizer
    if variant == "qlora":
        model, tokenizer = load_nf4(dense_dir, compute_dtype)
        keep_nf4_layout_for_training(model)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        return get_peft_model(model, lora_config(rank, targets_of(model))), tokenizer
    model, tokenizer = load_model(dense_dir, dtype=torch.float32)
    if variant == "lora":
        return get_peft_model(model, lora_config(rank, targets_of(model))), tokenizer
    if variant == "full":
        return model, tokenizer
    raise ValueError(f"unknown variant {variant!r}")


@torch.no_grad()
def qlora_merged_dense(qlora_model, dense_dir: str | os.PathLike):
    """QLoRA merged into a dense float32 model: each NF4 weight dequantised, plus its LoRA update.

    (PEFT's own ``merge_and_unload`` on a 4-bit base re-quantises the sum to NF4; deployment as a dense
    model dequantises first, as here.)
    """
    import bitsandbytes.functional as bnbf
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    from spallm_plugins.models import load_model

    dense, _ = load_model(dense_dir, dtype=torch.float32)
    modules = dict(dense.named_modules())
    base = qlora_model.get_base_model()
    for name, layer in nf4_linears(base).items():
        name = name.removesuffix(".base_layer")  # the LoRA wrapper's quantised base
        weight = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.float32)
        modules[name].weight.copy_(weight.reshape(modules[name].weight.shape))
    config = qlora_model.peft_config["default"]
    adapted = get_peft_model(dense, config)
    set_peft_model_state_dict(adapted, get_peft_model_state_dict(qlora_model))
    return adapted.merge_and_unload().eval()


def reset_peak_rss() -> bool:
    """Reset Linux's high-water mark to the current resident size (False where that is not possible)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False
