"""README's command list, the generated CLI reference and the format page's ``quantization_config`` example stay
in step with the code."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
from pathlib import Path

import pytest
from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
OPTION = re.compile(r"--[a-z][a-z0-9-]*")


def leaf_parsers(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """``{("bench", "quality"): parser, ...}`` for every runnable command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found = {}
            for name, sub in action.choices.items():
                found.update(leaf_parsers(sub, (*prefix, name)))
            return found
    return {prefix: parser}


def readme_commands() -> dict[tuple[str, ...], set[str]]:
    """``{("sketch",): {"--out"}, ...}``: the commands README's "Command line" block lists and their options."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Command line") :]
    block = section[section.index("```bash\n") + 8 : section.index("```", section.index("```bash\n") + 8)]
    entries: list[str] = []
    for line in block.splitlines():
        if line.startswith("spallm "):
            entries.append(line.split("#")[0])
        elif line.strip():
            entries[-1] += " " + line.split("#")[0].strip()
    commands = {}
    for entry in entries:
        words = entry.split()[1:]
        end = next(i for i, w in enumerate([*words, "END"]) if w.startswith(("-", "[")) or not w.islower())
        name = tuple(words[:end])
        assert name not in commands, f"README lists spallm {' '.join(name)} twice"
        commands[name] = set(OPTION.findall(entry))
    return commands


def long_options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--")} - {"--help"}


@pytest.fixture(scope="module")
def parser():
    from spallm_plugins.cli import build_parser

    return build_parser()


@pytest.fixture(scope="module")
def parsers(parser):
    return leaf_parsers(parser)


def cli_reference(parser) -> str:
    """The CLI reference page as ``mkdocs build`` generates it (docs/gen_reference.py)."""
    spec = importlib.util.spec_from_file_location("spallm_docs_gen", DOCS / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cli_reference(parser)


def test_readme_lists_every_command_of_the_parser(parsers):
    listed = readme_commands()
    assert set(listed) == set(parsers), "README's command list and the parser differ"
    for name, options in listed.items():
        unknown = options - long_options(parsers[name])
        assert not unknown, f"README lists options spallm {' '.join(name)} does not have: {sorted(unknown)}"


def test_cli_reference_lists_every_command_and_option(parser, parsers):
    assert "<!-- generated: cli -->" in (DOCS / "cli.md").read_text(encoding="utf-8"), "docs/cli.md lost its marker"
    page = cli_reference(parser)
    sections = dict(re.findall(r"^## (spallm [a-z -]+)\n(.*?)(?=^## |\Z)", page, flags=re.M | re.S))
    assert set(sections) == {" ".join(("spallm", *name)) for name in parsers}, sorted(sections)
    for name, sub in parsers.items():
        section = sections[" ".join(("spallm", *name))]
        missing = {o for o in long_options(sub) if not re.search(rf"<code>(?:[^<]*\W)?{o}(?![\w-])", section)}
        assert not missing, f"docs CLI reference: spallm {' '.join(name)} lacks {sorted(missing)}"


def test_every_option_and_argument_has_help_text(parsers):
    for name, parser in parsers.items():
        for action in parser._actions:
            if action.dest != "help":
                assert action.help, f"spallm {' '.join(name)}: {action.option_strings or action.dest} has no help"


def test_help_is_plain_text():
    out = run_cli("--help").stdout
    assert "``" not in out and "spallm quickstart" in out


def test_format_page_quantization_config_example_has_every_field():
    from spallm_plugins.config import SketchConfig

    text = (DOCS / "format.md").read_text(encoding="utf-8")
    section = text[text.index('`config.json["quantization_config"]`') :]
    example = json.loads(section[section.index("```json\n") + 8 : section.index("```", section.index("```json\n") + 8)])
    expected = SketchConfig(groups_per_row=example["groups_per_row"]).to_quantization_config()
    assert set(example) == set(expected), sorted(set(example) ^ set(expected))
    differ = {k: (example[k], expected[k]) for k in example if example[k] != expected[k]}
    assert not differ, f"docs/format.md's example differs from SketchConfig's defaults (example, code): {differ}"
