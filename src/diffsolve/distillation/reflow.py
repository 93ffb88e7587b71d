"""Reflow: a few-step student on the teacher's own noise -> data coupling (Liu et al. 2023, Rectified Flow,
arXiv:2209.03003; SlimFlow, Zhu et al. 2024, arXiv:2407.12718).

Pairs (z, x1): standard normal noise z and the endpoint x1 of the teacher's probability-flow ODE started at
x_T = prior(z).  On the coupled path x_t = alpha_t x1 + sigma_t e, with e = (x_T - alpha_T x1) / sigma_T the noise
the pair implies, the rectified (straight) flow is exact: its clean estimate is x1 at every t.  The student (a copy of
the teacher, or a smaller network) regresses x0(x_t, t) onto x1 (mean squared error in data space), with the training
times drawn from the few-step sampler's own grid (probability ``p_grid``) and uniformly otherwise, so its 1-2
evaluations land where it was trained.  A straight student needs one Euler / DDIM step per evaluation.

SlimFlow's annealing reflow (``anneal_steps`` > 0): a pair is, with probability max(0, 1 - step / anneal_steps), a
random one (independent noise and a training image) instead of the teacher's, so a smaller student
(``student_arch``, trained from scratch) first learns the data, then the coupling.

Pairs are generated in chunks (``out/pairs/chunk_XXXXX.safetensors``, seeds by the one seeding convention) and a
killed run resumes at the first missing chunk.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..adapters.denoiser import Denoiser
from ..grids import make_grid
from ..sampling import sample
from ..util import seeding
from ..util.files import json_dump_atomic, save_safetensors
from .run import DistillConfig, DistillRun, Method

Tensor = torch.Tensor


class Reflow(Method):
    """Options (``DistillConfig.options``): pairs (2048), pair_solver ('unipc-bh2'), pair_nfe (20), pair_spacing
    (None: the solver's), chunk (64), p_grid (0.5), spacing ('uniform': the student's grid), sampler ('ddim'),
    anneal_steps (0), data (the training images for random pairs, 'mnist'), student_arch (None: copy the teacher)."""

    name = "reflow"

    def __init__(self, cfg: DistillConfig, student: Optional[nn.Module] = None):
        o = dict(cfg.options)
        self.n_pairs = int(o.pop("pairs", 2048))
        self.pair_solver = o.pop("pair_solver", "unipc-bh2")
        self.pair_nfe = int(o.pop("pair_nfe", 20))
        self.pair_spacing = o.pop("pair_spacing", None)
        self.chunk = int(o.pop("chunk", 64))
        self.p_grid = float(o.pop("p_grid", 0.5))
        self.spacing = o.pop("spacing", "uniform")
        self.sampler_name = o.pop("sampler", "ddim")
        self.anneal_steps = int(o.pop("anneal_steps", 0))
        self.data_name = o.pop("data", "mnist")
        self.student_arch = o.pop("student_arch", None)
        if o:
            raise ValueError(f"unknown reflow option(s) {sorted(o)}")
        if self.n_pairs < 1 or self.chunk < 1 or not 0 <= self.p_grid <= 1:
            raise ValueError("reflow needs pairs >= 1, chunk >= 1 and 0 <= p_grid <= 1")
        self._student = student
        self.z: Optional[Tensor] = None
        self.x1: Optional[Tensor] = None
        self.data: Optional[Tensor] = None

    def student(self, teacher: Denoiser, cfg: DistillConfig) -> nn.Module:
        if self._student is not None:
            return self._student.float().requires_grad_(True).train()
        if self.student_arch:
            from ..models import build_model
            arch = {**teacher.config["architecture"], **self.student_arch}
            torch.manual_seed(cfg.seed)
            return build_model(arch).float().train()
        return super().student(teacher, cfg)

    def grid_times(self, run: DistillRun) -> Tensor:
        return make_grid(run.teacher.process, run.cfg.nfe, self.spacing, "denoise").t[: run.cfg.nfe]

    def sampler(self, cfg: DistillConfig) -> Dict[str, Any]:
        return {"solver": self.sampler_name, "nfe": cfg.nfe, "spacing": self.spacing, "final": "denoise"}

    # -- pairs --------------------------------------------------------------------------------------
    def prepare(self, run: DistillRun) -> None:
        from safetensors.torch import load_file

        folder = run.out / "pairs"
        folder.mkdir(parents=True, exist_ok=True)
        settings = {"solver": self.pair_solver, "nfe": self.pair_nfe, "spacing": self.pair_spacing,
                    "chunk": self.chunk, "seed": int(run.cfg.seed)}
        meta = folder / "pairs.json"
        if meta.exists() and json.loads(meta.read_text()) != settings:
            raise ValueError(f"{folder} holds pairs made with {json.loads(meta.read_text())}, not {settings}: "
                             "use another out_dir")
        json_dump_atomic(settings, meta)
        shape = run.teacher.sample_shape
        if shape is None:
            raise ValueError("reflow needs the teacher's sample_shape (ds.Denoiser(..., sample_shape=...))")
        zs: List[Tensor] = []
        xs: List[Tensor] = []
        n_chunks = -(-self.n_pairs // self.chunk)
        todo = [i for i in range(n_chunks) if not (folder / f"chunk_{i:05d}.safetensors").exists()]
        bar = None
        if todo and run.cfg.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=n_chunks, initial=n_chunks - len(todo), desc="reflow pairs", unit="chunk")
        base = (int(run.cfg.seed) + 1) << 40  # pair seeds: disjoint from the evaluation seeds 0, 1, ...
        for i in range(n_chunks):
            path = folder / f"chunk_{i:05d}.safetensors"
            if not path.exists():
                seeds = range(base + i * self.chunk, base + (i + 1) * self.chunk)
                z = seeding.noise(seeds, shape, dtype=torch.float64)
                kw: Dict[str, Any] = {"solver": self.pair_solver, "nfe": self.pair_nfe}
                if self.pair_spacing:
                    kw["spacing"] = self.pair_spacing
                with torch.no_grad():
                    x1 = sample(run.teacher, z, **kw)
                save_safetensors({"z": z.float(), "x1": x1.float()}, path)
                run.tick()
                if bar is not None:
                    bar.update(1)
            t = load_file(str(path))
            zs.append(t["z"])
            xs.append(t["x1"])
        if bar is not None:
            bar.close()
        self.z = torch.cat(zs)[: self.n_pairs]
        self.x1 = torch.cat(xs)[: self.n_pairs]
        if self.anneal_steps > 0:
            from ..util.datasets import load_dataset
            self.data = load_dataset(self.data_name).float()

    # -- the loss -------------------------------------------------------------------------------------
    def loss(self, run: DistillRun, step: int) -> Tensor:
        assert self.z is not None and self.x1 is not None
        g, b, proc = run.gen, run.cfg.batch_size, run.teacher.process
        idx = torch.randint(0, self.z.shape[0], (b,), generator=g)
        z, x1 = self.z[idx], self.x1[idx]
        if self.anneal_steps > 0 and self.data is not None:
            p_rand = max(0.0, 1.0 - step / self.anneal_steps)
            rand = torch.rand(b, generator=g) < p_rand
            j = torch.randint(0, self.data.shape[0], (b,), generator=g)
            z = torch.where(rand[:, None, None, None], torch.randn(z.shape, generator=g), z) if z.dim() == 4 \
                else torch.where(rand[:, None], torch.randn(z.shape, generator=g), z)
            x1 = torch.where(rand.reshape((-1,) + (1,) * (x1.dim() - 1)), self.data[j].to(x1), x1)
        grid = self.grid_times(run).to(torch.float64)
        u = torch.rand(b, generator=g, dtype=torch.float64)
        t_uni = proc.t_min + (proc.t_max - proc.t_min) * u
        pick = torch.randint(0, grid.numel(), (b,), generator=g)
        on_grid = torch.rand(b, generator=g) < self.p_grid
        t = torch.where(on_grid, grid[pick], t_uni)
        shp = (-1,) + (1,) * (z.dim() - 1)
        t_max = torch.tensor(proc.t_max, dtype=torch.float64)
        a_T, s_T = float(proc.alpha(t_max)), float(proc.sigma(t_max))
        x_T = proc.prior_from_noise(z.double())
        e = (x_T - a_T * x1.double()) / s_T
        a, s = proc.alpha(t).reshape(shp), proc.sigma(t).reshape(shp)
        xt = (a * x1.double() + s * e).float()
        x0 = run.student.evaluate(xt, t, {}).x0
        return (x0 - x1).square().mean()
