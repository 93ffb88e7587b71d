"""Figures of docs/processes.md: PFGM++, conditional affine processes, interpolant SDEs, Denoising MCMC and analytic
early-step skipping, each against an exact answer or a converged reference.

    python benchmarks/processes.py mixture-dmcmc              # sliced Wasserstein to exact samples at 10 NFE
    python benchmarks/processes.py conditional                # IR-SDE: MR Sampler (= DPM-Solver++) vs Euler SDE
    python benchmarks/processes.py interpolant                # eps(t) of the interpolant SDE at 20..200 steps
    python benchmarks/processes.py pfgm --model digits-pfgmpp # every VE-view solver on the PFGM++ digits model
    python benchmarks/processes.py mnist-skip --images 256    # FD-LeNet / RMSE with and without the analytic start
    python benchmarks/processes.py mnist-dmcmc --images 256   # FD-LeNet of Denoising MCMC at ~10 NFE

Each part prints a markdown table and writes ``<out>/<part>.json`` (default out: docs/processes).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

import diffsolve as ds
from diffsolve.evaluation.distances import sliced_wasserstein

DT = torch.float64


def _table(rows: List[Dict[str, Any]], cols: List[str]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _write(out: Path, part: str, payload: Dict[str, Any], cols: List[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{part}.json").write_text(json.dumps(payload, indent=2, default=float) + "\n")
    print(_table(payload["rows"], cols))


# ----------------------------------------------------------------------------------------
def mixture_dmcmc(args) -> None:
    """Sliced Wasserstein (200 directions) of 1000 samples to 1000 exact ones, plain solvers at 10 NFE vs DMCMC with
    4 Langevin-Gibbs steps + 6 integrator NFE per sample (exact sigma posterior; 250 chains x 4 rounds)."""
    from diffsolve.sampling.dmcmc import NoiseLevels, dmcmc

    cases = {"gmm64 (VP linear)": (ds.GaussianMixture.random(64, seed=0), ds.VPDiscrete.linear(1000)),
             "8 components, 16-d, delta 0.05 (EDM)":
                 (ds.GaussianMixture.random(dim=16, n_components=8, seed=3, delta=0.05, mean_std=1.0), ds.EDM())}
    rows = []
    n = 1000
    for name, (ref, proc) in cases.items():
        den = ref.denoiser(proc, "epsilon")
        exact = ref.sample(n, torch.Generator().manual_seed(1))
        sw = lambda x: sliced_wasserstein(x, exact, directions=200)
        rows.append({"case": name, "sampler": "exact samples (Monte-Carlo floor)", "nfe": 0,
                     "sw": sw(ref.sample(n, torch.Generator().manual_seed(2)))})
        z = torch.randn(n, ref.dim, generator=torch.Generator().manual_seed(3), dtype=DT)
        for s, k in (("euler", 10), ("heun", 9), ("dpm++2m", 10), ("unipc-bh2", 10), ("unipc-bh2", 100)):
            rows.append({"case": name, "sampler": f"{s} from noise", "nfe": k, "sw": sw(ds.sample(den, z, s, nfe=k))})
        levels = NoiseLevels.exact(ref, torch.logspace(-1.3, 0.5, 32, dtype=DT))
        for integ, cfg in (("euler", {}), ("heun", {}), ("dpm++2m", {}), ("unipc-bh2", {}),
                           ("unipc-bh2", {"sigma_step": "sample", "keep": "last"})):
            x, info = dmcmc(den, levels, seeds=range(250), shape=(ref.dim,), rounds=4, chain_steps=4,
                            nfe=6, solver=integ, step_size=0.5, **cfg)
            label = "paper's argmax, lowest" if not cfg else "Gibbs: sampled sigma, last state"
            rows.append({"case": name, "sampler": f"DMCMC ({label}) + {integ}", "nfe": info.nfe_per_sample,
                         "amortised_nfe": round(info.amortised_nfe, 1), "sw": sw(x),
                         "median_sigma": float(info.sigmas.median())})
            print(rows[-1])
    _write(Path(args.out), "mixture_dmcmc", {"rows": rows, "samples": n},
           ["case", "sampler", "nfe", "amortised_nfe", "median_sigma", "sw"])


# ----------------------------------------------------------------------------------------
def conditional(args) -> None:
    """IR-SDE (T = 100, lambda = 0.5) with y = mu on an exact 16-d mixture: sliced Wasserstein of x0 samples to exact
    ones.  The MR Sampler's ODE/SDE updates are our DPM-Solver++ ones in the standard frame (tests); its paper's
    baseline is the Euler discretisation of the reverse SDE (euler-maruyama)."""
    ref = ds.GaussianMixture.random(dim=16, n_components=4, seed=7, delta=0.1)
    proc = ds.MeanReverting(T=100, max_sigma=0.5)
    den = ref.denoiser(proc, "epsilon")
    n = 1000
    mu = 0.5 * torch.randn(n, 16, generator=torch.Generator().manual_seed(4), dtype=DT)
    z = torch.randn(n, 16, generator=torch.Generator().manual_seed(5), dtype=DT)
    exact = ref.sample(n, torch.Generator().manual_seed(1))
    sw = lambda x: sliced_wasserstein(x, exact, directions=200)
    kw = {"model_kwargs": {"mu": mu}, "seeds": list(range(n))}
    rows = [{"sampler": "exact samples (Monte-Carlo floor)", "nfe": 0,
             "sw": sw(ref.sample(n, torch.Generator().manual_seed(2)))}]
    runs = [("euler-maruyama (IR-SDE's reverse SDE)", "euler-maruyama", {}, (10, 20, 100, 400)),
            ("MR Sampler ODE data order 2 = dpm++2m taylor2", "dpm++2m", {"taylor2": True}, (5, 10, 20)),
            ("MR Sampler SDE data order 2 = dpm++2m-sde taylor2", "dpm++2m-sde", {"taylor2": True}, (5, 10, 20)),
            ("unipc-bh2", "unipc-bh2", {}, (5, 10, 20))]
    for label, s, opts, nfes in runs:
        for k in nfes:
            x = ds.sample(den, z, s, nfe=k, **kw, **opts) if ds.get_solver(s).stochastic else \
                ds.sample(den, z, s, nfe=k, model_kwargs=kw["model_kwargs"], **opts)
            rows.append({"sampler": label, "nfe": k, "sw": sw(x)})
            print(rows[-1])
    _write(Path(args.out), "conditional", {"rows": rows, "samples": n, "process": proc.config()},
           ["sampler", "nfe", "sw"])


# ----------------------------------------------------------------------------------------
def interpolant(args) -> None:
    """Rectified flow on an exact 8-d mixture (velocity model): sliced Wasserstein to exact samples for eps(t) = c t
    with the Euler-Maruyama and stochastic Heun integrators (Heun: 2 NFE a step)."""
    ref = ds.GaussianMixture.random(dim=8, n_components=4, seed=2, delta=0.1)
    proc = ds.RectifiedFlow()
    den = ref.denoiser(proc, "velocity")
    n = 2000
    exact = ref.sample(n, torch.Generator().manual_seed(1))
    sw = lambda x: sliced_wasserstein(x, exact, directions=200)
    z = torch.randn(n, 8, generator=torch.Generator().manual_seed(3), dtype=DT)
    rows = [{"integrator": "exact samples (Monte-Carlo floor)", "eps": "-", "steps": 0,
             "sw": sw(ref.sample(n, torch.Generator().manual_seed(2)))}]
    for c in (0.0, 0.2, 1.0, 3.0):
        for name in ("interpolant-sde", "interpolant-sde-heun"):
            for steps in (10, 25, 100):
                k = steps if name == "interpolant-sde" else 2 * steps - 1
                x = ds.sample(den, z, name, nfe=k, epsilon=lambda t, c=c: c * t, seeds=list(range(n)))
                rows.append({"integrator": name, "eps": f"{c:g} t", "steps": steps, "nfe": k, "sw": sw(x)})
                print(rows[-1])
    _write(Path(args.out), "interpolant", {"rows": rows, "samples": n}, ["integrator", "eps", "steps", "nfe", "sw"])


# ----------------------------------------------------------------------------------------
def pfgm(args) -> None:
    """Every VE-view (deterministic) solver on the PFGM++ digits model at 10 and 20 NFE: RMSE to its converged
    reference (dpm++3m, 100 NFE, Karras grid, same noise), next to the EDM digits model trained alike."""
    models = {"PFGM++ D=128 (" + args.model + ")": args.model, "EDM (digits-edm)": "digits-edm"}
    n = args.images
    rows = []
    grids = {}
    for label, name in models.items():
        den = ds.load(name)
        z = torch.randn(n, *den.sample_shape, generator=torch.Generator().manual_seed(args.seed), dtype=DT)
        ref = ds.sample(den, z, "dpm++3m", nfe=100, spacing="karras")
        grids[label] = ref[:16]
        for info in ds.solvers():
            if info.stochastic or info.requires:
                continue
            for k in (10, 20):
                t0 = time.perf_counter()
                x = ds.sample(den, z, info.name, nfe=max(k, info.min_nfe(True)))
                rows.append({"model": label, "solver": info.name, "nfe": k,
                             "rmse": float((x - ref).pow(2).mean().sqrt()),
                             "seconds": round(time.perf_counter() - t0, 2)})
                print(rows[-1])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from diffsolve.util.images import save_labelled_grids
    save_labelled_grids(list(grids.values()), list(grids), out / "pfgm_digits.png")
    _write(out, "pfgm", {"rows": rows, "images": n, "seed": args.seed}, ["model", "solver", "nfe", "rmse"])


# ----------------------------------------------------------------------------------------
def _mnist_reference(den, z):
    return ds.sample(den, z, "dpm++3m", nfe=100, spacing="uniform", final="t_min")


def mnist_skip(args) -> None:
    """The shipped MNIST model at 10 and 20 NFE with and without the analytic Gaussian start (mean and covariance of the
    5000 training images): FD-LeNet (256 images) and RMSE to the converged reference from the same noise."""
    from diffsolve.evaluation.metrics import default_metric
    from diffsolve.sampling import skipped_fraction
    from diffsolve.util.datasets import load_dataset

    den, metric = ds.load("mnist"), default_metric()
    start = ds.GaussianStart.from_data(load_dataset("mnist").double())
    z = torch.randn(args.images, *den.sample_shape, generator=torch.Generator().manual_seed(args.seed), dtype=DT)
    ref = _mnist_reference(den, z)
    rows = [{"sampler": "reference: dpm++3m 100 NFE, uniform, to t_min", "nfe": 100,
             "fd": metric.score(ref.float().clamp(-1, 1)).fd_lenet}]
    for k in (10, 20):
        for solver in (None,):
            for skip in (0.0, 0.1, 0.2, 0.3):
                kw = {"start": start, "skip": skip} if skip else {}
                x, info = ds.sample(den, z, solver, nfe=k, return_info=True, **kw)
                rows.append({"sampler": (solver or "default rule") + f" ({info.solver})", "nfe": info.nfe,
                             "skip": skip, "skipped_lambda_fraction": skipped_fraction(den.process,
                                                                                      float(info.grid.t[0])),
                             "t_switch": float(info.grid.t[0]), "rmse": float((x - ref).pow(2).mean().sqrt()),
                             "fd": metric.score(x.float().clamp(-1, 1)).fd_lenet})
                print(rows[-1])
    floor = metric.meta.get("floor_vs_real_stats_by_n", {}).get(str(args.images))
    _write(Path(args.out), "mnist_skip", {"rows": rows, "images": args.images, "floor": floor, "seed": args.seed},
           ["sampler", "nfe", "skip", "skipped_lambda_fraction", "t_switch", "rmse", "fd"])


def mnist_dmcmc(args) -> None:
    """Denoising MCMC on the shipped MNIST model with the shipped noise-level classifier: 4 Langevin-Gibbs steps + 6
    integrator NFE per sample, 64 chains x 4 rounds, against the plain default rule at 10 NFE (FD-LeNet, 256 images)."""
    from diffsolve.evaluation.metrics import default_metric
    from diffsolve.hub import load_noise_classifier
    from diffsolve.sampling.dmcmc import NoiseLevels, dmcmc

    den, metric = ds.load("mnist"), default_metric()
    clf = load_noise_classifier(args.classifier)
    levels = NoiseLevels(clf.sigmas, clf.logits)
    n = args.images
    z = torch.randn(n, *den.sample_shape, generator=torch.Generator().manual_seed(args.seed), dtype=DT)
    rows = [{"sampler": "default rule from noise", "nfe": 10, "amortised_nfe": 10.0,
             "fd": metric.score(ds.sample(den, z, nfe=10).float().clamp(-1, 1)).fd_lenet}]
    print(rows[-1])
    chains = args.chains
    for integ, steps, k, cfg in (("unipc-bh2", 4, 6, {}), ("unipc-bh2", 2, 8, {}), ("dpm++2m", 4, 6, {}),
                                 ("unipc-bh2", 4, 6, {"sigma_step": "sample", "keep": "last"})):
        t0 = time.perf_counter()
        x, info = dmcmc(den, levels, seeds=range(chains), rounds=n // chains, chain_steps=steps, nfe=k, solver=integ,
                        step_size=args.step, **cfg)
        rows.append({"sampler": f"DMCMC {steps} LG steps + {integ} {k} NFE" + (" (Gibbs, last)" if cfg else ""),
                     "nfe": info.nfe_per_sample, "amortised_nfe": round(info.amortised_nfe, 1),
                     "median_sigma": float(info.sigmas.median()),
                     "fd": metric.score(x.float().clamp(-1, 1)).fd_lenet,
                     "classes": metric.score(x.float().clamp(-1, 1)).classes_covered,
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(rows[-1])
    floor = metric.meta.get("floor_vs_real_stats_by_n", {}).get(str(n))
    _write(Path(args.out), "mnist_dmcmc", {"rows": rows, "images": n, "floor": floor, "chains": chains},
           ["sampler", "nfe", "amortised_nfe", "median_sigma", "fd", "classes"])


#: part -> (placeholder in docs/processes.md, its json, table columns)
DOC_TABLES = {"pfgm": ("PFGM_TABLE", "pfgm", ["model", "solver", "nfe", "rmse"]),
              "conditional": ("CONDITIONAL_TABLE", "conditional", ["sampler", "nfe", "sw"]),
              "interpolant": ("INTERPOLANT_TABLE", "interpolant", ["integrator", "eps", "steps", "nfe", "sw"]),
              "mixture-dmcmc": ("MIXTURE_DMCMC_TABLE", "mixture_dmcmc",
                                ["case", "sampler", "nfe", "amortised_nfe", "median_sigma", "sw"]),
              "mnist-dmcmc": ("MNIST_DMCMC_TABLE", "mnist_dmcmc",
                              ["sampler", "nfe", "amortised_nfe", "median_sigma", "fd", "classes"]),
              "mnist-skip": ("MNIST_SKIP_TABLE", "mnist_skip",
                             ["sampler", "nfe", "skip", "skipped_lambda_fraction", "t_switch", "rmse", "fd"])}


def doc(args) -> None:
    """Fill the tables of docs/processes.md from the parts' json files (a part not yet run says so)."""
    path = Path("docs/processes.md")
    text = path.read_text()
    for part, (mark, name, cols) in DOC_TABLES.items():
        src = Path(args.out) / f"{name}.json"
        if src.exists():
            payload = json.loads(src.read_text())
            if part == "pfgm":  # one row per solver, one column per model and NFE
                rows: Dict[str, Dict[str, Any]] = {}
                for r in payload["rows"]:
                    rows.setdefault(r["solver"], {"solver": r["solver"]})[f"{r['model'].split(' (')[0]} @{r['nfe']}"] = r["rmse"]
                cols = ["solver"] + sorted({k for r in rows.values() for k in r if k != "solver"}, reverse=True)
                payload = {**payload, "rows": list(rows.values())}
            extra = {k: v for k, v in payload.items() if k not in ("rows", "process")}
            table = (f"`python benchmarks/processes.py {part}` ({', '.join(f'{k} {v}' for k, v in extra.items())}; "
                     f"raw: `docs/processes/{name}.json`):\n\n" + _table(payload["rows"], cols))
        else:
            table = f"Not measured in this tree: `python benchmarks/processes.py {part}` writes it."
        text = text.replace(mark, table)
    path.write_text(text)
    print(f"wrote {path}")


PARTS = {"doc": doc, "mixture-dmcmc": mixture_dmcmc, "conditional": conditional, "interpolant": interpolant, "pfgm": pfgm,
         "mnist-skip": mnist_skip, "mnist-dmcmc": mnist_dmcmc}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("part", choices=list(PARTS))
    ap.add_argument("--out", default="docs/processes")
    ap.add_argument("--model", default="digits-pfgmpp")
    ap.add_argument("--classifier", default="mnist", help="noise-level classifier folder (default: the shipped one)")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--chains", type=int, default=64)
    ap.add_argument("--step", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    with torch.inference_mode():
        PARTS[args.part](args)
    print(f"{args.part}: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
