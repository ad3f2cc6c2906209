"""The laziness figure, the summary and its regime sentence, and the Custom Scalars layout."""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from lightning_lazy.watch import report

TIMES = [0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 100.0]
PER_TENSOR = {"model.module.0.weight": 0.3, "model.module.0.bias": 0.02, "model.module.2.weight": 0.001}


def history(**overrides: float) -> list[dict[str, float]]:
    """A run that starts at t~ = 0 (a point no log axis can show) and has every key."""
    rows = []
    for step, t in enumerate(TIMES):
        row = {"step": step, "epoch": 0, "normalized_time": t, "divergence": 0.01 * math.sqrt(t), "bound": 0.04 * t**2,
               "kappa": 0.04, "displacement": 0.001 * t, "tangent_gap": 0.1, "ntk_distance": 0.002 * t,
               "kernel_alignment": 1 - 1e-4 * t, "activation_stability": 1 - 1e-3 * t}
        row.update(overrides)
        rows.append(row)
    return rows


def panel(fig, letter: str):
    return next(ax for ax in fig.axes if ax.get_title().startswith(f"({letter})"))


def plotted_x(ax) -> list[float]:
    return sorted({float(x) for line in ax.get_lines() for x in np.atleast_1d(line.get_xdata())
                   if line.get_marker() not in (None, "None", "")})


def test_figure_panels_axes_and_tensor_names() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-positive values on a log axis" or similar on the way
        fig = report.laziness_figure(history(), horizon=5.0, per_tensor=PER_TENSOR, title="run 3")
        fig.canvas.draw()
    a = panel(fig, "a")
    assert a.get_xscale() == "log" and a.get_yscale() == "log"
    labels = [text for text in a.get_legend_handles_labels()[1]]
    assert any("divergence" in s for s in labels) and any("bound" in s for s in labels)
    # The line 1 and the horizon t~* = 5 are drawn (axhline / axvline: constant y / x data).
    assert any(np.allclose(line.get_ydata(), 1.0) for line in a.get_lines())
    assert any(np.allclose(line.get_xdata(), 5.0) for line in a.get_lines())
    assert any("horizon" in s and "5" in s for s in labels)
    # t~ = 0 cannot be drawn on a log axis: skipped, the other 7 points are there.
    assert plotted_x(a) == TIMES[1:]
    for letter in "bcd":
        assert panel(fig, letter).get_xscale() == "log"
    assert panel(fig, "d").get_yscale() == "log"
    # Kernel alignment and NTK distance on two y-axes (c has a twin sharing its x-axis).
    c = panel(fig, "c")
    assert sum(ax.bbox.bounds == c.bbox.bounds for ax in fig.axes) == 2
    e = panel(fig, "e")
    top_down = sorted(zip(e.get_yticks(), (t.get_text() for t in e.get_yticklabels())), reverse=True)
    assert [name for _, name in top_down] == list(PER_TENSOR)  # the model's order, first tensor at the top
    assert e.get_xscale() == "log"  # 0.3 and 0.001 are more than two decades apart
    assert fig._suptitle.get_text() == "run 3 · regime: in between"  # the last measurement's regime


def test_figure_with_one_point_missing_keys_and_nan(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one = report.laziness_figure([{"normalized_time": 2.0, "divergence": 0.05}])
        one.canvas.draw()
        assert plotted_x(panel(one, "a")) == [2.0] and panel(one, "a").get_yscale() == "log"
        assert "not measured" in " ".join(t.get_text() for t in panel(one, "b").texts)
        gaps = report.laziness_figure(history(divergence=math.nan, kernel_alignment=None), horizon=math.inf)
        gaps.canvas.draw()
        assert [line.get_label() for line in panel(gaps, "a").get_lines() if "horizon" in line.get_label()] == []
        only_start = report.laziness_figure([{"normalized_time": 0.0, "divergence": 0.0}], per_tensor={"w": math.nan})
        only_start.canvas.draw()
        assert "not measured" in " ".join(t.get_text() for t in panel(only_start, "a").texts)
    assert "e" not in {ax.get_title()[1:2] for ax in one.axes}  # no per-tensor values: no panel (e)


def test_save_figure_and_pixels(tmp_path: Path) -> None:
    fig = report.laziness_figure(history(), horizon=5.0, per_tensor=PER_TENSOR)
    path = report.save_figure(fig, tmp_path / "sub" / "laziness.png")
    assert path == tmp_path / "sub" / "laziness.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    pixels = report.figure_to_array(fig, dpi=50)
    assert pixels.dtype == np.uint8 and pixels.shape == (int(fig.get_figheight() * 50), int(fig.get_figwidth() * 50), 3)
    assert pixels.std() > 10  # not a blank canvas


LAZY = {"alpha": 100.0, "kappa0": 0.00424, "horizon": 15.4, "normalized_time": 505.0, "divergence": 0.018,
        "activation_stability": 0.999, "kernel_alignment": 0.9995, "displacement": 0.00223, "loss": 0.00153,
        "tangent_loss": 0.00152}
FEATURES = {"alpha": 0.1, "kappa0": 4.24, "horizon": 0.486, "normalized_time": 505.0, "divergence": 0.128,
            "activation_stability": 0.75, "kernel_alignment": 0.6, "displacement": 12.7, "loss": 1e-6,
            "tangent_loss": 0.00152}


def test_summary_of_a_lazy_run() -> None:
    text = report.laziness_summary(LAZY)
    lines = text.splitlines()
    assert lines[1] == "Laziness summary"  # after the verdict, which TensorBoard's Text tab shows first
    for needle in ("kappa(w0)", "0.00424", "15.4", "505", "0.018", "99.90 %", "0.9995", "0.00223", "0.00153 / 0.00152"):
        assert needle in text, needle
    assert lines[0] == report.regime(LAZY)
    assert lines[0].startswith("Regime: lazy (kernel regime):")
    assert "past the horizon" in lines[0]  # t~ = 505 > t~* = 15.4: the measures, not the bound, say lazy
    within = report.regime({**LAZY, "normalized_time": 3.0})
    assert within.startswith("Regime: lazy") and "within the horizon" in within
    assert report.classify_regime(LAZY) == report.LAZY


def test_summary_of_a_feature_learning_run() -> None:
    sentence = report.laziness_summary(FEATURES).splitlines()[0]
    assert sentence.startswith("Regime: feature learning:") and "75.0 %" in sentence
    # The verdict comes from the measures, not from alpha: the same measures at alpha = 1000 read the same.
    assert report.regime({**FEATURES, "alpha": 1000.0}) == sentence
    # Each measure alone can tell.
    assert report.classify_regime({"divergence": 0.5}) == report.FEATURE_LEARNING
    assert report.classify_regime({"activation_stability": 0.8}) == report.FEATURE_LEARNING
    assert report.classify_regime({"kernel_alignment": 0.5, "divergence": 0.01}) == report.FEATURE_LEARNING


def test_summary_in_between_missing_and_nan() -> None:
    assert report.classify_regime({"divergence": 0.15, "activation_stability": 0.95}) == report.IN_BETWEEN
    assert report.regime({"divergence": 0.15}).startswith("Regime: in between:")
    text = report.laziness_summary({"alpha": None, "divergence": 0.02, "kernel_alignment": math.nan, "loss": 0.5})
    assert "alpha" not in text and "kernel alignment" not in text and "0.5 / n/a" in text
    assert text.splitlines()[0].startswith("Regime: lazy")  # Δ is the only measure, and it is small
    assert report.regime({}).startswith("Regime: unknown")


def test_thresholds_are_ordered() -> None:
    assert report.LAZY_MAX_DIVERGENCE < report.FEATURE_MIN_DIVERGENCE
    assert report.FEATURE_MAX_ACTIVATION_STABILITY < report.LAZY_MIN_ACTIVATION_STABILITY <= 1
    assert report.FEATURE_MAX_KERNEL_ALIGNMENT < report.LAZY_MIN_KERNEL_ALIGNMENT <= 1


def test_custom_scalars_layout_one_kind_per_chart() -> None:
    from tensorboard.plugins.custom_scalar import layout_pb2
    from torch.utils.tensorboard.summary import custom_scalars

    layout = report.custom_scalars_layout()
    assert list(layout) == ["lazy training", "lazy training, per layer"]
    charts = list(layout["lazy training"].items())
    # The verdict's four tags open the tab.
    assert [patterns for _, (_, patterns) in charts[:4]] == [
        ["lazy/regime$"], ["lazy/divergence$", "lazy/bound$"], ["lazy/activation_stability$"], ["lazy/kernel_alignment$"]]
    tags_seen = set()
    for title, (kind, patterns) in charts:
        assert kind == "Multiline"
        tags = [re.sub(r"\\(.)", r"\1", p.removesuffix("$")) for p in patterns]
        kinds = {report.TAG_KINDS[tag] for tag in tags}
        assert len(kinds) == 1, f"chart {title!r} mixes {kinds}"
        for tag, pattern in zip(tags, patterns):
            assert re.match(pattern, tag) and not re.match(pattern, tag + "_per_tensor")
        tags_seen.update(tags)
    assert tags_seen == set(report.TAG_KINDS)  # every tag has a chart
    # Δ and the bound share a chart; displacement, tangent gap and NTK distance no longer do.
    by_tag = {t: title for title, (_, patterns) in charts for t in patterns}
    assert by_tag["lazy/divergence$"] == by_tag["lazy/bound$"]
    assert len({by_tag["lazy/displacement$"], by_tag["lazy/tangent_gap$"], by_tag["lazy/ntk_distance$"]}) == 3
    # What SummaryWriter.add_custom_scalars writes, read back as TensorBoard reads it.
    # Per layer: one chart per measure, whatever the layers are called, and nothing else in it.
    per_layer = layout["lazy training, per layer"]
    for measure in report.LAYER_CHARTS:
        (pattern,) = next(patterns for _, patterns in per_layer.values() if patterns[0].endswith(f"/{measure}$"))
        assert re.match(pattern, f"lazy/layers/0/{measure}") and re.match(pattern, f"lazy/layers/features.3/{measure}")
        assert not re.match(pattern, f"lazy/layers/0/{measure}_x") and not re.match(pattern, f"lazy/{measure}")
    written = layout_pb2.Layout.FromString(custom_scalars(layout).value[0].tensor.string_val[0])
    assert [chart.title for chart in written.category[0].chart] == [t for t, _ in charts]
    assert [chart.title for chart in written.category[1].chart] == list(per_layer)
    assert list(written.category[0].chart[0].multiline.tag) == layout["lazy training"][charts[0][0]][1]


def test_weights_panels_keep_one_scale_across_runs() -> None:
    # α = 100 moves its weights by 3e-4, α = 0.1 by 13: on one fixed scale their bars differ by 4.6 decades
    # (panel e) and their lines sit apart (panel d), instead of each filling its own panel.
    limits = {}
    for name, moved in (("lazy", 3e-4), ("features", 13.0)):
        fig = report.laziness_figure(history(displacement=moved, tangent_gap=moved / 10),
                                     per_tensor={"inner.net.0.weight": moved, "inner.net.0.bias": 0.0})
        fig.canvas.draw()
        d, e = panel(fig, "d"), panel(fig, "e")
        limits[name] = (d.get_ylim(), e.get_xlim())
        assert e.get_xscale() == "log" and "fixed scale" in e.get_xlabel() and "fixed scale" in d.get_ylabel()
        (bar,) = e.patches  # the bias did not move: no bar, the text "0"
        assert bar.get_x() == report.WEIGHT_SCALE[0] and bar.get_x() + bar.get_width() == pytest.approx(moved)
        assert " 0" in [t.get_text() for t in e.texts]
    assert limits["lazy"] == limits["features"] == ((report.WEIGHT_SCALE,) * 2)
    # A value beyond the scale widens it by whole decades, never cuts it.
    wide = report.laziness_figure(history(displacement=3e-8), per_tensor={"w": 2500.0})
    assert panel(wide, "d").get_ylim()[0] == pytest.approx(1e-8) and panel(wide, "e").get_xlim() == (1e-6, 1e4)


def test_figures_show_the_labels_they_are_given() -> None:
    labels = {"inner.model.module.0.weight": "0.weight Linear(10→256)"}
    fig = report.laziness_figure(history(), per_tensor={"inner.model.module.0.weight": 0.3, "other": 0.1},
                                 labels=labels)
    assert [t.get_text() for t in panel(fig, "e").get_yticklabels()] == ["0.weight Linear(10→256)", "other"]
    layers = [{"normalized_time": t, "layers": {"inner.model.module.0": {"feature_movement": 0.01 * t, "ntk_share": 0.6},
                                                "inner.model.module.4": {"feature_movement": 0.1 * t, "ntk_share": 0.4}}}
              for t in (1.0, 2.0, 4.0)]
    heat = report.layers_figure(layers, alpha=0.1, regime=report.FEATURE_LEARNING,
                                labels={"inner.model.module.0": "0 Linear(10→256)", "inner.model.module.4": "4 Linear(256→1)"})
    heat.canvas.draw()
    a = panel(heat, "a")
    assert [t.get_text() for t in a.get_yticklabels()] == ["0 Linear(10→256)", "4 Linear(256→1)"]
    title = heat._suptitle.get_text()
    assert "α = 0.1" in title and "regime: feature learning" in title
    # Readable once TensorBoard shrinks the image: no text under 9 pt.
    assert min(t.get_fontsize() for t in a.texts + a.get_yticklabels() + a.get_xticklabels()) >= 9
    unknown = report.layers_figure(layers, regime=report.UNKNOWN)
    assert "regime" not in unknown._suptitle.get_text() and "α" not in unknown._suptitle.get_text()


def test_summary_names_moved_layers_by_their_labels() -> None:
    values = dict(FEATURES, moved_layers=[("inner.model.module.4", "feature_movement", 14.1),
                                          ("inner.model.module.0", "feature_movement", 0.09)],
                  layer_labels={"inner.model.module.4": "4 Linear(256→1)"})
    line = next(line for line in report.laziness_summary(values).splitlines() if "moved most" in line)
    assert line.endswith("4 Linear(256→1): 14.1, inner.model.module.0: 0.09")


def test_the_readme_tensorboard_addresses_set_what_tensorboard_reads() -> None:
    # TensorBoard 2.x: Time Series reads smoothing, tagFilter and pinnedCards from the query string; the older
    # Scalars view reads _smoothingWeight and tagFilter from after the '#', and ignores them before it.
    import json
    from urllib.parse import parse_qs, unquote, urlsplit

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    addresses = re.findall(r"^http://localhost:6006/\S*$", readme, re.M)
    series = [a for a in addresses if a.endswith("#timeseries")]
    scalars = [a for a in addresses if "#scalars&" in a]
    assert series and scalars
    for address in series:
        query = parse_qs(urlsplit(address).query)
        assert query["smoothing"] == ["0"]
        assert [card["tag"] for card in json.loads(query["pinnedCards"][0])] == list(report.VERDICT_TAGS)
        assert parse_qs(urlsplit(report.tensorboard_address(pinned=report.VERDICT_TAGS)).query) == query
    for address in scalars:
        before, after = address.split("#", 1)
        assert "_smoothingWeight" not in before
        settings = dict(part.split("=", 1) for part in after.split("&")[1:])
        assert settings["_smoothingWeight"] == "0"
        assert re.fullmatch(unquote(settings["tagFilter"]), "lazy/kernel_alignment")
    assert parse_qs(urlsplit(report.tensorboard_address()).query) == {"smoothing": ["0"], "tagFilter": ["^lazy/"]}
