"""covinit: covariance-informed LoRA initialization.

The data flow reads top-down, one module per step (each imports only from the ones above it):

- :mod:`covinit.lora`, :mod:`covinit.adapters`, :mod:`covinit.surgery` — the LoRA layer, one
  protocol over covinit's / PEFT's / loralib-style layers, putting layers into a model;
  :mod:`covinit.residual` — the record of a residual init (W0 = base + P·Q).
- :mod:`covinit.collect` → :mod:`covinit.stats` / :mod:`covinit.sketch` /
  :mod:`covinit.distributed` → :mod:`covinit.budget` → :mod:`covinit.calibration_data` →
  :mod:`covinit.calibration` — hooks, exact float64 summaries, passes under a memory budget,
  the :class:`Calibration` and its file, :func:`calibrate`.
- :mod:`covinit.covariance` (with :mod:`covinit.smoothpca`, :mod:`covinit.geometry`) —
  shrinkage estimators, :func:`estimators`.
- :mod:`covinit.inits` (with :mod:`covinit.matched`, :mod:`covinit.quant`,
  :mod:`covinit.allocation`) — the init strategies, :func:`strategies`.
- :mod:`covinit.initialization` — :func:`initialize` writes A, B (and a residual base).
- :mod:`covinit.lora_io`, :mod:`covinit.export`, :mod:`covinit.peft_saving` — saving, export
  onto the untouched base, PEFT's own saving after a residual init.
- :mod:`covinit.reporting` — :func:`report`; :mod:`covinit.cli` — the ``covinit`` command.
"""

from covinit import quant  # noqa: F401  (registers the quantized-base strategies)
from covinit.adapters import LoRAAdapter, find_adapters
from covinit.calibration import calibrate
from covinit.calibration_data import Calibration
from covinit.covariance import Estimate, estimate, estimators
from covinit.export import export_lora, restore_base
from covinit.initialization import initialize
from covinit.inits import strategies
from covinit.lora import LoRALinear
from covinit.lora_io import load_lora, save_lora
from covinit.reporting import report
from covinit.stats import Moments
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
