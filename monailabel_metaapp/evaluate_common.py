"""What `metaapp evaluate seg` and `metaapp evaluate cls` share: reading the command line's lists,
plotting a score against the number of shots per method, and writing a result (JSON + PNG)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from monailabel_metaapp.provenance import stamp


def int_list(text: str | int) -> list[int]:
    """ "1,3,5" -> [1, 3, 5] (e.g. `--shots`).

    Args:
        text: comma-separated whole numbers (a single int is accepted as it is).
    """
    return [int(s) for s in str(text).split(",")]


def name_list(text: str | None, default: str) -> list[str]:
    """ "scratch,linear" -> ["scratch", "linear"], empty names dropped (e.g. `--baselines`).

    Args:
        text: comma-separated names; None: `default`; "": none.
        default: what None stands for.
    """
    return [b for b in (text if text is not None else default).split(",") if b]


def plot_curves(
    rows: list[dict],
    png: str | Path,
    y: str,
    y_err: str,
    ylabel: str,
    xlabel: str = "shots",
    group: str | None = None,
    title: str = "",
    panel: tuple[float, float] = (4.2, 3.6),
    ylim: tuple[float, float] | None = None,
    xticks: list[int] | None = None,
    x: str = "shots",
    xscale: str = "linear",
    ncols: int | None = None,
) -> None:
    """One panel per `group` value (or one panel), one curve per method: `y` ± `y_err` against `x`.

    Args:
        rows: result rows, each with "shots", "method", `y`, `y_err` (and `group`).
        png: the image to write.
        y: the row field plotted.
        y_err: the row field drawn as error bars.
        ylabel: the y axis' label.
        xlabel: the x axis' label.
        group: the row field that splits the panels (None: one panel, titled `title`).
        title: the figure's title.
        panel: width and height of one panel, in inches.
        ylim: the y range (None: matplotlib's choice).
        xticks: the x ticks (None: matplotlib's choice).
        x: the row field on the x axis.
        xscale: "linear" or "log".
        ncols: panels per row (None: all in one row).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({r[group] for r in rows}) if group else [None]
    methods = sorted({r["method"] for r in rows})
    colour = {m: f"C{i}" for i, m in enumerate(methods)}  # one colour per method in every panel
    ncols = min(ncols or len(groups), len(groups))
    nrows = -(-len(groups) // ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(panel[0] * ncols, panel[1] * nrows), squeeze=False)
    axes = [list(grid.flat)]
    for ax in axes[0][len(groups) :]:
        ax.set_visible(False)
    for ax, g in zip(axes[0], groups):
        for method in methods:
            rr = sorted((r for r in rows if r["method"] == method and (g is None or r[group] == g)), key=lambda r: r[x])
            if rr:
                xs = [r[x] for r in rr]
                ax.errorbar(
                    xs,
                    [r[y] for r in rr],
                    yerr=[r[y_err] for r in rr],
                    marker="o",
                    capsize=3,
                    label=method,
                    color=colour[method],
                )
        ax.set_title(title if g is None else g)
        ax.set_xlabel(xlabel)
        ax.set_xscale(xscale)
        ax.set_ylabel(ylabel)
        if ylim is not None:
            ax.set_ylim(*ylim)
        if xticks is not None:
            ax.set_xticks(xticks)
        ax.grid(alpha=0.3)
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_legend_handles_labels()[0]}
    axes[0][0].legend([handles[m] for m in methods if m in handles], [m for m in methods if m in handles])
    if group and title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def write_result(
    result: dict, out: str | Path, plot: Callable[[dict, Path], None], weights: list[str | Path] | None = None
) -> Path:
    """Write a result as JSON at `out` (folders made) and its plot beside it (same name, .png).

    Args:
        result: {"settings", "rows", ...}.
        out: the JSON file.
        plot: draws `result` into the PNG path it is given.
        weights: the weights files the result used: stamps it (`provenance`: commit, SHA-256s, host,
            command) unless it carries a stamp already.
    """
    if weights is not None and "provenance" not in result:
        result["provenance"] = stamp(weights)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    return out
