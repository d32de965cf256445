"""README's command list and its ``quantization_config`` example stay in step with the code."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
from conftest import run_cli

README = Path(__file__).resolve().parents[1] / "README.md"
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
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Command line") :]
    block = section[section.index("```bash\n") + 8 : section.index("```", section.index("```bash\n") + 8)]
    entries: list[str] = []
    for line in block.splitlines():
        if line.startswith("spallm "):
            entries.append(line)
        elif line.strip():
            entries[-1] += " " + line.strip()
    commands = {}
    for entry in entries:
        words = entry.split()[1:]
        end = next(i for i, w in enumerate([*words, "END"]) if w.startswith(("-", "[")) or not w.islower())
        name = tuple(words[:end])
        assert name not in commands, f"README lists spallm {' '.join(name)} twice"
        commands[name] = set(OPTION.findall(entry))
    return commands


@pytest.fixture(scope="module")
def parsers():
    from spallm_plugins.cli import build_parser

    return leaf_parsers(build_parser())


def test_readme_lists_every_command_and_option_of_the_parser(parsers):
    listed = readme_commands()
    assert set(listed) == set(parsers), "README's command list and the parser differ"
    for name, parser in parsers.items():
        if name == ("serve",):  # every other option is vLLM's own
            continue
        known = {s for a in parser._actions for s in a.option_strings if s.startswith("--")} - {"--help"}
        unknown = listed[name] - known
        assert not unknown, f"README lists options spallm {' '.join(name)} does not have: {sorted(unknown)}"
        for action in parser._actions:
            longs = {s for s in action.option_strings if s.startswith("--")} - {"--help"}
            if longs:
                assert longs & listed[name], f"README's spallm {' '.join(name)} lacks {sorted(longs)}"


def test_every_option_and_argument_has_help_text(parsers):
    for name, parser in parsers.items():
        for action in parser._actions:
            if action.dest != "help":
                assert action.help, f"spallm {' '.join(name)}: {action.option_strings or action.dest} has no help"


def test_help_is_plain_text():
    out = run_cli("--help").stdout
    assert "``" not in out and "spallm quickstart" in out


def test_readme_quantization_config_example_has_every_field():
    from spallm_plugins.config import SketchConfig

    text = README.read_text(encoding="utf-8")
    section = text[text.index('`config.json["quantization_config"]`') :]
    example = json.loads(section[section.index("```json\n") + 8 : section.index("```", section.index("```json\n") + 8)])
    expected = SketchConfig().to_quantization_config()
    assert set(example) == set(expected), sorted(set(example) ^ set(expected))
    assert SketchConfig.from_dict(example).groups_per_row == example["groups_per_row"]  # a valid config
