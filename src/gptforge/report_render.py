"""Rendering of the run report: one list of blocks written out as Markdown and as self-contained HTML.

`gptforge.report` reads a run directory and builds the page as a list of blocks; this module only turns blocks into
text, and knows nothing of stages or files beyond the images it inlines. The seam keeps each half readable and lets
a block kind be added in one place (both renderers sit side by side here).

Trade-offs:
- The blocks are rendered twice from one list, so the Markdown and the HTML cannot drift apart.
- The HTML carries its CSS inline and every image as a base64 data URI: bigger than linked files, but one file that
  can be mailed and opened offline. The Markdown links images relatively instead.
- Every piece of user text (labels, prompts, samples, paths) is escaped in both pages: samples are model output and
  can contain anything, `<script>` included. Markdown viewers render raw HTML, so it is entity-escaped there too.
"""

from __future__ import annotations

import base64
import html
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

NUM = ' class="num"'  # numbers align right
NUMBER = re.compile(r"^[+-]?[\d,]*\.?\d+(e[+-]?\d+)?( %|x| MB)?$")
CSS = """body{font-family:system-ui,-apple-system,"Segoe UI","PingFang SC","Hiragino Sans GB","Microsoft YaHei",
"Noto Sans CJK SC","Source Han Sans SC",sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #ccc;padding:3px 8px;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%}
pre{background:#f6f8fa;padding:.5em;white-space:pre-wrap;word-break:break-word;font-family:ui-monospace,Menlo,
Consolas,"Noto Sans Mono CJK SC","WenQuanYi Micro Hei Mono","Microsoft YaHei",monospace}nav a{margin-right:1em}
.warn{background:#fff4e5;border:1px solid #f0b429;padding:.5em 1em}h2{border-bottom:1px solid #ddd}
.sample{border-left:3px solid #ccc;padding-left:.8em;margin:.8em 0}.lbl{font-weight:bold;color:#555}"""

Block = tuple  # ("h", level, text, anchor) | ("p", text) | ("table", headers, rows) | ("img", path, caption)
#              | ("link", text, path) | ("pre", text) | ("sample", [(label, text), ...]) | ("warn", [text, ...])


def _md(s: Any, cell: bool = False) -> str:
    # Markdown viewers render raw HTML, so user text is entity-escaped here too (entities display as the characters).
    text = html.escape(str(s), quote=False)
    return text.replace("|", "\\|").replace("\n", "<br>") if cell else text


def _fence(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)  # the fence outlasts any backtick run inside
    f = "`" * max(3, longest + 1)
    return f"{f}text\n{text}\n{f}"


def _href(out_dir: Path, path: Path) -> str:
    return quote(Path(os.path.relpath(path, out_dir)).as_posix())


def render_markdown(title: str, blocks: list[Block], out_dir: Path) -> str:
    """The page as Markdown; images and files are linked relative to out_dir, where the page is written."""
    out = [f"# {_md(title)}"]
    for kind, *a in blocks:
        if kind == "h":
            out.append(f"{'#' * a[0]} {_md(a[1])}")
        elif kind == "p":
            out.append(_md(a[0]))
        elif kind == "table":
            lines = ["| " + " | ".join(_md(c, True) for c in row) + " |" for row in [a[0], *a[1]]]
            out.append("\n".join([lines[0], "|" + "---|" * len(a[0]), *lines[1:]]))
        elif kind in ("img", "link"):
            text, path = (a[1], a[0]) if kind == "img" else a
            out.append(f"{'!' if kind == 'img' else ''}[{_md(text)}]({_href(out_dir, path)})")
        elif kind == "pre":
            out.append(_fence(a[0]))
        elif kind == "sample":
            out.append("\n\n".join(f"**{_md(label)}**\n\n{_fence(text)}" for label, text in a[0]))
        elif kind == "warn":
            out.append("\n".join(f"- {_md(w)}" for w in a[0]))
    return "\n\n".join(out) + "\n"


def render_html(title: str, blocks: list[Block], out_dir: Path, run_dir: Path) -> str:
    """The page as one self-contained HTML file: CSS inline, images as data URIs, links relative to out_dir.

    run_dir only names an image that cannot be read (as the warnings name files: relative to the run).
    """
    e = html.escape
    nav = " ".join(f'<a href="#{e(b[3])}">{e(b[2])}</a>' for b in blocks if b[0] == "h" and b[1] == 2)
    out = [f"<h1>{e(title)}</h1>", f"<nav>{nav}</nav>"]
    for kind, *a in blocks:
        if kind == "h":
            anchor = f' id="{e(a[2])}"' if a[2] else ""
            out.append(f"<h{a[0]}{anchor}>{e(a[1])}</h{a[0]}>")
        elif kind == "p":
            out.append(f"<p>{e(a[0])}</p>")
        elif kind == "table":
            cell = lambda c: f"<td{NUM if NUMBER.match(c) else ''}>{e(c)}</td>"  # noqa: E731
            body = "".join("<tr>" + "".join(cell(str(c)) for c in row) + "</tr>" for row in a[1])
            head = "".join(f"<th>{e(str(h))}</th>" for h in a[0])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            try:
                src = "data:image/png;base64," + base64.b64encode(a[0].read_bytes()).decode()
                out.append(f'<figure><img src="{src}" alt="{e(a[1])}"><figcaption>{e(a[1])}</figcaption></figure>')
            except OSError as err:
                name = Path(os.path.relpath(a[0], run_dir)).as_posix()
                out.append(f"<p>(image {e(name)} unreadable: {e(str(err))})</p>")
        elif kind == "link":
            out.append(f'<p><a href="{e(_href(out_dir, a[1]))}">{e(a[0])}</a></p>')
        elif kind == "pre":
            out.append(f"<pre>{e(a[0])}</pre>")
        elif kind == "sample":
            inner = "".join(f'<div class="lbl">{e(label)}</div><pre>{e(text)}</pre>' for label, text in a[0])
            out.append(f'<div class="sample">{inner}</div>')
        elif kind == "warn":
            out.append('<div class="warn"><ul>' + "".join(f"<li>{e(w)}</li>" for w in a[0]) + "</ul></div>")
    head = f'<meta charset="utf-8"><meta name="viewport" content="width=device-width"><title>{e(title)}</title>'
    body = "\n".join(out)
    return f"<!DOCTYPE html>\n<html><head>{head}<style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
