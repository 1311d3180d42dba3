"""``rnnkit data list | get | info``: the corpora and prepared stores."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from rnnkit.cli.common import (err_console, print_store, user_errors)


def data_list(
    to: Path = typer.Option(Path("../shared/data"), "--to", help="Where the configs expect the corpora."),
    as_json: bool = typer.Option(False, "--json", help="One JSON list instead of a table."),
) -> None:
    """List the corpora: files, sizes, SHA-256, licence, source, and whether they are present.

    Example:  rnnkit data list
    """
    from rich.table import Table

    from rnnkit.data.corpora import CORPORA
    from rnnkit.data.fetch import status

    rows = [{"name": c.name, "status": status(c, to), "licence": c.licence, "source": c.source,
             "description": c.description,
             "files": [{"path": r, "bytes": n, "sha256": h} for r, n, h in c.files]} for c in CORPORA.values()]
    if as_json:
        print(json.dumps(rows))
        return
    table = Table(title=f"corpora (status under {to})")
    for col in ("name", "status", "file", "bytes", "sha256", "licence", "source"):
        table.add_column(col, overflow="fold")
    for r in rows:
        for i, f in enumerate(r["files"]):
            first = i == 0
            table.add_row(r["name"] if first else "", r["status"] if first else "", f["path"], f"{f['bytes']:,}",
                          f["sha256"][:16], r["licence"] if first else "", r["source"] if first else "")
    Console().print(table)


def data_get(
    name: str = typer.Argument(..., help="A corpus from 'rnnkit data list', e.g. multi30k."),
    source: Optional[str] = typer.Option(None, "--from", help="A folder laid out like ../shared/data, or a mirror "
                                                             "URL; default: the corpus's upstream address."),
    to: Path = typer.Option(Path("../shared/data"), "--to", help="Where to put it (the corpus gets its folder)."),
) -> None:
    """Fetch a corpus, verify every file's size and SHA-256, then move it into place.

    A corrupted or partial copy is refused and nothing is left where the configs read.

    Example:  rnnkit data get multi30k --from /mnt/corpora --to ../shared/data
    """
    from rnnkit.data.fetch import get

    with user_errors():
        for line in get(name, source, to):
            err_console.print(line, highlight=False)
    err_console.print(f"{name}: ready in {to / name}")


def data_info(store: Path = typer.Argument(..., help="A prepared store's folder (printed by 'rnnkit prepare').")
              ) -> None:
    """Show what a prepared store holds: sources and their fingerprints, settings, sizes, tokenizers.

    Example:  rnnkit data info ~/.cache/rnnkit/stores/translation-3477dbd57dcfa4a9d14c9e72f5aff4c2
    """
    from rnnkit.data.store import Store

    with user_errors():
        print_store(Store.open(store))
