"""Charts drawn on the server as inline SVG: no script, no external asset, readable by a
screen reader (each chart has a <title> and a <desc>, each mark its own <title>), and
styled by class from marketer.css (the admin CSP allows no inline style).

Pages show the same numbers in a table next to each chart.
"""

from __future__ import annotations

from collections.abc import Sequence

from markupsafe import Markup, escape

ROW = 30  # height of a bar's row
CHAR = 7.2  # average width of a character at the chart's font size
PAD = 10
MAX_COLUMN = 72  # widest step of a column chart (column and gap)


def _frame(chart_id: str, kind: str, width: float, height: float, title: str, desc: str) -> str:
    return (
        f'<svg class="chart {kind}" id="{escape(chart_id)}" role="img" '
        f'aria-labelledby="{escape(chart_id)}-title {escape(chart_id)}-desc" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" width="{width:.0f}" height="{height:.0f}" '
        f'preserveAspectRatio="xMinYMin meet" xmlns="http://www.w3.org/2000/svg">'
        f'<title id="{escape(chart_id)}-title">{escape(title)}</title>'
        f'<desc id="{escape(chart_id)}-desc">{escape(desc)}</desc>'
    )


def _label_width(labels: Sequence[str], most: float = 230) -> float:
    return min(most, max((len(label) for label in labels), default=4) * CHAR + 2 * PAD)


def _empty(chart_id: str, kind: str, title: str, width: float, text: str) -> Markup:
    svg = _frame(chart_id, f"{kind} is-empty", width, 40, title, text)
    svg += f'<text class="empty" x="0" y="24">{escape(text)}</text></svg>'
    return Markup(svg)


def bar_chart(
    items: Sequence[tuple[str, int]],
    *,
    chart_id: str,
    title: str,
    desc: str,
    width: float = 480,
    empty: str = "No data yet.",
) -> Markup:
    """Horizontal bars, one row per (label, value), longest scaled to the full width."""
    if not items:
        return _empty(chart_id, "bars", title, width, empty)
    left = _label_width([label for label, _ in items])
    room = width - left - 7 * CHAR - PAD  # space for the value after the longest bar
    top = max(value for _, value in items) or 1
    height = len(items) * ROW + PAD
    parts = [_frame(chart_id, "bars", width, height, title, desc)]
    for i, (label, value) in enumerate(items):
        y = PAD / 2 + i * ROW
        length = max(room * value / top, 1 if value else 0)
        parts.append(
            f'<g class="row"><title>{escape(label)}: {value:,}</title>'
            f'<text class="label" x="{left - PAD:.1f}" y="{y + 19:.1f}" text-anchor="end">'
            f"{escape(label)}</text>"
            f'<rect class="bar" x="{left:.1f}" y="{y + 5:.1f}" width="{length:.1f}" '
            f'height="{ROW - 10}" rx="3"/>'
            f'<text class="value" x="{left + length + 6:.1f}" y="{y + 19:.1f}">{value:,}</text>'
            "</g>"
        )
    parts.append("</svg>")
    return Markup("".join(parts))


def funnel_chart(
    steps: Sequence[tuple[str, int]],
    *,
    chart_id: str,
    title: str,
    desc: str,
    width: float = 480,
) -> Markup:
    """Centred bars narrowing step by step, each with its count and share of the first."""
    if not steps:
        return _empty(chart_id, "funnel", title, width, "No data yet.")
    left = _label_width([label for label, _ in steps], most=120)
    right = 15 * CHAR
    room = width - left - right
    first = steps[0][1]
    top = max(value for _, value in steps) or 1
    height = len(steps) * ROW + PAD
    parts = [_frame(chart_id, "funnel", width, height, title, desc)]
    for i, (label, value) in enumerate(steps):
        y = PAD / 2 + i * ROW
        length = max(room * value / top, 2)
        x = left + (room - length) / 2
        share = f"{value / first:.0%}" if first else "–"
        parts.append(
            f'<g class="step step-{i}"><title>{escape(label)}: {value:,} ({share})</title>'
            f'<text class="label" x="{left - PAD:.1f}" y="{y + 19:.1f}" text-anchor="end">'
            f"{escape(label)}</text>"
            f'<rect class="bar" x="{x:.1f}" y="{y + 4:.1f}" width="{length:.1f}" '
            f'height="{ROW - 8}" rx="3"/>'
            f'<text class="value" x="{left + room + PAD:.1f}" y="{y + 19:.1f}">'
            f"{value:,} · {share}</text></g>"
        )
    parts.append("</svg>")
    return Markup("".join(parts))


def column_chart(
    points: Sequence[tuple[str, int]],
    *,
    chart_id: str,
    title: str,
    desc: str,
    width: float = 960,
    height: float = 240,
    empty: str = "No data yet.",
) -> Markup:
    """Columns over time (label, value), left to right, with a scale on the left; a column
    is at most MAX_COLUMN wide, so a few days do not make slabs."""
    if not points:
        return _empty(chart_id, "columns", title, width, empty)
    top = max(value for _, value in points) or 1
    left, bottom, head = 6 * CHAR, 28.0, 14.0
    plot_w, plot_h = width - left - PAD, height - bottom - head
    step = min(plot_w / len(points), MAX_COLUMN)
    every = max(1, round(len(points) / 12))  # at most about a dozen labels on the axis
    parts = [_frame(chart_id, "columns", width, height, title, desc)]
    base = head + plot_h
    parts.append(
        f'<line class="axis" x1="{left:.1f}" y1="{base:.1f}" x2="{width - PAD:.1f}" '
        f'y2="{base:.1f}"/>'
        f'<line class="grid" x1="{left:.1f}" y1="{head:.1f}" x2="{width - PAD:.1f}" '
        f'y2="{head:.1f}"/>'
        f'<text class="tick" x="{left - 6:.1f}" y="{head + 4:.1f}" text-anchor="end">'
        f"{top:,}</text>"
        f'<text class="tick" x="{left - 6:.1f}" y="{base + 4:.1f}" text-anchor="end">0</text>'
    )
    for i, (label, value) in enumerate(points):
        h = plot_h * value / top
        x = left + i * step + step * 0.15
        parts.append(
            f'<g class="col"><title>{escape(label)}: {value:,}</title>'
            f'<rect class="bar" x="{x:.1f}" y="{base - h:.1f}" width="{step * 0.7:.1f}" '
            f'height="{h:.1f}" rx="2"/>'
            + (
                f'<text class="value" x="{x + step * 0.35:.1f}" y="{base - h - 4:.1f}" '
                f'text-anchor="middle">{value:,}</text>'
                if value
                else ""
            )
            + "</g>"
        )
        if i % every == 0:
            parts.append(
                f'<text class="tick" x="{x + step * 0.35:.1f}" y="{base + 18:.1f}" '
                f'text-anchor="middle">{escape(label)}</text>'
            )
    parts.append("</svg>")
    return Markup("".join(parts))
