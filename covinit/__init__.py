"""covinit: covariance-informed LoRA initialization.

Data flow, one module per step: ``collect`` (hooks → :mod:`covinit.stats`) → ``estimators``
(shrinkage covariances, smooth PCA) → ``strategies`` (directions → A, B) → ``lora`` /
``adapters`` (write into covinit's, PEFT's or loralib-style layers).
"""

from covinit.stats import Moments
from covinit.strategies import strategies

__all__ = sorted([
    "Moments",
    "strategies",
])
__version__ = "0.1.0"
