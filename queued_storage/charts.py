"""Bar charts as inline SVG, rendered on the server: no JavaScript, no library, no
build step. Each bar has a ``<title>`` (its time and value, shown on hover), the
axis has labels in the current time zone, and the tallest bar fills the plot."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, tzinfo
from html import escape

from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString, mark_safe

#: Size of a chart (SVG user units, one CSS pixel each).
WIDTH = 260
HEIGHT = 96
#: Room for the axis labels below the bars and the scale on their left.
BOTTOM = 16
#: The width of an axis label (``HH:MM`` at 10 px): none starts closer to the edge.
TICK_WIDTH = 28
LEFT = 64
TOP = 6


@dataclass(frozen=True)
class Bar:
    """One bar: the start of its interval and its value."""

    at: datetime
    value: float


def local_time(at: datetime) -> str:
    """``HH:MM`` in the current time zone (``TIME_ZONE``, or the one activated)."""
    return _in_zone(at, timezone.get_current_timezone())[1]


@functools.lru_cache(maxsize=1024)
def _in_zone(at: datetime, zone: tzinfo) -> tuple[datetime, str]:
    """``at`` in ``zone`` (a naive ``at``, with ``USE_TZ = False``, as it is) and
    its ``HH:MM``: a dashboard draws the same bar starts for every storage."""
    local = at.astimezone(zone) if timezone.is_aware(at) else at
    return local, local.strftime("%H:%M")


def bar_chart(
    bars: Sequence[Bar],
    *,
    label: str,
    colour: str,
    text: Callable[[float], str],
    every: int,
    tick: Callable[[datetime], bool] | None = None,
    css_class: str = "qs-chart",
) -> SafeString:
    """An SVG bar chart of ``bars`` (oldest first): ``text`` formats a value for
    the scale and the bars' titles, and every ``every``-th bar's start is an axis
    label (or, with ``tick``, each bar's whose start it accepts: e.g. whole hours).
    A chart of zeros has no bar taller than its baseline and no scale above it."""
    plot_width = WIDTH - LEFT
    plot_height = HEIGHT - BOTTOM - TOP
    tallest = max((bar.value for bar in bars), default=0.0)
    step = plot_width / max(len(bars), 1)
    width = f"{max(step - 1, 1):.2f}"
    # A dashboard draws six charts a storage over the same bar starts, mostly of
    # the same few values: each label is formatted and escaped once a chart, and
    # the numbers need no escaping (this is what format_html_join would build).
    zone = timezone.get_current_timezone()
    values: dict[float, str] = {}
    rects = []
    ticks = []
    for index, bar in enumerate(bars):
        x = LEFT + index * step
        height = 0.0 if tallest <= 0 else bar.value / tallest * plot_height
        local, when = _in_zone(bar.at, zone)
        shown = values.get(bar.value)
        if shown is None:
            shown = values[bar.value] = text(bar.value)
        rects.append(
            f'<rect class="qs-bar" x="{x:.2f}" y="{TOP + plot_height - height:.2f}" '
            f'width="{width}" height="{height:.2f}">'
            f"<title>{escape(f'{when}: {shown}')}</title></rect>"
        )
        ticked = tick(local) if tick is not None else index % every == 0
        if ticked and x + TICK_WIDTH <= WIDTH:
            ticks.append(f'<text x="{x:.2f}" y="{HEIGHT - 3}">{escape(when)}</text>')
    baseline = TOP + plot_height
    return format_html(
        '<svg class="{}" role="img" xmlns="http://www.w3.org/2000/svg" '
        'width="{}" height="{}" viewBox="0 0 {} {}"><title>{}</title>'
        '<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#999" stroke-width="1"/>'
        '<text class="qs-scale" x="{}" y="{}" text-anchor="end" font-size="10">{}'
        "</text>"
        '<text class="qs-scale" x="{}" y="{}" text-anchor="end" font-size="10">0'
        "</text>"
        '<g fill="{}">{}</g><g font-size="10" fill="currentColor">{}</g></svg>',
        css_class,
        WIDTH,
        HEIGHT,
        WIDTH,
        HEIGHT,
        label,
        LEFT,
        baseline,
        WIDTH,
        baseline,
        LEFT - 4,
        TOP + 8,
        text(tallest) if tallest > 0 else "",
        LEFT - 4,
        baseline,
        colour,
        mark_safe("".join(rects)),  # each part escaped above
        mark_safe("".join(ticks)),  # each part escaped above
    )
