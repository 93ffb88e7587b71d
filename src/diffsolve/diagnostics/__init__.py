"""Diagnostics of a frozen model, each checkable against the exact Gaussian-mixture reference.

* ``log_likelihood`` / ``bits_per_dim``: the probability-flow ODE likelihood (exact or Hutchinson divergence,
  adaptive or fixed-step), with dequantisation of 8-bit data (``likelihood``);
* ``flipd``, ``normal_bundle``, ``flow_jacobian``: local intrinsic dimension (``lid``);
* ``conservativity``: ||J - J^T||_F / ||J||_F of the denoiser or score (``conservativity``);
* ``hallucination_scores``, ``PredictionVariance``, ``hallucination_filter``: trajectory-variance hallucination
  scores through the step hook (``hallucination``);
* ``ode_sde_gap``, ``fokker_planck_residual``: the gap between the model's ODE and SDE and its cause (``gap``);
* ``jacobian_structure``, ``subspace_distance``: the denoiser Jacobian's rank and subspaces (``subspace``);
* ``diagnose``: several of them into one JSON report with plots (``report``; the ``diffsolve diagnose`` command).
"""
from .conservativity import Conservativity, conservativity, conservativity_by_t
from .core import DiagnosticError
from .gap import Gap, fokker_planck_residual, ode_sde_gap, two_sample
from .hallucination import (
    HallucinationRun,
    PredictionVariance,
    auroc,
    filter_report,
    hallucination_filter,
    hallucination_scores,
    hallucination_threshold,
    mode_distance,
    support_mask,
)
from .lid import LID, flipd, flow_jacobian, normal_bundle
from .likelihood import (
    DEQUANTIZATIONS,
    Likelihood,
    bits_per_dim,
    dequantize,
    flow,
    log_likelihood,
    offset_bits,
    quantize,
)
from .subspace import JacobianStructure, denoiser_jacobian, jacobian_structure, subspace_distance

__all__ = ["DiagnosticError", "Likelihood", "log_likelihood", "bits_per_dim", "offset_bits", "quantize", "dequantize",
           "DEQUANTIZATIONS", "flow", "LID", "flipd", "normal_bundle", "flow_jacobian", "Conservativity",
           "conservativity", "conservativity_by_t", "HallucinationRun", "PredictionVariance", "hallucination_scores",
           "hallucination_filter", "hallucination_threshold", "mode_distance", "support_mask", "filter_report", "auroc", "Gap",
           "ode_sde_gap", "fokker_planck_residual", "two_sample", "JacobianStructure", "denoiser_jacobian",
           "jacobian_structure", "subspace_distance"]
