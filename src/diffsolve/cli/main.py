"""Command line: ``diffsolve solvers | sample | demo | restore | diagnose`` (also ``python -m diffsolve``).

Every command samples the exact Gaussian-mixture reference model (``ds.GaussianMixture``), so
each sample can be scored against the exact probability-flow ODE solution from the same noise.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

import diffsolve as ds

from ..adapters.parameterisation import PARAMETERISATIONS
from ..evaluation.restore import DEFAULT_METHOD, DEFAULT_MODEL, OPERATORS
from ..evaluation.restore import EXCLUDED as RESTORE_EXCLUDED
from ..evaluation.teacher import ExactTeacher
from ..grids import FINALS, SPACINGS
from ..processes import PRESETS
from ..reference import REFERENCES, ExactTargets
from ..util import seeding
from ..util.jsonable import jsonable
from ..util.options import parse_options

PROCESSES = PRESETS
PREDICTIONS = tuple(p for p in PARAMETERISATIONS if not (PARAMETERISATIONS[p].preconditioned
                                                          or PARAMETERISATIONS[p].needs_offset))
DEMO_SOLVERS = ("ddim", "dpm++2m", "unipc-bh2", "dpm-solver-3m", "dpm++3m", "ipndm")
#: the exact ODE reference is solved for at most this many numbers (samples x dims); more are subsampled
EXACT_BUDGET = 16384


class CLIError(ValueError):
    """Bad command-line input (reported as ``error: ...``, exit code 2)."""


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------
def _log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def _write_json(path: Path, obj: Dict[str, Any]) -> None:
    path.write_text(json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n")


def _parse_options(items: Sequence[str]) -> Dict[str, Any]:
    """``["order=3", "eta=0.5", "variant=bh1"]`` -> solver options (Python literals, else strings)."""
    try:
        return parse_options(items)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _noise_and_seeds(n: int, shape: Sequence[int], seed: int):
    """The run's sample seeds (``seeding.run_seeds``) and their starting noise: sample i depends on (seed, i)
    alone, and is the same noise as ``ds.sample(seeds=...)`` and the tuner give that sample seed."""
    seeds = seeding.run_seeds(seed, n)
    return seeding.noise(seeds, shape), seeds


def _exact(ref: ds.GaussianMixture, proc: ds.NoiseProcess, noise: torch.Tensor,
           quiet: bool) -> Tuple[ExactTeacher, ExactTargets]:
    """The exact teacher of ``ref`` and its targets for ``noise``."""
    _log(f"solving the exact probability-flow ODE for {noise.shape[0]} samples ...", quiet)
    teacher = ExactTeacher(ref, proc)
    return teacher, teacher.targets(noise)


def _rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean().sqrt())


def _logp_per_dim(ref: ds.GaussianMixture, x: torch.Tensor) -> float:
    return float(ref.log_prob(x).mean()) / ref.dim


def _llgap(teacher: ExactTeacher, x: torch.Tensor, exact: torch.Tensor, t: Optional[float] = None) -> float:
    """[mean log p(exact) - mean log p(x)] / dim under the true mixture, or under its exact marginal at
    process time ``t`` (runs that stop at t_min).  Positive: the samples are less likely than exact ones."""
    return float(teacher.loglik_gap(x, exact, t).mean())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _scatter(ax, data: np.ndarray, x: Optional[np.ndarray], lim: float, color: str = "C0", size: float = 3) -> int:
    """Exact data in grey underneath, samples on top; returns how many samples fall off the panel."""
    ax.scatter(data[:, 0], data[:, 1], s=size, c="0.75", lw=0, rasterized=True)
    off = 0
    if x is not None:
        ax.scatter(x[:, 0], x[:, 1], s=size, c=color, lw=0, alpha=0.8, rasterized=True)
        off = int((np.abs(x) > lim).any(1).sum())
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    return off


def _image_grid(x: np.ndarray, cols: int = 8) -> np.ndarray:
    """[n, C, H, W] in about [-1, 1] -> one [rows*H, cols*W, C] image in [0, 1]."""
    n, c, h, w = x.shape
    rows = -(-n // cols)
    grid = np.ones((rows * (h + 1) - 1, cols * (w + 1) - 1, c))
    for i, img in enumerate(np.clip((x + 1) / 2, 0, 1)):
        r, q = divmod(i, cols)
        grid[r * (h + 1):r * (h + 1) + h, q * (w + 1):q * (w + 1) + w] = img.transpose(1, 2, 0)
    return grid[..., 0] if c == 1 else grid


# ----------------------------------------------------------------------------------------
# diffsolve solvers
# ----------------------------------------------------------------------------------------
def solver_table(markdown: bool = False) -> str:
    """Every registered solver as a plain-text or Markdown table."""
    rows = [(s.name, str(s.order), s.nfe_rule, "yes" if s.stochastic else "no", s.paper) for s in ds.solvers()]
    if markdown:
        lines = ["| name | order | NFE rule | paper |", "|---|---|---|---|"]
        lines += [f"| `{r[0]}` | {r[1]}{' (SDE)' if r[3] == 'yes' else ''} | {r[2]} | {r[4]} |" for r in rows]
        return "\n".join(lines)
    head = ("name", "order", "NFE rule", "stochastic", "paper")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths), "-----")]
    lines += [fmt.format(*r) for r in rows]
    return "\n".join(lines)


def cmd_solvers(args: argparse.Namespace) -> int:
    print(solver_table(args.markdown))
    return 0


# ----------------------------------------------------------------------------------------
# diffsolve sample
# ----------------------------------------------------------------------------------------
def cmd_sample(args: argparse.Namespace) -> int:
    if args.model is not None:
        return cmd_sample_model(args)
    if args.n < 1:
        raise CLIError(f"--n must be >= 1, got {args.n}")
    if not 0 <= args.seed < 2**31:
        raise CLIError(f"--seed must be in [0, 2**31), got {args.seed}")
    options = _parse_options(args.option)
    prof = _load_profile(args)
    prediction = args.prediction or (prof.model.get("prediction") if prof is not None else None) or "x0"
    args.prediction = prediction  # recorded in info.json
    proc = PROCESSES[args.process][1]()
    ref = REFERENCES[args.reference][1]()
    den = ref.denoiser(proc, prediction)
    out = Path(args.out)

    noise, seeds = _noise_and_seeds(args.n, ref.shape, args.seed)
    if prof is not None:
        options["profile"] = prof
    info = ds.get_solver(prof.entry(args.nfe).solver if prof is not None else args.solver)
    t0 = time.perf_counter()
    x, si = ds.sample(den, noise, solver=info.name, nfe=args.nfe, spacing=args.spacing, final=args.final,
                      seeds=seeds if info.stochastic else None, progress=not args.quiet, return_info=True,
                      **options)
    t_sample = time.perf_counter() - t0

    # exact ODE endpoints from the same noise, on a subsample if the data are large
    m = args.exact_samples if args.exact_samples is not None else min(args.n, max(1, EXACT_BUDGET // ref.dim))
    m = max(0, min(m, args.n))
    metrics: Dict[str, Any] = {"exact_samples": m}
    t_exact = 0.0
    if m:
        t1 = time.perf_counter()
        teacher, tg = _exact(ref, proc, noise[:m], args.quiet)
        t_exact = time.perf_counter() - t1
        target = tg.for_grid(si.ends_clean)
        metrics.update({
            "exact_target": "denoised" if si.ends_clean else "at_t_min",
            "rmse_vs_exact_ode": _rmse(x[:m], target),
            "max_abs_err_vs_exact_ode": float((x[:m] - target).abs().max()),
            "llgap_per_dim": _llgap(teacher, x[:m], target, None if si.ends_clean else tg.t_min),
        })
        if info.stochastic:
            metrics["note"] = ("stochastic solver: it samples the reverse SDE, so its distance to the ODE "
                               "solution is not an error; compare llgap_per_dim instead")
    data = ref.sample(args.n, torch.Generator().manual_seed(args.seed))
    metrics["logp_per_dim"] = {"samples": _logp_per_dim(ref, x), "exact_data": _logp_per_dim(ref, data)}

    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "samples.npy", x.cpu().numpy())
    files = {"samples": str(out / "samples.npy"), "info": str(out / "info.json")}
    png = _plot_samples(ref, x, data, info.name, si, out / "samples.png")
    if png:
        files["png"] = str(png)
    _write_json(out / "info.json", {
        "config": {k: v for k, v in vars(args).items() if k not in ("func", "command", "quiet")},
        "solver": si.solver, "nfe_budget": args.nfe, "nfe": si.nfe, "steps": si.steps,
        "ends_clean": si.ends_clean, "grid_t": si.grid.t, "options": si.options,
        "process": proc.config(), "shape": list(ref.shape), **metrics,
        "wall_s": {"sample": round(t_sample, 3), "exact_ode": round(t_exact, 3)},
        "files": files, "version": ds.__version__,
    })
    msg = f"{si.solver}: {si.nfe} NFE ({si.steps} steps) on {args.n} samples"
    if m:
        msg += f"; RMSE vs exact ODE {metrics['rmse_vs_exact_ode']:.4g} (on {m})"
    print(f"{msg} -> {out}")
    return 0


def _load_profile(args: argparse.Namespace):
    """The ``--profile`` of ``diffsolve sample`` (None without one); it needs an --nfe it has an entry for."""
    if not args.profile:
        return None
    from ..tuning import Profile

    prof = Profile.load(args.profile)
    prof.entry(args.nfe)  # a clear error when the profile has no entry for this NFE
    return prof


def cmd_sample_model(args: argparse.Namespace) -> int:
    """Sample a checkpoint / diffusers folder / built-in model; score against a high-NFE solution of the
    same model (and with FD-LeNet when the images are MNIST-shaped)."""
    if args.n < 1:
        raise CLIError(f"--n must be >= 1, got {args.n}")
    options = _parse_options(args.option)
    prof = _load_profile(args)
    info = ds.get_solver(prof.entry(args.nfe).solver if prof is not None else args.solver)
    den = ds.load(args.model)
    shape = tuple(getattr(den, "sample_shape", None) or ())
    if not shape:
        raise CLIError(f"{args.model}: the checkpoint does not record its sample shape")
    noise, seeds = _noise_and_seeds(args.n, shape, args.seed)
    kw = dict(seeds=seeds if info.stochastic else None, progress=not args.quiet, return_info=True, **options)
    if prof is not None:
        kw["profile"] = prof
    t0 = time.perf_counter()
    with torch.inference_mode():
        x, si = ds.sample(den, noise, solver=info.name, nfe=args.nfe, spacing=args.spacing, final=args.final, **kw)
        t_sample = time.perf_counter() - t0
        metrics: Dict[str, Any] = {}
        if args.reference_nfe and not info.stochastic:
            ref = ds.sample(den, noise, solver="dpm++2m", nfe=args.reference_nfe, spacing="logsnr")
            metrics["rmse_vs_reference"] = _rmse(x, ref)
            metrics["reference"] = f"dpm++2m, logsnr, {args.reference_nfe} NFE, same noise"
    if shape == (1, 28, 28):
        from ..evaluation.metrics import default_metric
        metrics["image_metric"] = default_metric().score(x.float().clamp(-1, 1)).as_dict()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "samples.npy", x.cpu().numpy())
    files = {"samples": str(out / "samples.npy"), "info": str(out / "info.json")}
    if len(shape) == 3:
        from ..util.images import save_labelled_grids
        files["png"] = str(save_labelled_grids([x.float().clamp(-1, 1)[:64]], [f"{si.solver} NFE {si.nfe}"],
                                               out / "samples.png", nrow=8, scale=2))
    _write_json(out / "info.json", {
        "model": args.model, "solver": si.solver, "nfe_budget": args.nfe, "nfe": si.nfe, "steps": si.steps,
        "ends_clean": si.ends_clean, "grid_t": si.grid.t, "options": si.options, "shape": list(shape),
        **metrics, "wall_s": {"sample": round(t_sample, 3)}, "files": files, "version": ds.__version__,
    })
    msg = f"{si.solver}: {si.nfe} NFE on {args.n} samples of {args.model}"
    if "rmse_vs_reference" in metrics:
        msg += f"; RMSE vs {args.reference_nfe}-NFE reference {metrics['rmse_vs_reference']:.4g}"
    if "image_metric" in metrics:
        msg += f"; FD-LeNet {metrics['image_metric']['fd_lenet']:.3g}"
    print(f"{msg} -> {out}")
    return 0


def _plot_samples(ref, x, data, name, si, path: Path) -> Optional[Path]:
    if ref.shape == (2,):
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(5, 5))
        lim = 1.25 * float(data.abs().max())
        off = _scatter(ax, data.numpy(), x.cpu().numpy(), lim, size=6)
        ax.set_title(f"{name}, NFE {si.nfe}" + (f" ({off} off-panel)" if off else ""), fontsize=10)
    elif len(ref.shape) == 3 and ref.shape[0] in (1, 3):
        plt = _pyplot()
        k = min(64, x.shape[0])
        fig, axes = plt.subplots(1, 2, figsize=(10, 5.4))
        for ax, imgs, title in ((axes[0], x[:k], f"{name}, NFE {si.nfe}"), (axes[1], data[:k], "exact data")):
            ax.imshow(_image_grid(imgs.cpu().numpy()), cmap="gray", interpolation="nearest")
            ax.set_title(title, fontsize=10)
            ax.axis("off")
    else:
        return None
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------
# diffsolve demo
# ----------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    return cmd_demo_toy(args) if args.toy else cmd_demo_model(args)


def cmd_demo_model(args: argparse.Namespace) -> int:
    """The shipped MNIST model: the default rule and the previous default at the demo NFEs and a converged
    reference from the same noise, each scored with FD-LeNet (writes demo.png and demo.json)."""
    from ..evaluation.metrics import default_metric
    from .demo_model import demo_model

    t0 = time.perf_counter()
    nfes = [n for n in args.nfe]
    res = demo_model(args.out, model=args.model, n=args.images, seed=args.seed, nfes=nfes, threads=args.threads)
    metric = default_metric()
    rows = []
    for label, by in res["samples"].items():
        for nfe, x in by.items():
            sc = metric.score(x.float())
            rows.append({"nfe": nfe, "sampler": label, "fd_lenet": sc.fd_lenet,
                         "classes_covered": sc.classes_covered, "class_kl": sc.class_kl,
                         "rmse_vs_reference": res["rmse"].get(label, {}).get(nfe, 0.0),
                         "seconds": res["seconds"][label][nfe]})
    from .demo_model import restoration_panel

    rest = restoration_panel(args.out, images=args.restore_images, seed=args.seed)
    wall = time.perf_counter() - t0
    # FD of n real images against the real statistics: the value a perfect model would get at this n
    floor = metric.meta.get("floor_vs_real_stats_by_n", {}).get(str(args.images))
    out = Path(args.out)
    _write_json(out / "demo.json", {"model": args.model, "images": args.images, "reference": res["reference"],
                                    "reference_nfe": res["reference_nfe"], "runs": rows, "wall_s": round(wall, 2),
                                    "fd_lenet_floor_at_this_n": floor,
                                    "fd_lenet_real_vs_real_halves": metric.meta.get("real_vs_real_floor"),
                                    "restoration": {k: v for k, v in rest.items() if k != "png"}})
    print(f"{'sampler':>16} {'NFE':>4} {'FD-LeNet':>9} {'classes':>7} {'RMSE vs ref':>11} {'time s':>7}")
    for r in rows:
        print(f"{r['sampler']:>16} {r['nfe']:>4} {r['fd_lenet']:>9.2f} {r['classes_covered']:>7} "
              f"{r['rmse_vs_reference']:>11.4f} {r['seconds']:>7.1f}")
    floor_txt = f"real-data floor at this n: {floor:.2f}; " if floor is not None else ""
    print(f"FD-LeNet on {args.images} images ({floor_txt}not comparable to Inception FID)")
    mean_psnr = sum(sum(p) for p in rest["psnr"]) / sum(len(p) for p in rest["psnr"])
    print(f"restoration ({rest['method']}, {rest['nfe']} NFE-equivalents, box {rest['box']} of {len(rest['labels'])} "
          f"held-out digits): PSNR {mean_psnr:.1f} dB, the LeNet reads the true digit in "
          f"{100 * rest['lenet_accuracy']:.0f}% of the samples ({rest['seconds']:.1f} s)")
    print(f"wrote {out / 'demo.png'}, {out / 'restore.png'} and {out / 'demo.json'} in {wall:.1f} s")
    return 0


def cmd_demo_toy(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    if args.n < 1:
        raise CLIError(f"--n must be >= 1, got {args.n}")
    solver_names = list(dict.fromkeys(ds.get_solver(s).name for s in args.solvers))  # aliases resolved, no repeats
    args.nfe = list(dict.fromkeys(args.nfe))
    t_start = time.perf_counter()
    ref, proc = ds.GaussianMixture.toy2d(), ds.VPDiscrete.linear(1000)
    den = ref.denoiser(proc, "x0")
    noise, _ = _noise_and_seeds(args.n, ref.shape, args.seed)
    data = ref.sample(args.n, torch.Generator().manual_seed(args.seed))
    teacher, tg = _exact(ref, proc, noise, args.quiet)
    exact = {"logp_per_dim_exact_ode": _logp_per_dim(ref, tg.denoised),
             "logp_per_dim_exact_data": _logp_per_dim(ref, data)}

    runs: List[Dict[str, Any]] = []
    samples = {}
    jobs = [(nfe, s) for nfe in args.nfe for s in solver_names]
    for nfe, s in tqdm(jobs, desc="demo", unit="run", disable=args.quiet, leave=False):
        x, si = ds.sample(den, noise, solver=s, nfe=nfe, spacing=args.spacing, return_info=True)
        samples[(nfe, s)] = x.numpy()
        runs.append({"solver": s, "nfe_budget": nfe, "nfe": si.nfe, "steps": si.steps,
                     "rmse_vs_exact_ode": _rmse(x, tg.denoised),
                     "llgap_per_dim": _llgap(teacher, x, tg.denoised)})

    plt = _pyplot()
    rows, cols = len(args.nfe), len(solver_names)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.95 * rows), squeeze=False)
    lim = 1.25 * float(data.abs().max())
    for r in runs:
        ax = axes[args.nfe.index(r["nfe_budget"])][solver_names.index(r["solver"])]
        r["off_panel"] = _scatter(ax, data.numpy(), samples[(r["nfe_budget"], r["solver"])], lim,
                                  color=f"C{solver_names.index(r['solver'])}")
        off = f", {r['off_panel']}/{args.n} off-panel" if r["off_panel"] else ""
        ax.set_title(f"{r['solver']}  NFE {r['nfe']}\nRMSE {r['rmse_vs_exact_ode']:.3g}  "
                     f"llgap/d {r['llgap_per_dim']:.2g}{off}", fontsize=8.5)
    fig.suptitle(f"toy 2-D mixture, DDPM linear VP, {args.spacing} grid, {args.n} samples from the same noise "
                 "(grey: exact data; RMSE vs the exact ODE solution)", fontsize=10)
    fig.tight_layout()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "toy.png", dpi=110)
    plt.close(fig)
    wall = time.perf_counter() - t_start
    _write_json(out / "toy.json", {
        "reference": "toy2d", "process": proc.config(), "spacing": args.spacing, "final": "denoise",
        "n": args.n, "seed": args.seed, "exact": exact, "runs": runs, "wall_s": round(wall, 2),
        "metrics": {"rmse_vs_exact_ode": "RMSE against the exact ODE solution from the same noise",
                    "llgap_per_dim": "[mean log p(exact ODE samples) - mean log p(samples)] / dim under the "
                                     "true mixture (0 is exact; positive: samples less likely, off the data)"},
        "version": ds.__version__,
    })

    print(f"{'solver':<14} {'NFE':>4} {'steps':>5} {'RMSE':>10} {'llgap/dim':>10}")
    for r in runs:
        print(f"{r['solver']:<14} {r['nfe']:>4} {r['steps']:>5} {r['rmse_vs_exact_ode']:>10.4g} "
              f"{r['llgap_per_dim']:>10.3g}")
    print(f"wrote {out / 'toy.png'} and {out / 'toy.json'} in {wall:.1f} s")
    return 0


# ----------------------------------------------------------------------------------------
# diffsolve restore
# ----------------------------------------------------------------------------------------
RESTORE_EPILOG = """\
operators (--operator NAME:ARG):
""" + "\n".join(f"  {k + (':' + v[0] if v[0] else ''):<20} {v[1]}" for k, v in OPERATORS.items()) + """

input (--input): a PNG (grayscale) or a .npy array ([C, H, W], [H, W] or [1, C, H, W]) of the model's image
size -- nothing is resized; uint8 is read as 0..255, float data in [0, 1] or [-1, 1] are mapped to [-1, 1].
--heldout I takes image I of the held-out MNIST split (never seen by models trained on mnist-train).
By default (--truth) the input is the clean image: it is measured here, y = A x + sigma_y n (noise seeded by
--seed), and the samples are scored against it.  With --measured the input is already the measurement: an image
of the measurement's shape (sr: the low-resolution image; blur, denoise: the degraded image; box, random: the
masked image, the mask given by the operator) or, for cs, a .npy vector of the measurements.

writes to --out: restore.png (truth, measurement, samples, mean, per-pixel std), samples.png, samples.npy [K, C,
H, W], mean.npy, std.npy, y.npy and info.json (method, NFE, VJPs, seconds, sigma_y, operator and, with a known
truth, PSNR / SSIM / LeNet-feature distance / 90% coverage / chi^2; see diffsolve.evaluation.image_quality).

example:
  diffsolve restore --heldout 0 --operator box:14 --sigma-y 0.05 --nfe 100 --samples 8
the same from Python:
  ds.restore("mnist-flow", "digit.png", "box:14", sigma_y=0.05, samples=8, out="out/restore")
"""


def cmd_restore(args: argparse.Namespace) -> int:
    """Posterior samples of a degraded image with the model as prior (``diffsolve.evaluation.restore``)."""
    from .. import inverse
    from ..evaluation.restore import parse_operator_spec, restore

    # cheap checks first, before the model is loaded
    if (args.input is None) == (args.heldout is None):
        raise CLIError("give exactly one of --input IMG_OR_NPY and --heldout INDEX")
    if args.heldout is not None and args.measured:
        raise CLIError("--heldout images are clean truths: --measured does not apply")
    if not (np.isfinite(args.sigma_y) and args.sigma_y >= 0):
        raise CLIError(f"--sigma-y must be a finite number >= 0, got {args.sigma_y}")
    if args.samples < 2:
        raise CLIError(f"--samples must be >= 2 (a spread and a coverage need two), got {args.samples}")
    if args.nfe < 1:
        raise CLIError(f"--nfe must be >= 1, got {args.nfe}")
    if not 0 <= args.seed < 2**31:
        raise CLIError(f"--seed must be in [0, 2**31), got {args.seed}")
    if args.method not in inverse.methods() or args.method in RESTORE_EXCLUDED:
        known = ", ".join(m for m in inverse.methods() if m not in RESTORE_EXCLUDED)
        raise CLIError(f"unknown inverse method {args.method!r} for a network prior; known: {known}")
    parse_operator_spec(args.operator)
    options = _parse_options(args.option)
    image: Any = args.input
    source = str(args.input)
    if args.heldout is not None:
        from ..util.datasets import load_dataset

        data = load_dataset("mnist-heldout")
        if not 0 <= args.heldout < data.shape[0]:
            raise CLIError(f"--heldout must be in [0, {data.shape[0]}), got {args.heldout}")
        image, source = data[args.heldout].to(torch.float64).numpy(), f"mnist-heldout[{args.heldout}]"
    den = ds.load(args.model)
    _log(f"restore: {args.method}, {args.nfe} NFE-equivalents per sample, {args.samples} samples, "
         f"operator {args.operator}, sigma_y {args.sigma_y:g}, prior {args.model}", args.quiet)
    r = restore(den, image, args.operator, sigma_y=float(args.sigma_y), method=args.method, nfe=args.nfe,
                samples=args.samples, seed=args.seed, measured=args.measured, solver=args.solver, out=args.out,
                progress=not args.quiet, source=source, **options)
    info, metrics = r.info, r.metrics
    _write_json(Path(r.files["info"]), {**json.loads(Path(r.files["info"]).read_text()), "model": args.model,
                                        "version": ds.__version__})
    msg = (f"{info.method}: {info.nfe} NFE + {info.vjps} VJPs per sample ({info.nfe_equivalents:g} NFE-eq), "
           f"{args.samples} samples in {info.seconds:.1f} s")
    if r.truth is not None:
        msg += (f"; mean PSNR {metrics['psnr_mean']:.2f} dB, SSIM {metrics['ssim_mean']:.3f}, "
                f"90% coverage {metrics['coverage_90']:.3f} (calibrated at K={args.samples}: "
                f"~{metrics['coverage_90_if_calibrated']:.2f})")
    if "chi2_mean" in metrics:
        msg += f", chi2/dof {metrics['chi2_mean']:.2f}"
    print(f"{msg} -> {args.out}")
    return 0


# ----------------------------------------------------------------------------------------
# parser and entry point
# ----------------------------------------------------------------------------------------
def _choices_help(table: Dict[str, tuple]) -> str:
    return "; ".join(f"{k}: {v[0]}" for k, v in table.items())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffsolve", description="Fast samplers for frozen diffusion and flow "
                                "models, checked against an exact Gaussian-mixture reference.")
    p.add_argument("--version", action="version", version=f"diffsolve {ds.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("solvers", help="list every solver (name, order, NFE rule, paper)")
    s.add_argument("--markdown", action="store_true", help="print a Markdown table (name | order | NFE rule | paper)")
    s.set_defaults(func=cmd_solvers)

    s = sub.add_parser("sample", help="sample the exact reference model and score it against the exact ODE")
    s.add_argument("--solver", default="dpm++2m", help="a name from `diffsolve solvers` (default: %(default)s)")
    s.add_argument("--nfe", type=int, default=10, help="budget of network evaluations (default: %(default)s)")
    s.add_argument("--process", choices=list(PROCESSES), default="vp-linear",
                   help=_choices_help(PROCESSES) + " (default: %(default)s)")
    s.add_argument("--spacing", choices=list(SPACINGS), default="logsnr",
                   help="time-step spacing (default: %(default)s)")
    s.add_argument("--final", choices=list(FINALS), default="denoise",
                   help="last step: jump to clean data with the denoiser, or stop at t_min (default: %(default)s)")
    s.add_argument("--reference", choices=list(REFERENCES), default="toy2d",
                   help=_choices_help(REFERENCES) + " (default: %(default)s)")
    s.add_argument("--prediction", choices=PREDICTIONS, default=None,
                   help="what the exact model outputs, to exercise the adapter (default: x0, or the profile's)")
    s.add_argument("--n", type=int, default=512, help="number of samples (default: %(default)s)")
    s.add_argument("--seed", type=int, default=0, help="noise seed, one generator per sample (default: %(default)s)")
    s.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="solver option, repeatable (e.g. order=3, eta=0.5, lower_order_final=False)")
    s.add_argument("--exact-samples", type=int, default=None, metavar="M",
                   help=f"score the first M samples against the exact ODE (default: all, up to "
                        f"{EXACT_BUDGET} numbers in total; 0 skips)")
    s.add_argument("--model", default=None,
                   help="sample a model instead of the exact reference: a diffsolve checkpoint folder, a diffusers "
                        "model folder, or a built-in name ('mnist')")
    s.add_argument("--reference-nfe", type=int, default=100,
                   help="with --model: score against this many NFE of dpm++2m from the same noise (0: skip)")
    s.add_argument("--profile", default=None, metavar="PROFILE.json",
                   help="sample with a tuned profile (`diffsolve tune`): its entry for --nfe sets solver, grid and "
                        "options; refused when it was made for another model, process or guidance scale")
    s.add_argument("--out", default="out/sample", help="output folder (default: %(default)s)")
    s.add_argument("--quiet", action="store_true", help="no progress bar or log messages")
    s.set_defaults(func=cmd_sample)

    s = sub.add_parser("demo", help="sample the shipped MNIST model at NFE 5 and 10 with the default rule and the "
                                    "previous default against a converged reference, with FD-LeNet (demo.png); "
                                    "--toy: compare solvers on the exact 2-D mixture (toy.png)")
    s.add_argument("--out", default="out", help="output folder (default: %(default)s)")
    s.add_argument("--toy", action="store_true", help="the exact 2-D toy mixture instead of the shipped model")
    s.add_argument("--model", default="mnist", help="model for the image demo (default: %(default)s)")
    s.add_argument("--images", type=int, default=64, help="images per NFE for the image demo (default: %(default)s)")
    s.add_argument("--restore-images", type=int, default=8,
                   help="held-out digits in the restoration panel (default: %(default)s)")
    s.add_argument("--threads", type=int, default=1, help="torch threads for the image demo (default: %(default)s; one thread is robust on a shared machine)")
    s.add_argument("--n", type=int, default=1000, help="number of samples (default: %(default)s)")
    s.add_argument("--nfe", type=int, nargs="+", default=[5, 10], help="NFE budgets, one row each (default: 5 10)")
    s.add_argument("--solvers", nargs="+", default=list(DEMO_SOLVERS),
                   help=f"solvers, one column each (default: {' '.join(DEMO_SOLVERS)})")
    s.add_argument("--spacing", choices=list(SPACINGS), default="logsnr",
                   help="time-step spacing (default: %(default)s)")
    s.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    s.add_argument("--quiet", action="store_true", help="no progress bar or log messages")
    s.set_defaults(func=cmd_demo)
    s = sub.add_parser("restore", help="restore a degraded image: posterior samples with the model as prior "
                                       "(inpainting, super-resolution, deblurring, compressed sensing)",
                       description="Posterior sampling for an inverse problem y = A x + sigma_y n with a frozen "
                                   "model as the prior (a thin layer over diffsolve.inverse.sample).",
                       epilog=RESTORE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--model", default=DEFAULT_MODEL, help="the prior: a checkpoint folder or a built-in name "
                                                          "(default: %(default)s, trained without the held-out "
                                                          "images)")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--input", default=None, metavar="IMG_OR_NPY", help="a grayscale PNG or a .npy image")
    src.add_argument("--heldout", type=int, default=None, metavar="INDEX",
                     help="the truth is image INDEX of the held-out MNIST split (0..499)")
    s.add_argument("--operator", default="box:14", metavar="NAME:ARG",
                   help="box:S | random:P | sr:F | blur:SIGMA | cs:R | denoise (default: %(default)s; see below)")
    s.add_argument("--sigma-y", type=float, default=0.05, help="measurement noise std, in the data's [-1, 1] "
                                                               "units (default: %(default)s)")
    s.add_argument("--method", default=DEFAULT_METHOD, help="an inverse method: " + ", ".join(
        m for m in ds.inverse.methods() if m not in RESTORE_EXCLUDED) + " (default: %(default)s)")
    s.add_argument("--nfe", type=int, default=100, help="budget per sample in NFE-equivalents, a VJP counted as "
                                                        "2 NFE (default: %(default)s)")
    s.add_argument("--samples", type=int, default=8, metavar="K", help="posterior samples (default: %(default)s)")
    s.add_argument("--solver", default="dpm++2m", help="solver of the wrapper methods (default: %(default)s)")
    s.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, repeatable (e.g. iterations=5 for mmps, zeta=0.5 for dps)")
    s.add_argument("--seed", type=int, default=0, help="sample seeds and measurement noise (default: %(default)s)")
    what = s.add_mutually_exclusive_group()
    what.add_argument("--truth", dest="measured", action="store_false",
                      help="the input is the clean image; it is measured here (default)")
    what.add_argument("--measured", dest="measured", action="store_true",
                      help="the input is already the measurement (no noise is added; no truth to score against)")
    s.set_defaults(measured=False)
    s.add_argument("--out", default="out/restore", help="output folder (default: %(default)s)")
    s.add_argument("--quiet", action="store_true", help="no progress bar or log messages")
    s.set_defaults(func=cmd_restore)
    from .diagnose import add_parser as _add_diagnose
    _add_diagnose(sub)
    for name, (_, text) in DELEGATED.items():  # listed in --help; dispatched before parsing
        sub.add_parser(name, help=text, add_help=False)
    return p


# commands whose own parsers live next to the code they drive
DELEGATED = {"train": ("diffsolve.training.train", "train a UNet (python -m diffsolve.training --help)"),
             "bench": ("diffsolve.bench.api", "benchmark our solvers against diffusers and k-diffusion"),
             "tune": ("diffsolve.tuning", "fit solver, grid and statistics to a model; write a profile"),
             "quantize": ("diffsolve.compression.cli", "quantise a model (timestep-aware); packed file and --report"),
             "distill": ("diffsolve.distillation.cli", "distil a few-step student (reflow, mmd, consistency)")}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        import importlib
        try:
            mod = importlib.import_module(DELEGATED[argv[0]][0])
        except ImportError as e:
            print(f"error: `diffsolve {argv[0]}` is unavailable ({e})", file=sys.stderr)
            return 2
        return int(mod.main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # bad input, as reported by the CLI or the library (incl. SamplingError)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
