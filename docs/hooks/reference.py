"""mkdocs hook: the reference pages, generated from the code at every build.

``reference/config.md`` comes from the config schema (the dataclasses that validate a
config: types, defaults, bounds, choices and each key's docstring), ``reference/cli.md``
from the Typer app (every command's help and options). Nothing here is written by hand,
so the pages cannot drift from the code.
"""
from __future__ import annotations

import json
from typing import Any

import click
import typer.main
from mkdocs.structure.files import File, Files

from rnnkit.cli import app
from rnnkit.config.schema import sections


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _default(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"`{json.dumps(value) if isinstance(value, (list, dict)) else value}`"


def config_reference() -> str:
    lines = [
        "# Config reference",
        "",
        "Every key of every task: its type, default, the values it may take, and what it does.",
        "This page is generated from the schema that validates configs (`rnnkit/config/`), the",
        "same one `rnnkit schema` writes as a JSON Schema for editors (see [Configs](../configs.md)).",
        "A key is written in YAML under its section, or on the command line as",
        "`--set section.key=value`.",
        "",
    ]
    for title, _, rows in sections():
        lines += [f"## {title}", "", "| key | type | default | allowed | description |",
                  "| --- | --- | --- | --- | --- |"]
        for row in rows:
            lines.append(f"| `{row.key}` | {row.type} | {_default(row.default)} | {_cell(row.allowed)} | "
                         f"{_cell(row.description)} |")
        lines.append("")
    return "\n".join(lines)


def _option_names(param: click.Parameter) -> str:
    if isinstance(param, click.Argument):
        return f"`{param.human_readable_name}`"
    names = [*param.opts, *param.secondary_opts]
    return ", ".join(f"`{n}`" for n in names)


def _param_default(param: click.Parameter) -> str:
    if isinstance(param, click.Argument):
        return "required" if param.required else ""
    if getattr(param, "is_flag", False):
        return "off" if not param.default else "on"
    default = param.default
    if default is None or default == () or default == []:
        return ""
    return f"`{default}`"


def _command_section(path: list[str], command: click.Command) -> list[str]:
    lines = [f"## rnnkit {' '.join(path)}", ""]
    help_text = (command.help or "").strip()
    paragraphs = [p.strip() for p in help_text.split("\n\n") if p.strip()]
    examples = []
    for para in paragraphs:
        if para.startswith(("Example:", "Then:")):
            examples += [line.split(":", 1)[1].strip() for line in para.splitlines()]
        else:
            lines += [" ".join(para.split()), ""]
    if examples:
        lines += ["```sh", *examples, "```", ""]
    params = [p for p in command.params if p.name not in ("help",) and not getattr(p, "hidden", False)]
    if params:
        lines += ["| argument or option | default | description |", "| --- | --- | --- |"]
        for p in params:
            lines.append(f"| {_option_names(p)} | {_cell(_param_default(p))} | {_cell(getattr(p, 'help', '') or '')} |")
        lines.append("")
    return lines


def cli_reference() -> str:
    root = typer.main.get_command(app)
    lines = ["# Command reference", "",
             "Every `rnnkit` command with its arguments and options, generated from the command line",
             "itself (the same text `rnnkit COMMAND --help` prints). `python -m rnnkit` works as well",
             "as `rnnkit`. A mistake in a command line is one line on stderr and exit code 2.", ""]
    for name, command in root.commands.items():
        if isinstance(command, click.Group):
            lines += [f"## rnnkit {name}", "", " ".join((command.help or "").split()), ""]
            for sub, subcommand in command.commands.items():
                lines += [line.replace("## rnnkit", "### rnnkit", 1) if line.startswith("## ") else line
                          for line in _command_section([name, sub], subcommand)]
        else:
            lines += _command_section([name], command)
    return "\n".join(lines)


def on_files(files: Files, config: Any) -> Files:
    for uri, text in (("reference/config.md", config_reference()), ("reference/cli.md", cli_reference())):
        files.append(File.generated(config, uri, content=text))
    return files
