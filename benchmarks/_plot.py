"""Plots for the benchmarks: ``--plot PATH.png`` draws what a reader would rather see.

matplotlib is optional (the ``emailmw[plot]`` extra, part of ``emailmw[dev]``). A
benchmark imports this module only when it was given ``--plot`` (``benchmarks/`` is
on ``sys.path`` when a benchmark runs as a script), and calls :func:`start` right
after parsing its arguments, so that a bad path or a missing extra stops it before it
measures anything. Drawing uses the Agg backend (no display).

The helpers are small: :func:`figure` (a grid of panels), :func:`cdf`, :func:`bars`,
:func:`grouped_bars`, :func:`log_scale`, and :func:`save`, which titles the figure
with the machine and the date and writes a small PNG.
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXTRA = "emailmw[plot]"
DPI = 100
COLORS = 64  # colours in the PNG's palette: plenty for lines, bars and anti-aliased text


def start(parser: argparse.ArgumentParser, path: str) -> Any:
    """Check ``--plot PATH`` and import matplotlib (Agg); return ``matplotlib.pyplot``.

    A path that is not a ``.png`` in an existing folder is a usage error; a missing
    matplotlib exits with a message naming the extra to install."""
    target = Path(path)
    if target.suffix.lower() != ".png":
        parser.error(f"--plot {path}: the file name must end in .png")
    if not target.parent.is_dir():
        parser.error(f"--plot {path}: folder {target.parent} does not exist")
    try:
        import matplotlib
    except ImportError as exc:
        raise SystemExit(
            f"--plot needs matplotlib, which cannot be imported ({exc}); "
            f"install the plot extra: pip install '{EXTRA}'"
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    pyplot.rcParams.update({"font.size": 8, "axes.titlesize": 9, "legend.fontsize": 7})
    return pyplot


def machine() -> str:
    """One line naming this machine: CPUs, CPU model, kernel, Python."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} CPUs ({model}), {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def figure(
    pyplot: Any, panels: int, *, cols: int = 2, size: tuple[float, float] = (5.0, 3.2)
) -> Any:
    """A figure of ``panels`` axes, ``cols`` a row; returns (figure, list of axes)."""
    cols = max(1, min(cols, panels))
    rows = (panels + cols - 1) // cols
    fig, grid = pyplot.subplots(
        rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False, layout="constrained"
    )
    axes = [ax for row in grid for ax in row]
    for spare in axes[panels:]:
        spare.set_visible(False)
    return fig, axes[:panels]


def log_scale(ax: Any, axis: str = "x") -> None:
    """A logarithmic ``axis`` labelled on the decades only (minor labels overlap)."""
    getattr(ax, f"set_{axis}scale")("log")
    ax.tick_params(axis=axis, which="minor", labelbottom=False, labelleft=False)


def cdf(ax: Any, values: Sequence[float], label: str, **style: Any) -> None:
    """The empirical CDF of ``values`` (a step from 0 to 1); nothing for no values."""
    ordered = sorted(values)
    if not ordered:
        return
    n = len(ordered)
    ax.step(ordered, [(i + 1) / n for i in range(n)], where="post", label=label, **style)
    ax.set_ylim(0.0, 1.02)
    ax.set_ylabel("fraction of messages")
    ax.grid(True, alpha=0.3)


def bars(
    ax: Any,
    labels: Sequence[str],
    values: Sequence[float],
    *,
    unit: str,
    fmt: str = "{:,.1f}",
    colors: Sequence[str] | None = None,
    suffix: str | None = None,
) -> None:
    """Horizontal bars, first label on top, each with its value written beside it
    (followed by ``suffix``, by default `` unit``)."""
    positions = list(range(len(labels)))[::-1]
    drawn = ax.barh(positions, values, color=colors)
    ax.set_yticks(positions, labels)
    after = f" {unit}" if suffix is None else suffix
    ax.bar_label(drawn, labels=[fmt.format(v) + after for v in values], padding=2)
    ax.set_xlabel(unit)
    ax.margins(x=0.25)
    ax.grid(True, axis="x", alpha=0.3)


def grouped_bars(
    ax: Any,
    groups: Sequence[str],
    series: dict[str, Sequence[float]],
    *,
    unit: str,
    fmt: str = "{:,.1f}",
) -> None:
    """Vertical bars: one cluster per group, one bar per series, values on top."""
    width = 0.8 / max(len(series), 1)
    for index, (name, values) in enumerate(series.items()):
        offsets = [g + (index - (len(series) - 1) / 2) * width for g in range(len(groups))]
        drawn = ax.bar(offsets, values, width, label=name)
        ax.bar_label(drawn, labels=[fmt.format(v) for v in values], padding=1, fontsize=6)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(unit)
    ax.margins(y=0.3 if len(series) > 1 else 0.15)
    ax.grid(True, axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend(loc="upper left", ncols=len(series))


def save(pyplot: Any, fig: Any, path: str, title: str) -> None:
    """Title ``fig`` with ``title``, the machine and the date; write it to ``path`` as a
    small PNG (``DPI`` dots per inch, reduced to a palette of ``COLORS``)."""
    from PIL import Image  # a dependency of matplotlib

    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    fig.suptitle(f"{title}\n{machine()}, {when}", fontsize=9)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    pyplot.close(fig)
    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(COLORS).save(path, format="PNG", optimize=True)
    sys.stderr.write(f"plot: wrote {path}\n")
