"""The plugins that ship with spallm-plugins: the reference, CPU and Triton kernels, the known architectures.

Registered through this package's own ``spallm`` entry point (``builtin``), like any third-party plugin.
"""

from __future__ import annotations

from .hooks import ArchitectureSpec, hookimpl

_LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@hookimpl
def spallm_kernel_backends() -> list:
    from .kernels.cpu import CPUBackend
    from .kernels.reference import ReferenceBackend

    backends = [ReferenceBackend(), CPUBackend()]
    try:
        from .kernels.triton import TritonBackend
    except ImportError:
        pass
    else:
        backends.append(TritonBackend())
    return backends


@hookimpl
def spallm_architectures() -> list[ArchitectureSpec]:
    return [
        ArchitectureSpec(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"), _LLAMA_LIKE, _FUSED),
        ArchitectureSpec(
            ("phi3",),
            ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
            {},
        ),
    ]
