"""FSDP2 (``fully_shard``) on two gloo CPU processes equals one process (covinit.distributed).

A tiny random float64 Llama with LoRA from PEFT (``fully_shard`` per decoder layer and at
the root) or from :func:`covinit.add_lora` (``fully_shard`` at the root only).  Each rank
calibrates its half of the batches (input, output and gradient sides) and initializes with a
``B = 0`` strategy on the gradient statistics (``grad-svd``) and a residual one
(``cov-svd``).  The reference is one process, no sharding, on all batches: statistics agree
to 1e-12, every rank's shards of ``A``, ``B`` and the base equal the slice (``torch.chunk``
along dim 0, FSDP2's layout) of the single-process tensors, a forward after the writes gives
the same logits, and ``export_lora`` (called on every rank, written by rank 0) gives the
single-process file.  Changing a rank under ``fully_shard`` and ``export_lora(format="peft")``
are refused with a message that says what to do instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from _gloo import gloo_group
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from covinit import Calibration, calibrate, export_lora, initialize
from covinit.distributed import copy_full_, full_tensor, is_sharded, storage_ptr

pytestmark = [pytest.mark.slow,  # two processes importing transformers/peft: ~15-20 s each
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")]

TARGETS = ["q_proj", "v_proj", "down_proj"]
SIDES = ("input", "output", "gradient")
# Rank r reads batches SHARDS[r]; under FSDP every forward is a collective, so both ranks
# run the same number of batches (the plain distributed test covers uneven shards).
SHARDS = [[0, 2], [1, 3]]
RESIDUAL, ZERO_B = "cov-svd", "grad-svd"


def make_model(kind: str) -> nn.Module:
    """Tiny random Llama in float64 (hidden 16, 2 layers, GQA 2/1 heads, FFN 32) with LoRA
    rank 2 on :data:`TARGETS`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=32)
    model = LlamaForCausalLM(config).to(torch.float64).eval()
    if kind == "peft":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(target_modules=TARGETS, r=2, lora_alpha=4))
    from covinit import add_lora

    return add_lora(model, TARGETS, rank=2, alpha=4.0)


def all_batches() -> list[dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(4):
        ids = torch.randint(0, 64, (2, 7), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, 5:] = 0  # right padding on one row
        out.append({"input_ids": ids, "attention_mask": mask,
                    "labels": ids.masked_fill(mask == 0, -100)})
    return out


def probe() -> dict[str, Tensor]:
    return {"input_ids": torch.arange(10).reshape(2, 5)}


def lora_params(model: nn.Module) -> dict[str, Tensor]:
    """The adapted layers' parameters (LoRA factors and base weights) by name, as held."""
    return {name: p for name, p in model.named_parameters()
            if any(t in name for t in TARGETS)
            and name.rsplit(".", 1)[-1] in ("weight", "lora_A", "lora_B")}


def run(model: nn.Module, batches: list[dict[str, Tensor]], out: Path, tag: str) -> None:
    """The steps both the ranks and the reference take; writes what each holds to ``out``."""
    cal = calibrate(model, batches, sides=SIDES, strategy=ZERO_B, show_progress=False)
    cal.save(out / f"{tag}_cal.safetensors")
    for strategy in (ZERO_B, RESIDUAL):
        if strategy == RESIDUAL:
            initialize(model, cal, strategy=RESIDUAL)
        local = {n: (p.to_local() if is_sharded(p) else p).detach().contiguous()
                 for n, p in lora_params(model).items()}
        save_file(local, out / f"{tag}_{strategy}.safetensors")
    with torch.no_grad():
        logits = model(**probe()).logits
    save_file({"logits": logits.contiguous()}, out / f"{tag}_logits.safetensors")
    export_lora(model, out / f"{tag}_export.safetensors")
    try:  # a rank change would create parameters fully_shard does not manage
        initialize(model, cal, strategy=RESIDUAL, rank_budget=9)
    except ValueError as err:
        (out / f"{tag}_error.txt").write_text(str(err))


def _worker(rank: int, store: str, kind: str, out: str) -> None:
    with gloo_group(store, rank):
        from torch.distributed.fsdp import fully_shard

        model = make_model(kind)
        if kind == "peft":  # per block and at the root
            for block in model.get_submodule("base_model.model.model.layers"):
                fully_shard(block)
        # Root only (covinit): FSDP keeps the root unsharded after a forward, so writes
        # must go to the resharded DTensors, or the next forward would not see them.
        fully_shard(model)
        batches = [all_batches()[i] for i in SHARDS[rank]]
        run(model, batches, Path(out), f"rank{rank}")
        if kind == "peft":
            with pytest.raises(ValueError, match="format='covinit' only"):
                export_lora(model, Path(out) / f"peft{rank}", format="peft")


def _close(got: Tensor, want: Tensor, what: str, rtol: float = 1e-12) -> None:
    assert got.shape == want.shape, what
    scale = want.abs().max().clamp_min(1e-300)
    assert (got - want).abs().max() <= rtol * scale, what


@pytest.mark.parametrize("kind", ["peft", "covinit"])
def test_fsdp2_two_processes_equal_single_process(tmp_path, kind):
    mp.spawn(_worker, args=(str(tmp_path / "store"), kind, str(tmp_path)), nprocs=2,
             join=True)
    ref_dir = tmp_path / "single"
    ref_dir.mkdir()
    run(make_model(kind), all_batches(), ref_dir, "single")

    single = Calibration.load(ref_dir / "single_cal.safetensors")
    for rank in range(2):
        cal = Calibration.load(tmp_path / f"rank{rank}_cal.safetensors")
        assert cal.info["world_size"] == 2 and cal.info["batches"] == 4
        assert sorted(cal.layer_names) == sorted(single.layer_names)
        for layer in single.layer_names:
            for side in SIDES:
                got, want = cal.moments(layer, side), single.moments(layer, side)
                assert got.n == want.n
                for field in ("mean", "m2", "t", "q"):
                    _close(getattr(got, field), getattr(want, field), f"{layer} {side} {field}")
            _close(cal.gradient(layer), single.gradient(layer), f"{layer} G")

    for strategy in (ZERO_B, RESIDUAL):
        want = load_file(ref_dir / f"single_{strategy}.safetensors")
        assert any("lora_A" in n for n in want) and any("lora_B" in n for n in want)
        for rank in range(2):
            got = load_file(tmp_path / f"rank{rank}_{strategy}.safetensors")
            assert got.keys() == want.keys()
            for name, full in want.items():
                # FSDP2 shards dim 0 as torch.chunk does
                _close(got[name], torch.chunk(full, 2, dim=0)[rank], f"{strategy} {name}",
                       rtol=1e-10)
        if strategy == ZERO_B:
            assert all(not t.any() for n, t in want.items() if "lora_B" in n)

    want_logits = load_file(ref_dir / "single_logits.safetensors")["logits"]
    for rank in range(2):
        got = load_file(tmp_path / f"rank{rank}_logits.safetensors")["logits"]
        _close(got, want_logits, "logits after init", rtol=1e-10)

    want_export = load_file(ref_dir / "single_export.safetensors")
    got_export = load_file(tmp_path / "rank0_export.safetensors")
    assert got_export.keys() == want_export.keys() and len(want_export) == 2 * 2 * len(TARGETS)
    for name, tensor in want_export.items():
        _close(got_export[name], tensor, f"export {name}", rtol=1e-10)
    with safe_open(tmp_path / "rank0_export.safetensors", "pt") as f, \
            safe_open(ref_dir / "single_export.safetensors", "pt") as g:
        assert {k: json.loads(v) for k, v in f.metadata().items()} == \
            {k: json.loads(v) for k, v in g.metadata().items()}
    assert not (tmp_path / "rank1_export.safetensors").exists()  # rank 0 writes

    assert not (ref_dir / "single_error.txt").exists()  # one process: the rank may change
    for rank in range(2):
        message = (tmp_path / f"rank{rank}_error.txt").read_text()
        assert "FSDP2" in message and "rank_budget" in message
        assert "calibrate and initialize before fully_shard" in message


def test_helpers_on_plain_tensors():
    p = nn.Parameter(torch.zeros(3, 2))
    assert not is_sharded(p) and full_tensor(p).data_ptr() == p.data_ptr()
    copy_full_(p, torch.ones(3, 2, dtype=torch.float64))
    assert p.dtype == torch.float32 and bool((p == 1).all())
    assert storage_ptr(p) == p.data_ptr()
    with pytest.raises(ValueError, match=r"shape \(2, 3\) into a parameter of shape \(3, 2\)"):
        copy_full_(p, torch.ones(2, 3))
