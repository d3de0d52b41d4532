"""The integer matmul routes of quant/int8_compute.py: each against the float route, the choice made once per machine,
CUDA's torch._int_mm (skipped without a GPU)."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from zimage_lite.errors import OptionError
from zimage_lite.quant import int8_compute
from zimage_lite.quant.convrot import CONVROT, ROWWISE, quantize_weight
from zimage_lite.quant.int8_compute import ROUTE_ENV, choose_route, cpu_route, int8_linear, prepack, route_for


def _layer(qtype, device="cpu", n=96, k=512):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(n, k, generator=g)
    w[:, ::37] *= 20  # outlier inputs
    q, s = quantize_weight(w, qtype)
    x = torch.randn(2, 7, k, generator=g)
    x[..., 5] *= 30  # an outlier activation channel
    bias = torch.randn(n, generator=g)
    return x.to(device), q.to(device), s.reshape(-1).to(device), bias.to(device)


@pytest.mark.parametrize("qtype", [CONVROT, ROWWISE], ids=lambda t: t.name)
@pytest.mark.parametrize("route", ["onednn", "int_mm"])
def test_routes_match_the_float_route(qtype, route):
    x, q, s, bias = _layer(qtype)
    want = int8_linear(x, q, s, qtype.groupsize, bias, route="float")
    packed = prepack(q) if route == "onednn" else None
    got = int8_linear(x.bfloat16(), q, s, qtype.groupsize, bias, route=route, packed=packed)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 7, 96)
    err = float((got.float() - want).norm() / want.norm())
    # activations per row to int8 (bf16 input): measured 9.2e-3 rotated, 5.1e-2 plain rows (the outlier channel sets
    # each row's scale; the rotation spreads it over 256 inputs); onednn with 7-bit activations (AVX2, no VNNI:
    # onednn_levels) 2.0e-2 and 1.15e-1
    assert err < (0.03 if qtype.groupsize else 0.15)


@pytest.mark.parametrize("levels", ["this cpu's", 63])
def test_the_onednn_route_multiplies_exactly(monkeypatch, levels):
    """Rows that fill every level of the route's activations against int8 weights at +-127: the route's product is
    the exact integer product times the scales. A kernel that saturates pairs of u8 x s8 products at 16 bits (AVX2
    without VNNI) gets 7-bit activations (onednn_levels); at 8 bits its error here was 0.70 (Zen 3). 63: the 7-bit
    form on any CPU (a VNNI one would not use it by itself)."""
    if levels == 63:
        monkeypatch.setattr(int8_compute, "onednn_levels", lambda: 63)
    g = torch.Generator().manual_seed(6)
    x = torch.rand(16, 512, generator=g) + 1.0  # one sign per row: every pair of products adds up
    x[8:] *= -1
    w = torch.where(torch.rand(64, 512, generator=g) < 0.9, 127, -127).to(torch.int8)
    scale = torch.rand(64, generator=g) + 0.5
    given = int8_compute.int8_activations(x, 0, "onednn")
    top = int8_compute.onednn_levels()
    assert given.zero == top + 1 and given.values.min() == 1 and given.values.max() == 2 * top + 1  # every level
    exact = ((given.values.double() - given.zero) @ w.double().t()) * given.scale.double() * scale.double()
    got = int8_linear(x, w, scale, 0, route="onednn", packed=prepack(w), given=given)
    assert float((got.double() - exact).norm() / exact.norm()) < 2e-7  # fp32 output: measured 3.3e-8


def test_a_kernel_inexact_even_at_7_bits_is_not_used(monkeypatch, tmp_path):
    monkeypatch.setenv("ZIMAGE_LITE_CACHE", str(tmp_path))
    monkeypatch.delenv(ROUTE_ENV, raising=False)
    cpu_route.cache_clear()
    monkeypatch.setattr(int8_compute, "time_routes", lambda: {"onednn": 300.0, "int_mm": 5.0, "float": 100.0})
    assert route_for("cpu") == "onednn"  # precondition: the timing picks it
    monkeypatch.setattr(int8_compute, "onednn_levels", lambda: 0)
    assert route_for("cpu") == "float"
    cpu_route.cache_clear()
    # not "float" whatever the figures: the best of the routes left
    (tmp_path / "int8-route.json").unlink()  # timed again
    monkeypatch.setattr(int8_compute, "time_routes", lambda: {"onednn": 400.0, "int_mm": 200.0, "float": 100.0})
    assert cpu_route()["route"] == "onednn" and route_for("cpu") == "int_mm"
    cpu_route.cache_clear()


def _dit_block(g):
    """A DiT block of the K-quant fixture and its call on 8 tokens."""
    from tests.fixtures import KQUANT
    from zimage_lite.models.dit import TransformerBlock, rope_freqs

    cfg = KQUANT.dit
    block = TransformerBlock(cfg, modulation=False)
    x, rope = torch.randn(8, cfg.dim, generator=g), rope_freqs(torch.zeros(8, 3), cfg.axes_dims, cfg.rope_theta)
    return block, lambda: block(x, rope, [8])


def _qwen3_layer(g):
    """A Qwen3 decoder layer of the K-quant fixture (hidden 256, FFN 512) and its call on 8 tokens."""
    from tests.fixtures import KQUANT
    from zimage_lite.models.qwen3 import Qwen3Encoder

    cfg = KQUANT.text_encoder
    encoder = Qwen3Encoder(cfg)
    cos, sin = encoder._rope(0, 8, "cpu", torch.float32)
    layer, x = encoder.layers[0], torch.randn(8, cfg.hidden_size, generator=g)
    return layer, lambda: layer(x, cos, sin)


@pytest.mark.parametrize("model", [_dit_block, _qwen3_layer], ids=["dit", "qwen3"])
@pytest.mark.parametrize("route", ["onednn", "int_mm"])
def test_a_blocks_projections_quantize_each_input_once(monkeypatch, route, model):
    """q, k and v read one input, the FFN's two input projections another: a DiT block or a Qwen3 layer rotates and
    quantizes 4 activations, not 7, and its output is the very same as with one quantization per Linear."""
    from zimage_lite.quant import qlinear
    from zimage_lite.quant.qlinear import QLinear, QTensor

    monkeypatch.setenv(ROUTE_ENV, route)
    g = torch.Generator().manual_seed(5)
    module, call = model(g)
    for owner in list(module.modules()):
        for name, linear in list(owner.named_children()):
            if isinstance(linear, torch.nn.Linear):  # ConvRot where the row fits its groups (DiT w2's 682 does not)
                qtype = CONVROT if linear.in_features % CONVROT.groupsize == 0 else ROWWISE
                q, s = quantize_weight(torch.randn(linear.weight.shape, generator=g), qtype)
                setattr(owner, name, QLinear(QTensor(q.view(torch.uint8), qtype, tuple(q.shape), (s.reshape(-1),)),
                                             None))
    calls, quantize = [], int8_compute.rounded_rows
    monkeypatch.setattr(int8_compute, "rounded_rows", lambda *a: calls.append(1) or quantize(*a))
    with torch.inference_mode():
        shared = call()
        assert len(calls) == 4
        monkeypatch.setattr(qlinear, "_activations_of", lambda *a: None)  # each Linear quantizes its own input
        alone = call()
    assert len(calls) == 4 + 7 and torch.equal(shared, alone)


def test_route_is_chosen_once_and_remembered(monkeypatch, tmp_path):
    monkeypatch.setenv("ZIMAGE_LITE_CACHE", str(tmp_path))
    monkeypatch.delenv(ROUTE_ENV, raising=False)
    cpu_route.cache_clear()
    calls = []
    monkeypatch.setattr(int8_compute, "time_routes",
                        lambda: calls.append(1) or {"onednn": 300.0, "int_mm": 150.0, "float": 100.0})
    assert route_for("cpu") == "onednn"
    cpu_route.cache_clear()  # a new process: read from the cache folder, not timed again
    assert route_for("cpu") == "onednn" and len(calls) == 1
    saved = json.loads((tmp_path / "int8-route.json").read_text())
    assert [e["gflops"]["onednn"] for e in saved.values()] == [300.0]
    cpu_route.cache_clear()
    (tmp_path / "int8-route.json").unlink()
    monkeypatch.setattr(int8_compute, "time_routes", lambda: {"onednn": 90.0, "int_mm": 80.0, "float": 100.0})
    assert route_for("cpu") == "float"  # no integer route faster: dequantize as for any packed type
    cpu_route.cache_clear()


def test_onednn_must_beat_the_routes_without_a_weight_copy_by_its_margin(monkeypatch, tmp_path):
    """oneDNN's blocked weight copy costs memory and a first-call conversion: a near tie goes to the route without
    one (this machine's timing: onednn 254, int_mm 238), a clear win (an AVX2 machine's naive int_mm) to oneDNN.
    A timing remembered under the old rule is chosen again by the new one."""
    assert choose_route({"float": 88.3, "onednn": 254.1, "int_mm": 237.8}) == "int_mm"
    assert choose_route({"float": 99.0, "onednn": 262.0, "int_mm": 6.0}) == "onednn"
    assert choose_route({"float": 200.0, "onednn": 254.0, "int_mm": 6.0}) == "float"
    monkeypatch.setenv("ZIMAGE_LITE_CACHE", str(tmp_path))
    monkeypatch.delenv(ROUTE_ENV, raising=False)
    key = int8_compute._machine_key()
    gflops = {"float": 88.3, "onednn": 254.1, "int_mm": 237.8}
    (tmp_path / "int8-route.json").write_text(json.dumps({key: {"route": "onednn", "gflops": gflops, "machine": key}}))
    monkeypatch.setattr(int8_compute, "time_routes", lambda: pytest.fail("timed again"))
    cpu_route.cache_clear()
    assert route_for("cpu") == "int_mm"
    gflops["onednn"] = None  # another version's file, or a hand-edited one: timed again, not a crash
    (tmp_path / "int8-route.json").write_text(json.dumps({key: {"route": "onednn", "gflops": gflops, "machine": key}}))
    monkeypatch.setattr(int8_compute, "time_routes", lambda: {"onednn": 600.0, "int_mm": 150.0, "float": 100.0})
    cpu_route.cache_clear()
    assert route_for("cpu") == "onednn"
    cpu_route.cache_clear()


def test_forced_route_must_be_known(monkeypatch):
    monkeypatch.setenv(ROUTE_ENV, "avx9000")
    with pytest.raises(OptionError, match=ROUTE_ENV):
        route_for("cpu")


def test_forced_onednn_must_be_able_to_run(monkeypatch):
    """Forcing oneDNN where it cannot run is refused, as the timing would not pick it: off the CPU, and on a CPU
    whose kernel is inexact even at 7 bits (its activations would get no levels: NaN outputs)."""
    monkeypatch.setenv(ROUTE_ENV, "onednn")
    with pytest.raises(OptionError, match="CPU only"):
        route_for("cuda")
    monkeypatch.setattr(int8_compute, "onednn_levels", lambda: 0)
    with pytest.raises(OptionError, match="does not multiply exactly"):
        route_for("cpu")
    # `info` and `plan` report it rather than fail
    assert int8_compute.describe_route("cpu").startswith("none: $ZIMAGE_LITE_INT8_ROUTE=onednn")


@pytest.mark.parametrize("route", ["onednn", "int_mm"])
def test_a_strided_bf16_input_quantizes_as_its_contiguous_copy(route):
    """A transposed bf16 input (rows of two ConvRot groups): its fp32 copy is made contiguous for the rotation to
    write into; the output is the contiguous input's, bit for bit."""
    x, q, s, _ = _layer(CONVROT)
    strided = x[0].bfloat16().t().contiguous().t()  # [7, 512] with a last-axis stride of 7
    assert not strided.is_contiguous()
    packed = prepack(q) if route == "onednn" else None
    got = int8_linear(strided, q, s, 256, route=route, packed=packed)
    assert torch.equal(got, int8_linear(strided.contiguous(), q, s, 256, route=route, packed=packed))
    assert torch.equal(quantize_weight(strided, CONVROT)[0], quantize_weight(strided.contiguous(), CONVROT)[0])


@pytest.mark.cuda
def test_cuda_int_mm_matches_float_route():
    x, q, s, bias = _layer(CONVROT, "cuda")
    assert route_for("cuda") == "int_mm"
    want = int8_linear(x, q, s, 256, bias, route="float")
    got = int8_linear(x, q, s, 256, bias)
    assert float((got - want).norm() / want.norm()) < 0.03  # as on the CPU (same arithmetic)


def test_a_shape_the_kernel_cannot_take_runs_float_before_any_quantization(monkeypatch):
    """CUDA's int8 GEMM wants N and K multiples of 8: such a weight takes the float route, and its Linear decides so
    before it quantizes the (possibly shared) activations."""
    from zimage_lite.quant import qlinear
    from zimage_lite.quant.qlinear import QLinear, QTensor

    shaped = [int8_compute.route_for_shape("int_mm", device, n, k) for device, n, k in
              [("cuda", 12, 512), ("cuda", 96, 20), ("cuda", 96, 512), ("cpu", 12, 20)]]
    assert shaped == ["float", "float", "int_mm", "int_mm"]
    x, q, s, bias = _layer(CONVROT)
    layer = QLinear(QTensor(q.view(torch.uint8), CONVROT, tuple(q.shape), (s,)), bias)
    monkeypatch.setenv(ROUTE_ENV, "int_mm")
    asked = []  # judged "float" as CUDA judges a 12 x 20 weight
    monkeypatch.setattr(qlinear, "route_for_shape", lambda *a: asked.append(a) or "float")
    calls, quantize = [], int8_compute.rounded_rows
    monkeypatch.setattr(int8_compute, "rounded_rows", lambda *a: calls.append(1) or quantize(*a))
    with torch.inference_mode(), qlinear.shared_input(x):
        got = layer(x)
    assert asked == [("int_mm", torch.device("cpu"), 96, 512)]  # the route, the weight's device, N (out) and K (in)
    assert calls == [] and torch.equal(got, int8_linear(x, q, s, CONVROT.groupsize, bias, route="float"))


def test_onednn_copy_is_planned_and_goes_with_its_weight(monkeypatch):
    """The route's blocked weight copy is memory the plan counts on the CPU (sizes.component_bytes), and a streamed
    block dropped to `meta` (runtime/streamer.LazyBlocks) drops it too: it must not outlive the weight. A resident
    weight that views its file holds the copy instead of the file's pages (qlinear.prepare_resident hands them back);
    a streamed one, or one converted at load (--int8-compute), holds both."""
    from tests.fixtures import TINY
    from zimage_lite.quant.qlinear import QLinear, QTensor
    from zimage_lite.runtime.memory import RELEASES_FILE_PAGES
    from zimage_lite.runtime.sizes import component_bytes, recipe_table

    monkeypatch.setenv(ROUTE_ENV, "onednn")
    x, q, s, bias = _layer(CONVROT)
    layer = QLinear(QTensor(q.view(torch.uint8), CONVROT, tuple(q.shape), (s,)), bias)
    layer(x)
    assert layer._packed_weight is not None
    layer.to("meta")
    assert layer._packed_weight is None

    table = recipe_table(TINY.dit, "int8-convrot")
    onednn = component_bytes(TINY.dit, table, "fp32", "the DiT", kind="cpu").blocks
    converted = component_bytes(TINY.dit, table, "fp32", "the DiT", kind="cpu", converted=True).blocks
    monkeypatch.setenv(ROUTE_ENV, "int_mm")
    plain = component_bytes(TINY.dit, table, "fp32", "the DiT", kind="cpu").blocks
    int8 = [sum(math.prod(shape) for n, (shape, fmt) in table.items()
                if n.startswith(b.name + ".") and fmt == CONVROT.name) for b in plain]
    assert any(int8) and all(b.streaming <= b.held for b in plain)  # without a copy: as held, resident or not
    # one more aligned copy of each int8 weight per block, nothing more, nothing less (alignment adds < 64 B each);
    # resident and viewing the file, the copy in place of the weight's pages
    for a, c, b, n in zip(onednn, converted, plain, int8, strict=True):
        assert n <= a.streaming - b.held < n + 64 * 16 and n <= c.held - b.held < n + 64 * 16
        assert abs(a.held - b.held) < 64 * 16 if RELEASES_FILE_PAGES else a.held == a.streaming


def test_a_streamed_int8_block_is_planned_with_its_file_pages(monkeypatch):
    """On the CPU a streamed block's int8 weights are read from the file at each use and copied by oneDNN beside
    them (only a resident weight hands its pages back): its slot holds both, more than the block held resident."""
    from tests.fixtures import TINY
    from zimage_lite.runtime import residency
    from zimage_lite.runtime.plan import PlanRequest, block_stage
    from zimage_lite.runtime.sizes import component_bytes, recipe_table

    monkeypatch.setenv(ROUTE_ENV, "onednn")
    req = PlanRequest(TINY, 1, quant="int8-convrot", device="cpu", dtype="fp32")
    sizes = component_bytes(TINY.dit, recipe_table(TINY.dit, "int8-convrot"), "fp32", "the DiT", kind="cpu")
    stage = block_stage("dit", sizes, 0, TINY.dit.n_heads, 64, req)
    placed = residency.place(stage, "cpu", sum(residency.floor(stage, "cpu")))  # the least: blocks stream
    blocks = {b.name: b for b in sizes.blocks}
    assert placed.streamed and placed.n_slots == 1  # precondition: blocks stream, in one slot
    assert placed.slot_bytes == max(blocks[n].streaming for n in placed.streamed) > blocks[placed.streamed[0]].held


def test_a_route_far_behind_after_the_first_round_is_timed_no_more(monkeypatch):
    """The route timing calls each route once per round; one OUT_OF_RACE times slower than the fastest (an AVX2
    CPU's naive int_mm: 1.4 s a call) is left out after the warm-up round and one timed round, and keeps its best
    figure from those (the warm-up alone does not decide: oneDNN's first call builds its kernels)."""
    calls: dict[str, int] = {}
    real = int8_compute.int8_linear

    def counted(*args, route, **kwargs):
        calls[route] = calls.get(route, 0) + 1
        if route == "int_mm":
            time.sleep(0.1)  # the others take about a millisecond on this product
        return real(*args, route="float", **kwargs)

    monkeypatch.setattr(int8_compute, "int8_linear", counted)
    gflops = int8_compute.time_routes((64, 512, 512), reps=3)
    assert calls == {"float": 4, "onednn": 4, "int_mm": 2}
    assert 0 < gflops["int_mm"] <= 2 * 64 * 512 * 512 / 0.1 / 1e9 < min(gflops["float"], gflops["onednn"])
