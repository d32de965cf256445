"""mkdocs hook: fill each ``<!-- generated: NAME -->`` marker with ``docs/gen_reference.py``'s ``GENERATED[NAME]``."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

MARKER = re.compile(r"<!-- generated: ([a-z-]+) -->")


def _generators() -> dict:
    spec = importlib.util.spec_from_file_location("spallm_docs_gen", Path(__file__).with_name("gen_reference.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.GENERATED


def on_page_markdown(markdown: str, page, config, files) -> str:
    if "<!-- generated: " not in markdown:
        return markdown
    generators = _generators()

    def fill(match: re.Match) -> str:
        name = match.group(1)
        if name not in generators:
            raise ValueError(f"{page.file.src_path}: unknown generated section {name!r}; known: {sorted(generators)}")
        return generators[name]()

    return MARKER.sub(fill, markdown)
