"""Plots for reports and benchmarks (matplotlib is optional: ``pip install spallm-plugins[bench]``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import BenchUnavailableError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BenchUnavailableError("plots need matplotlib: pip install 'spallm-plugins[bench]'") from None
    return plt


def _save(fig, path: str | Path) -> Path:
    plt = _pyplot()
    fig.axes[0].legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_layer_errors(report: dict[str, Any], path: str | Path) -> Path:
    """Per-layer output error (before and after refit, when known), in model order, log scale."""
    plt = _pyplot()
    names = list(report["layers"])
    after = [report["layers"][n]["loss"] for n in names]
    before = [report["layers"][n].get("loss_before_refit") for n in names]
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.06), 4))
    if any(b is not None for b in before):
        ax.plot(range(len(names)), [b or float("nan") for b in before], ".", ms=3, label="before refit")
    ax.plot(range(len(names)), after, ".", ms=3, label="sketch loss")
    ax.set_yscale("log")
    ax.set_xlabel("layer (model order)")
    ax.set_ylabel("output error (w - ŵ) H (w - ŵ)ᵀ")
    ax.set_title(
        f"spallm sketch: {report['config']['bits']}-bit, gpr {report['config']['groups_per_row']}, {report['config']['method']}"
    )
    return _save(fig, path)


def plot_quality(results: dict[str, Any], path: str | Path) -> Path:
    """Perplexity against bits per weight, one point per variant."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for row in results["rows"]:
        if row["name"] == "original":
            ax.axhline(row["perplexity"], color="k", lw=0.8, ls="--", label=f"original {row['perplexity']:.2f}")
            continue
        marker = "s" if row["name"].startswith(("rtn", "nf4")) else "o"
        ax.scatter(row["bits_per_weight"], row["perplexity"], marker=marker)
        ax.annotate(row["name"], (row["bits_per_weight"], row["perplexity"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (codes + tables / scales)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"spallm bench quality: {Path(results['model']).name}")
    return _save(fig, path)
