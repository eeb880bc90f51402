"""A tiny HTML builder with escaping by default, so report pages need no template dependency.

Every string passed as a child is escaped unless it is :class:`Markup` (already HTML). Attribute values
are always escaped. ``h("td", "0.5", cls="num", data_value="0.5")`` -> ``<td class="num"
data-value="0.5">0.5</td>`` (``cls`` stands for ``class``; ``_`` in attribute names becomes ``-``).
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from typing import Any

VOID = frozenset({"img", "br", "hr", "meta", "col"})


class Markup(str):
    """A string that is already HTML and must not be escaped again."""

    __slots__ = ()


def esc(text: Any) -> Markup:
    """Escaped text (``&``, ``<``, ``>``, quotes); Markup passes through unchanged."""
    if isinstance(text, Markup):
        return text
    return Markup(html.escape(str(text), quote=True))


def _attrs(attrs: dict[str, Any]) -> str:
    parts = []
    for key, value in attrs.items():
        if value is None or value is False:
            continue
        name = "class" if key in ("cls", "class_") else key.rstrip("_").replace("_", "-")
        parts.append(f" {name}" if value is True else f' {name}="{html.escape(str(value), quote=True)}"')
    return "".join(parts)


def _children(children: Iterable[Any]) -> str:
    out = []
    for child in children:
        if child is None:
            continue
        if isinstance(child, (list, tuple)):
            out.append(_children(child))
        else:
            out.append(esc(child))
    return "".join(out)


def h(tag: str, *children: Any, **attrs: Any) -> Markup:
    """One element; children are escaped text, Markup, None (skipped) or lists of those."""
    if tag in VOID:
        return Markup(f"<{tag}{_attrs(attrs)}>")
    return Markup(f"<{tag}{_attrs(attrs)}>{_children(children)}</{tag}>")


def join(*parts: Any) -> Markup:
    """Concatenate children (escaping plain strings)."""
    return Markup(_children(parts))


def fmt(value: Any, digits: int = 4) -> str:
    """A number as shown in reports: ``digits`` decimals, ``—`` for missing / NaN."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def num(value: Any, key: str | None = None, digits: int = 4) -> Markup:
    """A table cell for a number; ``data-key`` / ``data-value`` carry the exact value for checks."""
    exact = None if value is None else repr(value)
    return h("td", fmt(value, digits), cls="num", data_key=key, data_value=exact)


def table(header: Sequence[Any], rows: Iterable[Sequence[Any]], *, cls: str | None = None) -> Markup:
    """A table; a cell that is already a ``<td>`` Markup is used as is, anything else is wrapped."""
    head = h("tr", [h("th", c) for c in header])
    body = []
    for row in rows:
        cells = [c if isinstance(c, Markup) and c.startswith("<td") else h("td", c) for c in row]
        body.append(h("tr", cells))
    return h("table", h("thead", head), h("tbody", body), cls=cls)


def img(uri: str, alt: str, *, title: str | None = None, cls: str | None = None) -> Markup:
    """An embedded image (``uri`` a ``data:`` URI)."""
    return h("img", src=uri, alt=alt, title=title, cls=cls)


def section(ident: str, title: str, *body: Any) -> Markup:
    """A top-level report section with an anchor."""
    return h("section", h("h2", title), *body, id=ident)


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1180px;
padding:12px 20px;color:#1d1d1f;background:#fff;line-height:1.4}
h1{font-size:1.6em;margin:.3em 0}h2{border-bottom:2px solid #ddd;padding-bottom:3px;margin-top:1.6em}
h3{margin:1em 0 .4em}nav a{margin-right:1em}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.92em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.muted{color:#666;font-size:.9em}.kv td:first-child{font-weight:600;white-space:nowrap}
.grid{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
.gallery td{text-align:center;font-size:.8em}.gallery img{display:block;margin:auto}
.gallery td:first-child{max-width:190px;word-break:break-all}
img.fig{max-width:100%;height:auto}
.swatch{display:inline-block;width:.9em;height:.9em;border:1px solid #888;margin:0 4px -2px 10px}
.best{color:#0a7d2c}.worst{color:#b3261e}pre{background:#f7f7f7;padding:8px;overflow:auto;font-size:.85em}
details{margin:.5em 0}
"""


def page(title: str, body: Any, *, subtitle: Any = None, nav: Sequence[tuple[str, str]] = ()) -> str:
    """A complete self-contained document: inline CSS, no scripts, no external references."""
    links = h("nav", [h("a", label, href=f"#{ident}") for ident, label in nav]) if nav else None
    head = join(Markup('<meta charset="utf-8">'),
                Markup('<meta name="viewport" content="width=device-width, initial-scale=1">'),
                h("title", title), h("style", Markup(CSS)))
    sub = h("p", subtitle, cls="muted") if subtitle is not None else None
    return "<!DOCTYPE html>\n" + h("html", h("head", head), h("body", h("h1", title), sub, links, body),
                                   lang="en") + "\n"
