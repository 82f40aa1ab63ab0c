"""A ``transformers.TrainerCallback`` that exports adapters for the original base.

A PEFT model that :func:`covinit.initialize` gave a residual init already writes converted
adapters through its own ``save_pretrained`` (so ``Trainer`` checkpoints are right without
this callback).  :class:`ExportAdapterCallback` adds, in each checkpoint folder, the output
of :func:`covinit.export_lora`: for covinit's own or loralib-style layers (whose ``Trainer``
checkpoints hold the rewritten base, not an adapter for the original one), or to keep a
fixed, self-describing location next to the files ``Trainer`` resumes from.

Needs ``transformers`` (``pip install covinit[hf]``); import it from this module
(``from covinit.callbacks import ExportAdapterCallback``), it is not re-exported by
``covinit``.

Example
-------
::

    from covinit.callbacks import ExportAdapterCallback
    trainer = transformers.Trainer(model=peft_model, args=args, train_dataset=data,
                                   callbacks=[ExportAdapterCallback()])
    trainer.train()
    # output_dir/checkpoint-N/adapter-for-original-base/ loads with
    # PeftModel.from_pretrained(untouched_base, that_folder)
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from covinit.export import export_lora
from covinit.peft_saving import is_peft_model

__all__ = ["ExportAdapterCallback"]


class ExportAdapterCallback(TrainerCallback):
    """Write :func:`covinit.export_lora` into every checkpoint ``Trainer`` saves.

    Parameters
    ----------
    name : str, default="adapter-for-original-base"
        Where inside ``checkpoint-N``: a folder for ``format="peft"``, a file
        ``name + ".safetensors"`` for ``format="covinit"``.
    format : {"peft", "covinit"}, optional
        Default: ``"peft"`` for a ``peft.PeftModel`` (load with
        ``PeftModel.from_pretrained(untouched_base, folder)``), else ``"covinit"`` (load with
        :func:`covinit.load_lora` onto the plain model).

    Notes
    -----
    Runs on the process that saves (``args.should_save``), after ``Trainer`` wrote the
    checkpoint.  Layers without a residual init are exported as they are, so the callback is
    harmless on any LoRA model.
    """

    def __init__(self, name: str = "adapter-for-original-base", format: str | None = None
                 ) -> None:
        if format not in (None, "peft", "covinit"):
            raise ValueError(f"format must be 'peft', 'covinit' or None, got {format!r}")
        if not name or os.path.basename(name) != name:
            raise ValueError(f"name must be a plain file or folder name, got {name!r}")
        self.name = name
        self.format = format

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                model: nn.Module | None = None, **kwargs: Any) -> None:
        if not args.should_save or model is None:
            return
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        fmt = self.format or ("peft" if is_peft_model(model) else "covinit")
        target = self.name if fmt == "peft" else f"{self.name}.safetensors"
        export_lora(model, os.path.join(checkpoint, target), format=fmt)
