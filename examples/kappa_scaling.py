"""κ at initialization in the paper's three cases, measured with ``diagnostics.kappa``.

Chizat, Oyallon & Bach (2019), section 2: training is lazy when the laziness ratio

    κ_h(w0) = ‖h(w0) − y*‖ · ‖D²h(w0)‖ / ‖Dh(w0)‖²

is small. For a model with h(w0) = 0 the paper names three ways to make it small:

1. output scale α: κ of the centred model α·(h(w) − h(w0)) is κ_h(w0)/α            (slope −1);
2. initialization scale λ of a q-positively-homogeneous network (h(λw) = λ^q h(w)):
   κ(λ w0) = λ^{−q} κ(w0) — here a bias-free two-layer ReLU net (q = 2, antisymmetric init, so h(w0) = 0)
   and a bias-free three-layer ReLU net (q = 3, centred with ``AlphaScaled``)       (slopes −2, −3);
3. width m of a two-layer net with 1/√m output scaling: κ ≲ m^{−1/2}               (slope −1/2);
   shown beside the mean-field 1/m scaling, for which κ stays of order one         (slope 0).

The probe is teacher–student data on the sphere S^{d−1}: y* = teacher(x). Each κ is measured in float64
(Lanczos for ‖Dh‖, power iteration for ‖D²h‖), averaged (geometric mean) over seeds, plotted on log-log
axes with the predicted slopes drawn through the first point, and the least-squares slopes of log κ
against log(scale) are printed, written to a CSV and logged to TensorBoard.

    python examples/kappa_scaling.py --out-dir outputs/kappa_scaling --log-dir runs/kappa_scaling
    python examples/kappa_scaling.py --quick        # a few seconds, for tests
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on CI / servers
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from lightning_lazy import diagnostics  # noqa: E402
from lightning_lazy.data.teacher import Teacher, make_teacher_dataset  # noqa: E402
from lightning_lazy.models.shallow import TwoLayerReLU  # noqa: E402
from lightning_lazy.quiet import quiet_third_party_output  # noqa: E402
from lightning_lazy.scaling import AlphaScaled  # noqa: E402

# The predictions the figure checks: case name -> predicted slope of log κ against log(scale).
PREDICTED_SLOPES = {
    "alpha": -1.0,
    "lambda_q2": -2.0,
    "lambda_q3": -3.0,
    "width_1/sqrt(m)": -0.5,
    "width_1/m": 0.0,
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path("outputs/kappa_scaling"), help="PNG and CSV go here")
    parser.add_argument("--log-dir", type=Path, default=Path("runs/kappa_scaling"), help="TensorBoard log directory")
    parser.add_argument("--d", type=int, default=10, help="input dimension of the teacher-student probe")
    parser.add_argument("--probe-size", type=int, default=256, help="number of probe inputs")
    parser.add_argument("--m", type=int, default=64, help="hidden width for the alpha and lambda sweeps")
    parser.add_argument("--seeds", type=int, default=3, help="initializations averaged per point")
    parser.add_argument("--max-width", type=int, default=2048, help="largest width of the width sweep")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; these models are tiny, so more threads mostly contend (default 1)")
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds (used by the tests)")
    args = parser.parse_args(argv)
    # κ ∝ 1/α and κ ∝ λ^{-q} hold exactly for every initialization, so one seed shows them; the width
    # law is statistical and gets all --seeds.
    args.exact_seeds = args.seeds
    if args.quick:
        args.probe_size, args.seeds, args.exact_seeds, args.max_width, args.m = 64, 2, 1, 512, 32
    for name in ("d", "probe_size", "m", "seeds", "max_width", "threads"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.max_width < 64:
        parser.error(f"--max-width must be at least 64 so the width sweep has several points, got {args.max_width}")
    return args


class HomogeneousMLP(nn.Module):
    """Bias-free ReLU network d → m → … → 1 with ``depth`` linear layers: depth-positively homogeneous.

    Weights start at λ times He-normal (std √(2 / fan_in)), so h(λ w̃) = λ^depth h(w̃).
    """

    def __init__(self, d: int, m: int, depth: int, scale: float, seed: int) -> None:
        super().__init__()
        widths = [d] + [m] * (depth - 1) + [1]
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(fan_in, fan_out, bias=False, dtype=torch.float64))
            if i < depth - 1:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    std = math.sqrt(2.0 / layer.in_features)
                    noise = torch.randn(layer.weight.shape, generator=generator, dtype=torch.float64)
                    layer.weight.copy_(scale * std * noise)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def measure(model: nn.Module, x: Tensor, y: Tensor) -> diagnostics.Kappa:
    return diagnostics.kappa(model, x, y)


def alpha_sweep(x: Tensor, y: Tensor, alphas: Sequence[float], m: int, seeds: int) -> list[dict]:
    """κ of AlphaScaled(two-layer net, α, center=True): the network itself is not antisymmetric, centring does it."""
    rows = []
    for seed in range(seeds):
        base = TwoLayerReLU(x.shape[1], m, tau=1.0, antisymmetric=False, output_scale="1/sqrt(m)", seed=seed,
                            dtype=torch.float64)
        for alpha in alphas:
            k = measure(AlphaScaled(base, alpha, center=True), x, y)
            rows.append(_row("alpha", alpha, seed, k))
    return rows


def lambda_sweep(x: Tensor, y: Tensor, lambdas: Sequence[float], m: int, seeds: int) -> list[dict]:
    """κ at initialization scale λ for a 2-homogeneous and a 3-homogeneous ReLU network."""
    rows = []
    for seed in range(seeds):
        for lam in lambdas:
            # q = 2: every weight ~ N(0, λ²); the antisymmetric init gives h(w0) = 0 without centring.
            two = TwoLayerReLU(x.shape[1], m, tau=lam, antisymmetric=True, output_scale="1/sqrt(m)", seed=seed,
                               dtype=torch.float64)
            rows.append(_row("lambda_q2", lam, seed, measure(two, x, y)))
            # q = 3: centred by AlphaScaled (α = 1), which keeps derivatives and sets h(λ w0) = 0.
            three = AlphaScaled(HomogeneousMLP(x.shape[1], m, depth=3, scale=lam, seed=seed), 1.0, center=True)
            rows.append(_row("lambda_q3", lam, seed, measure(three, x, y)))
    return rows


def width_sweep(
    x: Tensor, y: Tensor, widths: Sequence[int], seeds: int, scalings: Sequence[str] = ("1/sqrt(m)", "1/m")
) -> list[dict]:
    """κ of the antisymmetric two-layer net (τ = 1) against its width, for the given output scalings."""
    rows = []
    for seed in range(seeds):
        for m in widths:
            for scale in scalings:
                net = TwoLayerReLU(x.shape[1], m, tau=1.0, antisymmetric=True, output_scale=scale, seed=seed,
                                   dtype=torch.float64)
                rows.append(_row(f"width_{scale}", m, seed, measure(net, x, y)))
    return rows


def _row(case: str, scale: float, seed: int, k: diagnostics.Kappa) -> dict:
    return {
        "case": case,
        "scale": float(scale),
        "seed": seed,
        "kappa": float(k.value),
        "residual_norm": float(k.residual_norm),
        "jacobian_norm": float(k.jacobian_norm),
        "hessian_norm": float(k.hessian_norm),
    }


def geometric_means(rows: list[dict], case: str) -> tuple[list[float], list[float], list[float]]:
    """Per scale: the scale, the geometric mean of κ over seeds, and the std of log κ (for error bars)."""
    scales = sorted({r["scale"] for r in rows if r["case"] == case})
    means, spreads = [], []
    for s in scales:
        logs = torch.tensor([math.log(r["kappa"]) for r in rows if r["case"] == case and r["scale"] == s])
        means.append(math.exp(float(logs.mean())))
        spreads.append(float(logs.std()) if logs.numel() > 1 else 0.0)
    return scales, means, spreads


def fit_slope(scales: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of log(value) against log(scale)."""
    if len(scales) < 2:
        raise ValueError("a slope needs at least two scales")
    lx = torch.tensor([math.log(s) for s in scales], dtype=torch.float64)
    ly = torch.tensor([math.log(v) for v in values], dtype=torch.float64)
    lx_c = lx - lx.mean()
    return float((lx_c * (ly - ly.mean())).sum() / (lx_c**2).sum())


def plot(rows: list[dict], slopes: dict[str, float]) -> plt.Figure:
    panels = [
        ("output scale α (centred model)", ["alpha"], "α"),
        ("initialization scale λ (homogeneous nets)", ["lambda_q2", "lambda_q3"], "λ"),
        ("width m (two-layer net, τ = 1)", ["width_1/sqrt(m)", "width_1/m"], "m"),
    ]
    labels = {
        "alpha": "two-layer, m fixed",
        "lambda_q2": "two-layer (q = 2)",
        "lambda_q3": "three-layer (q = 3)",
        "width_1/sqrt(m)": "1/√m output scale",
        "width_1/m": "1/m output scale",
    }
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (title, cases, xlabel) in zip(axes, panels):
        for i, case in enumerate(c for c in cases if c in slopes):
            scales, means, spreads = geometric_means(rows, case)
            color = f"C{i}"
            # Error bars: ± one std of log κ across seeds, drawn multiplicatively.
            lower = [mu * (1 - math.exp(-s)) for mu, s in zip(means, spreads)]
            upper = [mu * (math.exp(s) - 1) for mu, s in zip(means, spreads)]
            ax.errorbar(scales, means, yerr=[lower, upper], fmt="o", color=color, capsize=3,
                        label=f"{labels[case]}: fitted slope {slopes[case]:+.2f}")
            # The predicted law with its best-fitting prefactor (least squares in log space), so that a
            # pre-asymptotic first point does not tilt the reference line.
            predicted = PREDICTED_SLOPES[case]
            log_prefactor = sum(math.log(mu) - predicted * math.log(s) for s, mu in zip(scales, means)) / len(scales)
            ax.plot(scales, [math.exp(log_prefactor) * s**predicted for s in scales], "--", color=color,
                    label=f"predicted slope {predicted:+g}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        # Label the measured scales themselves: log axes spanning less than a decade otherwise get
        # overlapping minor-tick labels.
        ticks = sorted({r["scale"] for r in rows if r["case"] in cases})
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel("κ at initialization")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Laziness ratio κ = ‖h − y*‖·‖D²h‖ / ‖Dh‖² at initialization "
                 "(Chizat, Oyallon & Bach 2019)")
    fig.tight_layout()
    return fig


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Run the three sweeps; write PNG, CSV and TensorBoard logs; return the fitted slopes per case."""
    args = parse_args(argv)
    quiet_third_party_output()  # Lightning's tips and internal deprecation notices: nothing to act on here
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # main() may be called in-process (tests): leave the caller's setting


def _run(args: argparse.Namespace) -> dict[str, float]:
    start = time.perf_counter()
    teacher = Teacher(args.d, seed=0, dtype=torch.float64)
    x, y = make_teacher_dataset(teacher, args.probe_size, seed=1).tensors

    alphas = [10.0**k for k in range(-2, 4)]  # κ ∝ 1/α is exact at w0: six decades suffice to show it
    lambdas = [0.25, 0.5, 1.0, 2.0, 4.0]
    widths = [2**k for k in range(4, int(math.log2(args.max_width)) + 1)]
    if args.quick:
        alphas, lambdas = [0.1, 100.0], [0.5, 2.0]
        widths = [w for w in widths if w >= 64]  # below ~64 neurons the m^{-1/2} law has not set in
    rows = alpha_sweep(x, y, alphas, args.m, args.exact_seeds)
    rows += lambda_sweep(x, y, lambdas, args.m, args.exact_seeds)
    # Quick mode skips the mean-field line: for the same seed it is exactly √m times the 1/√m one.
    scalings = ("1/sqrt(m)",) if args.quick else ("1/sqrt(m)", "1/m")
    rows += width_sweep(x, y, widths, args.seeds, scalings)

    cases = [case for case in PREDICTED_SLOPES if any(r["case"] == case for r in rows)]
    slopes = {case: fit_slope(*geometric_means(rows, case)[:2]) for case in cases}
    elapsed = time.perf_counter() - start

    args.out_dir.mkdir(parents=True, exist_ok=True)
    with open(args.out_dir / "kappa_scaling.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(args.out_dir / "kappa_slopes.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", "fitted_slope", "predicted_slope"])
        for case, slope in slopes.items():
            writer.writerow([case, f"{slope:.4f}", PREDICTED_SLOPES[case]])
    fig = plot(rows, slopes)
    fig.savefig(args.out_dir / "kappa_scaling.png", dpi=120)
    with SummaryWriter(log_dir=str(args.log_dir)) as tb:
        tb.add_figure("kappa_scaling/figure", fig)  # closes the figure
        for case, slope in slopes.items():
            tb.add_scalar(f"kappa_scaling/fitted_slope/{case}", slope)
        tb.add_text("kappa_scaling/slopes", "\n".join(
            f"- {case}: fitted {slope:+.3f}, predicted {PREDICTED_SLOPES[case]:+g}  "
            for case, slope in slopes.items()))

    print(f"kappa at initialization, {len(rows)} measurements in {elapsed:.1f} s "
          f"(probe {args.probe_size} points, d={args.d})")
    for case, slope in slopes.items():
        print(f"  {case:16s} fitted slope {slope:+.3f}   predicted {PREDICTED_SLOPES[case]:+g}")
    print(f"figure: {args.out_dir / 'kappa_scaling.png'}   TensorBoard: {args.log_dir}")
    return slopes


if __name__ == "__main__":
    main(sys.argv[1:])
