"""What a person reads of a monitored run: the laziness figure, a plain-text summary, and the TensorBoard
Custom Scalars layout.

- :func:`laziness_figure` draws the monitor's measurements against the normalized time t̃: Δ and the
  bound t̃²·κ(w0) on log-log axes with the line 1 and the predicted horizon t̃*, activation stability,
  kernel alignment and NTK distance, displacement and tangent gap, and the relative displacement of each
  parameter tensor by name. :func:`save_figure` writes it as PNG, :func:`figure_to_array` gives the pixels
  for ``SummaryWriter.add_image``, :func:`figure_to_png` the pixels as PNG bytes (one draw, one encoding).
- :func:`laziness_summary` and :func:`regime`: a few lines of text, opening with one sentence on the regime
  the run was in, judged from the measures (Δ, activation stability, kernel alignment), not from α;
  :func:`regime_code` gives the regime as a number (:data:`REGIME_CODES`) for a scalar chart or HParams.
- :func:`custom_scalars_layout`: charts that never mix quantities of different kinds, the verdict's first, and
  one chart per per-layer measure.

Layer and parameter names are shown as given, or through the ``labels`` the caller passes
(:mod:`lightning_lazy.watch.naming`: ``0 Linear(10→256)`` rather than the wrapper path ``model.module.0``).

Only torch-free plotting (matplotlib's ``Figure`` with the Agg canvas, no pyplot state) and numpy.
"""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import quote

import numpy as np
from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.colors import Colormap
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullLocator

# ------------------------------------------------------------------------------------------ thresholds
#
# The regime sentence compares the last measures with these. Δ is relative to the initial residual
# ‖y* − αh(w0)‖ and the probe is usually drawn from the training set, where the network and its tangent
# model both end up fitting the targets; so Δ stays moderate even when the features change a lot
# (0.13 at α = 0.1 in the demo, weights moved 12.7×), and the ReLU pattern and the kernel are the clearer
# signals ("ReLU units" below: every piecewise-linear unit, see diagnostics.activation_stability). The values
# separate the demo's runs as their weights and kernels show: α = 10 and 100 lazy
# (Δ ≤ 0.05, ≥ 99 % of units unchanged), α = 0.1 feature learning (75 % unchanged), α = 1 in between.

# Lazy: the network stays within 10 % of the initial residual of its tangent model ...
LAZY_MAX_DIVERGENCE = 0.1
# ... at most 2 % of the ReLU units on the probe switched their on/off state from w0 ...
LAZY_MIN_ACTIVATION_STABILITY = 0.98
# ... and the tangent kernel kept its direction: cos(K_t, K_0) ≥ 0.98 (a rescaled kernel has 1).
LAZY_MIN_KERNEL_ALIGNMENT = 0.98
# Feature learning, any one of: the network is 30 % of the initial residual away from its tangent model,
FEATURE_MIN_DIVERGENCE = 0.3
# more than 10 % of the ReLU units switched,
FEATURE_MAX_ACTIVATION_STABILITY = 0.9
# or the kernel turned by more than cos⁻¹(0.9) ≈ 26°: the model now learns with another kernel.
FEATURE_MAX_KERNEL_ALIGNMENT = 0.9

LAZY = "lazy (kernel regime)"
FEATURE_LEARNING = "feature learning"
IN_BETWEEN = "in between"
UNKNOWN = "unknown"

# The regime as a number (logged as lazy/regime and as an HParams metric): higher is lazier, as activation
# stability and kernel alignment are. Unknown has no code (NaN: not logged).
REGIME_CODES = {LAZY: 1.0, IN_BETWEEN: 0.5, FEATURE_LEARNING: 0.0}

# Colours kept for one quantity in every panel and run.
_COLOURS = {
    "divergence": "tab:blue", "bound": "tab:red", "activation_stability": "tab:green",
    "kernel_alignment": "tab:purple", "ntk_distance": "tab:orange", "displacement": "tab:brown",
    "tangent_gap": "tab:cyan",
}


# ------------------------------------------------------------------------------------------------ figure

# Panel titles at y = 1 (the axes' top, where matplotlib's automatic placement puts them on these panels, none
# with ticks on top): the automatic placement lays out each panel's y tick labels once more at every draw.
_PANEL_TITLE = {"fontsize": 10, "y": 1.0}


def _value(entry: Mapping[str, float | None], key: str) -> float:
    """``entry[key]`` as a float; NaN when missing, None or not a number."""
    value = entry.get(key)
    try:
        return float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def _series(history: Sequence[Mapping[str, float | None]], key: str, log_y: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(t̃, value)`` of the entries with a finite t̃ > 0 and a finite value (> 0 when ``log_y``).

    t̃ = 0 (initialization) has no place on a log time axis; those entries are skipped, as are NaN values.
    """
    t = np.array([_value(e, "normalized_time") for e in history], dtype=float)
    v = np.array([_value(e, key) for e in history], dtype=float)
    keep = np.isfinite(t) & (t > 0) & np.isfinite(v)
    if log_y:
        keep &= v > 0
    order = np.argsort(t[keep], kind="stable")
    return t[keep][order], v[keep][order]


def _plot(ax: Axes, history: Sequence[Mapping[str, float | None]], key: str, label: str, log_y: bool) -> bool:
    t, v = _series(history, key, log_y)
    if len(t) == 0:
        return False
    ax.plot(t, v, "o-", ms=3.5, lw=1.4, color=_COLOURS[key], label=label)
    return True


def _no_data(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"{what}: not measured\n(or only at t̃ = 0)", transform=ax.transAxes, ha="center",
            va="center", fontsize=9, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def _plain_log_ticks(axis: Axis) -> None:
    # Plain numbers on the decades and no minor ticks: matplotlib's mathtext labels and its 8 minor ticks
    # per decade made a draw of this figure several times slower, and the monitor draws it often.
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_locator(NullLocator())


def _time_axis(ax: Axes) -> None:
    ax.set_xscale("log")
    _plain_log_ticks(ax.xaxis)
    ax.set_xlabel("normalized time t̃")
    ax.grid(True, which="major", alpha=0.3)


def _log_y(ax: Axes) -> None:
    ax.set_yscale("log")
    _plain_log_ticks(ax.yaxis)


def laziness_figure(history: list[dict[str, float]], *, horizon: float | None = None,
                    per_tensor: dict[str, float] | None = None, title: str = "", alpha: float | None = None,
                    labels: Mapping[str, str] | None = None) -> Figure:
    """The laziness figure of one run, from the monitor's measurements.

    Args:
        history: one dict per measurement, in any order, with any of the keys ``"normalized_time"`` (t̃,
            required for a point to be drawn), ``"divergence"``, ``"bound"`` (t̃²·κ(w0)),
            ``"activation_stability"``, ``"kernel_alignment"``, ``"ntk_distance"``, ``"displacement"``,
            ``"tangent_gap"`` (others are ignored). Missing keys, None and NaN leave gaps.
        horizon: the predicted laziness horizon t̃* = 1/√κ(w0), drawn as a vertical line when finite.
        per_tensor: relative displacement ‖w_p − w0_p‖/‖w0_p‖ of each parameter tensor, by name; drawn as
            a horizontal bar chart with the names on the axis, on the fixed log scale :data:`WEIGHT_SCALE`.
        labels: what the axis shows for each name of ``per_tensor`` (names without one are shown as they
            are): :func:`lightning_lazy.watch.naming.parameter_labels`, ``"0.weight Linear(10→256)"``.
        title: the start of the figure's title (e.g. the run's name); ``alpha`` and the regime of the last
            measurement (:func:`classify_regime`) follow it.
        alpha: the model's scale α, shown in the title.

    Panels, each on its own axes against t̃ on a log axis: (a) Δ and the bound, log y, with the line 1 and
    t̃*; (b) activation stability on y ∈ [0, 1]; (c) kernel alignment (left axis, [0, 1]) and NTK distance
    (right axis, from 0 to max(1, its largest value)); (d) displacement and tangent gap and (e) the per-tensor
    displacement, both on the log scale :data:`WEIGHT_SCALE` (widened by whole decades only for a value beyond
    it). The fixed axes make runs comparable at a glance: 0.999 at α = 100 and 0.75 at α = 0.1 do not both
    fill panel (b), and α = 100's displacement of 3e-4 does not draw a bar as long as α = 0.1's 13. Measurements at t̃ = 0 (at initialization)
    cannot sit on a log axis and are skipped, as are values ≤ 0 on a log y axis.

    Returns a ``matplotlib.figure.Figure`` with an Agg canvas (no pyplot state; nothing to close).
    """
    per_tensor = {(labels or {}).get(name, name): value for name, value in (per_tensor or {}).items()}
    names = list(per_tensor)
    # Fixed margins rather than constrained layout, which doubles the cost of a draw; the right column is
    # sized for the longest tensor name (about 0.55 em per character at 7-8 pt).
    height = max(7.5, 0.17 * len(names) + 1.5)  # about 0.17 in per name on the bar chart
    width = 16.0
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    verdict = classify_regime(history[-1]) if history else UNKNOWN
    heading = [part for part in (title, f"α = {alpha:g}" if alpha is not None else "",
                                 f"regime: {verdict}" if verdict != UNKNOWN else "") if part]
    top = 1 - 0.75 / height if heading else 1 - 0.45 / height
    bottom = 0.6 / height
    grid_right = 0.6 if names else 0.97
    grid = fig.add_gridspec(2, 2, left=0.05, right=grid_right, bottom=bottom, top=top, wspace=0.4, hspace=0.32,
                            width_ratios=[1.2, 1])
    axes = {"a": fig.add_subplot(grid[0, 0]), "b": fig.add_subplot(grid[0, 1]), "c": fig.add_subplot(grid[1, 0]),
            "d": fig.add_subplot(grid[1, 1])}
    if names:
        label_width = (max(len(n) for n in names) * 0.55 * 8 / 72 + 0.3) / width
        axes["e"] = fig.add_axes((grid_right + 0.01 + label_width, bottom, 0.985 - grid_right - 0.01 - label_width,
                                  top - bottom))

    # (a) Δ and the bound against t̃, log-log: the bound grows like t̃², Δ stays orders of magnitude below.
    ax = axes["a"]
    drawn = _plot(ax, history, "divergence", "divergence Δ from the tangent model", log_y=True)
    drawn |= _plot(ax, history, "bound", "bound t̃²·κ(w0)", log_y=True)
    if drawn:
        _time_axis(ax)
        _log_y(ax)
        ax.axhline(1.0, color="black", lw=1, ls="--", label="1")
        if horizon is not None and math.isfinite(horizon) and horizon > 0:
            ax.axvline(horizon, color="gray", lw=1.2, ls=":", label=f"horizon t̃* = {horizon:.3g}")
        ax.legend(fontsize=8, loc="best")
    else:
        _no_data(ax, "divergence and bound")
    has_bound = len(_series(history, "bound", log_y=True)[0]) > 0
    ax.set_title("(a) divergence Δ and the bound t̃²·κ(w0): lazy guaranteed while the bound < 1" if has_bound else
                 "(a) divergence Δ from the tangent model (no bound: it holds for gradient descent only)",
                 **_PANEL_TITLE)

    # (b) Share of piecewise-linear units whose linear piece is still that of w0, on [0, 1] whatever the run.
    ax = axes["b"]
    if _plot(ax, history, "activation_stability", "activation stability", log_y=False):
        _time_axis(ax)
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.set_ylim(0.0, 1.02)
        ax.set_ylabel("share of units on their w0 piece")
    else:
        _no_data(ax, "activation stability")
    ax.set_title("(b) activation stability", **_PANEL_TITLE)

    # (c) Kernel alignment (≈ 1 when lazy) and NTK distance (≈ 0 when lazy): one axis each.
    ax = axes["c"]
    has_alignment = _plot(ax, history, "kernel_alignment", "kernel alignment (left axis)", log_y=False)
    t_dist, v_dist = _series(history, "ntk_distance", log_y=False)
    if has_alignment or len(t_dist):
        _time_axis(ax)
        ax.set_ylim(0.0, 1.02)
        ax.set_ylabel("alignment cos(K, K0)", color=_COLOURS["kernel_alignment"])
        lines, labels = ax.get_legend_handles_labels()
        if len(t_dist):
            right = ax.twinx()
            right.plot(t_dist, v_dist, "s-", ms=3.5, lw=1.4, color=_COLOURS["ntk_distance"],
                       label="NTK distance (right axis)")
            right.set_ylim(0.0, max(1.0, float(np.max(v_dist))) * 1.02)
            right.set_ylabel("NTK distance |K - K0| / |K0|", color=_COLOURS["ntk_distance"])
            more_lines, more_labels = right.get_legend_handles_labels()
            lines, labels = lines + more_lines, labels + more_labels
        if not has_alignment:
            ax.set_yticks([])
        ax.legend(lines, labels, fontsize=8, loc="center left")  # "best" would not see the right axis' line
    else:
        _no_data(ax, "kernel alignment and NTK distance")
    ax.set_title("(c) tangent kernel K against its value K0 at w0", **_PANEL_TITLE)

    # (d) Relative weight displacement and the twin's gap, log y: both span decades across α.
    ax = axes["d"]
    drawn = _plot(ax, history, "displacement", "displacement |w - w0| / |w0|", log_y=True)
    drawn |= _plot(ax, history, "tangent_gap", "tangent gap |w - w_twin| / |w - w0|", log_y=True)
    if drawn:
        _time_axis(ax)
        _log_y(ax)
        shown = np.concatenate([_series(history, key, log_y=True)[1] for key in ("displacement", "tangent_gap")])
        ax.set_ylim(*_weight_limits(shown))
        ax.set_ylabel("relative distance (fixed scale)")
        ax.legend(fontsize=8, loc="best")
    else:
        _no_data(ax, "displacement and tangent gap")
    ax.set_title("(d) weights: displacement from w0, gap to the twin's", **_PANEL_TITLE)

    if names:
        _per_tensor_panel(axes["e"], per_tensor)
    if heading:
        fig.suptitle(" · ".join(heading), fontsize=12)
    return fig


# The fixed log scale of the weights' relative distances, panels (d) and (e): from a lazy run's 1e-6 (α = 1e4 on
# MNIST-1D moves its weights by about that) to a feature-learning run's 1e3 (α = 0.1 in the demo, after one epoch:
# all weights 13 times their initial norm, the output layer's weight 150 times). A value beyond widens the axis by
# whole decades rather than being cut.
WEIGHT_SCALE = (1e-6, 1e3)


def _weight_limits(values: np.ndarray) -> tuple[float, float]:
    """:data:`WEIGHT_SCALE`, widened to the decades holding any positive finite value beyond it."""
    low, high = WEIGHT_SCALE
    positive = values[np.isfinite(values) & (values > 0)]
    if positive.size:
        low = min(low, 10.0 ** math.floor(math.log10(float(positive.min()))))
        high = max(high, 10.0 ** math.ceil(math.log10(float(positive.max()))))
    return low, high


def _per_tensor_panel(ax: Axes, per_tensor: Mapping[str, float]) -> None:
    """(e): a horizontal bar per parameter tensor, in the model's order from top to bottom, names on the axis,
    on the fixed log scale of panel (d)."""
    names = list(per_tensor)
    values = np.array([_value(per_tensor, name) for name in names], dtype=float)
    low, high = _weight_limits(values)
    position = np.arange(len(names))[::-1]
    drawn = np.isfinite(values) & (values > 0)
    # Bars grow from the scale's left end, so a bar's length is its value's decades above 1e-6 in every run.
    ax.barh(position[drawn], values[drawn] - low, left=low, color=_COLOURS["displacement"], height=0.7)
    ax.set_yticks(position, labels=names, fontsize=7 if len(names) > 20 else 8)
    ax.set_ylim(-0.6, len(names) - 0.4)
    ax.set_xscale("log")
    _plain_log_ticks(ax.xaxis)
    ax.set_xlim(low, high)
    ax.set_xlabel("relative displacement |w_p - w0_p| / |w0_p| (fixed scale)")
    ax.grid(True, axis="x", alpha=0.3)
    for y, value in zip(position, values):
        if not np.isfinite(value):
            ax.text(low, y, " n/a", va="center", fontsize=7, color="gray")
        elif value <= 0:
            ax.text(low, y, " 0", va="center", fontsize=7, color="gray")
    ax.set_title("(e) displacement per parameter tensor (last measurement)", **_PANEL_TITLE)


# The colour range of the feature-movement heat map: 0.1 % of the initial output (dark) to 10 times it (bright).
FEATURE_MOVEMENT_SCALE = (1e-3, 10.0)


def layers_figure(layer_history: Sequence[Mapping[str, object]], *, title: str = "", alpha: float | None = None,
                  regime: str | None = None, labels: Mapping[str, str] | None = None) -> Figure:
    """The per-layer heat map: which layers learn features, and when.

    Args:
        layer_history: one entry per measurement, in time order: ``{"normalized_time": t̃, "layers": {layer:
            {"feature_movement": …, "ntk_share": …, …}}}`` (the monitor's ``layer_history``).
        title: the start of the figure's title (e.g. the run's name); ``alpha`` and ``regime`` follow it, as in
            :func:`laziness_figure`'s.
        alpha: the model's scale α, shown in the title.
        regime: the run's regime (:func:`classify_regime` of its last measurement), shown in the title unless
            ``UNKNOWN``.
        labels: what each row shows for a layer of ``layer_history`` (others as they are):
            :func:`lightning_lazy.watch.naming.layer_labels`, ``"0 Linear(10→256)"``.

    Two panels, layers as rows (in the network's order, top to bottom), measurements as columns (labelled by t̃):
    (a) feature movement ‖φ_l − φ_l(w0)‖/‖φ_l(w0)‖ of each layer's output on the probe, on a fixed log colour
    scale :data:`FEATURE_MOVEMENT_SCALE` (values beyond are drawn at its ends; a cell at exactly 0, e.g. at
    lr = 0, is white); (b) each layer's share tr Θ_l / tr Θ of the tangent kernel, from 0 to 1. Fixed scales: two
    runs' heat maps compare by colour. Each cell carries its value while the grid is small enough to read them
    (24 layers, 16 measurements); text is sized for TensorBoard's image cards, which show the figure shrunk.
    How to read it: a layer whose row stays dark in (a) computes what it computed at w0 (lazy); a row that
    brightens is learning features, from the column where it does. (b) says which layers the kernel (hence
    gradient descent in the lazy regime) mostly moves; a share that shifts over time is the kernel changing its
    make-up. Missing values (no scale, or not measured) are grey.

    Returns a ``matplotlib.figure.Figure`` with an Agg canvas.
    """
    from matplotlib.colors import LogNorm, Normalize

    layers: list[str] = []
    for entry in layer_history:
        for name in entry.get("layers", {}):  # type: ignore[union-attr]
            if name not in layers:
                layers.append(name)
    shown_names = [(labels or {}).get(name, name) for name in layers]
    columns = len(layer_history)
    many = len(layers) > 20
    text = {"ticks": 9 if many else 12, "cells": 9, "labels": 12, "title": 13, "heading": 16}
    height = max(4.5, (0.3 if many else 0.5) * len(layers) + 2.6)
    label_width = max([len(n) for n in shown_names] + [4]) * 0.6 * text["ticks"] / 72
    fig = Figure(figsize=(2 * (label_width + max(4.0, 0.7 * columns) + 1.8), height))
    FigureCanvasAgg(fig)
    times = [_value(entry, "normalized_time") for entry in layer_history]  # type: ignore[arg-type]
    panels = (("feature_movement", "(a) feature movement |φ_l - φ_l(w0)| / |φ_l(w0)|", True),
              ("ntk_share", "(b) share of the tangent kernel tr Θ_l / tr Θ", False))
    for index, (key, label, log) in enumerate(panels):
        ax = fig.add_subplot(1, 2, index + 1)
        grid = np.array([[_value(entry.get("layers", {}).get(name, {}), key)  # type: ignore[union-attr]
                          for entry in layer_history] for name in layers], dtype=float).reshape(len(layers), columns)
        finite = grid[np.isfinite(grid)]
        if not finite.size:
            _no_data(ax, label)
            continue
        cmap = _colormap("magma" if log else "viridis", bad="lightgray")
        if log:
            # One fixed scale for every run, so that runs compare at a glance (lazy dark, feature learning bright).
            norm = LogNorm(vmin=FEATURE_MOVEMENT_SCALE[0], vmax=FEATURE_MOVEMENT_SCALE[1], clip=True)
            shown = np.ma.masked_invalid(np.where(grid > 0, np.clip(grid, *FEATURE_MOVEMENT_SCALE), np.nan))
            zero = np.ma.masked_where(~(grid == 0), np.ones_like(grid))
            ax.imshow(zero, aspect="auto", cmap=_colormap("Greys"), vmin=0, vmax=10, interpolation="nearest")
        else:
            norm = Normalize(vmin=0.0, vmax=1.0)
            shown = np.ma.masked_invalid(grid)
        image = ax.imshow(shown, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
        bar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02, extend="both" if log else "neither")
        bar.ax.tick_params(labelsize=text["ticks"])
        ax.set_yticks(range(len(layers)), labels=shown_names, fontsize=text["ticks"])
        every = max(1, math.ceil(columns / 12))
        ticks = list(range(0, columns, every))
        ax.set_xticks(ticks, labels=[f"{times[i]:.3g}" for i in ticks], fontsize=text["ticks"], rotation=45)
        ax.set_xlabel("normalized time t̃ of the measurement", fontsize=text["labels"])
        ax.set_title(label, fontsize=text["title"])
        if len(layers) <= 24 and columns <= 16:
            for (row, column), value in np.ndenumerate(grid):
                if np.isfinite(value):
                    shade = float(norm(min(max(value, norm.vmin), norm.vmax))) if log else float(norm(value))
                    ax.text(column, row, f"{value:.2g}", ha="center", va="center", fontsize=text["cells"],
                            color="white" if shade < 0.6 else "black")
    heading = [part for part in (title, f"α = {alpha:g}" if alpha is not None else "",
                                 f"regime: {regime}" if regime and regime != UNKNOWN else "",
                                 "per layer: where the network leaves its kernel") if part]
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.6 / height))
    fig.suptitle(" · ".join(heading), fontsize=text["heading"])
    return fig


def _colormap(name: str, bad: str | None = None) -> Colormap:
    """Matplotlib's colour map ``name``, with the colour ``bad`` for masked cells."""
    from matplotlib import colormaps

    return colormaps[name].with_extremes(bad=bad) if bad else colormaps[name]


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG at ``path`` (parent folders made); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    return path


def figure_to_array(fig: Figure, dpi: int = 100) -> np.ndarray:
    """The figure's pixels, ``uint8 [H, W, 3]``: ``SummaryWriter.add_image(tag, img, step, dataformats="HWC")``."""
    fig.set_dpi(dpi)
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


# zlib level of figure_to_png: on the README example's laziness figure (1600 × 750 pixels) level 3 encodes in
# 18 ms against 25 ms at Pillow's default 6, for 134 kB against 127 kB.
PNG_COMPRESS_LEVEL = 3


def figure_to_png(fig: Figure, dpi: int = 100) -> bytes:
    """The figure's pixels (:func:`figure_to_array`, ``[H, W, 3]`` RGB) encoded once as a PNG.

    One Agg draw and one encoding: the monitor writes these bytes to ``laziness.png`` and, unchanged, to
    TensorBoard (``savefig`` would draw the figure again, ``add_image`` encode the pixels again).
    """
    from PIL import Image  # matplotlib's own dependency

    out = io.BytesIO()
    Image.fromarray(figure_to_array(fig, dpi)).save(out, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return out.getvalue()


# ----------------------------------------------------------------------------------------------- summary


def _finite(values: Mapping[str, float | None], key: str) -> float | None:
    value = _value(values, key)
    return value if math.isfinite(value) else None


def classify_regime(values: Mapping[str, float | None]) -> str:
    """``LAZY``, ``FEATURE_LEARNING``, ``IN_BETWEEN`` or ``UNKNOWN`` from the last Δ, activation stability
    and kernel alignment in ``values`` (any may be missing; see the module's thresholds).

    Feature learning as soon as one measure crosses its feature-learning threshold; lazy when every
    measure present is on the lazy side; in between otherwise; unknown when none is present.
    """
    divergence = _finite(values, "divergence")
    stability = _finite(values, "activation_stability")
    alignment = _finite(values, "kernel_alignment")
    if divergence is None and stability is None and alignment is None:
        return UNKNOWN
    if ((divergence is not None and divergence >= FEATURE_MIN_DIVERGENCE)
            or (stability is not None and stability < FEATURE_MAX_ACTIVATION_STABILITY)
            or (alignment is not None and alignment < FEATURE_MAX_KERNEL_ALIGNMENT)):
        return FEATURE_LEARNING
    if ((divergence is None or divergence <= LAZY_MAX_DIVERGENCE)
            and (stability is None or stability >= LAZY_MIN_ACTIVATION_STABILITY)
            and (alignment is None or alignment >= LAZY_MIN_KERNEL_ALIGNMENT)):
        return LAZY
    return IN_BETWEEN


def _evidence(values: Mapping[str, float | None]) -> str:
    parts = []
    divergence = _finite(values, "divergence")
    if divergence is not None:
        parts.append(f"Δ = {divergence:.3g}")
    stability = _finite(values, "activation_stability")
    if stability is not None:
        parts.append(f"{100 * stability:.1f} % of units on their w0 piece")
    alignment = _finite(values, "kernel_alignment")
    if alignment is not None:
        parts.append(f"kernel alignment {alignment:.3f}")
    return ", ".join(parts)


def regime_code(values: Mapping[str, float | None]) -> float:
    """:func:`classify_regime` as a number, :data:`REGIME_CODES`: 1 lazy, 0.5 in between, 0 feature learning,
    NaN unknown. Logged as ``lazy/regime`` at each measurement and as an HParams metric at the end of fit."""
    return REGIME_CODES.get(classify_regime(values), math.nan)


def regime(values: Mapping[str, float | None]) -> str:
    """One plain sentence on the regime the run was in, from its measures (see :func:`classify_regime`).

    ``values``: the keys of :func:`laziness_summary`; ``divergence``, ``activation_stability`` and
    ``kernel_alignment`` decide, ``normalized_time`` and ``horizon`` say whether the paper's bound still
    guaranteed laziness at the end. The bound is a sufficient condition only: a run can stay lazy long
    past t̃* (the demo's α = 100 run is, at 30 times its horizon), so the horizon qualifies the sentence
    and does not decide it. With ``adaptive_optimizer`` set (Adam, ...), where the bound does not hold, the
    horizon is never mentioned.
    """
    kind = classify_regime(values)
    if kind == UNKNOWN:
        return ("Regime: unknown: neither the divergence, the activation stability nor the kernel alignment was "
                "measured.")
    evidence = _evidence(values)
    if kind == FEATURE_LEARNING:
        return f"Regime: {kind}: the network left its linearization around w0 ({evidence})."
    if kind == IN_BETWEEN:
        return f"Regime: {kind}: the network moved away from its linearization without leaving it ({evidence})."
    t, horizon = _finite(values, "normalized_time"), _finite(values, "horizon")
    if values.get("adaptive_optimizer"):
        horizon = None
    if t is not None and horizon is not None and horizon > 0:
        where = (f", within the horizon t~* = {horizon:.3g} where the bound guarantees it" if t <= horizon else
                 f", {t / horizon:.3g} times past the horizon t~* = {horizon:.3g}, so by the measures and no "
                 "longer by the bound's guarantee")
    else:
        where = ""
    return f"Regime: {kind}: the network stayed close to its linearization around w0 ({evidence}){where}."


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def laziness_summary(values: Mapping[str, float | str | None]) -> str:
    """A short plain-text summary of a run, for the terminal and TensorBoard's text tab.

    ``values``: any of ``"alpha"``, ``"adaptive_optimizer"`` (the optimizer's class name when the bound does
    not hold for it, :func:`lightning_lazy._optim.adaptive_optimizer`), ``"kappa0"`` (κ(w0)), ``"horizon"``
    (t̃*), ``"normalized_time"`` (t̃ at the end), ``"divergence"``, ``"activation_stability"``,
    ``"kernel_alignment"``, ``"displacement"``, ``"loss"`` (the model's last training loss),
    ``"tangent_loss"`` (the twin's), ``"moved_layers"`` (``[(layer, measure, value)]``, the layers that moved
    most), ``"layer_labels"`` (``{layer: label}``, :func:`lightning_lazy.watch.naming.layer_labels`: how the
    moved layers are named, ``0 Linear(10→256)``; a layer without a label by its name); missing, None or NaN
    values are left out. The first line is
    :func:`regime`'s sentence (TensorBoard's Text tab shows it first, uncut). With an adaptive optimizer
    the horizon is not stated, and a line says why: the theorem's time is that of gradient descent.
    """
    rows: list[tuple[str, str]] = []
    adaptive = values.get("adaptive_optimizer") or None
    alpha = _finite(values, "alpha")
    if alpha is not None:
        rows.append(("alpha", f"{alpha:g}"))
    if adaptive:
        rows.append(("optimizer", f"{adaptive}: adaptive, so the bound t~^2 kappa(w0) (proved for gradient descent) "
                                  "and its horizon do not apply; the measures below do"))
    kappa0 = _finite(values, "kappa0")
    if kappa0 is not None:
        rows.append(("kappa(w0)", _fmt(kappa0)))
    horizon = None if adaptive else _finite(values, "horizon")
    if horizon is not None:
        rows.append(("horizon t~* (t~^2 kappa(w0) = 1)", _fmt(horizon)))
    t = _finite(values, "normalized_time")
    if t is not None:
        past = f"  ({t / horizon:.3g} x the horizon)" if horizon is not None and horizon > 0 else ""
        meaning = "  (sum of lr x ||Dh(w0)||^2: not the theorem's time)" if adaptive else ""
        rows.append(("normalized time t~", _fmt(t) + past + meaning))
    divergence = _finite(values, "divergence")
    if divergence is not None:
        rows.append(("divergence Δ from the tangent model", _fmt(divergence)))
    stability = _finite(values, "activation_stability")
    if stability is not None:
        rows.append(("activation stability", f"{100 * stability:.2f} % of units on their w0 linear piece"))
    alignment = _finite(values, "kernel_alignment")
    if alignment is not None:
        rows.append(("kernel alignment with K(w0)", f"{alignment:.4f}"))
    displacement = _finite(values, "displacement")
    if displacement is not None:
        rows.append(("displacement |w - w0| / |w0|", _fmt(displacement)))
    loss, tangent_loss = _finite(values, "loss"), _finite(values, "tangent_loss")
    if loss is not None or tangent_loss is not None:
        rows.append(("train loss: model / tangent model",
                     f"{_fmt(loss) if loss is not None else 'n/a'} / "
                     f"{_fmt(tangent_loss) if tangent_loss is not None else 'n/a'}"))
    moved = values.get("moved_layers") or []
    if moved:
        measure = str(moved[0][1]).replace("_", " ")
        labels = values.get("layer_labels") or {}
        rows.append((f"layers that moved most ({measure})",
                     ", ".join(f"{labels.get(name, name)}: {_fmt(float(value))}" for name, _, value in moved)))
    width = max((len(name) for name, _ in rows), default=0)
    return "\n".join([regime(values), "Laziness summary"] + [f"  {name:<{width}}  {text}" for name, text in rows])


# -------------------------------------------------------------------------------------- custom scalars

# The kind of each tag: a chart of the layout holds tags of one kind only, so one y-axis fits them all.
TAG_KINDS: dict[str, str] = {
    "lazy/regime": "regime code",
    # Δ and the bound are both compared with 1 (the bound is the paper's sufficient condition for Δ small).
    "lazy/divergence": "compared with 1",
    "lazy/bound": "compared with 1",
    "lazy/kappa": "kappa",
    "lazy/jacobian_norm": "jacobian norm",
    "lazy/hessian_norm": "hessian norm",
    "lazy/kernel_alignment": "cosine",
    "lazy/ntk_distance": "relative kernel distance",
    "lazy/activation_stability": "share of units",
    "lazy/displacement": "relative weight distance",
    "lazy/tangent_gap": "ratio of weight distances",
    "lazy/tangent/train_loss": "loss",
    "lazy/tangent/val_loss": "loss",
    "lazy/tangent/val_acc": "accuracy",
    "lazy/normalized_time": "normalized time",
    "lazy/target_alignment": "cosine",
    "lazy/ntk_top_eigenvalue": "kernel eigenvalue",
    "lazy/ntk_effective_rank": "effective rank",
    "lazy/ntk_target_energy": "share of target energy",
    "lazy/kernel_velocity": "kernel velocity",
    "lazy/kernel/val_loss": "loss",
    "lazy/kernel/val_acc": "accuracy",
}


# The per-layer measures (lazy/layers/<layer>/<measure>), one Custom Scalars chart each.
LAYER_CHARTS: dict[str, str] = {
    "feature_movement": "feature movement |phi_l - phi_l(w0)| / |phi_l(w0)|",
    "displacement": "displacement |w_l - w_l0| / |w_l0|",
    "ntk_share": "share of the tangent kernel tr K_l / tr K",
    "ntk_distance": "kernel distance |K_l - K_l(w0)| / |K_l(w0)|",
}


def custom_scalars_layout() -> dict[str, dict[str, list]]:
    """The layout for ``SummaryWriter.add_custom_scalars``: the monitor's ``lazy/...`` tags, one kind per chart,
    the four the verdict is read from first (regime, Δ, activation stability, kernel alignment); then a second
    category with one chart per per-layer measure (:data:`LAYER_CHARTS`), every layer's line in it.

    A layout cannot choose a log y-axis: each Custom Scalars chart has its own "Toggle y-axis log scale"
    button (TensorBoard 2.x), which "divergence and bound" needs, since the bound grows like t̃² past 1e3
    while Δ stays below 1; the chart's title says so. The charts' x-axis is the step, not t̃: the laziness
    figure (Images tab) draws against t̃. Nor can a layout set the smoothing, which should be 0 (the log-spaced
    early measurements are few, and smoothing shifts them): the address ``#custom_scalars&_smoothingWeight=0``
    does (TensorBoard 2.x reads the hash, not the query string).
    """
    charts = {
        # The four tags the verdict is read from, first: the Custom Scalars tab opens on them.
        "regime (1 lazy, 0.5 in between, 0 feature learning)": ["lazy/regime"],
        "divergence and bound t~^2 kappa(w0) (use the log-scale button)": ["lazy/divergence", "lazy/bound"],
        "activation stability": ["lazy/activation_stability"],
        "kernel alignment with K(w0)": ["lazy/kernel_alignment"],
        "kappa": ["lazy/kappa"],
        "||D(alpha h)|| (jacobian norm)": ["lazy/jacobian_norm"],
        "||D^2(alpha h)|| (hessian norm)": ["lazy/hessian_norm"],
        "NTK distance ||K - K(w0)|| / ||K(w0)||": ["lazy/ntk_distance"],
        "displacement ||w - w0|| / ||w0||": ["lazy/displacement"],
        "tangent gap ||w - w_twin|| / ||w - w0||": ["lazy/tangent_gap"],
        "tangent model losses": ["lazy/tangent/train_loss", "lazy/tangent/val_loss"],
        "tangent model accuracy": ["lazy/tangent/val_acc"],
        "normalized time t~": ["lazy/normalized_time"],
        "kernel-target alignment (centred)": ["lazy/target_alignment"],
        "top NTK eigenvalue": ["lazy/ntk_top_eigenvalue"],
        "NTK effective rank (sum l)^2 / sum l^2": ["lazy/ntk_effective_rank"],
        "share of the targets' energy in the top NTK eigenvectors": ["lazy/ntk_target_energy"],
        "kernel velocity |K - K_prev| / |K_prev| per unit t~": ["lazy/kernel_velocity"],
        "kernel baseline (w0) validation loss": ["lazy/kernel/val_loss"],
        "kernel baseline (w0) validation accuracy": ["lazy/kernel/val_acc"],
    }
    # One chart per per-layer measure, every layer's line in it (the layers' names are not known here, and a
    # pattern needs none): lazy/layers/<layer>/<measure>, <layer> a dotted module path without "/".
    per_layer = {f"per layer: {title}": [f"lazy/layers/[^/]+/{measure}$"] for measure, title in LAYER_CHARTS.items()}
    # Multiline entries are regular expressions matched at the tag's start: "$" keeps e.g. lazy/displacement
    # from also drawing a lazy/displacement_... tag.
    return {"lazy training": {title: ["Multiline", [f"{re.escape(tag)}$" for tag in tags]]
                              for title, tags in charts.items()},
            "lazy training, per layer": {title: ["Multiline", patterns] for title, patterns in per_layer.items()}}


# ------------------------------------------------------------------------------------------- TensorBoard

# The tags the verdict is read from (classify_regime's three measures and the regime itself).
VERDICT_TAGS = ("lazy/regime", "lazy/divergence", "lazy/activation_stability", "lazy/kernel_alignment")


def tensorboard_command(log_dir: str | Path) -> str:
    """A command that starts TensorBoard on ``log_dir`` from the current folder, whether or not the
    environment this package runs in is activated (the README's set-up does not activate it): ``tensorboard``
    when the one on ``PATH`` is this environment's, else its path (``.venv/bin/tensorboard`` from the
    repository's root), else ``<python> -m tensorboard.main``."""
    on_path = shutil.which("tensorboard")
    beside_python = shutil.which("tensorboard", path=str(Path(sys.executable).parent))
    if beside_python is None:
        program = f"{sys.executable} -m tensorboard.main"
    elif on_path is not None and Path(on_path).resolve() == Path(beside_python).resolve():
        program = "tensorboard"
    else:
        path = Path(beside_python).absolute()
        try:
            program = str(path.relative_to(Path.cwd()))
        except ValueError:
            program = str(path)
    return f"{program} --logdir {log_dir}"


def tensorboard_address(port: int = 6006, pinned: Sequence[str] = ()) -> str:
    """The address that opens TensorBoard 2.x's default view (Time Series) on the ``lazy/`` tags with
    smoothing 0, ``pinned`` tags (e.g. :data:`VERDICT_TAGS`) pinned above the rest.

    What a run's logs cannot set, the address does: Time Series reads ``smoothing``, ``tagFilter`` (a regular
    expression) and ``pinnedCards`` (JSON) from the query string. The older Scalars and Custom Scalars views read
    theirs from after the ``#`` instead (``#scalars&_smoothingWeight=0&tagFilter=...``). Neither view takes
    "ignore outliers in chart scaling" from the address: it is kept in the browser's storage.
    """
    query = ["smoothing=0"]
    if pinned:
        cards = [{"plugin": "scalars", "tag": tag} for tag in pinned]
        query.append("pinnedCards=" + quote(json.dumps(cards, separators=(",", ":")), safe=""))
    else:
        query.append("tagFilter=" + quote("^lazy/", safe=""))
    return f"http://localhost:{port}/?{'&'.join(query)}#timeseries"
