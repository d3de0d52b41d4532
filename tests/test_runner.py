"""The block runner: the GPU streamer's ordering proven on the CPU with the simulated device, passes cut short,
pinned memory (loud fallback, freed at the end of a stage), and placement against its plan.

The simulated device defers every copy until the compute stream waits for it and poisons its destination until
then, and checks each slot's states; so a streamer that forgets a wait, or prefetches into the slot in use, fails
here on every run. The CUDA tests at the end skip without a GPU.
"""

from __future__ import annotations

import contextlib
import gc
import warnings
import weakref
from dataclasses import replace

import numpy as np
import pytest
import torch
from fixtures import KQUANT, TINY, rel_err

import zimage_lite
from zimage_lite.errors import OptionError
from zimage_lite.models.dit import ZImageDiT
from zimage_lite.runtime.devices import CpuDevice, CudaDevice, SimulatedDevice, SlotStateError
from zimage_lite.runtime.placement import PlanMismatchWarning, place
from zimage_lite.runtime.plan import PlanRequest, make_plan, minimum_budget
from zimage_lite.runtime.sizes import source_table
from zimage_lite.runtime.streamer import PageableMemoryWarning, Streamer
from zimage_lite.weights.components import open_dit

cuda = pytest.mark.cuda  # skipped without a GPU (conftest); benchmarks/gpu_check.sh selects these
LAYOUT_TOL = 1e-5  # streamed vs resident on the CPU: the BLAS picks kernels by alignment (measured 1.8e-6)


def _dit_plan(device: str = "cuda", extra: int = 0, dtype: str = "fp32"):
    """The tiny DiT's stage plan at the smallest budget that fits (every block streams) plus `extra` bytes."""
    req = PlanRequest(config=TINY, budget=1, quant="F32", width=48, height=64, device=device, dtype=dtype,
                      caption_tokens=20)
    return make_plan(replace(req, budget=minimum_budget(req) + extra)).stage("dit")


def _placed(tiny_model, stage, device) -> ZImageDiT:
    cfg, src = open_dit(tiny_model / "transformer")
    with torch.device("meta"):
        model = ZImageDiT(cfg)
    return place(model, src, stage, device, torch.float32, "DiT")


def _inputs(device="cpu"):
    g = torch.Generator().manual_seed(0)
    x, t, caps = torch.randn(1, 16, 12, 10, generator=g), torch.tensor([0.4]), [torch.randn(20, 48, generator=g)]
    return x.to(device), t.to(device), [c.to(device) for c in caps]


def _points_home(runner, block) -> bool:
    """Every tensor of a streamed block is a view of the block's own host bytes."""
    home = runner.host[id(block)].untyped_storage().data_ptr()
    return all(getattr(t.owner, t.leaf).untyped_storage().data_ptr() == home for t in runner.layout[id(block)])


def _synchronous(tiny_model, stage) -> torch.Tensor:
    """The DiT's output placed by `stage` on the synchronous CPU device: no ordering to get wrong, and the same
    memory layout as the simulated run (so the same BLAS kernels: equal bits)."""
    with torch.no_grad():
        return _placed(tiny_model, stage, CpuDevice())(*_inputs())


@pytest.fixture(scope="module")
def oracle(tiny_model):
    return _synchronous(tiny_model, _dit_plan())


def test_plans_stream_blocks():
    """Preconditions of the tests below: the smallest plan streams every block; a larger one keeps some."""
    assert _dit_plan().resident == () and len(_dit_plan().streamed) == 6
    mixed = _dit_plan(extra=3 * _dit_plan().slot_bytes // 2)
    assert 0 < len(mixed.resident) < 6


@pytest.mark.parametrize("extra", [0, 3], ids=["all-streamed", "mixed"])
def test_simulated_streaming_equals_the_synchronous_run(tiny_model, extra):
    stage = _dit_plan(extra=extra * _dit_plan().slot_bytes // 2)
    want = _synchronous(tiny_model, stage)
    sim = SimulatedDevice()
    model = _placed(tiny_model, stage, sim)
    with torch.no_grad():
        for _ in range(2):  # the second pass reuses the slots
            assert torch.equal(model(*_inputs()), want)
    assert sim.bytes_copied == 2 * stage.transfer_bytes and sim.in_flight == 0


def test_streamed_layout_gives_the_resident_output(tiny_model, oracle):
    with torch.no_grad():
        assert rel_err(oracle, _placed(tiny_model, None, CpuDevice())(*_inputs())) < LAYOUT_TOL


class _Forgetful(SimulatedDevice):
    """A device whose `wait` on one stream does nothing: what the streamer without that wait would do."""

    def __init__(self, stream: str) -> None:
        super().__init__()
        self.skip = stream

    def wait(self, event, stream) -> None:
        if stream != self.skip:
            super().wait(event, stream)


@pytest.mark.parametrize("stream,message", [("copy", "copy into device buffer 0 while it is done"),
                                            ("compute", "compute on device buffer 0 while it is filling")])
def test_a_missing_wait_fails(tiny_model, stream, message):
    model = _placed(tiny_model, _dit_plan(), _Forgetful(stream))
    with pytest.raises(SlotStateError, match=message), torch.no_grad():
        model(*_inputs())


def test_simulated_copies_land_at_the_wait_and_poison_until_then():
    sim = SimulatedDevice()
    slot, host = sim.device_buffer(8), sim.host_buffer(8, pin=True)
    host.copy_(torch.arange(8, dtype=torch.uint8))
    copied, freed = sim.event(), sim.event()
    with pytest.raises(SlotStateError, match="while it is free"):
        sim.compute_on(slot)
    sim.copy(slot, host)
    sim.record(copied, "copy")
    assert (slot == 0xFF).all() and torch.isnan(slot[:4].view(torch.float32)).all()
    with pytest.raises(SlotStateError, match="while it is filling"):
        sim.copy(slot, host)
    sim.wait(copied, "compute")
    assert torch.equal(slot, host)
    sim.compute_on(slot)
    with pytest.raises(SlotStateError, match="while it is in use"):
        sim.copy(slot, host)
    sim.compute_done(slot)
    sim.wait(freed, "copy")  # never recorded: waits for nothing
    with pytest.raises(SlotStateError, match="while it is done"):
        sim.copy(slot, host)
    sim.record(freed, "compute")
    sim.wait(freed, "copy")
    assert (slot == 0xFF).all()  # handed back: a later copy may land at any moment
    sim.copy(slot, host)


class _Boom(Exception):
    pass


@pytest.mark.parametrize("how", ["raise", "break", "stop"])
def test_a_pass_cut_short_restores_every_block(tiny_model, oracle, how):
    sim = SimulatedDevice()
    model = _placed(tiny_model, _dit_plan(), sim)
    runner, seen = model.runner, []
    with pytest.raises(_Boom) if how == "raise" else contextlib.nullcontext():
        with runner.run() as blocks:
            for i, block in enumerate(blocks):
                seen.append(block)
                if i == 2:
                    if how == "raise":
                        raise _Boom
                    if how == "break":
                        break
                    runner.stop()
    assert len(seen) == 3  # stop(): the blocks after the one computing are skipped
    assert all(_points_home(runner, b) for b in runner.order)
    assert sim.in_flight == 0 and not sim.pending  # block 3's prefetch was waited for, not left in flight
    with torch.no_grad():
        assert torch.equal(model(*_inputs()), oracle)  # the next pass starts clean


def test_cpu_streaming_restores_on_exception(tiny_model):
    model = _placed(tiny_model, _dit_plan("cpu"), torch.device("cpu"))
    with pytest.raises(_Boom), model.runner.run() as blocks:
        block = next(blocks)
        assert block.attention_norm1.weight.device.type == "cpu"  # read from the memory map for this pass
        raise _Boom
    assert all(p.device.type == "meta" for b in model.schedule() for p in b.module.parameters())


def test_pinning_failure_falls_back_loudly(tiny_model, oracle, monkeypatch):
    def refuse(self, nbytes, pin):
        if pin:
            raise RuntimeError("CUDA error: out of memory")
        return torch.empty(nbytes, dtype=torch.uint8)

    monkeypatch.setattr(SimulatedDevice, "host_buffer", refuse)
    with pytest.warns(PageableMemoryWarning, match=r"could not pin 64\.00 MiB .*ulimit -l"):
        model = _placed(tiny_model, _dit_plan(), SimulatedDevice())
    assert model.runner.pageable_bytes == model.runner.host_bytes > 0  # recorded, for the pipeline to report
    with torch.no_grad():
        assert torch.equal(model(*_inputs()), oracle)


def test_close_frees_the_pinned_chunks(tiny_model):
    sim = SimulatedDevice()
    model = _placed(tiny_model, _dit_plan(), sim)
    with torch.no_grad():
        model(*_inputs())
    runner = model.runner
    chunks = [weakref.ref(c) for c in runner.chunks]
    assert chunks and sim.live_host_bytes == runner.host_bytes
    runner.close()
    gc.collect()
    assert all(c() is None for c in chunks) and sim.live_host_bytes == 0
    assert all(p.device.type == "meta" for b in model.schedule() for p in b.module.parameters())
    with pytest.raises(RuntimeError, match="closed"), runner.run():
        pass


def test_pipeline_closes_the_runner_when_a_stage_ends(tiny_model):
    pipe = zimage_lite.load(tiny_model, device="cpu", dtype="fp32")
    sim = SimulatedDevice()
    pipe._models["dit"] = _placed(tiny_model, _dit_plan(), sim)
    pipe._release("dit")
    gc.collect()
    assert "dit" not in pipe._models and sim.live_host_bytes == 0


@pytest.mark.parametrize("fmt", ["Q4_K_M", "int8", "nf4"])
def test_placement_agrees_with_the_plan_of_a_quantized_file(kq_model, tmp_path, fmt):
    """Packed weights: the plan sizes each one as placement holds it (bitsandbytes scales as their own buffers)."""
    from quantize.convert import convert

    [written] = convert(kq_model, fmt, out=tmp_path / ("dit.gguf" if fmt == "Q4_K_M" else "dit"))
    cfg, src = open_dit(written.path)
    req = PlanRequest(config=replace(KQUANT, dit=cfg), budget=1, quant=fmt, width=48, height=64, device="cuda",
                      dtype="bf16", caption_tokens=20, dit_tensors=source_table(src))
    stage = make_plan(replace(req, budget=minimum_budget(req))).stage("dit")
    assert stage.streamed  # precondition: blocks stream, so slots, traffic and pinned chunks are all checked
    with torch.device("meta"):
        model = ZImageDiT(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a PlanMismatchWarning fails the test
        place(model, src, stage, SimulatedDevice(), torch.bfloat16, "DiT")
    assert (model.runner.slot_bytes, model.runner.transfer_bytes) == (stage.slot_bytes, stage.transfer_bytes)


def test_placement_agrees_with_its_plan(tiny_model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = _placed(tiny_model, _dit_plan(), SimulatedDevice())
    stage = _dit_plan()
    assert (model.runner.slot_bytes, model.runner.transfer_bytes, model.runner.host_bytes) == (
        stage.slot_bytes, stage.transfer_bytes, stage.pinned_bytes)


@pytest.mark.parametrize("field,what", [("slot_bytes", "streaming slots"), ("transfer_bytes", "bytes copied"),
                                        ("pinned_bytes", "pinned host memory")])
def test_placement_says_when_it_differs_from_the_plan(tiny_model, field, what):
    stage = _dit_plan()
    planned = replace(stage, **{field: getattr(stage, field) + 64})
    want = getattr(planned, field)
    with pytest.warns(PlanMismatchWarning, match=rf"DiT \(dit stage\).*{what} .* \({want} B\) planned") as seen:
        _placed(tiny_model, planned, SimulatedDevice())
    assert len(seen) == 1 and str(want - 64) in str(seen[0].message)  # both figures, in one warning


def test_plan_and_schedule_must_name_the_same_blocks(tiny_model):
    stage = _dit_plan()
    extra = replace(stage, blocks=(*stage.blocks, "layers.9"), streamed=(*stage.streamed, "layers.9"))
    with pytest.raises(OptionError, match="names block.* layers.9 that the DiT does not have"):
        _placed(tiny_model, extra, SimulatedDevice())
    short = replace(stage, blocks=stage.blocks[:-1], streamed=stage.streamed[:-1])
    with pytest.raises(OptionError, match="leaves out the DiT's block.* layers.1"):
        _placed(tiny_model, short, SimulatedDevice())


def test_streamed_blocks_are_read_one_at_a_time(tiny_model, monkeypatch):
    """Each streamed block goes from the source into its chunk before the next one is read: the component never
    exists whole in host memory."""
    pack, held = Streamer._pack, []

    def watched(self, block, sizes):
        waiting = [b for b in self.order if b is not block and id(b) not in self.host]
        held.append(sum(any(p.device.type != "meta" for p in b.parameters()) for b in waiting))
        pack(self, block, sizes)

    monkeypatch.setattr(Streamer, "_pack", watched)
    _placed(tiny_model, _dit_plan(), SimulatedDevice())
    assert held == [0] * 6  # no block waiting for its turn was loaded early


# ---- on a GPU -------------------------------------------------------------------------------------------------------
class _InOrderCuda(CudaDevice):
    """CUDA with every copy on the compute stream: in order by construction, nothing to overlap or to get wrong."""

    def copy(self, dst, src) -> None:
        dst.copy_(src)


@cuda
@pytest.mark.parametrize("extra", [0, 3], ids=["all-streamed", "mixed"])
def test_cuda_streaming_equals_resident(tiny_model, extra):
    """Side-stream copies give the bits of in-order copies (same slots, same kernels: torch.equal), and the resident
    model's output up to the BLAS' choice of kernels by pointer alignment (slot views are 64-byte aligned)."""
    stage = _dit_plan(extra=extra * _dit_plan().slot_bytes // 2)
    model = _placed(tiny_model, stage, torch.device("cuda"))
    assert isinstance(model.runner.device, CudaDevice) and model.runner.pageable_bytes == 0
    assert model.runner.transfer_bytes == stage.transfer_bytes > 0
    with torch.no_grad():
        in_order = _placed(tiny_model, stage, _InOrderCuda(torch.device("cuda")))(*_inputs("cuda"))
        resident = _placed(tiny_model, None, torch.device("cuda"))(*_inputs("cuda"))
        for _ in range(3):
            got = model(*_inputs("cuda"))
            assert torch.equal(got, in_order)
        assert rel_err(got, resident) < LAYOUT_TOL


@cuda
def test_cuda_close_returns_the_pinned_memory(tiny_model):
    stats = getattr(torch.cuda, "host_memory_stats", None)
    if stats is None or not hasattr(getattr(torch, "accelerator", None), "empty_host_cache"):
        pytest.skip("this torch cannot report or empty its pinned host cache")
    torch.accelerator.empty_host_cache()
    before = stats().get("allocated_bytes.current", 0)
    model = _placed(tiny_model, _dit_plan(), torch.device("cuda"))
    assert model.runner.pageable_bytes == 0
    assert stats()["allocated_bytes.current"] - before == model.runner.host_bytes  # chunks, no rounding
    with torch.no_grad():
        model(*_inputs("cuda"))
    model.runner.close()
    gc.collect()
    assert stats()["allocated_bytes.current"] == before


class _SlowBlock(torch.nn.Module):
    """A large packed weight applied many times: slow compute on a big slot, to widen any race window."""

    def __init__(self, weight, repeats: int = 12) -> None:
        super().__init__()
        from zimage_lite.quant.qlinear import QLinear

        self.linear, self.repeats = QLinear(weight, None), repeats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.repeats):
            x = torch.tanh(self.linear(x))
        return x


class _Stack(torch.nn.Module):
    def __init__(self, blocks) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)

    def forward(self, x, runner):
        with runner.run() as blocks:
            for block in blocks:
                x = block(x)
        return x


@cuda
def test_cuda_race_amplifier():
    """8 large Q4_K blocks, all streamed, slow compute: any copy that lands early or late changes the bits."""
    from gguf import GGMLQuantizationType as Q

    from zimage_lite.models.layers import Resident
    from zimage_lite.quant.formats import quantize
    from zimage_lite.quant.qlinear import QTensor

    g = torch.Generator(device="cuda").manual_seed(0)
    side = 4096  # 9.4 MB packed per block, 75 MB streamed per pass
    weights = [QTensor(torch.from_numpy(quantize(torch.randn(side, side, device="cuda", generator=g) / 64, Q.Q4_K)),
                       Q.Q4_K, (side, side)) for _ in range(8)]
    streamed = _Stack([_SlowBlock(w) for w in weights]).eval()
    resident = _Stack([_SlowBlock(w) for w in weights]).cuda().eval()
    runner = Streamer(list(streamed.blocks), [True] * 8, CudaDevice(torch.device("cuda")))
    assert runner.pageable_bytes == 0 and runner.transfer_bytes >= 8 * side * side * 9 // 16
    x = torch.randn(256, side, device="cuda", generator=g, dtype=torch.bfloat16)
    with torch.no_grad():
        want = resident(x, Resident(list(resident.blocks)))
        assert torch.isfinite(want).all()
        for _ in range(5):
            assert torch.equal(streamed(x, runner), want)
    runner.close()


@cuda
def test_cuda_pipeline_streams_under_a_tiny_budget(tiny_model):
    """Through the pipeline: a --vram that streams DiT blocks renders what the resident run renders."""
    kwargs = dict(width=48, height=64, steps=2, seed=3)
    resident = np.asarray(zimage_lite.load(tiny_model, device="cuda", dtype="fp32").text_to_image("x", **kwargs))
    probe = zimage_lite.load(tiny_model, device="cuda", dtype="fp32", vram="80GB")
    request = probe.make_plan(48, 64, 0.0, caption_tokens=probe.tokenizer.encode("x").ids.shape[0]).request
    least = minimum_budget(request) + request.headroom  # the smallest --vram this run accepts
    pipe = zimage_lite.load(tiny_model, device="cuda", dtype="fp32", vram=least)
    streamed = np.asarray(pipe.text_to_image("x", **kwargs))
    assert pipe.plan.stage("dit").streamed  # precondition: the budget really streams
    # the DiT's output differs by ~1e-6 (kernels chosen by alignment), which may round a pixel the other way
    assert np.abs(streamed.astype(int) - resident).max() <= 1
