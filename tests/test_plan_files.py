"""Plans from real files (per-tensor types and recipe labels), the devices a plan is made for (`cuda:N`, native
bf16), and the layering that keeps the quantize tool out of the runtime."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader

import zimage_lite
from zimage_lite.runtime import budget
from zimage_lite.runtime.budget import CUDA_HEADROOM, resolve_dtype
from zimage_lite.runtime.memory import aligned
from zimage_lite.runtime.plan import make_plan, minimum_budget, plan_for
from zimage_lite.runtime.plan_format import format_plan
from zimage_lite.runtime.units import GIB

ROOT = Path(__file__).resolve().parent.parent
FLOAT = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}


@pytest.fixture(scope="module")
def q4_k_m_dit(kq_model: Path, tmp_path_factory) -> Path:
    """The K-quant fixture's DiT written by our quantize tool as Q4_K_M: its six F32 norms per block outnumber its
    K-quant Linears, the case that was once planned and labelled as F32."""
    from quantize.convert import convert

    [result] = convert(kq_model, "Q4_K_M", component="dit", out=tmp_path_factory.mktemp("q4km") / "dit.gguf")
    return result.path


def _block_bytes(path: Path, elem: int) -> tuple[int, int]:
    """(bytes held once placed, bytes stored) of the DiT's blocks, from the GGUF file's own tensor infos: packed
    tensors as they lie in the file, float tensors cast to `elem` bytes; the fused qkv becomes three Linears; each
    tensor aligned in its buffer."""
    held = stored = 0
    for t in GGUFReader(path).tensors:
        if not t.name.startswith(("noise_refiner.", "context_refiner.", "layers.")):
            continue
        parts = 3 if ".attention.qkv." in t.name else 1
        per = int(np.prod(t.shape)) // parts * elem if t.tensor_type in FLOAT else int(t.n_bytes) // parts
        held += parts * aligned(per)
        stored += int(t.n_bytes)
    return held, stored


def test_a_q4_k_m_file_is_planned_per_tensor_and_labelled_by_its_recipe(kq_model, q4_k_m_dit):
    pipe = zimage_lite.load(kq_model, dit=q4_k_m_dit, device="cpu", dtype="bf16", ram="8GB")
    plan = pipe.make_plan(64, 64, 0.0, caption_tokens=32)
    assert plan.request.quant == "Q4_K_M"  # general.file_type, not the most common type of layers.0 (F32)
    assert "DiT Q4_K_M" in format_plan(plan)
    dit = plan.stage("dit")
    held, stored = _block_bytes(q4_k_m_dit, elem=2)
    assert not dit.streamed and dit.resident_bytes == held
    # at its smallest budget every block streams, and each step reads the blocks as the file stores them
    least = minimum_budget(replace(plan.request, budget=1))
    small = make_plan(replace(plan.request, budget=least)).stage("dit")
    assert small.streamed == small.blocks and small.transfer_bytes == stored


def test_the_png_names_the_recipe(kq_model, q4_k_m_dit):
    image = zimage_lite.load(kq_model, dit=q4_k_m_dit, device="cpu", dtype="fp32").text_to_image(
        "x", width=64, height=64, steps=1, seed=1)
    assert image.info["dit_format"] == "Q4_K_M"


def test_float_files_are_labelled_by_their_block_weights(tiny_model):
    pipe = zimage_lite.load(tiny_model, device="cpu", dtype="fp32")
    assert pipe.weight_format("dit") == "F32" and pipe.weight_format("text_encoder") == "BF16"


def test_the_host_only_embedding_table_stays_as_stored(tiny_model):
    """What the planner counts for Qwen3's embedding table (nothing: a view of the file) is what loading holds: the
    table keeps its stored dtype, and the looked-up rows are cast, to the same values as a cast table gives."""
    from zimage_lite.models.qwen3 import Qwen3Encoder
    from zimage_lite.weights.components import open_text_encoder
    from zimage_lite.weights.load import load_module

    cfg, source = open_text_encoder(tiny_model / "text_encoder")
    with torch.device("meta"):
        model = Qwen3Encoder(cfg)
    load_module(model, source, torch.float32, "cpu", "text encoder")
    assert model.embed_tokens.weight.dtype == torch.bfloat16 == source.get("embed_tokens.weight").dtype
    assert model.layers[0].mlp.up_proj.weight.dtype == torch.float32  # the blocks are cast as before
    ids = torch.tensor([3, 1, 4, 1, 5])
    features = model(ids, "cpu", torch.float32)
    model.embed_tokens.weight.data = model.embed_tokens.weight.data.float()  # the table cast, as before
    assert torch.equal(model(ids, "cpu", torch.float32), features)


# ---- devices -------------------------------------------------------------------------------------------------------

@pytest.fixture
def two_gpus(monkeypatch):
    """torch.cuda faked with two cards: device 0 an fp16-only Turing card with 2 GiB free, device 1 an Ampere card
    with 24 GiB free (and is_bf16_supported() saying yes for both, as torch does when it can emulate). Records the
    device each question was asked about."""
    asked: list[tuple[str, int]] = []
    cards = {0: ((7, 5), 2 * GIB), 1: ((8, 6), 24 * GIB)}

    def index(device) -> int:
        return torch.device(device).index or 0 if device is not None else 0

    def capability(device=None):
        asked.append(("capability", index(device)))
        return cards[index(device)][0]

    def mem_get_info(device=None):
        asked.append(("free", index(device)))
        return cards[index(device)][1], 80 * GIB

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(cards))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    return asked


def test_auto_dtype_is_bf16_only_where_the_gpu_has_it_natively(two_gpus):
    assert resolve_dtype("auto", "cuda:0") == "fp16"  # Turing: bf16 would be emulated
    assert resolve_dtype("auto", "cuda:1") == "bf16"
    assert resolve_dtype("auto", "cuda") == "fp16"  # the current device, 0
    assert two_gpus == [("capability", 0), ("capability", 1), ("capability", 0)]
    assert resolve_dtype("fp32", "cuda:0") == "fp32" and len(two_gpus) == 3  # an explicit dtype asks nothing


def test_cuda_n_plans_with_that_devices_memory(two_gpus):
    plan = plan_for("turbo", "Q4_K_M", 1024, 1024, False, "cuda:1", None, None)
    assert ("free", 1) in two_gpus and ("free", 0) not in two_gpus
    assert plan.request.budget == 24 * GIB - CUDA_HEADROOM and plan.request.dtype == "bf16"
    assert not plan.stage("dit").streamed  # 24 GiB keeps the whole Q4_K_M DiT
    assert budget.device_budget("cuda:0") == 2 * GIB - CUDA_HEADROOM


def test_the_pipeline_plans_for_its_own_device(two_gpus, tiny_model):
    pipe = zimage_lite.load(tiny_model, device="cuda:1")
    assert pipe.dtype == torch.bfloat16
    pipe.make_plan(64, 64, 0.0, caption_tokens=32)
    assert ("free", 1) in two_gpus and ("free", 0) not in two_gpus


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cpu:1"])
def test_bad_devices_are_refused(device):
    with pytest.raises(zimage_lite.errors.OptionError, match="--device"):
        plan_for("turbo", "Q4_K_M", 1024, 1024, False, device, 8 * GIB, 8 * GIB)


# ---- layering ------------------------------------------------------------------------------------------------------

def test_plan_and_run_never_import_the_quantize_tool(tmp_path):
    """The runtime stands alone: `zimage-lite plan` (preset and files) and a demo run leave the `quantize` tool and
    the test-only reference libraries (diffusers, transformers) unimported."""
    code = textwrap.dedent(f"""
        import sys
        from zimage_lite.cli import main
        assert main(["plan", "--preset", "turbo", "--vram", "4GB", "--device", "cuda"]) == 0
        assert main(["plan", "--model", "demo", "--device", "cpu", "--ram", "1GB"]) == 0
        assert main(["run", "x", "--model", "demo", "--steps", "1", "--width", "64", "--height", "64",
                     "--device", "cpu", "--out", {str(tmp_path / "x.png")!r}]) == 0
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("quantize", "diffusers", "transformers"))
        assert not loaded, loaded
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "peak host memory" in done.stdout
