"""``TrainConfig`` and the trainable objectives (read from the parameterisation table)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Optional, Tuple

from ..adapters.parameterisation import PARAMETERISATIONS, Parameterisation, get_parameterisation

#: parameterisations of the table that are not training objectives, and why
_NOT_TRAINABLE = {"score": "its target -eps/sigma is unbounded as sigma -> 0",
                  "residual": "it needs the conditioning y of a process with an offset, which training has not"}
#: what a network can be trained to output: the table's names, in its order, less ``_NOT_TRAINABLE``
OBJECTIVES: Tuple[str, ...] = tuple(name for name in PARAMETERISATIONS if name not in _NOT_TRAINABLE)


def _choices() -> str:
    aliases = [a for name in OBJECTIVES for a in PARAMETERISATIONS[name].aliases]
    return f"{', '.join(OBJECTIVES)} (or an alias: {', '.join(aliases)})"


def objective_parameterisation(name: str) -> Parameterisation:
    """The table entry of the training objective ``name`` (a table name or alias); ValueError otherwise."""
    try:
        param = get_parameterisation(name)
    except ValueError:
        raise ValueError(f"unknown objective {name!r}; choose one of {_choices()}") from None
    if param.name not in OBJECTIVES:
        raise ValueError(f"objective {name!r} cannot be trained ({_NOT_TRAINABLE[param.name]}); "
                         f"choose one of {_choices()}")
    return param


#: the class-conditioning fields, left out of an unconditional config's ``to_dict`` at their defaults
_CONDITIONING = ("num_classes", "label_dropout")


@dataclass
class TrainConfig:
    """Everything a training run needs (JSON-serialisable; see ``diffsolve.training`` module doc)."""

    dataset: str = "digits"                 # 'digits', 'mnist', 'gaussian25', a folder of images or a .npy file
    out_dir: str = "runs/diffsolve"
    process: str = "VPDiscrete"             # VPDiscrete | VPContinuous | VE | EDM | RectifiedFlow
    process_kwargs: Dict[str, Any] = field(default_factory=dict)  # e.g. {"schedule": "cosine"} (VPDiscrete:
    #                                         default linear betas, 1000 steps), {"sigma_data": 0.5} (EDM)
    objective: str = "epsilon"              # epsilon | x0 | v | velocity | edm (or an alias of the table)
    loss_weighting: str = "none"            # none | edm
    t_sampling: str = "auto"                # auto | uniform | lognormal (auto: lognormal for EDM/VE)
    lognormal_mean: float = -1.2            # EDM's P_mean / P_std for log(sigma/alpha)
    lognormal_std: float = 1.2
    model_time: str = "auto"                # auto | process | log_sigma (auto: log_sigma for EDM/VE/edm)
    model: Dict[str, Any] = field(default_factory=dict)  # UNetConfig fields (in_channels is set from data), or
    #                                         {"type": "MLP", "hidden": ..., "layers": ...} for vector data
    num_classes: int = 0                    # 0: unconditional; K: class-conditional on labels 0..K-1 (K: null)
    label_dropout: float = 0.1              # probability of training a label as the null label (for CFG)
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    lr_schedule: str = "constant"           # constant | cosine (after warm-up)
    min_lr_ratio: float = 0.1               # cosine floor, as a fraction of lr
    warmup_steps: int = 100
    weight_decay: float = 0.0
    adam_betas: Tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0                  # 0 disables
    ema_decay: float = 0.999
    ema_warmup: bool = True                 # decay_k = min(ema_decay, (1 + k) / (10 + k))
    seed: int = 0
    bf16: bool = False                      # bfloat16 autocast for the forward pass
    compile: bool = False                   # torch.compile(dynamic=False)
    device: str = "auto"                    # auto | cpu | cuda | cuda:1 | mps
    threads: Optional[int] = None           # torch.set_num_threads
    limit: Optional[int] = None             # use only the first `limit` images
    checkpoint_every: int = 500             # 0: only at the end
    keep_checkpoints: int = 2               # older step_* folders are removed (0 keeps all)
    sample_every: int = 0                   # 0: one grid at the end; <0: never
    sample_nfe: int = 20
    num_samples: int = 64
    log_every: int = 50
    resume: Optional[str] = None            # None | 'auto' (latest in out_dir) | a checkpoint folder
    progress: bool = True
    export_dtype: str = "float32"           # dtype of the final model/model.safetensors
    accelerate: str = "auto"                # auto (use it under `accelerate launch`) | never

    def __post_init__(self):
        self.adam_betas = tuple(self.adam_betas)
        self.objective = objective_parameterisation(self.objective).name
        if self.loss_weighting not in ("none", "edm"):
            raise ValueError("loss_weighting must be 'none' or 'edm'")
        if self.t_sampling not in ("auto", "uniform", "lognormal"):
            raise ValueError("t_sampling must be 'auto', 'uniform' or 'lognormal'")
        if self.model_time not in ("auto", "process", "log_sigma"):
            raise ValueError("model_time must be 'auto', 'process' or 'log_sigma'")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError("lr_schedule must be 'constant' or 'cosine'")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if not 0 <= self.ema_decay < 1:
            raise ValueError("ema_decay must lie in [0, 1)")
        if self.accelerate not in ("auto", "never"):
            raise ValueError("accelerate must be 'auto' or 'never'")
        if self.export_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError("export_dtype must be float32, float16 or bfloat16")
        if isinstance(self.num_classes, bool) or int(self.num_classes) != self.num_classes or self.num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0 (0: unconditional), got {self.num_classes!r}")
        self.num_classes = int(self.num_classes)
        if not 0 <= self.label_dropout <= 1:
            raise ValueError(f"label_dropout must lie in [0, 1], got {self.label_dropout!r}")
        in_model = self.model.get("num_classes")
        if in_model is not None and in_model != self.num_classes:
            raise ValueError(f"model.num_classes={in_model!r} differs from num_classes={self.num_classes}; set "
                             "num_classes (the UNet's follows it)")

    @property
    def parameterisation(self) -> Parameterisation:
        """The table entry of ``objective``."""
        return get_parameterisation(self.objective)

    @property
    def null_label(self) -> Optional[int]:
        """The label of the unconditional branch (``num_classes``); None for an unconditional run."""
        return self.num_classes if self.num_classes > 0 else None

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        if not self.num_classes:  # unconditional: the dict of every config written before these fields existed
            for f in fields(self):
                if f.name in _CONDITIONING and d[f.name] == f.default:
                    del d[f.name]
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig key(s) {unknown}")
        return cls(**d)
