"""bitsandbytes int8/nf4 DiT folders in the runtime: kernels, source, forward, streaming, render, info, bad input.

The folders are our quantize tool's, plus its nf4 one re-serialized with double-quantized absmax by bitsandbytes'
QuantState.as_dict (the code diffusers saves with; its keys match a folder diffusers 0.42 wrote). Kernels equal
bitsandbytes' own dequantization bit for bit (fp32, CPU). Forward: relative L2 against the F32 DiT on the 256-wide
KQUANT fixture, measured int8 1.4%, nf4 18.5% (nested the same): each nf4 weight is 9.2% off by itself and the
error compounds over the blocks; against float Linears holding bitsandbytes' dequantized weights the runtime is
exact (< 1e-5).

Only what compares with bitsandbytes itself (its kernels, its double-quantized folder) needs the library
(`needs_bnb`); the folders our tool writes (quantize/bnb.py, pure torch) and everything read from them run without it.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import optional, rel_err
from safetensors.torch import load_file, save_file

import zimage_lite
from quantize.convert import convert
from zimage_lite.cli import main
from zimage_lite.errors import CheckpointError, UnsupportedQuantError
from zimage_lite.models.dit import ZImageDiT
from zimage_lite.quant import formats
from zimage_lite.quant.formats import INT8, BnbType, dequantize
from zimage_lite.quant.qlinear import QLinear, QTensor
from zimage_lite.runtime.devices import CpuDevice
from zimage_lite.runtime.plan import minimum_budget
from zimage_lite.runtime.streamer import Streamer
from zimage_lite.weights.components import open_component, open_dit
from zimage_lite.weights.inspect import describe
from zimage_lite.weights.load import load_module

bitsandbytes, needs_bnb = optional("bitsandbytes")
F = getattr(bitsandbytes, "functional", None)

ST = "diffusion_pytorch_model.safetensors"
KINDS = ["int8", "nf4", pytest.param("nf4-nested", marks=needs_bnb)]
FORWARD_TOL = {"int8": 0.03, "nf4": 0.30, "nf4-nested": 0.30}  # relative L2 vs F32; measured 0.014, 0.185
IMAGE_TOL = 2.0  # int8 vs F32 render: mean |diff| in 8-bit levels (measured 0.5)


@pytest.fixture(scope="module")
def folders(kq_model, tmp_path_factory) -> dict[str, Path]:
    """Our tool's int8 and nf4 folders, and, with bitsandbytes installed, the nf4 one with double-quantized absmax
    (as diffusers writes it with bnb_4bit_use_double_quant, serialized by bitsandbytes' own QuantState.as_dict)."""
    out = tmp_path_factory.mktemp("bnb")
    found = {t: convert(kq_model, t, out=out)[0].path for t in ("int8", "nf4")}
    if bitsandbytes is not None:
        found["nf4-nested"] = _double_quant(found["nf4"], kq_model / "transformer", out / "nested")
    return found


def _double_quant(nf4: Path, original: Path, dst: Path) -> Path:
    _, src = open_dit(original)
    tensors, key = load_file(nf4 / ST), ".quant_state.bitsandbytes__nf4"
    for weight in [n.removesuffix(key) for n in list(tensors) if n.endswith(key)]:
        for k in [k for k in tensors if k.startswith(weight + ".")]:
            del tensors[k]
        tensors[weight], state = F.quantize_4bit(src.get(weight).float(), blocksize=64, quant_type="nf4",
                                                 compress_statistics=True)
        tensors |= {f"{weight}.{k}": v for k, v in state.as_dict(packed=True).items()}
    return _write(dst, nf4, tensors, use_double_quant=True)


def _write(dst: Path, like: Path, tensors: dict[str, torch.Tensor], **quant: object) -> Path:
    dst.mkdir()
    config = json.loads((like / "config.json").read_text())
    config["quantization_config"] |= {f"bnb_4bit_{k}": v for k, v in quant.items()}
    (dst / "config.json").write_text(json.dumps(config))
    save_file(tensors, dst / ST)
    return dst


def _bnb_dequantized(file: dict[str, torch.Tensor], weight: str) -> torch.Tensor:
    """bitsandbytes' own dequantization of `weight` from a folder's file tensors."""
    if weight.removesuffix("weight") + "SCB" in file:
        return F.int8_vectorwise_dequant(file[weight], file[weight.removesuffix("weight") + "SCB"])
    state = {k[len(weight) + 1:]: v for k, v in file.items() if k.startswith(weight + ".")}
    return F.dequantize_4bit(file[weight], F.QuantState.from_dict(state, torch.device("cpu")))


def _load_dit(path: Path) -> ZImageDiT:
    cfg, src = open_dit(path)
    with torch.device("meta"):
        model = ZImageDiT(cfg)
    return load_module(model, src, torch.float32, "cpu", "DiT")


def _inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, 16, 16, generator=g), torch.tensor([0.5]), [torch.randn(20, 48, generator=g)]


# ---- kernels


# None: the default chunk (one chunk here); small: several chunks on worker threads, the last one short
@needs_bnb
@pytest.mark.parametrize("chunk", [None, 1000], ids=["one-chunk", "chunked"])
def test_int8_equals_bitsandbytes(chunk, monkeypatch):
    if chunk:
        monkeypatch.setattr(formats, "DEQUANT_CHUNK_WEIGHTS", chunk)
    w = torch.randn(96, 200, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 96)[:, None]
    w[5] = 0  # an all-zero row: SCB 0
    q, scb, _ = F.int8_vectorwise_quant(w.half())
    got = dequantize(q.view(torch.uint8), INT8, (96, 200), state=(scb,))
    assert torch.equal(got, F.int8_vectorwise_dequant(q, scb))  # bit for bit: both multiply by fp32 1/127
    assert rel_err(got, q.float() * scb[:, None] / 127) < 2e-7  # the textbook formula differs by 1 ulp at most


# whole blocks; a short last block (an odd row length would send bitsandbytes to a torch.compile path: 18 s)
@pytest.mark.parametrize("shape", [(64, 256), (7, 100)], ids=str)
@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "nested"])
@pytest.mark.parametrize("chunk", [None, 192], ids=["one-chunk", "chunked"])
@needs_bnb
def test_nf4_equals_bitsandbytes(shape, nested, chunk, monkeypatch):
    if chunk:
        monkeypatch.setattr(formats, "DEQUANT_CHUNK_WEIGHTS", chunk)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape) + shape[1]))
    packed, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
    state = (qs.absmax, qs.code) + ((qs.state2.absmax, qs.state2.code, qs.offset.reshape(1)) if nested else ())
    qtype = BnbType("nf4", 64, qs.state2.blocksize if nested else 0)
    got = QTensor(packed, qtype, shape, state).dequantize()
    assert torch.equal(got, F.dequantize_4bit(packed, qs))
    assert torch.equal(dequantize(packed, qtype, shape, torch.bfloat16, state=state), got.bfloat16())


def test_wrong_state_size_is_a_checkpoint_error():
    q = torch.zeros(4, 8, dtype=torch.uint8)
    with pytest.raises(CheckpointError, match=r"to_q.weight \(bitsandbytes int8, shape \[4, 8\]\).*\[32, 4\]"):
        dequantize(q, INT8, (4, 8), name="to_q.weight", state=(torch.ones(3),))


# ---- the folders as a DiT source


@pytest.mark.parametrize("kind", KINDS)
def test_folder_opens_as_a_dit_source(folders, kq_model, kind):
    comp = open_component(folders[kind], "dit")
    stored = set(comp.stored.names())
    assert comp.kind == "dit" and comp.layout == "official" and comp.config == open_dit(kq_model / "transformer")[0]
    assert not any(n.endswith((".SCB", ".weight_format", ".absmax", ".quant_map")) or ".quant_state." in n or
                   "nested_" in n for n in stored)  # state tensors folded into their weights
    src, name = comp.source, "layers.1.feed_forward.w2.weight"
    t = src.get(name)
    qtype = "int8" if kind == "int8" else "nf4"
    assert src.qtype(name) == qtype and src.shape(name) == (256, 682) and isinstance(t, QTensor)
    assert t.data.dtype == torch.uint8 and t.data.numel() == 256 * 682 // (1 if kind == "int8" else 2)
    assert src.qtype("all_x_embedder.2-1.weight") == "BF16" and src.qtype("layers.0.attention_norm1.weight") == "F32"


@needs_bnb
@pytest.mark.parametrize("kind", KINDS)
def test_folder_dequantizes_as_bitsandbytes(folders, kind):
    name = "layers.1.feed_forward.w2.weight"
    got = open_component(folders[kind], "dit").source.get(name).dequantize()
    assert torch.equal(got, _bnb_dequantized(load_file(folders[kind] / ST), name))  # bit for bit


@pytest.mark.parametrize("kind", KINDS)
def test_dit_forward_within_bound(folders, kq_model, kind):
    ref, model = _load_dit(kq_model / "transformer"), _load_dit(folders[kind])
    packed = [m for m in model.modules() if isinstance(m, QLinear)]
    assert len(packed) == 31 and all(m.weight.dtype == torch.uint8 for m in packed)  # stays packed in memory
    x, t, caps = _inputs()
    with torch.no_grad():
        want, got = ref(x, t, caps), model(x, t, caps)
        assert float((got - want).norm() / want.norm()) < FORWARD_TOL[kind]
        # the streamer's device slots carry the scale buffers along with the packed bytes
        blocks = [b.module for b in model.schedule()]
        model.runner = Streamer(blocks, [True] * len(blocks), CpuDevice())
        assert rel_err(model(x, t, caps), got) < 1e-5


@needs_bnb
@pytest.mark.parametrize("kind", KINDS)
def test_dit_forward_equals_bitsandbytes_weights(folders, kind):
    """The same DiT with float Linears holding bitsandbytes' dequantized weights: the runtime adds no error of its
    own."""
    model, file, exact = _load_dit(folders[kind]), load_file(folders[kind] / ST), _load_dit(folders[kind])
    for name, m in [(n, m) for n, m in exact.named_modules() if isinstance(m, QLinear)]:
        parent, _, child = name.rpartition(".")
        linear = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        linear.weight.data, linear.bias = _bnb_dequantized(file, f"{name}.weight"), m.bias
        setattr(exact.get_submodule(parent), child, linear)
    x, t, caps = _inputs()
    with torch.no_grad():
        assert rel_err(model(x, t, caps), exact(x, t, caps)) < 1e-5


def test_renders_from_dit_folder_and_model_folder(folders, kq_model, tmp_path):
    kwargs = dict(width=32, height=32, steps=2, seed=7)
    resident = zimage_lite.load(kq_model, dit=folders["nf4"], device="cpu", dtype="fp32")
    image = resident.text_to_image("a fox", **kwargs)
    assert image.info["dit_format"] == "nf4" and np.asarray(image).std() > 5
    # --ram so small that every block is read again from the folder at each step: the smallest the planner accepts
    request = resident.make_plan(32, 32, 0.0, resident.tokenizer.encode("a fox").ids.shape[0]).request
    least = minimum_budget(replace(request, budget=1))
    streamed = zimage_lite.load(kq_model, dit=folders["nf4"], device="cpu", dtype="fp32", ram=least)
    assert np.array_equal(np.asarray(streamed.text_to_image("a fox", **kwargs)), np.asarray(image))
    assert streamed.plan.stage("dit").resident == ()
    # a model folder whose transformer/ is the int8 folder
    model = tmp_path / "Z-Image-int8"
    model.mkdir()
    for part in ("text_encoder", "tokenizer", "vae", "scheduler"):
        (model / part).symlink_to(kq_model / part)
    (model / "transformer").symlink_to(folders["int8"])
    int8 = zimage_lite.load(model, device="cpu", dtype="fp32").text_to_image("a fox", **kwargs)
    f32 = zimage_lite.load(kq_model, device="cpu", dtype="fp32").text_to_image("a fox", **kwargs)
    assert int8.info["dit_format"] == "int8"
    assert np.abs(np.asarray(int8, np.float32) - np.asarray(f32, np.float32)).mean() < IMAGE_TOL


# ---- info and bad input


def test_info_reports_the_folder(folders, kq_model, capsys):
    [s] = describe(folders["nf4"])["sections"]
    file = folders["nf4"] / ST
    data = file.stat().st_size - 8 - int.from_bytes(file.read_bytes()[:8], "little")  # all but the header
    assert s["component"] == "dit" and s["layout"] == "bitsandbytes nf4" and s["bytes"] == data
    assert s["qtypes"]["nf4"]["count"] == 31 and s["tensors"] == describe(kq_model / "transformer")["sections"][0][
        "tensors"] and s["params"] == describe(kq_model / "transformer")["sections"][0]["params"]
    assert main(["info", str(folders["int8"])]) == 0
    out = capsys.readouterr().out
    assert "DiT, bitsandbytes int8 layout" in out and "int8 31 (" in out and "zimage-lite: yes" in out


@pytest.mark.parametrize("kind,drop", [
    ("int8", "layers.0.attention.to_q.SCB"),
    ("nf4", "layers.1.feed_forward.w2.weight.absmax"),
    ("nf4", "noise_refiner.0.attention.to_k.weight.quant_state.bitsandbytes__nf4"),
    pytest.param("nf4-nested", "layers.0.attention.to_v.weight.nested_absmax", marks=needs_bnb),
])
def test_missing_state_tensor_is_named(folders, kq_model, tmp_path, kind, drop):
    tensors = load_file(folders[kind] / ST)
    del tensors[drop]
    broken = _write(tmp_path / "broken", folders[kind], tensors)
    with pytest.raises(CheckpointError, match=rf"tensor {drop} is missing: the bitsandbytes"):
        zimage_lite.load(kq_model, dit=broken, device="cpu")


def test_cut_scale_tensor_is_named(folders, kq_model, tmp_path):
    tensors = load_file(folders["int8"] / ST)
    tensors["layers.1.attention.to_out.0.SCB"] = tensors["layers.1.attention.to_out.0.SCB"][:100].clone()
    broken = _write(tmp_path / "broken", folders["int8"], tensors)
    with pytest.raises(CheckpointError, match=r"tensor layers.1.attention.to_out.0.SCB has 100 elements"):
        zimage_lite.load(kq_model, dit=broken, device="cpu")


def test_other_quant_methods_are_refused_by_name(folders, kq_model, tmp_path):
    other = tmp_path / "torchao"
    other.mkdir()
    (other / ST).symlink_to(folders["int8"] / ST)
    config = json.loads((folders["int8"] / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "torchao", "quant_type": "int8_weight_only"}
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedQuantError, match=r"quant_method is 'torchao'; zimage-lite reads bitsandbytes"):
        zimage_lite.load(kq_model, dit=other, device="cpu")
