"""The profile file of ``ds.tune``: one tuned sampler per NFE budget, refused by any other model."""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..adapters.denoiser import Model
from ..adapters.denoiser import Model as Denoiser
from ..adapters.identity import IdentityCheck, ModelMismatch
from ..grids import TimeGrid, explicit
from ..sampling import sample
from ..solvers.dpm_v3_stats import Statistics
from ..util.files import save_safetensors, sha256_file
from ..util.jsonable import jsonable

Tensor = torch.Tensor
DT = torch.float64
FORMAT = "diffsolve.profile/1"
PathLike = Union[str, os.PathLike]


class ProfileError(ValueError):
    """A profile file that cannot be read: missing, not a profile, an unknown format or corrupted."""


class ProfileMismatch(ModelMismatch):
    """A profile used with a model (or guidance scale, process, data shape) it was not made for."""

# ----------------------------------------------------------------------------------------
# the profile
# ----------------------------------------------------------------------------------------
@dataclass
class Entry:
    """The tuned sampler for one NFE budget.

    ``t``: the process times of the grid (decreasing; without the clean point for ``final='denoise'``);
    ``options``: solver options (JSON values; DPM-Solver-v3's statistics are the profile's, ``uses_stats``);
    ``calib_error`` / ``eval_error``: RMSE against the teacher on the calibration / evaluation noise;
    ``baselines``: the same errors for the library default and the best named-spacing configuration.
    """

    nfe: int
    solver: str
    t: List[float]
    final: str
    options: Dict[str, Any] = field(default_factory=dict)
    uses_stats: bool = False
    calib_error: float = math.nan
    eval_error: Optional[float] = None
    eval_error_median: Optional[float] = None
    baselines: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    search: Dict[str, Any] = field(default_factory=dict)

    def grid(self, process) -> TimeGrid:
        return explicit(process, t=torch.tensor(self.t, dtype=DT), final=self.final)

    def describe(self) -> str:
        opts = "".join(f", {k}={v}" if k != "coefficients" else f", {k}=<{len(v)} fitted rows>"
                       for k, v in self.options.items())
        return f"{self.solver} ({len(self.t)} times, final={self.final}{opts})"

    def to_dict(self) -> Dict[str, Any]:
        return jsonable({"nfe": self.nfe, "solver": self.solver, "t": [float(v) for v in self.t],
                            "final": self.final, "options": self.options, "uses_stats": self.uses_stats,
                            "calib_error": self.calib_error, "eval_error": self.eval_error,
                            "eval_error_median": self.eval_error_median, "baselines": self.baselines,
                            "search": self.search})

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Entry":
        d = dict(d)
        d["calib_error"] = math.nan if d.get("calib_error") is None else d["calib_error"]
        return cls(**d)


class Profile:
    """Tuned samplers of one model, one per NFE budget (``ds.tune``); ``Profile.load(path)`` reads one back.

    ``model``: what the profile was made for (fingerprint, process, guidance scale, prediction, data shape);
    ``probe``: the model's outputs on the fingerprint's fixed inputs; ``stats``: DPM-Solver-v3 statistics
    (or None); ``meta``: teacher, seeds, sizes, timings.
    """

    def __init__(self, entries: Dict[int, Entry], model: Dict[str, Any], probe: Tensor,
                 stats: Optional[Statistics] = None, meta: Optional[Dict[str, Any]] = None,
                 path: Optional[str] = None):
        self.entries = {int(k): v for k, v in sorted(entries.items())}
        self.model = dict(model)
        self.probe = probe.to(DT).cpu()
        self.stats = stats
        self.meta = dict(meta or {})
        self.path = path
        self._identity = IdentityCheck(self.model, self.probe, self.shape, "the profile")

    @property
    def nfes(self) -> List[int]:
        return list(self.entries)

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.model["shape"])

    def __repr__(self) -> str:
        return (f"Profile(nfes={self.nfes}, shape={self.shape}, model={self.model.get('fingerprint')}, "
                f"guidance_scale={self.model.get('guidance_scale')})")

    def entry(self, nfe: Optional[int]) -> Entry:
        """The entry for exactly ``nfe`` (``None``: the only entry of a one-entry profile)."""
        if nfe is None:
            if len(self.entries) == 1:
                return next(iter(self.entries.values()))
            raise ValueError(f"this profile has entries for NFE {self.nfes}; pass nfe= (one of them)")
        if isinstance(nfe, bool) or not isinstance(nfe, int):
            raise ValueError(f"nfe must be an integer, got {nfe!r}")
        if nfe not in self.entries:
            raise ValueError(f"this profile has no entry for nfe={nfe}; it was tuned for NFE {self.nfes} "
                             f"(run `diffsolve tune ... --nfe {nfe}` to add one)")
        return self.entries[nfe]

    # -- validity --------------------------------------------------------------------
    def check(self, den: Denoiser, shape: Optional[Sequence[int]] = None) -> int:
        """Raise ``ProfileMismatch`` unless this profile belongs to ``den`` (process, guidance scale,
        prediction, network fingerprint) and data of ``shape``.  The fingerprint (two network calls on fixed
        inputs; a ``Denoiser``'s ``nfe`` is left unchanged) is checked once per model object; returns the
        network calls this check made."""
        if not isinstance(den, Model):
            raise TypeError("den must provide the diffsolve model protocol (e.g. a ds.Denoiser)")
        problems = []
        if shape is not None and tuple(shape) != self.shape:
            problems.append(f"data shape {tuple(shape)} != the profile's {self.shape}")
        try:
            found, calls = self._identity.problems(den, fingerprint=not problems)
        except (RuntimeError, ValueError) as e:
            raise ProfileMismatch(f"profile does not match: the model fails on the profile's data shape "
                                  f"{self.shape} ({type(e).__name__}: {e})") from None
        for p in found:
            if p.startswith("guidance scale"):
                p += " (a profile is tuned for one guidance scale; tune again for this one)"
            elif "fingerprint" in p:
                p += ": this profile was tuned for another model"
            problems.append(p)
        if problems:
            where = f" ({self.path})" if self.path else ""
            raise ProfileMismatch("profile does not match" + where + ": " + "; ".join(problems))
        return calls

    def settings(self, den: Denoiser, nfe: Optional[int], shape: Optional[Sequence[int]] = None,
                 check: bool = True) -> Tuple[str, TimeGrid, Dict[str, Any], Entry]:
        """(solver, grid, options, entry) that ``ds.sample`` uses for ``nfe`` (after ``check``)."""
        if check:
            self.check(den, shape)
        e = self.entry(nfe)
        opts = dict(e.options)
        if e.uses_stats:
            if self.stats is None:
                raise ProfileError("the profile's entry uses DPM-Solver-v3 statistics but it has none")
            opts.update(stats=self.stats, check_stats=False)  # the profile's own check covered the model
        return e.solver, e.grid(den.process), opts, e

    def settings_for(self, den: Denoiser, nfe: Optional[int], shape: Sequence[int]):
        """The ``SamplerSpec`` protocol of ``ds.sample``: (solver, grid, options, network calls of the check)."""
        calls = self.check(den, shape)
        solver, grid, opts, _ = self.settings(den, nfe, shape, check=False)
        return solver, grid, opts, calls

    def sample(self, den: Denoiser, noise: Tensor, nfe: Optional[int] = None, **kwargs: Any):
        """``ds.sample(den, noise, profile=self, nfe=nfe, **kwargs)``."""
        return sample(den, noise, nfe=nfe, profile=self, **kwargs)

    # -- report ----------------------------------------------------------------------
    def table(self) -> str:
        """A Markdown table: per NFE the tuned sampler and its calibration / evaluation errors."""
        lines = ["| NFE | tuned sampler | calib RMSE | eval RMSE | eval RMSE, default dpm++2m | "
                 "eval RMSE, best named spacing |", "|---|---|---|---|---|---|"]
        for n, e in self.entries.items():
            d, b = e.baselines.get("default", {}), e.baselines.get("best_named", {})
            lines.append(f"| {n} | {e.describe()} | {fmt(e.calib_error)} | {fmt(e.eval_error)} | "
                         f"{fmt(d.get('eval_error'))} | {fmt(b.get('eval_error'))} ({b.get('label', '')}) |")
        return "\n".join(lines)

    # -- persistence -----------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return jsonable({"format": FORMAT, "model": self.model, "meta": self.meta,
                            "entries": {str(n): e.to_dict() for n, e in self.entries.items()}})

    def save(self, path: PathLike) -> str:
        """Write ``path`` (JSON; ``.json`` is appended when missing) and its tensors next to it
        (``<stem>.safetensors``); both are replaced atomically.  Returns the JSON path."""
        jpath = Path(os.fspath(path))
        if jpath.suffix != ".json":
            jpath = jpath.with_name(jpath.name + ".json")
        jpath.parent.mkdir(parents=True, exist_ok=True)
        tpath = jpath.with_suffix(".safetensors")
        tensors = {"probe": self.probe}
        tmeta: Dict[str, str] = {"format": FORMAT}
        if self.stats is not None:
            st_tensors, tmeta["stats_meta"] = self.stats.to_tensors("stats.")
            tensors.update(st_tensors)
        save_safetensors(tensors, tpath, tmeta)
        body = self.to_dict()
        body["tensors"] = {"file": tpath.name, "sha256": sha256_file(tpath)}
        body["checksum"] = _checksum(body)
        tmp = str(jpath) + ".tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps(body, indent=1, allow_nan=False) + "\n")
        os.replace(tmp, jpath)
        self.path = str(jpath)
        return str(jpath)

    @classmethod
    def load(cls, path: PathLike) -> "Profile":
        """Read a profile written by ``save``; ``ProfileError`` when it is missing, unreadable or corrupted."""
        from safetensors import safe_open

        jpath = Path(os.fspath(path))
        if not jpath.exists() and jpath.with_name(jpath.name + ".json").exists():
            jpath = jpath.with_name(jpath.name + ".json")
        if not jpath.is_file():
            raise ProfileError(f"no profile at {jpath}")
        try:
            body = json.loads(jpath.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ProfileError(f"{jpath} is not a readable profile (corrupted JSON: {e})") from None
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            fmt = body.get("format") if isinstance(body, dict) else None
            raise ProfileError(f"{jpath} is not a diffsolve profile (format {fmt!r}, expected {FORMAT!r})")
        if body.get("checksum") != _checksum({k: v for k, v in body.items() if k != "checksum"}):
            raise ProfileError(f"{jpath} is corrupted: its checksum does not match its contents "
                               "(edited or damaged; tune again)")
        tinfo = body.get("tensors") or {}
        tpath = jpath.with_name(str(tinfo.get("file", "")))
        if not tinfo.get("file") or not tpath.is_file():
            raise ProfileError(f"the profile's tensor file {tpath} is missing (it belongs next to {jpath.name})")
        if sha256_file(tpath) != tinfo.get("sha256"):
            raise ProfileError(f"{tpath} is corrupted or belongs to another profile (its sha256 does not match "
                               f"the one recorded in {jpath.name})")
        try:
            with safe_open(str(tpath), framework="pt") as f:
                t = {k: f.get_tensor(k) for k in f.keys()}
                tmeta = f.metadata() or {}
        except Exception as e:  # safetensors raises its own error types
            raise ProfileError(f"{tpath} is not a readable safetensors file: {e}") from None
        stats = None
        if "stats.lam" in t:
            stats = Statistics.from_tensors(t, tmeta.get("stats_meta", "{}"), "stats.")
        entries = {int(k): Entry.from_dict(v) for k, v in body["entries"].items()}
        return cls(entries, body["model"], t["probe"], stats, body.get("meta"), path=str(jpath))


def load_profile(profile: Union[Profile, PathLike]) -> Profile:
    if isinstance(profile, Profile):
        return profile
    if isinstance(profile, (str, os.PathLike)):
        return Profile.load(profile)
    raise TypeError(f"profile must be a diffsolve.Profile or a path, got {type(profile).__name__}")


def _checksum(body: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=False).encode()).hexdigest()


def fmt(v: Optional[float]) -> str:
    return "—" if v is None or not math.isfinite(float(v)) else f"{float(v):.3e}"
