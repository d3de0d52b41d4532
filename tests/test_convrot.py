"""ComfyUI INT8 (ConvRot / plain rows): the convention, the files we write, reading them, running them, bad input.

The reference for the convention is built here by hand with numpy, independently of zimage_lite.quant.convrot: the
regular Hadamard matrix as the Kronecker power of comfy-kitchen's H4 divided by sqrt(n), applied to consecutive
groups of 256 input columns, rows quantized symmetric with max/127 and round-half-even, clamped to [-128, 127].
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import KQ_TEXT, make_checkpoint, refused, rel_err, resident_bytes_of, resident_bytes_under
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import zimage_lite
from quantize.convert import convert
from zimage_lite.errors import CheckpointError, UnsupportedQuantError
from zimage_lite.models.dit import ZImageDiT
from zimage_lite.quant import convrot
from zimage_lite.quant.convrot import CONVROT, ROWWISE, quantize_weight, rotate
from zimage_lite.quant.formats import dequantize
from zimage_lite.quant.qlinear import QLinear
from zimage_lite.runtime.memory import RELEASES_FILE_PAGES, FileViews
from zimage_lite.weights.components import open_component, open_dit
from zimage_lite.weights.load import load_module

# The DiT and text encoder both 256 wide, so ConvRot applies to their Linears (TINY's 64-wide rows would all fall back
# to plain rows); w2's 682-wide input does not split into groups of 256 and stays plain rows, as ComfyUI's writers do.
INT8_MODEL = replace(KQ_TEXT, dit=replace(KQ_TEXT.dit, dim=256, axes_dims=(32, 48, 48)))
DIT_FILE, TE_FILE = "z_image_turbo_int8_convrot.safetensors", "qwen_3_4b_int8_convrot.safetensors"


def reference_hadamard(n: int) -> np.ndarray:
    h4 = np.array([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=np.float64)
    h = h4
    while h.shape[0] < n:
        h = np.kron(h, h4)
    return h / np.sqrt(n)


def reference_quantize(w: np.ndarray, groupsize: int) -> tuple[np.ndarray, np.ndarray]:
    rows, k = w.shape
    if groupsize:
        w = (w.reshape(rows, k // groupsize, groupsize) @ reference_hadamard(groupsize).T).reshape(rows, k)
    scale = np.maximum(np.abs(w).max(axis=1, keepdims=True) / 127.0, 1e-30)
    return np.clip(np.round(w / scale), -128, 127).astype(np.int8), scale


@pytest.fixture(scope="module")
def int8_files(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("int8")
    model = make_checkpoint(root / "Z-Image-int8", INT8_MODEL)
    out = root / "out"
    out.mkdir()
    convert(model, "int8-convrot", component="all", out=out)
    convert(model, "int8-rowwise", component="dit", out=out)
    return model, out / DIT_FILE, out / TE_FILE


# ---- the convention


def test_hadamard_is_the_regular_one():
    h = reference_hadamard(256)
    assert np.allclose(h, h.T) and np.allclose(h @ h.T, np.eye(256))
    assert np.allclose(h[:4, :4] * 16, [[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]])


@pytest.mark.parametrize("groupsize", [4, 16, 64, 256, 1024])
def test_rotation_is_the_dense_hadamard_product(groupsize, monkeypatch):
    """rotate() works in two smaller Hadamard factors (H_a V H_b): the same as each group times the dense H, for
    every power of 4, the unequal factors (64 = 4 x 16, 1024 = 16 x 64) included. Measured max error 2.6e-7 to
    7.6e-7 on values ~1 (fp32); held at 2e-6."""
    x = torch.randn(6, 2 * max(groupsize, 256), generator=torch.Generator().manual_seed(4))
    ref = (x.double().numpy().reshape(6, -1, groupsize) @ reference_hadamard(groupsize)).reshape(6, -1)
    assert np.abs(rotate(x, groupsize).double().numpy() - ref).max() < 2e-6
    monkeypatch.setattr(convrot, "ROTATE_CHUNK", 2 * groupsize)  # chunks of two groups: each read, then written
    y = x.clone()
    assert rotate(y, groupsize, out=y) is y and np.abs(y.double().numpy() - ref).max() < 2e-6


@pytest.mark.parametrize("groupsize", [0, 2, 8, 48, 512])
def test_rotation_refuses_a_group_that_is_not_a_power_of_4_dividing_the_row(groupsize):
    with pytest.raises(UnsupportedQuantError, match="not a power of 4 dividing the row length 1536"):
        rotate(torch.zeros(2, 1536), groupsize)


@pytest.mark.parametrize("qtype", [CONVROT, ROWWISE], ids=lambda t: t.name)
def test_quantize_dequantize_matches_the_reference(qtype):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 768, generator=g)
    w[:, ::97] *= 30  # outlier input columns: what ConvRot's rotation spreads over the group
    w[5] = 0  # a zero row: scale clamps at 1e-30, values 0
    q, scale = quantize_weight(w, qtype)
    ref_q, ref_scale = reference_quantize(w.double().numpy(), qtype.groupsize)
    # fp32 here, fp64 there: a value within 1e-5 of a rounding boundary may land one level apart
    assert np.abs(q.numpy().astype(int) - ref_q).max() <= 1 and (q.numpy() != ref_q).mean() < 1e-3
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (48, 1)
    assert np.allclose(scale.numpy(), ref_scale, rtol=1e-6)
    back = dequantize(q.view(torch.uint8), qtype, (48, 768), state=(scale.reshape(-1),))
    ref_back = ref_q * ref_scale
    if qtype.groupsize:
        h = reference_hadamard(256)
        ref_back = (ref_back.reshape(48, 3, 256) @ h).reshape(48, 768)  # H^T H = I: rotated back
    assert np.allclose(back.numpy(), ref_back, atol=1e-5 * np.abs(ref_back).max())
    # relative L2 of the round trip: measured 5.7e-3 rotated, 3.9e-2 plain rows (the outliers set the row scale)
    err = float((back - w).norm() / w.norm())
    assert err < (0.01 if qtype.groupsize else 0.08)


# ---- files we write


def test_written_file_has_comfyui_keys(int8_files):
    _, dit, te = int8_files
    with safe_open(str(dit), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("layers.0.attention.qkv.weight").dtype == torch.int8
        assert f.get_tensor("layers.0.attention.qkv.weight_scale").shape == (768, 1)
        assert f.get_tensor("x_embedder.weight").dtype == torch.float32  # kept float, as the published file
        tag = json.loads(bytes(f.get_tensor("layers.1.feed_forward.w1.comfy_quant").tolist()))
        plain = json.loads(bytes(f.get_tensor("layers.1.feed_forward.w2.comfy_quant").tolist()))
    assert tag == {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 256}
    assert plain == {"format": "int8_tensorwise"}  # 682 inputs: not rotated
    layers = {k.removesuffix(".comfy_quant") for k in keys if k.endswith(".comfy_quant")}
    assert all(f"{m}.weight" in keys and f"{m}.weight_scale" in keys for m in layers)
    assert not any(m.startswith(("x_embedder", "t_embedder", "cap_embedder", "final_layer")) for m in layers)
    assert len(layers) == 4 * 6 + 2 * 6 - 2  # 2 layers, 2 noise and 2 context refiners (no adaLN there)
    te_keys = set(load_file(te))
    assert "model.layers.0.self_attn.q_proj.comfy_quant" in te_keys and "model.embed_tokens.weight" in te_keys


def test_written_file_reads_back(int8_files):
    model, dit, _ = int8_files
    src = open_component(dit, "dit").source
    name = "layers.0.feed_forward.w1.weight"
    assert src.qtype(name) == "int8-convrot256"
    original = open_dit(model / "transformer")[1].get(name).float()
    back = src.get(name).dequantize()
    # int8 per row: measured 7.0e-3 relative L2; tolerance 1.5e-2
    assert float((back - original).norm() / original.norm()) < 1.5e-2


# ---- the integer path against the dequantized float path


def _load(path: Path) -> ZImageDiT:
    cfg, src = open_dit(path)
    with torch.device("meta"):
        model = ZImageDiT(cfg)
    return load_module(model, src, torch.float32, "cpu", "DiT")


@pytest.mark.parametrize("route", ["onednn", "int_mm"])
def test_integer_path_matches_float_path(int8_files, monkeypatch, route):
    _, dit, _ = int8_files
    model = _load(dit)
    assert sum(isinstance(m, QLinear) for m in model.modules()) == 46  # 34 layers, the 6 fused qkv split in 3
    g = torch.Generator().manual_seed(1)
    x, t, caps = torch.randn(1, 16, 16, 16, generator=g), torch.tensor([0.5]), [torch.randn(20, 256, generator=g)]
    with torch.no_grad():
        monkeypatch.setenv("ZIMAGE_LITE_INT8_ROUTE", "float")
        want = model(x, t, caps)
        monkeypatch.setenv("ZIMAGE_LITE_INT8_ROUTE", route)
        got = model(x, t, caps)
    # activations quantized per row to int8: measured 1.66e-2 relative L2 (both routes; onednn with 7-bit activations,
    # AVX2 without VNNI: 3.4e-2); tolerance 5e-2
    assert float((got - want).norm() / want.norm()) < 5e-2


def test_placing_on_the_cpu_makes_onednns_copies(int8_files, monkeypatch):
    """On the onednn route a resident int8 model holds oneDNN's copy of each int8 weight once placed (counted as
    loading, as the plan counts it held), not first at its first call; and not the file's pages under the weights
    beside it (full size on AVX2, 256x256: the ConvRot DiT's stage peaked at 11.98 GiB RSS with them, 6.26 without)."""
    model, dit, te = int8_files
    monkeypatch.setenv("ZIMAGE_LITE_INT8_ROUTE", "onednn")
    pipe = zimage_lite.load(model, dit=dit, text_encoder=te, device="cpu", dtype="fp32")
    for which in ("dit", "text_encoder"):
        linears = [m for m in pipe._load(which).modules() if isinstance(m, QLinear)]
        assert linears  # precondition: int8 Linears
        assert all(getattr(m, "_packed_for", None) == m.weight.data_ptr() for m in linears)
        # the file's pages under the int8 weights handed back (the plan counts the copies alone): measured resident
        # 0.065x (DiT) and 0.097x (text encoder) the weights' bytes, each weight's two edge pages; 1.03x and 1.05x kept
        if RELEASES_FILE_PAGES:
            assert sum(resident_bytes_under(m.weight) for m in linears) < sum(m.weight.numel() for m in linears) / 4


def test_streamed_int8_blocks_make_their_copies_at_each_use(int8_files, monkeypatch):
    """Under the least --ram the DiT's blocks stream: each use makes its blocks' copies and drops them with the
    weights (back on `meta`) and the file's pages under them, the image is the one every block resident gives (but
    for the VAE's tiles and attention's chunks), and `prepare_resident` passes over the dropped weights."""
    from zimage_lite.quant.qlinear import prepare_resident
    from zimage_lite.runtime.plan import minimum_budget

    model, dit, te = int8_files
    monkeypatch.setenv("ZIMAGE_LITE_INT8_ROUTE", "onednn")
    resident = zimage_lite.load(model, dit=dit, text_encoder=te, device="cpu", dtype="fp32")
    req = resident.make_plan(256, 256, 0.0, 40).request
    least = zimage_lite.load(model, dit=dit, text_encoder=te, device="cpu", dtype="fp32",
                             ram=minimum_budget(replace(req, budget=1)) + req.headroom)
    want = resident.text_to_image("a fox", width=256, height=256, steps=2, seed=3)
    mapped = []  # the DiT file's resident bytes at each step, its map alive
    for event in least.generate("a fox", width=256, height=256, steps=2, seed=3):
        mapped += [resident_bytes_of(dit)] if event.stage == "step" else []
        got = event.image
    # the pages of the blocks read before go with them (runtime/streamer.LazyBlocks): measured 0.36x the file at
    # each step (the float tensors outside the blocks, the weights' edge pages), 1.00x with them kept
    if RELEASES_FILE_PAGES:
        assert mapped and max(mapped) < dit.stat().st_size / 2
    # the least budget also tiles the VAE and chunks attention: measured 1 level at most, 2.0e-5 levels on average
    diff = np.abs(np.asarray(got, dtype=np.int16) - np.asarray(want, dtype=np.int16))
    assert diff.max() <= 1 and diff.mean() < 2e-4
    streamed = set(least.plan.stage("dit").streamed)
    assert streamed  # precondition
    least.plan = least.make_plan(256, 256, 0.0, 40)
    dit_model = least._load("dit")
    blocks = [b.module for b in dit_model.schedule() if b.name in streamed]
    for block in blocks:  # one use, as the runner makes it
        dit_model.runner.materialize(block, FileViews())
        block.to("meta")
    linears = [m for b in blocks for m in b.modules() if isinstance(m, QLinear)]
    assert linears and all(m.weight.is_meta and m._packed_weight is None for m in linears)
    assert prepare_resident(dit_model) == 0
    assert all(m._packed_weight is None for m in linears)


def test_the_enhancers_stored_form_holds_onednns_copies_not_the_files_pages(int8_files, monkeypatch):
    """Where the converted form would stream, the enhancer holds its layers as stored and runs them as the image path
    does: oneDNN's copies made when it is placed and the file's pages under them handed back, as its plan counts."""
    from types import SimpleNamespace

    from zimage_lite.enhance import hold_for_decoding
    from zimage_lite.models.qwen3 import Qwen3Encoder
    from zimage_lite.runtime.placement import place
    from zimage_lite.weights.components import open_language_model

    monkeypatch.setenv("ZIMAGE_LITE_INT8_ROUTE", "onednn")
    cfg, source = open_language_model(int8_files[2])
    with torch.device("meta"):
        model = Qwen3Encoder(cfg, lm=True)
    model = place(model, source, None, torch.device("cpu"), torch.float32, "text encoder (enhancer)")
    hold_for_decoding(model, SimpleNamespace(unpacked=False, head="view"), torch.float32)
    linears = [m for m in model.modules() if isinstance(m, QLinear)]
    assert linears and all(getattr(m, "_packed_for", None) == m.weight.data_ptr() for m in linears)
    if RELEASES_FILE_PAGES:  # measured 0.097x the weights' bytes (their edge pages); kept, ~1.05x (as above)
        assert sum(resident_bytes_under(m.weight) for m in linears) < sum(m.weight.numel() for m in linears) / 4
    source.close()


def test_the_enhancer_makes_no_onednn_copies(int8_files, monkeypatch):
    """The prompt enhancer converts its layers for decoding (quant/decode_linear.py): its plan counts the converted
    layers, and oneDNN's copies are never made for it (the pipeline's stages make them as they place their models;
    the enhancer's stored form, when the converted one would stream, through `hold_for_decoding`)."""
    from zimage_lite.quant import qlinear

    model, _, te = int8_files
    monkeypatch.setenv("ZIMAGE_LITE_INT8_ROUTE", "onednn")
    calls, prepack = [], qlinear.prepack
    monkeypatch.setattr(qlinear, "prepack", lambda w: calls.append(1) or prepack(w))
    pipe = zimage_lite.load(model, text_encoder=te, device="cpu", dtype="fp32")
    pipe.enhance("a fox", max_tokens=2)
    assert calls == []
    pipe._load("text_encoder")
    assert calls  # precondition: a stage's placement does make them


def test_pipeline_runs_from_int8_dit_and_text_encoder(int8_files):
    model, dit, te = int8_files
    kw = dict(width=32, height=32, steps=2, seed=7)
    image = zimage_lite.load(model, dit=dit, text_encoder=te, device="cpu", dtype="fp32").text_to_image("a fox", **kw)
    ref = zimage_lite.load(model, device="cpu", dtype="fp32").text_to_image("a fox", **kw)
    assert image.info["dit_format"] == "int8-convrot256"
    # mean |diff| in 8-bit levels: measured 0.72 (1.05 with 7-bit activations, AVX2); tolerance 3
    assert np.abs(np.asarray(image, np.float32) - np.asarray(ref, np.float32)).mean() < 3


def test_rowwise_file_reads_and_runs(int8_files):
    model, _, _ = int8_files
    rowwise = int8_files[1].with_name("z_image_turbo_int8_rowwise.safetensors")
    got, want = _load(rowwise), _load(model / "transformer")
    g = torch.Generator().manual_seed(2)
    x, t, caps = torch.randn(1, 16, 16, 16, generator=g), torch.tensor([0.3]), [torch.randn(12, 256, generator=g)]
    with torch.no_grad():
        assert rel_err(got(x, t, caps), want(x, t, caps)) < 0.08  # max-relative, measured 0.027


# ---- bad input


def _broken(tmp_path: Path, dit: Path, edit) -> Path:
    tensors = load_file(dit)
    edit(tensors)
    path = tmp_path / "broken.safetensors"
    save_file(tensors, path)
    return path


def test_unknown_format_is_refused(int8_files, tmp_path, capsys):
    model, dit, _ = int8_files
    tag = "layers.0.attention.out.comfy_quant"

    def edit(t):
        t[tag] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)

    broken = _broken(tmp_path, dit, edit)
    with pytest.raises(UnsupportedQuantError, match="float8_e4m3fn"):
        open_component(broken, "dit")
    refused(capsys, ["run", "x", "--model", str(model), "--dit", str(broken), "--out",
                     str(tmp_path / "x.png")], tag, "float8_e4m3fn", watch=(tmp_path,))


def test_missing_weight_scale_is_refused(int8_files, tmp_path, capsys):
    model, dit, _ = int8_files
    gone = "layers.1.feed_forward.w3.weight_scale"
    broken = _broken(tmp_path, dit, lambda t: t.pop(gone))
    with pytest.raises(CheckpointError, match=f"tensor {gone} is missing"):
        open_component(broken, "dit")
    refused(capsys, ["run", "x", "--model", str(model), "--dit", str(broken), "--out",
                     str(tmp_path / "x.png")], gone, watch=(tmp_path,))


@pytest.mark.parametrize("route", ["onednn", "int_mm", "float"])
def test_int8_compute_converts_gguf_linears(int8_files, tmp_path, monkeypatch, route):
    """Each int8 route forced in turn (the machine's own choice is whichever it timed fastest)."""
    from zimage_lite.quant.int8_compute import ROUTE_ENV

    monkeypatch.setenv(ROUTE_ENV, route)
    model, _, _ = int8_files
    [q8] = [r.path for r in convert(model, "Q8_0", component="dit", out=tmp_path)]
    kw = dict(width=32, height=32, steps=2, seed=7)
    plain = zimage_lite.load(model, dit=q8, device="cpu", dtype="fp32")
    converted = zimage_lite.load(model, dit=q8, device="cpu", dtype="fp32", int8_compute=True)
    table = converted.tensor_table("dit")
    assert plain.tensor_table("dit")["layers.0.feed_forward.w1.weight"][1] == "Q8_0"
    assert table["layers.0.feed_forward.w1.weight"][1] == "int8-convrot256"  # as converted: what the plan sizes
    assert table["layers.0.feed_forward.w2.weight"][1] == "F16"  # 682 inputs fit no Q8_0 block: F16, left alone
    assert table["noise_refiner.0.attention.to_q.weight"][1] == "BF16"  # float in the file: left alone
    a, b = plain.text_to_image("a fox", **kw), converted.text_to_image("a fox", **kw)
    # mean |diff| in 8-bit levels: measured 0.345 (onednn and int_mm: the same integers), 0.255 (float); tolerance 2.5
    assert np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean() < 2.5
    # the image says it ran so: --from-png runs it so again
    assert converted.run_params("a fox", **kw)["int8_compute"] is True
    assert "int8_compute" not in plain.run_params("a fox", **kw)


W1 = "layers.0.feed_forward.w1.weight"


def _converting(int8_files, tmp_path: Path):
    """(a Q8_0 DiT file of the int8 test model, an --int8-compute source over it, w1 as stored there)."""
    from zimage_lite.runtime.sizes import layout
    from zimage_lite.weights.comfy_quant import Int8ComputeSource

    [q8] = [r.path for r in convert(int8_files[0], "Q8_0", component="dit", out=tmp_path)]
    comp = open_component(q8, "dit")
    return q8, Int8ComputeSource(comp.source, layout(comp.config).linears), comp.source.get(W1)


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux: resident pages per mapping")
def test_int8_compute_leaves_no_file_pages_resident_under_its_copy(int8_files, tmp_path):
    """A converted weight is an int8 copy: the GGUF pages it was read from leave the process's RSS (the plan
    counts the copy only; full size, the Q4_K_M DiT's 4.6 GiB stayed resident beside it)."""
    q8, source, stored = _converting(int8_files, tmp_path)
    assert int(stored.data.sum()) >= 0 and resident_bytes_of(q8) >= stored.data.numel()  # read: resident
    converted = source.get(W1)
    assert converted.qtype == CONVROT and resident_bytes_of(q8) == 0
    source.close()


def test_int8_compute_converts_a_chunk_of_rows_at_a_time(int8_files, tmp_path, monkeypatch):
    """The same int8 rows and scales as converting the whole weight at once, with fp32 temporaries of a chunk
    (beyond the int8 result, measured: 16.0 bytes a weight of a 48-row chunk of the 682 x 256 w1, 0.20 MB; the
    whole weight at once 2.80 MB, 14x the bound of 20 bytes a chunk weight)."""
    from fixtures import allocated_peak

    from zimage_lite.weights import comfy_quant

    _, source, stored = _converting(int8_files, tmp_path)
    whole_q, whole_scale = quantize_weight(stored.dequantize(torch.float32), CONVROT)
    monkeypatch.setattr(comfy_quant, "CONVERT_CHUNK_WEIGHTS", 48 * stored.shape[1])  # 15 chunks
    peak = allocated_peak(lambda: source.get(W1))
    converted = source.get(W1)
    assert torch.equal(converted.data.view(torch.int8), whole_q)
    assert torch.equal(converted.state[0], whole_scale.reshape(-1))
    output = converted.data.numel() + 4 * converted.shape[0]
    assert peak - output < 20 * 48 * stored.shape[1]  # bytes a weight of one chunk, not of the whole weight
    source.close()


def test_int8_compute_converts_in_one_reused_chunk_buffer(int8_files, tmp_path, monkeypatch):
    """A conversion reuses one fp32 chunk buffer, worked in place: no chunk-sized temporary per operation, each of
    which is a fresh mapping in the pipeline faulted in page by page (full-size Q4_K_M text encoder: 45.7 s to
    convert, 13.5 s in place). Counted: allocations of a chunk's fp32 size or more, 16 for 15 chunks (the int8
    result, the buffer, rotate's chunk-sized product per chunk but the last, shorter one), held to 17; 72 with a
    new tensor per operation."""
    from torch.profiler import ProfilerActivity, profile

    from zimage_lite.weights import comfy_quant

    _, source, stored = _converting(int8_files, tmp_path)
    chunk = 48 * stored.shape[1]
    monkeypatch.setattr(comfy_quant, "CONVERT_CHUNK_WEIGHTS", chunk)  # 15 chunks
    source.get(W1)  # warm: the dequantize kernels' kept temporaries
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        source.get(W1)
    large = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.nbytes() >= 4 * chunk]
    assert len(large) <= 15 + 2, len(large)
    source.close()


def test_from_png_keeps_int8_compute(int8_files, tmp_path):
    from zimage_lite.cli import build_parser
    from zimage_lite.image import save_image
    from zimage_lite.rerun import apply_image_params

    model, _, _ = int8_files
    pipe = zimage_lite.load(model, device="cpu", dtype="fp32", int8_compute=True)
    png = tmp_path / "a.png"
    save_image(pipe.text_to_image("a fox", width=32, height=32, steps=1, seed=7), png,
               pipe.run_params("a fox", width=32, height=32, steps=1, seed=7))
    args = build_parser().parse_args(["run", "--from-png", str(png)])
    apply_image_params(args, set())
    assert args.int8_compute is True


def test_int8_compute_with_streamed_blocks_is_refused(int8_files, tmp_path, capsys):
    """A streamed block is read again at every step on the CPU, so its conversion would be repeated: refused by
    name with what to do; at a budget that keeps every block resident the same run goes."""
    model, _, _ = int8_files
    [q8] = [r.path for r in convert(model, "Q8_0", component="dit", out=tmp_path)]
    argv = ["run", "a fox", "--model", str(model), "--dit", str(q8), "--int8-compute", "--device", "cpu", "--dtype",
            "fp32", "--width", "32", "--height", "32", "--steps", "1"]
    out = tmp_path / "out"
    out.mkdir()
    refused(capsys, [*argv, "--ram", "20MiB", "--out", str(out / "a.png")], "--int8-compute", "--ram", "DiT",
            "streams", watch=(out,))
    from zimage_lite.cli import main

    # `plan` shows the plan and says run would refuse it
    assert main(["plan", "--model", str(model), "--dit", str(q8), "--int8-compute", "--device", "cpu", "--dtype",
                 "fp32", "--width", "32", "--height", "32", "--ram", "20MiB"]) == 0
    captured = capsys.readouterr()
    assert "note: --int8-compute: under --ram" in captured.err and "streamed" in captured.out
    assert main([*argv, "--ram", "60MiB", "--out", str(out / "a.png")]) == 0


def test_rotates_temporary_stays_under_the_mapping_threshold():
    """Outside a DiT forward blocks from HOST_MMAP_THRESHOLD up are fresh mappings, faulted in page by page:
    `rotate`'s one temporary (ROTATE_CHUNK fp32 values) stays under it (--int8-compute converting the Q4_K_M text
    encoder: 21.3 s with a 1 MiB temporary, 13.5 s with 512 KiB)."""
    from zimage_lite.runtime.memory import HOST_MMAP_THRESHOLD

    assert 4 * convrot.ROTATE_CHUNK < HOST_MMAP_THRESHOLD


def test_the_plan_counts_only_what_int8_compute_converts_as_converted(int8_files, tmp_path, monkeypatch):
    """--int8-compute converts GGUF Linears only: beside a ConvRot DiT (views of its file, whose pages go back once
    oneDNN has copied them) a Q8_0 text encoder is converted (its int8 copies stay beside oneDNN's), and the plan
    counts each component as it is held."""
    model, dit, _ = int8_files
    monkeypatch.setenv("ZIMAGE_LITE_INT8_ROUTE", "onednn")
    [q8] = [r.path for r in convert(model, "Q8_0", component="text-encoder", out=tmp_path)]
    plans = [zimage_lite.load(model, dit=dit, text_encoder=q8, device="cpu", dtype="fp32", int8_compute=on)
             .make_plan(256, 256, 0.0, 40) for on in (False, True)]
    assert plans[1].request.converted == {"text_encoder"}
    assert plans[1].stage("dit").resident_bytes == plans[0].stage("dit").resident_bytes
    assert plans[1].stage("text_encoder").resident_bytes > plans[0].stage("text_encoder").resident_bytes
