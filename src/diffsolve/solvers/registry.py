"""Solver registry: every solver, its order, NFE rule, source and what it requires of the process; and the one
NFE planner (budget or explicit grid -> steps, step orders and cost)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..grids import TimeGrid
from . import adams, consistency, ddim, dpm_solver, dpm_v3, euler, fitted, momentum, unipc
from .state import SamplingError

__all__ = ["SolverInfo", "SOLVERS", "get_solver", "solvers", "SamplingError", "Plan"]


@dataclass(frozen=True)
class Plan:
    """How a solver spends a budget: grid points to lay, per-step orders of singlestep methods, NFE used."""

    steps: int
    orders: Optional[Tuple[int, ...]]
    cost: int

    @property
    def options(self) -> Dict[str, Any]:
        return {"orders": list(self.orders)} if self.orders is not None else {}


@dataclass(frozen=True)
class SolverInfo:
    """A registered solver.

    ``cost(steps, clean_end)`` is the number of network evaluations for a grid of ``steps``
    intervals; the NFE budget is turned into the largest grid that fits.
    """

    name: str
    fn: Callable
    order: int
    nfe_rule: str
    paper: str
    defaults: Dict[str, Any] = field(default_factory=dict)
    stochastic: bool = False
    cost: Callable[[int, bool], int] = lambda steps, clean: steps
    singlestep_order: int = 0  # > 0: budget split by dpm_solver.singlestep_orders
    requires: Tuple[str, ...] = ()  # options the caller must pass (e.g. dpm-v3's stats=)
    #: process capabilities the solver needs (e.g. 'gaussian' marginals for reverse-SDE solvers)
    needs: Tuple[str, ...] = ()

    def plan(self, nfe: int, clean_end: bool) -> Tuple[int, Dict[str, Any]]:
        """(steps, extra solver options) for an NFE budget (see ``plan_budget``)."""
        p = self.plan_budget(nfe, clean_end)
        return p.steps, p.options

    def plan_budget(self, nfe: int, clean_end: bool) -> Plan:
        """The largest grid of a spacing within ``nfe``: a singlestep method spends the remainder on one
        lower-order step (DPM-Solver's recipe), the others take the most steps whose cost fits."""
        if self.singlestep_order:
            orders = dpm_solver.singlestep_orders(nfe, self.singlestep_order, clean_end)
            return Plan(len(orders), tuple(orders), sum(orders))
        steps = nfe
        while steps > 0 and self.cost(steps, clean_end) > nfe:
            steps -= 1
        return Plan(steps, None, self.cost(steps, clean_end) if steps else 0)

    def plan_grid(self, grid: TimeGrid) -> Plan:
        """Full-order steps on a given grid (a singlestep method's jump to clean data is order 1)."""
        if self.singlestep_order:
            orders = tuple(1 if grid.is_clean(i + 1) else self.singlestep_order for i in range(grid.steps))
            return Plan(grid.steps, orders, sum(orders))
        return Plan(grid.steps, None, self.cost(grid.steps, grid.clean_end))

    def steps_for_nfe(self, nfe: int, clean_end: bool) -> Tuple[int, int]:
        """(steps, NFE used) of the largest explicit grid (full-order steps) within ``nfe``."""
        best = (0, 0)
        for steps in range(1, nfe + 1):
            if self.singlestep_order:
                cost = sum(1 if (clean_end and i == steps - 1) else self.singlestep_order for i in range(steps))
            else:
                cost = self.cost(steps, clean_end)
            if cost <= nfe:
                best = (steps, cost)
        if best[0] == 0:
            raise ValueError(f"solver {self.name!r} cannot take a step within nfe={nfe}")
        return best

    def min_nfe(self, clean_end: bool) -> int:
        """Smallest budget that buys at least one step."""
        return next(n for n in range(1, 64) if self.plan_budget(n, clean_end).steps >= 1)

    def check_process(self, process) -> None:
        """A clear error when the process lacks a capability this solver needs."""
        for cap in self.needs:
            if not getattr(process, cap, False):
                raise ValueError(f"solver {self.name!r} needs a process with {cap} marginals; {process!r} has "
                                 "none (use an ODE solver)")


def _heun_cost(steps: int, clean: bool) -> int:
    return 2 * steps - 1 if clean else 2 * steps


def _pndm_cost(steps: int, clean: bool) -> int:
    return steps if (clean and steps == 1) else steps + 1


_DPM = "Lu et al. 2022, DPM-Solver (arXiv:2206.00927)"
_DPMPP = "Lu et al. 2022, DPM-Solver++ (arXiv:2211.01095)"
_UNIPC = "Zhao et al. 2023, UniPC (arXiv:2302.04867)"
_V3 = "Zheng et al. 2023, DPM-Solver-v3 (arXiv:2310.13268)"
_MOM = "Wizadwongsa et al. 2023, Diffusion Sampling with Momentum (arXiv:2307.11118)"

_LIST: List[SolverInfo] = [
    SolverInfo("ddim", ddim.ddim, 1, "1 per step", "Song et al. 2021, DDIM (arXiv:2010.02502)", {"eta": 0.0}),
    SolverInfo("euler", euler.euler, 1, "1 per step", "Karras et al. 2022, EDM (arXiv:2206.00364)"),
    SolverInfo("heun", euler.heun, 2, "2 per step, 1 for the jump to clean data",
               "Karras et al. 2022, EDM (arXiv:2206.00364)", cost=_heun_cost),
    SolverInfo("pndm", adams.pndm, 2, "1 per step + 1 (first step is Heun-like)",
               "Liu et al. 2022, PNDM (arXiv:2202.09778)", cost=_pndm_cost),
    SolverInfo("ipndm", adams.ipndm, 4, "1 per step", "Zhang & Chen 2023 (arXiv:2204.13902); Zhou et al. 2024",
               {"order": 4}),
    SolverInfo("deis", adams.deis, 3, "1 per step", "Zhang & Chen 2023, DEIS (arXiv:2204.13902)", {"order": 3}),
    SolverInfo("dpm-solver-1", dpm_solver.dpm_singlestep, 1, "1 per step", _DPM, {"form": "noise"},
               singlestep_order=1),
    SolverInfo("dpm-solver-2", dpm_solver.dpm_singlestep, 2, "2 per step (+1 jump), remainder lower order", _DPM,
               {"form": "noise"}, singlestep_order=2),
    SolverInfo("dpm-solver-3", dpm_solver.dpm_singlestep, 3, "3 per step (+1 jump), remainder lower order", _DPM,
               {"form": "noise"}, singlestep_order=3),
    SolverInfo("dpm-solver-2m", dpm_solver.dpm_multistep, 2, "1 per step", _DPM + "; " + _DPMPP,
               {"order": 2, "form": "noise"}),
    SolverInfo("dpm-solver-3m", dpm_solver.dpm_multistep, 3, "1 per step", _DPM + "; " + _DPMPP,
               {"order": 3, "form": "noise"}),
    SolverInfo("dpm++2s", dpm_solver.dpm_singlestep, 2, "2 per step (+1 jump), remainder lower order", _DPMPP,
               {"form": "data"}, singlestep_order=2),
    SolverInfo("dpm++2m", dpm_solver.dpm_multistep, 2, "1 per step", _DPMPP, {"order": 2, "form": "data"}),
    SolverInfo("dpm++3m", dpm_solver.dpm_multistep, 3, "1 per step", _DPMPP, {"order": 3, "form": "data"}),
    SolverInfo("dpm++2m-sde", dpm_solver.dpm_sde_multistep, 1, "1 per step (strong order 1)", _DPMPP,
               {"order": 2}, stochastic=True, needs=("gaussian",)),
    SolverInfo("unipc-bh1", unipc.unipc, 3, "1 per step (corrector reuses the next evaluation)", _UNIPC,
               {"variant": "bh1", "order": 2}),
    SolverInfo("unipc-bh2", unipc.unipc, 3, "1 per step (corrector reuses the next evaluation)", _UNIPC,
               {"variant": "bh2", "order": 2}),
    SolverInfo("ddpm", ddim.ddpm, 1, "1 per step (weak order 1)", "Ho et al. 2020, DDPM (arXiv:2006.11239)",
               stochastic=True, needs=("gaussian",)),
    SolverInfo("euler-maruyama", euler.euler_maruyama, 1, "1 per step (weak order 1)",
               "Song et al. 2021, score SDE (arXiv:2011.13456)", stochastic=True, needs=("gaussian",)),
    SolverInfo("dpm-v3", dpm_v3.dpm_v3, 3, "1 per step (corrector reuses the next evaluation)", _V3, {"order": 3},
               requires=("stats",)),
    SolverInfo("dpm++2m-hb", momentum.dpmpp_2m_hb, 1, "1 per step", _MOM + "; " + _DPMPP, {"beta": 0.8}),
    SolverInfo("ipndm-hb", momentum.ipndm_hb, 1, "1 per step", _MOM + "; Zhang & Chen 2023 (arXiv:2204.13902)",
               {"order": 4, "beta": 0.8}),
    SolverInfo("ghvb", momentum.ghvb, 4, "1 per step", _MOM, {"order": 4, "beta": 0.8}),
    SolverInfo("fitted", fitted.fitted, 1, "1 per step",
               "Shaul et al. 2024, Bespoke Non-Stationary Solvers (arXiv:2403.01329); coefficients from ds.tune"),
    SolverInfo("consistency", consistency.consistency, 1, "1 per step (denoise, re-noise)",
               "Song et al. 2023, Consistency Models (arXiv:2303.01469)", stochastic=True, needs=("gaussian",)),
]

SOLVERS: Dict[str, SolverInfo] = {s.name: s for s in _LIST}
_ALIASES = {"dpmpp_2m": "dpm++2m", "dpmpp-2m": "dpm++2m", "dpmpp_3m": "dpm++3m", "unipc": "unipc-bh2",
            "dpm-solver++": "dpm++2m", "plms": "pndm", "ddim-eta": "ddim", "em": "euler-maruyama"}


def get_solver(name: str) -> SolverInfo:
    key = _ALIASES.get(name.lower(), name.lower()) if isinstance(name, str) else name
    if key not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; valid names: {', '.join(SOLVERS)}")
    return SOLVERS[key]


def solvers() -> List[SolverInfo]:
    """Every solver with its order, NFE rule and paper (``ds.solvers()``)."""
    return list(_LIST)
