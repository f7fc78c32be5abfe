"""The bench's charts: throughput and p99 against concurrency, one line per target (and path).

matplotlib is imported only when charts are drawn: it is a `bench` extra, and slow to import.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

from aggregator.bench.plan import Target
from aggregator.bench.results import BenchResult
from aggregator.bench.summary import Row, workload_line

CHART_FILES = ("throughput.png", "p99.png")

_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
_DASHES = ("-", "--", "-.")


class LineStyle(NamedTuple):
    """How one target's line looks in the charts."""

    color: str
    marker: str
    linestyle: str


def line_styles(count: int) -> list[LineStyle]:
    """A distinct colour for each of up to 20 lines, then marker and dash tell them apart.

    matplotlib's default cycle has 10 colours: with more targets, two lines shared a colour
    and marker and a reader could not tell which was which.
    """
    import matplotlib

    palette = matplotlib.colormaps["tab20"]  # a listed map: an int picks its i-th colour
    return [
        LineStyle(
            matplotlib.colors.to_hex(palette(i % 20)),
            _MARKERS[i % len(_MARKERS)],
            _DASHES[(i // 20) % len(_DASHES)],
        )
        for i in range(count)
    ]


def write_charts(result: BenchResult, rows: list[Row], out: Path) -> list[Path]:
    """Throughput and p99 against concurrency, one line per target (log-scaled concurrency)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    for filename, attr, label in (
        ("throughput.png", "rps", "aggregated requests/s (median; bars: min-max)"),
        ("p99.png", "p99_ms", "p99 latency, ms (median)"),
    ):
        fig, ax = plt.subplots(figsize=(11, 5.5), dpi=110)
        names = list(dict.fromkeys(r.target for r in rows))
        for name, style in zip(names, line_styles(len(names)), strict=True):
            mine = [r for r in rows if r.target == name]
            xs = [r.concurrency for r in mine]
            ys = [getattr(r, attr) for r in mine]
            if attr == "rps":
                below = [r.rps - r.rps_min for r in mine]
                above = [r.rps_max - r.rps for r in mine]
                ax.errorbar(
                    xs,
                    ys,
                    yerr=[below, above],
                    capsize=3,
                    label=name,
                    color=style.color,
                    marker=style.marker,
                    linestyle=style.linestyle,
                )
            else:
                ax.plot(
                    xs,
                    ys,
                    label=name,
                    color=style.color,
                    marker=style.marker,
                    linestyle=style.linestyle,
                )
        levels = list(result.options.levels)
        if result.options.app is not None:
            pass  # a developer's own views: no ideal and no floor the bench could know
        elif attr == "rps":
            fan_out = Target("loop", "async", "aiohttp")
            ideal = [result.options.workload.ideal_rps(c, fan_out) or math.nan for c in levels]
            ax.plot(levels, ideal, linestyle=":", color="grey", label="ideal C/L")
        else:
            ax.axhline(
                result.options.workload.floor_s * 1000,
                linestyle=":",
                color="grey",
                label="slowest source",
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label.removeprefix("aggregated ") if result.options.app else label)
        ax.set_title(workload_line(result), fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        # Outside the axes: inside, it hid lines wherever "best" could not find room.
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        path = out / filename
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
