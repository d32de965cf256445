"""The ``spallm`` cases run.py puts into PEFT's generic tests (``tests/test_custom_models.py``): PEFT's MLP
dense (an adapter sketches its linears at injection) and sketched (``SketchedMLP``: the adapter trains tables
over the base's codes), each with one target, two targets, and ``modules_to_save`` over a linear."""

import torch

from spallm_plugins.config import SketchConfig
from spallm_plugins.integrations.peft import SpaLLMConfig
from spallm_plugins.sketch import sketch_model

DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def sketched(model: torch.nn.Module) -> torch.nn.Module:
    dtype = next(model.parameters()).dtype
    config = SketchConfig(table_dtype=DTYPES[dtype], target_modules=["lin0", "lin1"], modules_to_not_convert=[])
    sketch_model(model, config)
    return model


TEST_CASES = [
    ("Vanilla MLP 1 SpaLLM", "MLP", SpaLLMConfig, {"target_modules": ["lin0"]}),
    ("Vanilla MLP 2 SpaLLM", "MLP", SpaLLMConfig, {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 3 SpaLLM", "MLP", SpaLLMConfig, {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Sketched MLP 1 SpaLLM", "SketchedMLP", SpaLLMConfig, {"target_modules": ["lin0"]}),
    ("Sketched MLP 2 SpaLLM", "SketchedMLP", SpaLLMConfig, {"target_modules": ["lin0", "lin1"]}),
    ("Sketched MLP 3 SpaLLM", "SketchedMLP", SpaLLMConfig, {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
]
