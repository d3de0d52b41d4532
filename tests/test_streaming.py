"""Running under a memory plan: streamed blocks, chunked attention, tiled VAE, fp16 guards, bad budgets.

The CUDA tests skip cleanly on machines without a GPU; everything else runs on the CPU.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from fixtures import load_model, rel_err

import zimage_lite
from zimage_lite.cli import main
from zimage_lite.errors import BudgetError
from zimage_lite.models import dit as dit_module
from zimage_lite.models.dit import ZImageDiT
from zimage_lite.models.vae import AutoencoderDecoder
from zimage_lite.models.vae_encoder import AutoencoderEncoder
from zimage_lite.runtime.devices import CpuDevice
from zimage_lite.runtime.streamer import Streamer
from zimage_lite.weights.components import open_dit, open_vae

cuda = pytest.mark.cuda  # skipped without a GPU (conftest); benchmarks/gpu_check.sh selects these
FP16_TOL = 0.01  # fp16 vs fp32 DiT forward, relative L2: measured 1.4e-3


def _inputs(seed=0, hw=(12, 10), cap=20):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, *hw, generator=g), torch.tensor([0.4]), [torch.randn(cap, 48, generator=g)]


def test_cpu_streaming_renders_the_resident_image(tiny_model):
    """--ram small enough that every DiT block is read from the memory map at each use."""
    kwargs = dict(width=48, height=64, steps=3, seed=5)
    streamed = zimage_lite.load(tiny_model, device="cpu", dtype="fp32", ram="2MB")
    a = np.asarray(streamed.text_to_image("a fox", **kwargs))
    assert streamed.plan.stage("dit").resident == ()  # nothing held: all 6 blocks streamed
    assert len(streamed.plan.stage("dit").streamed) == 6
    resident = zimage_lite.load(tiny_model, device="cpu", dtype="fp32")
    b = np.asarray(resident.text_to_image("a fox", **kwargs))
    assert resident.plan.stage("dit").streamed == ()
    assert np.array_equal(a, b)


def test_block_slots_give_the_resident_output(tiny_model):
    """The streamer's slot bookkeeping (blocks in host chunks, two alternating device slots), on the CPU device."""
    ref = load_model(ZImageDiT, open_dit, tiny_model / "transformer")
    model = load_model(ZImageDiT, open_dit, tiny_model / "transformer")
    blocks = [b.module for b in model.schedule()]
    streamed = [i % 3 != 0 for i in range(len(blocks))]
    streamer = Streamer(blocks, streamed, CpuDevice())
    model.runner = streamer
    assert streamer.transfer_bytes > 0 and len(streamer.slots) == 2
    x, t, caps = _inputs()
    with torch.no_grad():
        want = ref(x, t, caps)
        # Not bit-exact: the BLAS picks kernels by pointer alignment, and slot views align differently (measured
        # 1.8e-6; tolerance 1e-5).
        assert rel_err(model(x, t, caps), want) < 1e-5
        assert rel_err(model(x, t, caps), want) < 1e-5  # a second step reuses the same slots


def test_chunked_attention_matches(tiny_model):
    model = load_model(ZImageDiT, open_dit, tiny_model / "transformer")
    x, t, caps = _inputs(1, (16, 16), 40)
    with torch.no_grad():
        want = model(x, t, caps)
        model.set_attention_chunk(24)
        got = model(x, t, caps)
    # measured 0 (each query row is computed as without chunks); 8 float32 ulps for kernels' summation order
    assert rel_err(got, want) <= 1e-6


# Tiled vs untiled VAE: float rounding only (whole-map GroupNorm statistics summed group by group, the norm folded
# into one multiply-add). Measured on these inputs: decode 7.7e-7 .. 9.0e-7, encode 5.8e-7 .. 7.6e-7.
TILE_TOL = 8e-6


@pytest.mark.parametrize("tile", [16, 9, 5])  # 16: 3x2 tiles; 9 and 5: ragged edges
def test_tiled_vae_decode_matches_untiled(tiny_model, tile):
    vae = load_model(AutoencoderDecoder, open_vae, tiny_model / "vae")
    lat = torch.randn(1, 16, 40, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole, tiled = vae.decode(lat), vae.decode(lat, tile=tile)
    assert tiled.shape == whole.shape == (1, 3, 320, 192)
    assert rel_err(tiled, whole) <= TILE_TOL


@pytest.mark.parametrize("tile", [16, 9, 5])
def test_tiled_vae_encode_matches_untiled(tiny_model, tile):
    vae = load_model(AutoencoderEncoder, open_vae, tiny_model / "vae")
    image = torch.rand(1, 3, 320, 192, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        whole, tiled = vae.encode(image), vae.encode(image, tile=tile)
    assert tiled.shape == whole.shape == (1, 16, 40, 24)
    assert rel_err(tiled, whole) <= TILE_TOL


def test_fp16_guard_keeps_latents_finite(tiny_model, monkeypatch):
    """FFN weights scaled so that silu(w1 x) * w3 x exceeds fp16's range (each factor stays in it), as in the real
    model: without the guard the output is not finite (the precondition: this input does overflow), with it every
    value is finite."""
    model = load_model(ZImageDiT, open_dit, tiny_model / "transformer", torch.float16)
    for block in [b.module for b in model.schedule()]:
        block.feed_forward.w1.weight.data *= 300
        block.feed_forward.w3.weight.data *= 300
    x, t, caps = _inputs()
    x, caps = x.half(), [c.half() for c in caps]
    with torch.no_grad():
        with monkeypatch.context() as m:
            m.setattr(dit_module, "fp16_guard", lambda t: t)
            unguarded = model(x, t, caps)
        guarded = model(x, t, caps)
    assert not torch.isfinite(unguarded).all()
    assert torch.isfinite(guarded).all()


def test_fp16_run_agrees_with_fp32(tiny_model):
    ref = load_model(ZImageDiT, open_dit, tiny_model / "transformer")
    half = load_model(ZImageDiT, open_dit, tiny_model / "transformer", torch.float16)
    x, t, caps = _inputs()
    with torch.no_grad():
        a, b = ref(x, t, caps), half(x.half(), t, [c.half() for c in caps]).float()
    assert float((a - b).norm() / a.norm()) < FP16_TOL


def test_out_of_memory_mid_run_gives_advice(tiny_model, tmp_path, capsys, monkeypatch):
    """A real allocation failure of the CPU allocator (torch raises a plain RuntimeError there, not
    OutOfMemoryError) mid-run: one line of advice, exit 2, nothing written."""
    def oom(*args, **kwargs):
        # 4 EiB: malloc fails at once, nothing is touched. In a thread of its own: glibc moves a thread whose malloc
        # failed to another arena for good (arena_get_retry), where blocks over 64 MiB are always mappings of their
        # own, so the heap tests of test_memory_plan would fail after this one in the same process
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(torch.empty, 2**62, dtype=torch.uint8).result()

    with pytest.raises(RuntimeError, match="can't allocate memory"):  # precondition: not an OutOfMemoryError
        oom()
    monkeypatch.setattr(ZImageDiT, "forward", oom)
    out = tmp_path / "o.png"
    code = main(["run", "x", "--model", str(tiny_model), "--width", "32", "--height", "32", "--device", "cpu",
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "out of cpu memory" in err and "peak device memory" in err and "--ram" in err
    assert "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_other_runtime_errors_are_not_called_out_of_memory(tiny_model, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(ZImageDiT, "forward", broken)
    pipe = zimage_lite.load(tiny_model, device="cpu", dtype="fp32")
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        pipe.text_to_image("x", width=32, height=32, steps=1, seed=0)


@pytest.mark.parametrize("flag,value", [("--vram", "4XB"), ("--ram", "-1GB"), ("--ram", "")])
def test_bad_budget_strings(tiny_model, tmp_path, capsys, flag, value):
    code = main(["run", "x", "--model", str(tiny_model), f"{flag}={value}", "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code == 2 and flag in err and "4GB" in err
    assert list(tmp_path.iterdir()) == []


def test_budget_too_small_names_the_smallest(tiny_model, tmp_path, capsys):
    """The suggested --ram is the smallest plan's need rounded up to a whole MB, and the run fits in it."""
    args = ["run", "x", "--model", str(tiny_model), "--width", "64", "--height", "64", "--dtype", "fp32", "--out",
            str(tmp_path / "o.png")]
    code = main([*args, "--ram", "100KB"])
    err = capsys.readouterr().err
    assert code == 2 and "--ram" in err and "is too small" in err
    assert list(tmp_path.iterdir()) == []
    need = float(re.search(r"the smallest plan needs ([\d.]+) MiB", err).group(1)) * 2**20  # to 0.005 MiB
    suggested = re.search(r"Try --ram (\d+)MB", err).group(1)
    assert 0 <= int(suggested) * 1e6 - need + 6e3 and int(suggested) * 1e6 - need - 6e3 < 1e6
    assert main([*args, "--ram", f"{suggested}MB"]) == 0 and (tmp_path / "o.png").exists()


def test_plan_command_without_files(capsys):
    assert main(["plan", "--preset", "turbo", "--quant", "Q4_K_M", "--width", "1024", "--height", "1024",
                 "--vram", "4GB", "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("peak device memory:"))
    assert float(line.split()[3]) <= 3.6
    assert "transfer per step" in out


@pytest.mark.parametrize("preset,want", [("turbo", "1024x1024, cfg off"), ("base", "1024x1024, cfg on"),
                                         ("demo", "256x256, cfg off")])
def test_plan_command_takes_the_presets_defaults(capsys, preset, want):
    assert main(["plan", "--preset", preset, "--device", "cpu", "--ram", "64GB"]) == 0
    assert want in capsys.readouterr().out.splitlines()[0]
    assert main(["plan", "--preset", "base", "--cfg", "0", "--width", "512", "--device", "cpu", "--ram", "64GB"]) == 0
    assert "512x1024, cfg off" in capsys.readouterr().out.splitlines()[0]  # what is given wins


def test_plan_command_on_a_model(tiny_model, capsys):
    assert main(["plan", "--model", str(tiny_model), "--device", "cpu", "--ram", "2MB", "--dtype", "fp32",
                 "--width", "48", "--height", "64", "--prompt-tokens", "24"]) == 0
    assert "streamed: noise_refiner.0-1 context_refiner.0-1 layers.0-1" in capsys.readouterr().out


@cuda
def test_cuda_image_matches_the_cpu_image(tiny_model):
    """The same seed renders the same image on a GPU and on the CPU (noise comes from a seeded CPU generator). The
    budget keeps everything resident: test_runner.py's CUDA tests are the ones that stream."""
    kwargs = dict(width=48, height=64, steps=2, seed=3)
    a = np.asarray(zimage_lite.load(tiny_model, device="cuda", dtype="fp32", vram="600MB").text_to_image("x",
                                                                                                           **kwargs))
    b = np.asarray(zimage_lite.load(tiny_model, device="cpu", dtype="fp32").text_to_image("x", **kwargs))
    assert np.abs(a.astype(int) - b).max() <= 2


def test_budget_error_type():
    from zimage_lite.runtime.plan import plan_for

    with pytest.raises(BudgetError, match="smallest plan needs"):
        plan_for("turbo", "Q4_K_M", 1024, 1024, False, "cuda", 10**8, None)
