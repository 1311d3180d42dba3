"""What ``predict --attention`` shows of a classifier's weights: words shaded on a terminal,
and a small self-contained HTML page (``--attention-html``). Both read the entries of
:meth:`rnnkit.tasks.classifier_text.ClassifierText.predict_details`."""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Sequence

from rich.text import Text

SHADE = (255, 170, 60)      # the colour of full weight; no weight is the background


def _shaded(pairs: Sequence[tuple[str, float]]) -> Text:
    """Words with a background whose strength is the weight against the largest of the line."""
    top = max((a for _, a in pairs), default=0.0) or 1.0
    text = Text()
    for k, (word, weight) in enumerate(pairs):
        if k:
            text.append(" ")
        share = weight / top
        r, g, b = (int(255 - (255 - c) * share) for c in SHADE)
        text.append(word, style=f"black on rgb({r},{g},{b})" if share > 0.05 else "")
    return text


def terminal_lines(d: dict[str, Any] | None, probs: bool, hops: bool) -> list[Text]:
    """One entry as shaded lines: the label (and probability) and the words; documents one
    line per sentence with its weight; with ``hops`` one line per hop."""
    if d is None:
        return [Text("")]
    head = Text(d["label"] + (f"\t{d['probability']:.4f}" if probs else ""), style="bold")
    if "sentences" in d:
        lines = [head]
        for s in d["sentences"]:
            lines.append(Text(f"  [{s['weight']:.3f}] ") + _shaded(s["words"]))
        return lines
    line = head + Text("\t") + _shaded(d.get("attention", []))
    extra = [Text(f"  hop {h + 1}: ") + _shaded(pairs) for h, pairs in enumerate(d.get("hops", []))] if hops else []
    return [line, *extra]


def _spans(pairs: Sequence[tuple[str, float]]) -> str:
    top = max((a for _, a in pairs), default=0.0) or 1.0
    return " ".join(f'<span style="background: rgba({SHADE[0]},{SHADE[1]},{SHADE[2]},{a / top:.3f})" '
                    f'title="{a:.4f}">{html.escape(w)}</span>' for w, a in pairs)


def write_html(path: Path, inputs: Sequence[str], entries: Sequence[dict[str, Any] | None], title: str) -> None:
    """A page with each input's label and its words shaded by weight (each hop's below the
    mean; documents: each sentence with a bar for its weight, and its words within it)."""
    blocks = []
    for n, (line, d) in enumerate(zip(inputs, entries), start=1):
        if d is None:
            continue
        rows = []
        if "sentences" in d:
            for s in d["sentences"]:
                rows.append(f'<div class="row"><span class="bar" style="width: {100 * s["weight"]:.1f}px" '
                            f'title="{s["weight"]:.4f}"></span><span class="w">{s["weight"]:.3f}</span>'
                            f'{_spans(s["words"])}</div>')
        else:
            tag = '<span class="tag">mean</span>' if d.get("hops") else ""
            rows.append(f'<div class="row">{tag}{_spans(d.get("attention", []))}</div>')
            for h, pairs in enumerate(d.get("hops", []), start=1):
                rows.append(f'<div class="row"><span class="tag">hop {h}</span>{_spans(pairs)}</div>')
        blocks.append(f'<section><h2>{n}. {html.escape(d["label"])} <small>{d["probability"]:.3f}</small></h2>'
                      f'{"".join(rows)}</section>')
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font: 15px/1.7 system-ui, sans-serif; margin: 2em auto; padding: 0 1em; max-width: 60em; color: #222; }}
h1 {{ font-size: 1.2em; }} h2 {{ font-size: 1em; margin: 1.2em 0 0.3em; }} small {{ color: #777; font-weight: normal; }}
.row {{ margin: 0.15em 0; }} span[title] {{ padding: 0.1em 0.15em; border-radius: 3px; }}
.tag {{ display: inline-block; width: 3.5em; color: #777; font-size: 0.85em; }}
.bar {{ display: inline-block; height: 0.8em; background: rgb(90,120,200); margin-right: 0.3em; }}
.w {{ display: inline-block; width: 3.5em; color: #777; font-size: 0.85em; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Each word's background is its attention weight against the largest in its line (hover for the weight).</p>
{"".join(blocks)}
</body></html>
"""
    path.write_text(page, encoding="utf-8")
