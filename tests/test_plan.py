"""The memory planner and budget parsing: pure arithmetic, so every case here runs in milliseconds."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from zimage_lite.config import PRESETS, DiTConfig
from zimage_lite.errors import BudgetError, OptionError
from zimage_lite.runtime import budget as budget_module
from zimage_lite.runtime.budget import (
    CUDA_HEADROOM,
    GB,
    GIB,
    MB,
    dit_tensors,
    format_option_size,
    format_size,
    param_counts,
    parse_size,
    weight_bytes,
)
from zimage_lite.runtime.plan import (
    PlanRequest,
    format_plan,
    make_plan,
    minimum_budget,
    plan_for,
)

TURBO = PRESETS["turbo"]
DIT_BLOCKS = 34


def cuda_plan(quant: str, size: int, vram: str, **kw):
    return plan_for("turbo", quant, size, size, kw.pop("cfg", False), "cuda", parse_size(vram, "--vram"), None,
                    dtype=kw.pop("dtype", "bf16"), **kw)


# ---- parameter counts and bytes ------------------------------------------------------------------------------------

def test_parameter_counts_match_the_verified_figures():
    # zimage_spec.md §8.1 [verified counts]
    counts = param_counts(TURBO)
    assert counts["dit_modulated_block"] == 180_910_336
    assert counts["dit_context_block"] == 176_962_816
    assert counts["dit_other"] == 11_852_352
    assert counts["dit_total"] == 6_154_908_736
    assert counts["text_layer"] == 100_930_816
    assert counts["text_embedding"] == 388_956_160
    assert counts["text_total"] == 4_022_468_096
    assert counts["vae_decoder"] == 49_545_475


def test_block_formats_use_ggml_block_sizes():
    assert weight_bytes(3840, 10240, "Q4_K") == 3840 * 40 * 144
    assert weight_bytes(3840, 3840, "Q8_0") == 3840 * 120 * 34
    assert weight_bytes(10, 10, "BF16") == 200


@pytest.mark.parametrize("quant, gigabytes", [
    # jayn7/Z-Image-Turbo-GGUF file sizes (gguf_interop.md §5): refiners and embedders BF16, lcpp K-quant mix rules
    ("Q8_0", 7.22), ("Q6_K", 5.91), ("Q5_K_M", 5.52), ("Q5_K_S", 5.19), ("Q4_K_M", 4.98), ("Q4_K_S", 4.66),
    ("Q3_K_M", 4.12), ("Q3_K_S", 3.79), ("BF16", 12.31),
])
def test_dit_bytes_reproduce_published_gguf_sizes(quant, gigabytes):
    c = DiTConfig()
    blocks = {"noise_refiner": c.n_refiner_layers, "context_refiner": c.n_refiner_layers, "layers": c.n_layers,
              "other": 1}
    total = sum(dit_tensors(c, quant, kind).nbytes() * n for kind, n in blocks.items())
    assert total / GB == pytest.approx(gigabytes, abs=0.006)


def test_q4_k_m_mix_raises_qkv_and_w2():
    types = {role.split(".", 2)[2]: fmt for role, _, _, fmt in dit_tensors(DiTConfig(), "Q4_K_M", "layers").linear}
    assert types == {"attention.qkv.weight": "Q5_K", "attention.out.weight": "Q4_K", "feed_forward.w1.weight": "Q4_K",
                     "feed_forward.w3.weight": "Q4_K", "feed_forward.w2.weight": "Q6_K",
                     "adaLN_modulation.0.weight": "Q4_K"}


# ---- cuda plans for the full-size model ----------------------------------------------------------------------------

@pytest.mark.parametrize("size", [512, 1024])
@pytest.mark.parametrize("quant", ["BF16", "Q8_0", "Q4_K_M"])
@pytest.mark.parametrize("vram", ["4GB", "8GB", "24GB"])
def test_turbo_plans_fit_their_budget(size, quant, vram):
    plan = cuda_plan(quant, size, vram)
    assert plan.peak_bytes <= parse_size(vram, "--vram") - CUDA_HEADROOM
    dit = plan.stage("dit")
    assert len(dit.blocks) == DIT_BLOCKS
    assert dit.blocks[:4] == ("noise_refiner.0", "noise_refiner.1", "context_refiner.0", "context_refiner.1")
    assert set(dit.resident) | set(dit.streamed) == set(dit.blocks)
    assert len(plan.stage("text_encoder").blocks) == 35  # layer 35's output is never read
    assert dit.n_slots == (2 if dit.streamed else 0)
    assert dit.attention == "sdpa"


def test_q4_k_m_is_all_resident_in_24gb():
    dit = cuda_plan("Q4_K_M", 1024, "24GB").stage("dit")
    assert dit.streamed == () and dit.slot_bytes == 0 and dit.transfer_bytes == 0


def test_q4_k_m_in_4gb_streams_a_few_blocks_under_3_6_gib():
    plan = cuda_plan("Q4_K_M", 1024, "4GB")
    dit = plan.stage("dit")
    assert 0 < len(dit.streamed) < DIT_BLOCKS
    assert dit.peak_bytes <= 3.6 * GIB
    # the BF16 refiners are the largest blocks: keeping them keeps the two slots small
    assert {"noise_refiner.0", "context_refiner.1"} <= set(dit.resident)
    assert dit.slot_bytes == 2 * dit_tensors(DiTConfig(), "Q4_K_M", "layers").nbytes()
    assert plan.transfer_per_step == dit.transfer_bytes == len(dit.streamed) * dit.slot_bytes // 2


@pytest.mark.parametrize("quant", ["BF16", "Q4_K_M"])
@pytest.mark.parametrize("cfg", [False, True])
def test_more_budget_never_keeps_fewer_blocks(quant, cfg):
    previous = {"text_encoder": -1, "dit": -1}
    for tenths in range(20, 241, 4):  # from 2 GB, where every setting here fits
        plan = cuda_plan(quant, 1024, f"{tenths / 10}GB", cfg=cfg)
        for name in previous:
            kept = len(plan.stage(name).resident)
            assert kept >= previous[name], (name, tenths)
            previous[name] = kept


def test_cfg_doubles_activations_but_not_traffic():
    plain, cfg = cuda_plan("BF16", 1024, "24GB"), cuda_plan("BF16", 1024, "24GB", cfg=True)
    assert cfg.stage("dit").activation_bytes > 1.9 * plain.stage("dit").activation_bytes
    small, small_cfg = cuda_plan("BF16", 512, "4GB"), cuda_plan("BF16", 512, "4GB", cfg=True)
    assert len(small_cfg.stage("dit").streamed) >= len(small.stage("dit").streamed)
    assert small_cfg.transfer_per_step == small_cfg.stage("dit").transfer_bytes


def test_plans_are_stable():
    assert cuda_plan("Q4_K_M", 1024, "4GB") == cuda_plan("Q4_K_M", 1024, "4GB")


# ---- VAE -----------------------------------------------------------------------------------------------------------

def test_vae_tiles_at_1024_under_4gb_in_fp32():
    # fp16 cards decode the VAE in fp32 (plain fp16 overflows): 3.7 GiB untiled (zimage_spec.md §8.2) does not fit
    vae = cuda_plan("Q4_K_M", 1024, "4GB", dtype="fp16").stage("vae")
    assert vae.tiled and vae.tile < 128


def test_vae_bf16_untiled_at_1024_tiled_at_2048_in_4gb():
    assert not cuda_plan("Q4_K_M", 1024, "4GB").stage("vae").tiled  # 1.9 GiB fits (zimage_spec.md §8.3)
    vae = cuda_plan("Q4_K_M", 2048, "4GB").stage("vae")
    assert vae.tiled and vae.tile == 128


# ---- cpu -----------------------------------------------------------------------------------------------------------

def test_cpu_demo_with_2mb_streams_every_dit_block():
    # fp32: in bf16 the VAE decode (1.4 MB at 64x64, vae.decode_memory) sets the floor, above the resident DiT's need
    plan = plan_for("demo", "Q4_K_M", 64, 64, False, "cpu", None, parse_size("1.95MB", "--ram"), dtype="fp32",
                    caption_tokens=32)
    dit = plan.stage("dit")
    assert dit.resident == () and len(dit.streamed) == len(dit.blocks) == 4
    assert dit.n_slots == 1  # one reused dequantize buffer
    assert plan.peak_bytes <= 2 * MB


def test_cpu_keeps_quantized_blocks_packed():
    """On the CPU a quantized block stays packed in the memory map; only one Linear at a time is dequantized."""
    roomy = plan_for("turbo", "Q4_K_M", 512, 512, False, "cpu", None, parse_size("8GB", "--ram"), dtype="bf16")
    assert not roomy.stage("dit").streamed  # 4.98 GB of packed weights fit in 8 GB
    plan = plan_for("turbo", "Q4_K_M", 512, 512, False, "cpu", None, parse_size("4GB", "--ram"), dtype="bf16")
    dit = plan.stage("dit")
    assert dit.streamed and dit.n_slots == 1
    stored = {kind: dit_tensors(DiTConfig(), "Q4_K_M", kind).nbytes()
              for kind in ("noise_refiner", "context_refiner", "layers")}
    assert dit.slot_bytes == max(stored[name.split(".")[0]] for name in dit.streamed)
    assert dit.scratch_bytes == 11520 * 3840 * 2  # the largest packed weight (the fused qkv) in bf16
    assert dit.transfer_bytes == sum(stored[name.split(".")[0]] for name in dit.streamed)


def test_cpu_chunks_attention_when_math_scores_do_not_fit():
    small = plan_for("turbo", "Q8_0", 512, 512, False, "cpu", None, parse_size("16GB", "--ram"), dtype="bf16")
    assert small.stage("dit").attention == "sdpa"
    big = plan_for("turbo", "Q8_0", 2048, 2048, False, "cpu", None, parse_size("16GB", "--ram"), dtype="bf16")
    dit = big.stage("dit")
    assert dit.attention == "chunked" and dit.attention_chunk & (dit.attention_chunk - 1) == 0


# ---- budgets too small ---------------------------------------------------------------------------------------------

def test_too_small_budget_names_the_smallest_that_fits():
    with pytest.raises(BudgetError) as e:
        cuda_plan("Q4_K_M", 1024, "1GB")
    message = str(e.value)
    assert message.startswith("--vram 1GB is too small for Q4_K_M at 1024x1024")
    suggested = re.search(r"Try --vram (\S+?GB)", message).group(1)
    cuda_plan("Q4_K_M", 1024, suggested)  # the suggestion fits
    assert "dit: two streaming slots" in message


def test_minimum_budget_is_exact():
    request = PlanRequest(config=TURBO, budget=1, quant="Q4_K_M", width=768, height=768, device="cuda")
    least = minimum_budget(request)
    make_plan(replace(request, budget=least))
    with pytest.raises(BudgetError):
        make_plan(replace(request, budget=least - 1))


def test_too_small_suggests_a_smaller_size_that_fits():
    request = PlanRequest(config=TURBO, budget=1, quant="Q4_K_M", width=1024, height=1024, device="cuda")
    budget = minimum_budget(replace(request, width=768, height=768))
    with pytest.raises(BudgetError, match=r"--width 768 --height 768"):
        make_plan(replace(request, budget=budget))


def test_cuda_without_gpu_or_vram_asks_for_vram(monkeypatch):
    monkeypatch.setattr(budget_module, "device_budget", lambda device: None)
    with pytest.raises(OptionError, match="--vram"):
        plan_for("turbo", "Q4_K_M", 1024, 1024, False, "cuda", None, None, dtype="bf16")


@pytest.mark.parametrize("kw, option", [({"quant": "Q4_K_X"}, "--quant"), ({"width": 1000}, "--width"),
                                        ({"dtype": "fp8"}, "--dtype")])
def test_bad_options(kw, option):
    with pytest.raises(OptionError, match=option):
        make_plan(replace(PlanRequest(config=TURBO, budget=24 * GB), **kw))


# ---- text ----------------------------------------------------------------------------------------------------------

def test_format_plan_lines():
    plan = cuda_plan("Q4_K_M", 1024, "4GB")
    text = format_plan(plan)
    peaks = re.findall(r"^peak device memory: (\d+\.\d\d) GiB", text, re.MULTILINE)
    assert peaks == [f"{plan.peak_bytes / GIB:.2f}"]
    assert len(re.findall(r"^transfer per step: \d+\.\d\d GiB", text, re.MULTILINE)) == 1
    assert len(re.findall(r"^  stage peak: \d+\.\d\d GiB", text, re.MULTILINE)) == 3
    assert "streamed: layers." in text


@pytest.mark.parametrize("text, expected", [
    ("4GB", 4 * 10**9), ("4G", 4 * 2**30), ("3.5GiB", int(3.5 * 2**30)), ("512MB", 512 * 10**6), ("1MB", 10**6),
    ("800M", 800 * 2**20), ("2e9", 2 * 10**9), ("123456", 123456), ("4gb", 4 * 10**9), (" 8 GiB ", 8 * 2**30),
])
def test_parse_size(text, expected):
    assert parse_size(text, "--vram") == expected


@pytest.mark.parametrize("text", ["4XB", "-1GB", "", "GB", "0", "1.2.3G", "nan", "4 G B"])
def test_parse_size_rejects(text):
    with pytest.raises(OptionError, match=r"^--ram .*4GB"):
        parse_size(text, "--ram")


def test_format_sizes():
    assert format_size(int(3.42 * GIB)) == "3.42 GiB"
    assert format_size(17) == "17 B"
    assert format_option_size(4 * GB) == "4GB"
    assert format_option_size(int(1.61 * GB), round_up=True) == "1.7GB"
    assert parse_size(format_option_size(1_612_345_678, round_up=True), "--vram") >= 1_612_345_678
