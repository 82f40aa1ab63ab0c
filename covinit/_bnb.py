"""bitsandbytes quantized layers as LoRA bases: read ``Q(W)`` dequantized, write re-quantized.

A bitsandbytes ``Linear4bit`` or ``Linear8bitLt`` computes with a quantized weight ``Q(W)``.
Init strategies read the base weight and residual strategies replace it, so covinit's own
:class:`~covinit.lora.LoRALinear` and the adapter protocol (:mod:`covinit.adapters`, PEFT's
``lora.Linear4bit`` / ``lora.Linear8bitLt``) both go through :class:`QuantizedBase`: reads
return the dequantized ``Q(W)`` (d, k); writes re-quantize in the layer's own format, so they
are exact only for a weight already on the layer's grid.

A floor below the LoRA layer and the adapters (it imports nothing from covinit).  covinit
never imports bitsandbytes itself: a model holding its layers has imported it.

Formats (bitsandbytes 0.50.2, CPU):

* 4-bit (nf4 / fp4, optionally double-quantized absmax): decoded here from the packed codes,
  not with bitsandbytes' CPU ``dequantize_4bit``, which is wrong for some shapes.
* 8-bit (LLM.int8, Dettmers et al. 2022, arXiv 2208.07339): int8 codes ``CB`` (d, k) and one
  absmax ``SCB`` per output row, ``Q(W) = CB·SCB/127``.  In training mode the CPU forward is
  ``x·Q(W)ᵀ`` in ``x``'s dtype; in eval mode it also quantizes the *activations* to int8 per
  row (``MatMul8bitLt``; outlier columns above ``threshold`` stay in float16), which is
  ~0.6 % off ``x·Q(W)ᵀ`` on the test's tiny Llama.  Calibration therefore runs these layers
  in training mode (:func:`covinit.calibrate`), so it sees what training computes.
"""

from __future__ import annotations

import importlib
import sys

import torch
from torch import Tensor, nn

__all__ = ["QuantizedBase", "canonical_4bit", "dequantize_4bit", "dequantize_8bit",
           "quantized_kind"]


def _bnb_module(name: str) -> object | None:
    """``bitsandbytes.<name>`` if bitsandbytes is already imported, else None."""
    if "bitsandbytes" not in sys.modules:
        return None
    return importlib.import_module(f"bitsandbytes.{name}")


def quantized_kind(module: nn.Module) -> str | None:
    """``"4bit"`` for a bitsandbytes ``Linear4bit``, ``"8bit"`` for ``Linear8bitLt``, else None."""
    bnb_nn = _bnb_module("nn")
    if bnb_nn is None:
        return None
    if isinstance(module, bnb_nn.Linear4bit):  # type: ignore[attr-defined]
        return "4bit"
    if isinstance(module, bnb_nn.Linear8bitLt):  # type: ignore[attr-defined]
        return "8bit"
    return None


# ---------------------------------------------------------------------- 4-bit
def canonical_4bit(layer: nn.Module) -> object:
    """The layer's ``QuantState`` with its weight in bitsandbytes' canonical packing.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a ``Linear4bit`` the first time it
    runs in eval mode without autograd and then computes in bfloat16 (0.3 % off the float32
    result; and it fails for ``out_features`` not a multiple of 32).  Undo such a repacking
    with bitsandbytes' own inverse (what its ``state_dict`` does) and switch it off for this
    layer, so calibration sees the same float32 computation as training and covinit's reads
    see the canonical codes.
    """
    weight = layer.weight  # type: ignore[attr-defined]
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        functional = _bnb_module("functional")
        weight.data, weight.quant_state = \
            functional._convert_weight_packed_for_cpu_inverse(  # type: ignore[attr-defined]
                weight.data, weight.quant_state)
        layer.quant_state = weight.quant_state
    layer.support_avx512bf16_for_cpu = False
    return weight.quant_state


def dequantize_4bit(packed: Tensor, state: object) -> Tensor:
    """``Q(W)`` (d, k), float32, from a ``Linear4bit``'s packed codes and ``QuantState``.

    Computed here from the codes (two per byte, high nibble first; block absmax, itself
    8-bit-quantized in blocks of 256 with double quantization) rather than with
    ``bitsandbytes.functional.dequantize_4bit``, whose CPU kernel in 0.50.2 returns wrong
    values for some shapes (48×96, 64×96, 16×32 at block 64: 15–30 % off its own codes).
    """
    flat = packed.detach().reshape(-1).view(torch.uint8)
    codes = torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)  # (≥ d·k,)
    d, k = (int(s) for s in state.shape)  # type: ignore[attr-defined]
    absmax = state.absmax  # type: ignore[attr-defined]
    if state.nested:  # type: ignore[attr-defined]
        inner = state.state2  # type: ignore[attr-defined]
        groups = torch.arange(absmax.numel()) // inner.blocksize
        absmax = inner.code[absmax.long()] * inner.absmax[groups] + state.offset  # type: ignore[attr-defined]
    scale = absmax.float().repeat_interleave(state.blocksize)[: d * k]  # type: ignore[attr-defined]
    table = state.code.float()  # type: ignore[attr-defined]
    return (table[codes[: d * k].long()] * scale).reshape(d, k)


def _probe_4bit(name: str, layer: nn.Module, weight: Tensor) -> None:
    """Refuse a ``Linear4bit`` whose own forward disagrees with its codes.

    bitsandbytes 0.50.2's CPU forward dequantizes with the kernel above, so for the shapes it
    gets wrong the layer computes with another matrix than the one it stores; reading ``W0``
    would then describe a different layer.  Checked once per quantization state on 4 random
    inputs through ``matmul_4bit`` itself (with autograd on, its unpacked path).
    """
    state = layer.weight.quant_state  # type: ignore[attr-defined]
    if getattr(layer, "_covinit_probed", None) is state:
        return
    bnb = _bnb_module("autograd._functions")
    x = torch.randn(4, weight.shape[1], generator=torch.Generator().manual_seed(0),
                    dtype=torch.float32).requires_grad_(True)
    with torch.enable_grad():
        got = bnb.matmul_4bit(x, layer.weight.t(), quant_state=state)  # type: ignore[attr-defined]
    want = x.detach() @ weight.float().T
    gap = float((got.detach() - want).norm() / want.norm().clamp_min(1e-30))
    if gap > 1e-4:
        d, k = weight.shape
        raise ValueError(
            f"layer {name!r} (bitsandbytes Linear4bit, d={d}, k={k}): its CPU forward "
            f"disagrees with its own 4-bit codes (relative {gap:.3f}); bitsandbytes 0.50.2's "
            "CPU dequantize_4bit is wrong for some shapes (seen for k not a multiple of the "
            "block size, e.g. 48x96, 64x96), so the model does not compute its stored layer. "
            "Use a GPU, or a plain nn.Linear holding the dequantized weight "
            "(covinit.quant.quantize)")
    layer._covinit_probed = state


# ---------------------------------------------------------------------- 8-bit
def _scb_8bit(layer: nn.Module) -> Tensor | None:
    """A ``Linear8bitLt``'s row absmax ``SCB`` (d,): on the weight until the first forward,
    then on the layer's ``MatmulLtState`` (bitsandbytes moves it there)."""
    scb = getattr(layer.weight, "SCB", None)  # type: ignore[attr-defined]
    return scb if scb is not None else layer.state.SCB  # type: ignore[attr-defined]


def dequantize_8bit(codes: Tensor, scb: Tensor) -> Tensor:
    """``Q(W) = CB·SCB/127`` (d, k), float32, from int8 codes ``CB`` (d, k) and ``SCB`` (d,).

    Multiplied in the order of bitsandbytes' CPU training forward (``MatMul8bitFp``), so a
    float32 forward computes ``x·Q(W)ᵀ`` with exactly this matrix; bitsandbytes'
    ``int8_vectorwise_dequant`` rounds differently (within 1 ulp).
    """
    return codes.detach().to(torch.float32) * (scb.detach().to(torch.float32).unsqueeze(1)
                                               * (1.0 / 127.0))


# ---------------------------------------------------------------------- the protocol
class QuantizedBase:
    """Read and write the weight of a bitsandbytes ``Linear4bit`` / ``Linear8bitLt``.

    Reads dequantize the codes; writes re-quantize with the layer's own format: 4-bit through
    ``bitsandbytes.functional.quantize_4bit`` (quant type, block size, double quantization,
    storage dtype kept), 8-bit through ``int8_vectorwise_quant`` on the float16 weight (as
    bitsandbytes quantizes when the model is loaded).

    A write is therefore *not* exact: the layer then computes ``Q(W)`` for the ``W`` written
    (a residual init's ``W0 − c·B·A`` loses its quantization error; a weight already on the
    layer's grid, such as what :meth:`read` returned, comes back unchanged).

    Parameters
    ----------
    name : str
        Layer name for error messages.
    layer : nn.Module
        A bitsandbytes ``Linear4bit`` or ``Linear8bitLt`` holding quantized weights.

    Attributes
    ----------
    kind : {"4bit", "8bit"}
    bits : {4, 8}
    shape : tuple of int
        ``(d, k)``.
    dtype : torch.dtype
        What :meth:`read` returns: the original weight dtype (4-bit), float32 (8-bit).

    Raises
    ------
    TypeError
        A layer that is not quantized yet (4-bit without ``quant_state``; 8-bit with
        ``has_fp16_weights=True`` or not moved to its device), or another kind of module.
    ValueError
        A 4-bit layer whose CPU forward disagrees with its codes.
    """

    def __init__(self, name: str, layer: nn.Module) -> None:
        self.name, self.layer = name, layer
        kind = quantized_kind(layer)
        d, k = int(layer.out_features), int(layer.in_features)  # type: ignore[arg-type]
        if kind == "8bit":
            if layer.weight.dtype != torch.int8 or _scb_8bit(layer) is None:  # type: ignore[union-attr]
                raise TypeError(
                    f"layer {name!r}: bitsandbytes Linear8bitLt (d={d}, k={k}) holds "
                    f"unquantized {layer.weight.dtype} weights (has_fp16_weights=True, or not "
                    "moved to its device yet); covinit reads int8 bases: load the model with "
                    "BitsAndBytesConfig(load_in_8bit=True), or build the layer with "
                    "has_fp16_weights=False and call .to(device)")
            self.shape = tuple(int(s) for s in layer.weight.shape)  # type: ignore[union-attr]
            self.dtype = torch.float32
        elif kind == "4bit":
            state = canonical_4bit(layer)
            if state is None:
                raise TypeError(f"layer {name!r}: its Linear4bit weight (d={d}, k={k}) is not "
                                "quantized yet (no quant_state); move the model to its device "
                                "first")
            self.shape = tuple(int(s) for s in state.shape)  # type: ignore[attr-defined]
            self.dtype = state.dtype  # type: ignore[attr-defined]
        else:
            raise TypeError(f"layer {name!r}: {type(layer).__name__} is not a bitsandbytes "
                            "Linear4bit or Linear8bitLt")
        self.kind = kind
        self.bits = 8 if kind == "8bit" else 4
        if self.shape != (d, k):
            raise TypeError(f"layer {name!r}: bitsandbytes {kind} weight shape {self.shape} "
                            f"is not the layer's (d, k) = {(d, k)}")
        if kind == "4bit":
            _probe_4bit(name, layer, self.read())

    def read(self) -> Tensor:
        """``Q(W)`` (d, k), a new tensor of :attr:`dtype`."""
        if self.kind == "8bit":
            return dequantize_8bit(self.layer.weight.data, _scb_8bit(self.layer))  # type: ignore[arg-type]
        state = canonical_4bit(self.layer)
        return dequantize_4bit(self.layer.weight.data, state).to(state.dtype)  # type: ignore[attr-defined]

    def write(self, weight: Tensor) -> None:
        """Re-quantize ``weight`` (d, k) into the layer in its own format."""
        if self.kind == "8bit":
            self._write_8bit(weight)
            return
        layer = self.layer
        state = canonical_4bit(layer)
        functional = _bnb_module("functional")
        packed, new_state = functional.quantize_4bit(  # type: ignore[attr-defined]
            weight.detach().to(state.dtype).contiguous(),  # type: ignore[attr-defined]
            blocksize=state.blocksize, compress_statistics=state.nested,  # type: ignore[attr-defined]
            quant_type=state.quant_type, quant_storage=layer.weight.dtype)  # type: ignore[attr-defined]
        with torch.no_grad():
            layer.weight.data = packed
        layer.weight.quant_state = new_state
        layer.quant_state = new_state
        layer._covinit_probed = new_state  # same shape and format as the probed state

    def _write_8bit(self, weight: Tensor) -> None:
        layer = self.layer
        device = layer.weight.device  # type: ignore[union-attr]
        half = weight.detach().to(device=device, dtype=torch.float16).contiguous()
        if not bool(torch.isfinite(half).all()):
            raise ValueError(f"layer {self.name!r}: the base weight written is not finite in "
                             "float16, which bitsandbytes' int8 quantizer works in (|w| must "
                             "stay below 65504)")
        functional = _bnb_module("functional")
        codes, scb, _ = functional.int8_vectorwise_quant(half)  # type: ignore[attr-defined]
        # A zero row has absmax 0 and codes 0·inf = NaN: make its codes 0 (Q = 0 exactly).
        codes = torch.where(scb.unsqueeze(1) > 0, codes, torch.zeros_like(codes))
        # Wherever bitsandbytes keeps codes and absmax (weight, and the layer's state after
        # its first forward), so its next forward and its state_dict see the new ones.
        weight_param, state = layer.weight, layer.state  # type: ignore[union-attr]
        with torch.no_grad():
            weight_param.data = codes
        if getattr(weight_param, "SCB", None) is not None:
            weight_param.CB, weight_param.SCB = codes, scb
        if state.SCB is not None:
            state.CB, state.SCB = codes, scb
