"""LoRAs on the DiT as low-rank side paths: parity with diffusers (load_lora_weights + set_adapters, PEFT), on float
and Q8_0 weights, streamed equal to resident (CPU, the simulated GPU streamer, CUDA), the plan's bytes equal to what
placement allocates, the option, the warnings and the run parameters.

fp32 on CPU, the tiny fixture, 4 steps at 64x64; the LoRAs (fixtures.make_lora) touch every linear diffusers can
target (52 on the tiny DiT: both refiners, the main layers, the embedders, the final layer) and move the latents by
12-25%, far above every tolerance here.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import LORA_FORMATS, TINY, load_dequantized, make_lora, optional, refused, rel_err, write_lora
from PIL import Image

import zimage_lite
from zimage_lite.config import DiTConfig
from zimage_lite.image import read_params, save_image
from zimage_lite.loras import DuplicateLoraWarning, Loras
from zimage_lite.models.adapters import AdaptedLinear
from zimage_lite.models.dit import ZImageDiT
from zimage_lite.options import lora_option
from zimage_lite.quant.qlinear import QLinear
from zimage_lite.runtime.devices import SimulatedDevice
from zimage_lite.runtime.memory import aligned
from zimage_lite.runtime.placement import PlanMismatchWarning, place
from zimage_lite.runtime.plan import PlanRequest, make_plan, minimum_budget
from zimage_lite.weights.components import open_dit

diffusers, _ = optional("diffusers")
peft, _ = optional("peft")
transformers, _ = optional("transformers")
needs_reference = pytest.mark.skipif(diffusers is None or peft is None or transformers is None,
                                     reason="needs diffusers, transformers and peft (diffusers' LoRA loading)")

# Final latents against diffusers, fp32: measured 2.3e-7 (one LoRA), 3.2e-7 (scale 0.7), 2.8e-7 (two), Q8_0 3.3e-7,
# each key format 2.5e-7 .. 2.8e-7
LATENT_TOL = 3e-6
IMAGE_TOL = 1  # 8-bit levels, max over all pixels, as tests/test_parity.py
# streamed vs resident (the BLAS picks kernels by alignment), one file twice vs once at the summed scale (the folded
# pair rounds differently): measured 0 (CPU lazy blocks), 4.7e-7 (simulated GPU streamer), 3.2e-7 (twice)
LAYOUT_TOL = 4e-6
MOVED = 0.05  # each LoRA case moves the latents by at least this much (measured 0.13 .. 0.24)
TWO = [("a", 0.7), ("b", 1.3)]
CASES = [[("a", 1.0)], [("a", 0.7)], TWO]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    return {"a": make_lora(folder / "a.safetensors", seed=1), "b": make_lora(folder / "b.safetensors", seed=2, rank=3)}


def _uses(files, case):
    return [(files[name], scale) for name, scale in case]


def _ours(pipe, seed=7, size=64, steps=4):
    done = next(e for e in pipe.generate("a fox", width=size, height=size, steps=steps, seed=seed)
                if e.stage == "decoded")
    return done.latents, done.image, done.info


def _theirs(ref, files, case, seed=7, size=64, steps=4):
    """diffusers with the same LoRAs: one adapter per file, weighted by set_adapters."""
    with warnings.catch_warnings():  # peft warns that a second adapter joins the first: what is meant here
        warnings.simplefilter("ignore", UserWarning)
        for name, _ in case:
            ref.load_lora_weights(str(files[name]), adapter_name=name)
    ref.set_adapters([name for name, _ in case], adapter_weights=[scale for _, scale in case])
    try:
        latents = ref("a fox", width=size, height=size, num_inference_steps=steps, guidance_scale=0.0,
                      generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").images
        with torch.no_grad():
            vae = ref.vae
            decoded = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
        return latents, ref.image_processor.postprocess(decoded, output_type="pil")[0]
    finally:
        ref.unload_lora_weights()


def _assert_same(lat, image, want_lat, want, tol=LATENT_TOL):
    assert rel_err(lat, want_lat) <= tol
    assert np.abs(np.asarray(image, np.float32) - np.asarray(want, np.float32)).max() <= IMAGE_TOL


@pytest.fixture(scope="module")
def plain(tiny_model):
    return _ours(zimage_lite.load(tiny_model, device="cpu", dtype="fp32"))[0]


@needs_reference
@pytest.mark.parametrize("case", CASES, ids=["one", "scale-0.7", "two"])
def test_matches_diffusers(tiny_model, files, plain, case):
    ref = diffusers.ZImagePipeline.from_pretrained(tiny_model, dtype=torch.float32)
    lat, image, _ = _ours(zimage_lite.load(tiny_model, device="cpu", dtype="fp32", loras=_uses(files, case)))
    assert rel_err(lat, plain) > MOVED  # the LoRA does something
    _assert_same(lat, image, *_theirs(ref, files, case))


@needs_reference
@pytest.mark.parametrize("fmt", LORA_FORMATS)
def test_every_format_renders_as_diffusers(tiny_model, tmp_path, plain, fmt):
    """One LoRA per key format (with alpha where the format stores one) rendered by both: the same image. On the
    main layers' attention and feed-forward, whose names every format spells (diffusers drops some ComfyUI names of
    the embedders, which zimage-lite applies; tests/test_lora_formats.py checks every module's delta)."""
    from zimage_lite.weights.lora import linear_shapes

    modules = [n for n in linear_shapes(TINY.dit) if n.startswith("layers.") and "adaLN" not in n]
    alpha = None if fmt == "dot" else 6.0  # the dot form stores no alpha
    path = write_lora(tmp_path / f"{fmt}.safetensors", TINY.dit, fmt, rank=4, seed=3, modules=modules, alpha=alpha,
                      gain=0.5)
    ref = diffusers.ZImagePipeline.from_pretrained(tiny_model, dtype=torch.float32)
    lat, image, _ = _ours(zimage_lite.load(tiny_model, device="cpu", dtype="fp32", loras=[(path, 0.8)]))
    assert rel_err(lat, plain) > MOVED
    _assert_same(lat, image, *_theirs(ref, {"x": path}, [("x", 0.8)]))


@needs_reference
def test_q8_dit_with_loras_matches_diffusers_on_dequantized_weights(tiny_model, files, tmp_path):
    """The side path on packed weights: diffusers renders from the Q8_0 file's dequantized weights plus the LoRAs."""
    from quantize.convert import convert

    [res] = convert(tiny_model, "Q8_0", out=tmp_path)
    pipe = zimage_lite.load(tiny_model, dit=res.path, device="cpu", dtype="fp32", keep_loaded=True,
                            loras=_uses(files, TWO))
    lat, image, _ = _ours(pipe)
    packed = [m for m in pipe._models["dit"].modules() if isinstance(m, QLinear)]
    assert len(packed) >= 10 and all(m.lora is not None for m in packed)  # the rest stay float (AdaptedLinear)
    ref = diffusers.ZImagePipeline.from_pretrained(tiny_model, dtype=torch.float32)
    load_dequantized(ref.transformer, res.path)
    _assert_same(lat, image, *_theirs(ref, files, TWO))


def test_smallest_budget_equals_resident(tiny_model, files):
    """The CPU at the smallest --ram: the blocks (and their side paths) are read at each use."""
    uses = _uses(files, TWO)
    resident = zimage_lite.load(tiny_model, device="cpu", dtype="fp32", ram="64GB", loras=uses)
    tokens = resident.tokenizer.encode("a fox").ids.shape[0]
    ram = minimum_budget(replace(resident.make_plan(64, 64, 0.0, tokens).request, budget=1))
    smallest = zimage_lite.load(tiny_model, device="cpu", dtype="fp32", ram=ram, loras=uses)
    assert smallest.make_plan(64, 64, 0.0, tokens).stage("dit").resident == ()
    assert resident.make_plan(64, 64, 0.0, tokens).stage("dit").streamed == ()
    a_lat, a, _ = _ours(resident)
    b_lat, b, _ = _ours(smallest)
    assert rel_err(b_lat, a_lat) <= LAYOUT_TOL
    assert np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max() <= IMAGE_TOL


# ---- the GPU streamer: the simulated device on the CPU, and CUDA ----------------------------------------------------

def _inputs(device="cpu"):
    g = torch.Generator().manual_seed(0)
    x, t, caps = torch.randn(1, 16, 12, 10, generator=g), torch.tensor([0.4]), [torch.randn(20, 48, generator=g)]
    return x.to(device), t.to(device), [c.to(device) for c in caps]


def _placed(tiny_model, loras, stage, device):
    cfg, src = open_dit(tiny_model / "transformer")
    with torch.device("meta"):
        model = ZImageDiT(cfg)
    return place(model, loras.attach(model, src, torch.float32), stage, device, torch.float32, "DiT")


def _gpu_stage(loras, extra=0):
    """The tiny DiT's stage plan with the LoRAs at the smallest budget that fits, plus `extra` bytes."""
    req = PlanRequest(config=TINY, budget=1, quant="F32", width=48, height=64, device="cuda", dtype="fp32",
                      caption_tokens=20, adapter_tensors=loras.table())
    return make_plan(replace(req, budget=minimum_budget(req) + extra)).stage("dit")


@pytest.mark.parametrize("extra", [0, 1], ids=["all-streamed", "mixed"])
def test_simulated_gpu_streaming_equals_resident(tiny_model, files, extra):
    """Side paths travel with their block through the pinned chunks and slots, and the streamer's figures are the
    plan's (a plan that left them out warns PlanMismatchWarning: slots, bytes copied, pinned memory)."""
    loras = Loras.read(_uses(files, TWO), TINY.dit)
    stage = _gpu_stage(loras)
    stage = _gpu_stage(loras, extra=extra * 3 * stage.slot_bytes // 2)
    assert stage.streamed and (bool(stage.resident) == bool(extra))
    with torch.no_grad():
        want = _placed(tiny_model, loras, None, torch.device("cpu"))(*_inputs())
        sim = SimulatedDevice()
        with warnings.catch_warnings():
            warnings.simplefilter("error", PlanMismatchWarning)
            model = _placed(tiny_model, loras, stage, sim)
        for _ in range(2):  # the second pass reuses the slots
            assert rel_err(model(*_inputs()), want) <= LAYOUT_TOL
    assert sim.bytes_copied == 2 * stage.transfer_bytes


@pytest.mark.cuda
@pytest.mark.parametrize("vram", ["600MB", "smallest"])
def test_cuda_streaming_with_loras_equals_the_cpu(tiny_model, files, vram):
    """Resident and at the smallest --vram (every block and its side paths streamed through the slots), no plan
    mismatch. Bound as test_streaming's CUDA-vs-CPU check: 2 levels (never run here: no GPU was lent)."""
    uses = _uses(files, TWO)
    cpu = zimage_lite.load(tiny_model, device="cpu", dtype="fp32", loras=uses)
    if vram == "smallest":
        probe = zimage_lite.load(tiny_model, device="cuda", dtype="fp32", vram="600MB", loras=uses)
        request = probe.make_plan(64, 64, 0.0, probe.tokenizer.encode("a fox").ids.shape[0]).request
        vram = minimum_budget(replace(request, budget=1)) + request.headroom
    gpu = zimage_lite.load(tiny_model, device="cuda", dtype="fp32", vram=vram, loras=uses)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PlanMismatchWarning)
        a, b = _ours(gpu)[1], _ours(cpu)[1]
    assert np.abs(np.asarray(a, np.int32) - np.asarray(b, np.int32)).max() <= 2


# ---- memory ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_plan_counts_what_placement_allocates(tiny_model, files, dtype):
    pipe = zimage_lite.load(tiny_model, device="cpu", dtype=dtype, keep_loaded=True, loras=_uses(files, TWO))
    _ours(pipe, steps=1)
    planned = pipe.plan.stage("dit").adapter_bytes
    placed = [p for n, p in pipe._models["dit"].named_parameters() if ".lora." in n]
    assert len(placed) == 2 * 52 and all(p.dtype == pipe.dtype for p in placed)
    assert planned == sum(aligned(p.numel() * p.element_size()) for p in placed)
    # on the CPU the blocks view the one host copy: the stage's weights grow by exactly that much
    bare = zimage_lite.load(tiny_model, device="cpu", dtype=dtype, ram=pipe.ram).make_plan(64, 64, 0.0)
    assert pipe.make_plan(64, 64, 0.0).stage("dit").weight_bytes - bare.stage("dit").weight_bytes == planned


def test_minimum_budget_counts_the_loras(files):
    loras = Loras.read(_uses(files, TWO), TINY.dit)
    req = PlanRequest(config=TINY, budget=1, quant="F32", width=64, height=64, device="cuda", dtype="fp32",
                      caption_tokens=20)
    with_loras = replace(req, adapter_tensors=loras.table())
    least = minimum_budget(with_loras)
    assert least > minimum_budget(req)
    make_plan(replace(with_loras, budget=least))  # fits exactly at the minimum
    stage = make_plan(replace(with_loras, budget=least)).stage("dit")
    assert stage.adapter_bytes and stage.staging_bytes >= stage.adapter_bytes  # their host copy, while placing


# ---- options, warnings, parameters -----------------------------------------------------------------------------

def test_lora_option(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a:b.safetensors").touch()
    assert lora_option("x.safetensors") == (Path("x.safetensors"), 1.0)
    assert lora_option("x.safetensors:0.5")[1] == 0.5
    assert lora_option("x.safetensors:-1e-1")[1] == -0.1
    assert lora_option("a:b.safetensors") == (lora_option("a:b.safetensors")[0], 1.0)
    assert str(lora_option("a:b.safetensors")[0]) == "a:b.safetensors"
    assert str(lora_option("a:b.safetensors:2")[0]) == "a:b.safetensors"


@pytest.mark.parametrize("scale,words", [("abc", "'abc' is not a number"), ("nan", "finite"), ("inf", "finite")])
def test_scale_that_is_not_a_number(tiny_model, files, tmp_path, capsys, scale, words):
    refused(capsys, ["run", "x", "--model", str(tiny_model), "--lora", f"{files['a']}:{scale}",
                     "--out", str(tmp_path / "x.png")], "--lora", words, watch=(tmp_path,))


def test_same_file_twice_warns_and_adds_up(tiny_model, files):
    with pytest.warns(DuplicateLoraWarning, match="given twice"):
        twice = zimage_lite.load(tiny_model, device="cpu", dtype="fp32", loras=[(files["a"], 1.0), (files["a"], 0.5)])
    once = zimage_lite.load(tiny_model, device="cpu", dtype="fp32", loras=[(files["a"], 1.5)])
    assert rel_err(_ours(twice, steps=2)[0], _ours(once, steps=2)[0]) <= LAYOUT_TOL


def test_parameters_round_trip(tiny_model, files, tmp_path, capsys):
    import hashlib

    pipe = zimage_lite.load(tiny_model, device="cpu", dtype="fp32", loras=_uses(files, TWO))
    _, image, info = _ours(pipe, steps=1)
    want = [{"name": f"{n}.safetensors", "sha256": hashlib.sha256(files[n].read_bytes()).hexdigest()[:16],
             "scale": s} for n, s in TWO]
    assert info["loras"] == want
    for ext in ("png", "jpg"):
        save_image(image, tmp_path / f"x.{ext}", info)
        assert read_params(tmp_path / f"x.{ext}")["loras"] == want
    image.info.update({k: v if isinstance(v, list) else str(v) for k, v in info.items()})  # as text_to_image does
    save_image(image, tmp_path / "y.png")
    assert read_params(tmp_path / "y.png")["loras"] == want
    # --from-png needs the files again, and names them
    refused(capsys, ["run", "--from-png", str(tmp_path / "x.png"), "--out", str(tmp_path / "z.png")],
            "--lora a.safetensors:0.7", "--lora b.safetensors:1.3", watch=(tmp_path,))


def test_cli_run_and_plan_with_loras(tiny_model, files, tmp_path, capsys):
    from zimage_lite.cli import main

    out = tmp_path / "x.png"
    assert main(["run", "x", "--model", str(tiny_model), "--lora", f"{files['a']}:0.7", "--lora", str(files["b"]),
                 "--steps", "1", "--seed", "3", "--out", str(out), "--device", "cpu", "--dtype", "fp32"]) == 0
    assert [e["scale"] for e in read_params(out)["loras"]] == [0.7, 1.0]
    again = tmp_path / "again.png"
    assert main(["run", "--from-png", str(out), "--lora", f"{files['a']}:0.7", "--lora", str(files["b"]),
                 "--out", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    capsys.readouterr()
    assert main(["plan", "--model", str(tiny_model), "--lora", str(files["a"]), "--device", "cpu"]) == 0
    assert "LoRA side paths" in capsys.readouterr().out
    turbo = make_lora(tmp_path / "turbo.safetensors", DiTConfig(), rank=2, targets="layers.0.")  # files-free plan
    assert main(["plan", "--lora", str(turbo), "--device", "cuda", "--vram", "4GB"]) == 0
    assert "LoRA side paths: 0.00 GiB" in capsys.readouterr().out


def test_adapted_linears_cover_every_target(tiny_model, files):
    """Float linears become AdaptedLinear; the base weight is the checkpoint's, untouched."""
    pipe = zimage_lite.load(tiny_model, device="cpu", dtype="fp32", keep_loaded=True, loras=_uses(files, [("a", 1.0)]))
    _ours(pipe, steps=1)
    model = pipe._models["dit"]
    adapted = [n for n, m in model.named_modules() if isinstance(m, AdaptedLinear)]
    assert len(adapted) == 52
    _, src = open_dit(tiny_model / "transformer")
    assert all(torch.equal(model.get_submodule(n).weight, src.get(f"{n}.weight")) for n in adapted)


def test_cli_warnings_are_one_line_each(tiny_model, files, tmp_path, capsys):
    """The same file twice, and a LoRA some of whose keys map to nothing (an extra key from another model): each a
    `warning:` line naming the file; the run goes on (partial match: apply the rest, list what was skipped)."""
    from safetensors.torch import load_file, save_file

    from zimage_lite.cli import main

    partial = tmp_path / "partial.safetensors"
    state = load_file(files["a"])
    state["lora_unet_input_blocks_1_0_emb_layers_1.lora_down.weight"] = torch.zeros(4, 8)  # an SDXL key
    state["lora_unet_input_blocks_1_0_emb_layers_1.lora_up.weight"] = torch.zeros(8, 4)
    save_file(state, partial)
    argv = ["run", "x", "--model", str(tiny_model), "--width", "32", "--height", "32", "--steps", "1", "--lora",
            str(files["a"]), "--lora", f"{files['a']}:0.5", "--lora", str(partial), "--out", str(tmp_path / "o.png")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"warning: LoRA {files['a']} is given twice" in err
    assert f"warning: LoRA {partial}: 2 of its keys map onto no DiT linear and are skipped" in err
    assert "input_blocks_1_0_emb_layers_1" in err and "Warning" not in err  # one line each, not Python's format
