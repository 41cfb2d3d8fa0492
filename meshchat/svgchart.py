"""Small self-contained SVG charts and one-file HTML reports, with no dependency.

Pure functions from numbers to text: the mesh picture (meshmap.py) and the
reports of scripts/chaos.py and scripts/bench.py use them. Every text that
goes into the markup passes through ``esc``, which also drops the characters
XML 1.0 cannot hold (text here may come from the network: nicks, labels).
"""

import math
import re
from typing import List, Optional, Sequence, Tuple

# Characters XML 1.0 forbids even escaped: most C0 controls, lone surrogates, U+FFFE and U+FFFF.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
PALETTE = ("#3465a4", "#f57900", "#4e9a06", "#75507b", "#c4a000", "#cc0000", "#06989a", "#888a85")
FONT = 'font-family="sans-serif" font-size="12"'


def esc(text: object) -> str:
    """``text`` safe inside an XML element or a double-quoted attribute."""
    s = _NOT_XML.sub("\ufffd", str(text))
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def fmt(value: Optional[float]) -> str:
    """A figure short enough for an axis or a bar: 3 significant digits."""
    if value is None:
        return "n/a"
    if value == 0 or 0.01 <= abs(value) < 10_000:
        return f"{value:.3g}"
    return f"{value:.2e}"


def _nice_top(top: float) -> float:
    """An axis end at or above ``top``: 1, 2 or 5 times a power of ten."""
    if top <= 0 or top != top:
        return 1.0
    power = 10 ** math.floor(math.log10(top))
    for step in (1, 2, 5, 10):
        if step * power >= top:
            return step * power
    return 10 * power


def bar_chart(title: str, categories: Sequence[str], series: Sequence[Tuple[str, Sequence[Optional[float]]]],
              unit: str = "", top: Optional[float] = None, width: int = 640, height: int = 300) -> str:
    """Grouped vertical bars: one group per category, one bar per series (None: no bar)."""
    left, right, head, foot = 60, 10, 30, 60
    plot_w, plot_h = width - left - right, height - head - foot
    values = [v for _, vs in series for v in vs if v is not None]
    top = top if top is not None else _nice_top(max(values, default=1.0))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" {FONT}>',
           f'<text x="{width / 2:.0f}" y="18" text-anchor="middle" font-weight="bold">{esc(title)}</text>']
    for k in range(5):  # axis and grid
        y = head + plot_h * (1 - k / 4)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{esc(fmt(top * k / 4))}</text>')
    if unit:
        out.append(f'<text x="12" y="{head + plot_h / 2:.0f}" transform="rotate(-90 12 {head + plot_h / 2:.0f})" '
                   f'text-anchor="middle">{esc(unit)}</text>')
    n_cat, n_ser = max(len(categories), 1), max(len(series), 1)
    group = plot_w / n_cat
    bar = group * 0.8 / n_ser
    for i, cat in enumerate(categories):
        x0 = left + group * i + group * 0.1
        for j, (_, vs) in enumerate(series):
            v = vs[i] if i < len(vs) else None
            if v is None:
                continue
            h = plot_h * min(max(v / top, 0.0), 1.0)
            x, y = x0 + bar * j, head + plot_h - h
            out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(bar - 1, 1):.1f}" height="{h:.1f}" '
                       f'fill="{PALETTE[j % len(PALETTE)]}"><title>{esc(series[j][0])} {esc(cat)}: '
                       f'{esc(fmt(v))} {esc(unit)}</title></rect>')
        out.append(f'<text x="{left + group * (i + 0.5):.1f}" y="{head + plot_h + 16}" '
                   f'text-anchor="middle">{esc(cat)}</text>')
    out.extend(_legend([name for name, _ in series], left, height - 18))
    out.append("</svg>")
    return "\n".join(out)


def line_chart(title: str, xs: Sequence[float], series: Sequence[Tuple[str, Sequence[Optional[float]]]],
               xlabel: str = "", unit: str = "", top: Optional[float] = None, width: int = 640,
               height: int = 300) -> str:
    """Lines with a dot per point over a numeric x axis (None: a gap)."""
    left, right, head, foot = 60, 20, 30, 60
    plot_w, plot_h = width - left - right, height - head - foot
    values = [v for _, vs in series for v in vs if v is not None]
    top = top if top is not None else _nice_top(max(values, default=1.0))
    x_lo, x_hi = (min(xs), max(xs)) if xs else (0.0, 1.0)
    span = (x_hi - x_lo) or 1.0

    def px(x: float) -> float:
        return left + plot_w * (x - x_lo) / span

    def py(v: float) -> float:
        return head + plot_h * (1 - min(max(v / top, 0.0), 1.0))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" {FONT}>',
           f'<text x="{width / 2:.0f}" y="18" text-anchor="middle" font-weight="bold">{esc(title)}</text>']
    for k in range(5):
        y = head + plot_h * (1 - k / 4)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{esc(fmt(top * k / 4))}</text>')
    for x in xs:
        out.append(f'<text x="{px(x):.1f}" y="{head + plot_h + 16}" text-anchor="middle">{esc(fmt(x))}</text>')
    if xlabel:
        out.append(f'<text x="{left + plot_w / 2:.0f}" y="{head + plot_h + 32}" text-anchor="middle">'
                   f'{esc(xlabel)}</text>')
    if unit:
        out.append(f'<text x="12" y="{head + plot_h / 2:.0f}" transform="rotate(-90 12 {head + plot_h / 2:.0f})" '
                   f'text-anchor="middle">{esc(unit)}</text>')
    for j, (name, vs) in enumerate(series):
        colour = PALETTE[j % len(PALETTE)]
        points = [(px(x), py(v)) for x, v in zip(xs, vs) if v is not None]
        if len(points) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for (x, y), v in zip(points, [v for v in vs if v is not None]):
            out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"><title>{esc(name)}: '
                       f'{esc(fmt(v))} {esc(unit)}</title></circle>')
    out.extend(_legend([name for name, _ in series], left, height - 14))
    out.append("</svg>")
    return "\n".join(out)


def _legend(names: List[str], x: float, y: float) -> List[str]:
    out = []
    for j, name in enumerate(names):
        out.append(f'<rect x="{x:.0f}" y="{y - 10:.0f}" width="10" height="10" fill="{PALETTE[j % len(PALETTE)]}"/>')
        out.append(f'<text x="{x + 14:.0f}" y="{y:.0f}">{esc(name)}</text>')
        x += 24 + 7 * len(name)
    return out


def html_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def html_page(title: str, sections: Sequence[Tuple[str, str]], preamble: str = "") -> str:
    """One self-contained XHTML-compatible page: each section a heading and its markup (inline SVG, tables)."""
    parts = [
        "<!DOCTYPE html>",
        '<html xmlns="http://www.w3.org/1999/xhtml" lang="en"><head><meta charset="utf-8"/>',
        f"<title>{esc(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:1em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
        "pre{background:#f4f4f4;padding:.5em;overflow-x:auto}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    if preamble:
        parts.append(f"<pre>{esc(preamble)}</pre>")
    for heading, markup in sections:
        parts.append(f"<h2>{esc(heading)}</h2>\n{markup}")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
