"""FlowChef: steering a flow in its vector field without gradients through the network (Patel et al. 2024,
arXiv:2412.00100).

For a rectified flow x_t = (1 - t) x0 + t eps with velocity v = eps - x0, the x0 estimate is x0_hat = x_t - t v.
FlowChef holds v fixed ("gradient skipping": d x0_hat / d x_t ~ I, no VJP through the network), moves the state
down the gradient of the data loss at x0_hat and then takes the solver step with the *old* v:

    x_t <- x_t - zeta grad_{x0_hat} L(x0_hat),   L = ||y - A x0_hat||^2 / 2,

so one network evaluation per step, as without guidance.  The step with v fixed carries a shift of the state
unchanged to the next time, so the same update can be applied after the solver's step, to x_s; this is how it
runs here, as an ``after_step`` hook of any solver.  For a general process x_t = alpha_t x0 + sigma_t eps, "v
fixed" means x0_hat and eps_hat shift together, which moves the state by (alpha_s + sigma_s) times the x0 shift:

    x_s <- x_s - zeta (alpha_s + sigma_s) grad_{x0_hat} L(x0_hat(x_t))   (alpha + sigma = 1 for the flow),

skipped on the step into clean data (as the paper skips its last step).  The paper's pixel-space setting, step
100 on the *mean* squared error over m measurements, is zeta = 200 / m here.  Non-linear operators are
differentiated by autograd through the operator only.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ...adapters.denoiser import ModelWrapper
from ...solvers.drivers import Step
from ...solvers.state import SolverState
from ..exact import check_measurement

Tensor = torch.Tensor


def data_gradient(op, y: Tensor, x0: Tensor) -> Tensor:
    """grad_x ||y - A x||^2 / 2 = A^T (A x - y) at x0 (autograd through a non-linear operator)."""
    if op.linear:
        return op.adjoint(op.forward(x0) - y.to(x0.dtype))
    with torch.enable_grad():
        xg = x0.detach().requires_grad_(True)
        loss = 0.5 * (op.forward(xg) - y.to(x0.dtype)).pow(2).sum()
        (g,) = torch.autograd.grad(loss, xg)
    return g


class FlowChef(ModelWrapper):
    """The model unchanged, plus the steering hook ``after_step`` (``inverse.sample`` passes it to the solver)."""

    name = "flowchef"
    needs_gradients = False

    def __init__(self, model, op, y, sigma_y, zeta: float = 0.5):
        super().__init__(model)
        if not zeta > 0:
            raise ValueError(f"FlowChef needs a step zeta > 0, got {zeta}")
        self.op, self.y, self.sigma_y = op, check_measurement(op, y, sigma_y, batch=True), float(sigma_y)
        self.zeta = float(zeta)
        self.vjps = 0

    def describe(self) -> Dict[str, Any]:
        return {"kind": self.name, "zeta": self.zeta, "sigma_y": self.sigma_y}

    def after_step(self, state: SolverState, step: Step) -> Optional[SolverState]:
        if step.clean or step.t_to is None:
            return None
        t = torch.as_tensor(step.t_to, dtype=torch.float64)
        p = self.process
        scale = float(p.alpha(t) + p.sigma(t))
        g = data_gradient(self.op, self.y, step.denoised.detach())
        state.x = state.x - (self.zeta * scale) * g.to(state.x.dtype)
        return None
