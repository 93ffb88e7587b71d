"""Model adapters: the parameterisation table, ``Denoiser`` and the ``Model`` protocol, model identity and
derivatives."""
from .denoiser import (
           Conditioned,
           Denoiser,
           Model,
           ModelWrapper,
           NonFiniteError,
           Prediction,
           base_model,
           outputs_from,
           state_dtype,
)
from .identity import IdentityCheck, ModelMismatch, model_fingerprint
from .parameterisation import PARAMETERISATIONS, PREDICTIONS, Parameterisation, edm_coefficients, get_parameterisation

__all__ = ["Conditioned", "Denoiser", "Model", "ModelWrapper", "NonFiniteError", "Prediction", "base_model", "outputs_from",
           "state_dtype", "IdentityCheck", "ModelMismatch", "model_fingerprint", "PARAMETERISATIONS", "PREDICTIONS",
           "Parameterisation", "edm_coefficients", "get_parameterisation"]
