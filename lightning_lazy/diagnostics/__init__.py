"""Matrix-free measures of lazy training (Chizat, Oyallon & Bach, 2019), as pure ``torch.func`` functions.

Conventions shared by every function here:

- ``model`` is an ``nn.Module`` (evaluated with ``functional_call``, in eval mode so dropout and
  BatchNorm make it one deterministic function) or a functional model ``fn(params, x) -> Tensor``.
- ``params`` is a ``{name: tensor}`` dict; for a module it defaults to its current trainable parameters.
- ``x`` is a probe batch ``[N, ...]``; outputs are read as ``[N, K]`` (trailing dimensions flattened).
- Function-space norms are the empirical L² norm on the probe, ‖f‖ = (1/√N)·‖f(X)‖_F, the norm in which
  the ½-squared-error loss averaged over examples is ½‖h − y*‖². So ``jacobian_norm`` = σ_max(J)/√N with
  J the ``[N·K, P]`` probe Jacobian, and κ, the divergence, the NTK distance are the same whichever
  normalization one picks.
- Nothing here builds an explicit Jacobian or Hessian of the whole network; dtype and device follow the
  inputs (float64 in, float64 out).
"""

from __future__ import annotations

from lightning_lazy.diagnostics._common import (
    DEFAULT_MEMORY_BUDGET,
    FunctionalModel,
    ModelLike,
    Params,
)
from lightning_lazy.diagnostics.curvature import (
    Kappa,
    hessian_norm,
    jacobian_norm,
    jacobian_norm_from_ntk,
    kappa,
)
from lightning_lazy.diagnostics.kernels import (
    Spectrum,
    gradient_descent_mse,
    kernel_alignment,
    kernel_velocity,
    ntk_distance,
    ntk_spectrum,
    target_alignment,
)
from lightning_lazy.diagnostics.lanczos import extreme_eigenpair
from lightning_lazy.diagnostics.movement import (
    FEATURE_SKETCH_SIZE,
    FeatureSketch,
    count_sketch,
    ActivationStates,
    Displacement,
    activation_stability,
    activation_states,
    displacement,
    divergence_numerator,
    divergence_scale,
    feature_movement,
    layer_displacement,
    parameter_owning_modules,
    path_divergence,
    recording_activation_states,
    recording_module_outputs,
    recording_relu_states,
    relu_states,
)
from lightning_lazy.diagnostics.ntk import (
    NTK_IMPLEMENTATIONS,
    NtkImplementation,
    empirical_ntk,
    owning_module,
)

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "FunctionalModel",
    "ModelLike",
    "Params",
    "NTK_IMPLEMENTATIONS",
    "NtkImplementation",
    "extreme_eigenpair",
    "gradient_descent_mse",
    "target_alignment",
    "Spectrum",
    "ntk_spectrum",
    "kernel_velocity",
    "owning_module",
    "layer_displacement",
    "feature_movement",
    "FEATURE_SKETCH_SIZE",
    "FeatureSketch",
    "count_sketch",
    "recording_module_outputs",
    "parameter_owning_modules",
    "Displacement",
    "Kappa",
    "ActivationStates",
    "activation_stability",
    "activation_states",
    "displacement",
    "empirical_ntk",
    "hessian_norm",
    "jacobian_norm",
    "jacobian_norm_from_ntk",
    "kappa",
    "kernel_alignment",
    "ntk_distance",
    "path_divergence",
    "divergence_scale",
    "divergence_numerator",
    "recording_activation_states",
    "recording_relu_states",
    "relu_states",
]
