"""``rnnkit schema``: the JSON Schema of config files, for editors and validators."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from rnnkit.cli.common import check_output_file, err_console, user_errors


def schema_text() -> str:
    """The schema as the command writes it (and as ``configs/rnnkit.schema.json`` holds it)."""
    from rnnkit.config.schema import json_schema

    return json.dumps(json_schema(), indent=2) + "\n"


def schema(
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the schema here; default stdout."),
) -> None:
    """Write the JSON Schema of config files, for editors and validators.

    It holds every key of every task with its type, default, bounds, choices and description.

    Editors that speak the YAML language server check and complete a config whose first line is `# yaml-language-server: $schema=PATH` (the shipped configs point at configs/rnnkit.schema.json).

    Example:  rnnkit schema -o rnnkit.schema.json
    """
    text = schema_text()
    if output is None:
        sys.stdout.write(text)
        return
    with user_errors():
        check_output_file(output, "--output")
        output.write_text(text, encoding="utf-8")
    err_console.print(f"wrote {output}")
