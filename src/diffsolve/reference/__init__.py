"""Exact references: the Gaussian-mixture (MoLRG) model with closed-form posterior, log-density and
probability-flow ODE, the point cloud (finite data, Gaussian or PFGM++ kernel), the named mixtures of the command
line, and closed-form solver statistics."""
from typing import Callable, Dict, Tuple

from .dense import DenseGaussianMixture
from .gmm import ClosedFormPrior, ExactTargets, GaussianMixture, exact_targets
from .pointcloud import PointCloud
from .shared import SharedCovarianceMixture
from .statistics import gaussian_statistics

#: the named exact references: name -> (description, constructor)
REFERENCES: Dict[str, Tuple[str, Callable[[], GaussianMixture]]] = {
    "toy2d": ("8 elongated Gaussians on a ring in 2-D", lambda: GaussianMixture.toy2d()),
    "gmm64": ("random low-rank mixture, 64 dims", lambda: GaussianMixture.random(64, seed=0)),
    "gmm3072": ("random low-rank mixture, 3072 dims", lambda: GaussianMixture.random(3072, seed=0)),
    "image": ("the gmm3072 mixture shaped as 3x32x32 images",
              lambda: GaussianMixture.random(3072, seed=0, shape=(3, 32, 32))),
}

__all__ = ["GaussianMixture", "DenseGaussianMixture", "PointCloud", "SharedCovarianceMixture", "ClosedFormPrior",
           "ExactTargets", "exact_targets", "gaussian_statistics", "REFERENCES"]
