"""covinit: covariance-informed LoRA initialization.

Data flow, one module per step: ``collect`` (hooks → :mod:`covinit.stats`) → ``estimators``
(shrinkage covariances, smooth PCA) → ``strategies`` (directions → A, B) → ``lora`` /
``adapters`` (write into covinit's, PEFT's or loralib-style layers).
"""

from covinit import quant  # noqa: F401  (registers the quantized-base strategies)
from covinit.adapters import LoRAAdapter, find_adapters
from covinit.calibration import Calibration, calibrate
from covinit.estimators import Estimate, estimate, estimators
from covinit.export import export_lora, restore_base
from covinit.initialize import initialize
from covinit.lora import LoRALinear
from covinit.lora_io import load_lora, save_lora
from covinit.reporting import report
from covinit.stats import Moments
from covinit.strategies import strategies
from covinit.surgery import add_lora, lora_state_dict

__all__ = [
    "Calibration",
    "Estimate",
    "LoRAAdapter",
    "LoRALinear",
    "Moments",
    "add_lora",
    "calibrate",
    "estimate",
    "estimators",
    "export_lora",
    "find_adapters",
    "initialize",
    "load_lora",
    "lora_state_dict",
    "report",
    "restore_base",
    "save_lora",
    "strategies",
]
__version__ = "0.1.0"
