"""The generated parts of the docs: the CLI reference (from ``spallm``'s argparse parser) and the PEFT config
reference (from ``SpaLLMConfig``'s declared dataclass fields and their ``metadata["help"]``).

Run by ``docs/hooks.py`` while ``mkdocs build`` renders a page, so the pages cannot drift from the code;
``tests/test_readme.py`` checks the CLI page covers every command and option. Nothing here touches the network.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
from collections.abc import Iterator

NO_DEFAULT = (None, argparse.SUPPRESS, False)


def cell(text: object) -> str:
    """``text`` as one Markdown table cell: one line; pipes, brackets and stars escaped (not table or link syntax)."""
    text = " ".join(str(text).split())
    for char in "\\|[]*_<":
        text = text.replace(char, "\\" + char)
    return text


def code(text: object) -> str:
    """``text`` as inline code inside a table cell (HTML, so no Markdown character needs escaping)."""
    return f"<code>{html.escape(' '.join(str(text).split()))}</code>"


def leaf_commands(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], str, argparse.ArgumentParser]]:
    """``(("bench", "quality"), summary, parser)`` for every runnable command, in the parser's order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            summaries = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                children = list(leaf_commands(sub, (*prefix, name)))
                if len(children) == 1 and children[0][0] == (*prefix, name):
                    yield (*prefix, name), summaries.get(name, ""), sub
                else:
                    yield from children
            return
    yield prefix, parser.description or "", parser


def option_rows(parser: argparse.ArgumentParser) -> Iterator[str]:
    """One table row per argument: its names, its default and its help (``%(default)s`` expanded)."""
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.dest == "help" or action.help == argparse.SUPPRESS:
            continue
        names = ", ".join(action.option_strings) or str(action.metavar or action.dest)
        if action.option_strings and action.nargs != 0:
            names += " " + formatter._format_args(action, formatter._get_default_metavar_for_optional(action))
        default = "" if action.default in NO_DEFAULT or not action.option_strings else code(action.default)
        yield f"| {code(names)} | {default} | {cell(formatter._expand_help(action))} |"


def cli_reference(parser: argparse.ArgumentParser | None = None) -> str:
    """The CLI reference page's body: every command, its usage line and a table of its arguments."""
    if parser is None:
        from spallm_plugins.cli import build_parser

        parser = build_parser()
    parts = []
    for name, summary, sub in leaf_commands(parser):
        command = " ".join(("spallm", *name))
        usage = " ".join(sub.format_usage().split()).removeprefix("usage: ")
        parts += [f"## {command}", "", cell(summary or sub.description or ""), "", "```text", usage, "```", ""]
        parts += ["| argument | default | what |", "| --- | --- | --- |", *option_rows(sub), ""]
    return "\n".join(parts)


def peft_config_reference() -> str:
    """A table of ``SpaLLMConfig``'s own fields (those it declares; PEFT's inherited ones are PEFT's docs)."""
    from spallm_plugins.integrations.peft import SpaLLMConfig

    declared = SpaLLMConfig.__annotations__
    rows = ["| field | type | default | what |", "| --- | --- | --- | --- |"]
    for field in dataclasses.fields(SpaLLMConfig):
        if field.name not in declared:
            continue
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", field.type)
        rows.append(
            f"| {code(field.name)} | {code(kind)} | {code(repr(default))} | {cell(field.metadata.get('help', ''))} |"
        )
    return "\n".join(rows)


GENERATED = {"cli": cli_reference, "peft-config": peft_config_reference}
