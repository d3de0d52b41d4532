"""The memory planner and budget parsing on full-size configs: pure arithmetic, no weights (plans from real files,
labels, devices and layering: test_plan_files.py)."""

from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest

from zimage_lite.config import PRESETS, DiTConfig
from zimage_lite.errors import BudgetError, CheckpointError, OptionError
from zimage_lite.quant.chunks import DEVICE_CHUNK, DEVICE_CHUNK_TEMP_BYTES, MAX_WORKERS
from zimage_lite.quant.formats import DEQUANT_CHUNK_WEIGHTS
from zimage_lite.runtime import budget as budget_module
from zimage_lite.runtime.budget import CUDA_HEADROOM
from zimage_lite.runtime.memory import PINNED_CHUNK, pinned_layout
from zimage_lite.runtime.plan import PlanRequest, make_plan, minimum_budget, plan_for
from zimage_lite.runtime.plan_format import format_plan
from zimage_lite.runtime.sizes import layout, recipe_label, recipe_table, stored_bytes
from zimage_lite.runtime.units import GB, GIB, MB, MIB, format_option_size, format_si, format_size, gb, gib, parse_size

TURBO = PRESETS["turbo"]
DIT_BLOCKS = 34
# A full-size main DiT layer in Q4_K_M, by hand from ggml's block sizes (256 weights: Q4_K 144 B, Q5_K 176 B, Q6_K
# 210 B): q, k, v Q5_K; out, w1, w3, adaLN Q4_K; w2 Q6_K; and its vectors (norm_q, norm_k, four block norms, the adaLN
# bias), F32 in the file, cast to the compute dtype when placed.
Q4_K_M_LAYER_PACKED = 3 * 3840 * 15 * 176 + 3840 * 15 * 144 + 2 * 10240 * 15 * 144 + 3840 * 40 * 210 + 15360 * 144
LAYER_VECTORS = 2 * 128 + 4 * 3840 + 15360
LARGEST_LINEAR = 10240 * 3840  # w1, w3, w2: the runtime's q, k, v are three 3840x3840 Linears, not one fused qkv


def cuda_plan(quant: str, size: int, vram: str, **kw):
    return plan_for("turbo", quant, size, size, kw.pop("cfg", False), "cuda", parse_size(vram, "--vram"), None,
                    dtype=kw.pop("dtype", "bf16"), **kw)


# ---- parameter counts and bytes ------------------------------------------------------------------------------------

def test_parameter_counts_match_the_verified_figures():
    # zimage_spec.md §8.1 [verified counts], read from the models' own schedules and state dicts
    dit, text = layout(TURBO.dit), layout(TURBO.text_encoder)
    block = {name: sum(math.prod(dit.shapes[t]) for t in tensors) for name, tensors in dit.blocks}
    assert block["layers.0"] == 180_910_336 and block["context_refiner.0"] == 176_962_816
    assert sum(math.prod(s) for n, s in dit.shapes.items() if n not in dit.block_tensors) == 11_852_352
    assert sum(math.prod(s) for s in dit.shapes.values()) == 6_154_908_736
    assert sum(math.prod(text.shapes[t]) for t in text.blocks[0][1]) == 100_930_816
    assert math.prod(text.shapes["embed_tokens.weight"]) == 388_956_160
    assert len(text.blocks) == 35  # layer 35's output is never read, so the model does not hold it


def test_block_formats_use_ggml_block_sizes():
    assert stored_bytes((3840, 10240), "Q4_K") == 3840 * 40 * 144
    assert stored_bytes((3840, 3840), "Q8_0") == 3840 * 120 * 34
    assert stored_bytes((10, 10), "BF16") == 200
    assert stored_bytes((4, 128), "int8") == 4 * 128 + 4 * 4  # + an fp32 scale per row
    assert stored_bytes((4, 128), "nf4") == 4 * 64 + 8 * 4  # + an fp32 absmax per 64 weights
    with pytest.raises(CheckpointError, match="'?'"):
        stored_bytes((4,), "?")


@pytest.mark.parametrize("quant, gigabytes", [
    # jayn7/Z-Image-Turbo-GGUF file sizes (gguf_interop.md §5): refiners and embedders BF16, lcpp K-quant mix rules
    ("Q8_0", 7.22), ("Q6_K", 5.91), ("Q5_K_M", 5.52), ("Q5_K_S", 5.19), ("Q4_K_M", 4.98), ("Q4_K_S", 4.66),
    ("Q3_K_M", 4.12), ("Q3_K_S", 3.79), ("BF16", 12.31),
])
def test_dit_bytes_reproduce_published_gguf_sizes(quant, gigabytes):
    total = sum(stored_bytes(shape, fmt) for shape, fmt in recipe_table(DiTConfig(), quant).values())
    assert total / GB == pytest.approx(gigabytes, abs=0.006)


def test_q4_k_m_mix_raises_qkv_and_w2():
    table = recipe_table(DiTConfig(), "Q4_K_M")
    types = {n.split(".", 2)[2]: fmt for n, (shape, fmt) in table.items()
             if n.startswith("layers.0.") and len(shape) == 2}
    assert types == {"attention.to_q.weight": "Q5_K", "attention.to_k.weight": "Q5_K", "attention.to_v.weight": "Q5_K",
                     "attention.to_out.0.weight": "Q4_K", "feed_forward.w1.weight": "Q4_K",
                     "feed_forward.w3.weight": "Q4_K", "feed_forward.w2.weight": "Q6_K",
                     "adaLN_modulation.0.weight": "Q4_K"}


def test_bitsandbytes_recipes_quantize_every_block_linear_and_nothing_else():
    table = recipe_table(DiTConfig(), "nf4")
    lay = layout(DiTConfig())
    quantized = {n for n, (_, fmt) in table.items() if fmt == "nf4"}
    assert quantized == lay.linears & lay.block_tensors
    assert len(quantized) == 32 * 8 + 2 * 7  # the context refiners have no adaLN
    assert {fmt for n, (_, fmt) in table.items() if n not in quantized} == {"BF16"}


@pytest.mark.parametrize("quant, label", [("Q4_K_M", "Q4_K"), ("Q8_0", "Q8_0"), ("BF16", "BF16"), ("int8", "int8"),
                                          ("nf4", "nf4")])
def test_a_file_without_metadata_is_labelled_by_its_block_weights(quant, label):
    # Q4_K_M's blocks hold more F32 norms than Linears: the label weighs the Linears' weights, not tensor counts
    assert recipe_label(DiTConfig(), recipe_table(DiTConfig(), quant)) == label


def test_gguf_file_type_names_the_recipe():
    assert recipe_label(DiTConfig(), recipe_table(DiTConfig(), "Q4_K_M"), file_type=15) == "Q4_K_M"  # MOSTLY_Q4_K_M
    assert recipe_label(DiTConfig(), recipe_table(DiTConfig(), "Q4_K_M"), file_type=999) == "Q4_K"  # unknown value


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
    held = Q4_K_M_LAYER_PACKED + 2 * LAYER_VECTORS  # packed Linears + bf16 vectors
    assert dit.slot_bytes == 2 * held
    assert plan.transfer_per_step == len(dit.streamed) * held


def test_cuda_dequantize_scratch_is_one_output_and_one_chunk():
    dit = cuda_plan("Q4_K_M", 1024, "4GB").stage("dit")
    assert dit.scratch_bytes == LARGEST_LINEAR * 2 + DEVICE_CHUNK * DEVICE_CHUNK_TEMP_BYTES
    assert cuda_plan("BF16", 1024, "4GB").stage("dit").scratch_bytes == 0  # float weights are never dequantized


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
    small, small_cfg = cuda_plan("Q4_K_M", 512, "4GB"), cuda_plan("Q4_K_M", 512, "4GB", cfg=True)
    streamed, streamed_cfg = small.stage("dit").streamed, small_cfg.stage("dit").streamed
    assert len(streamed_cfg) > len(streamed) > 0  # the larger activations leave room for fewer resident blocks
    # ...but each streamed block is still copied once per step: the CFG pair goes through it together
    assert small_cfg.transfer_per_step * len(streamed) == small.transfer_per_step * len(streamed_cfg)


def test_plans_follow_the_schedule_not_the_table_order():
    request = PlanRequest(config=TURBO, budget=int(3.3 * GIB), quant="Q4_K_M", device="cuda")
    table = recipe_table(TURBO.dit, "Q4_K_M")
    shuffled = dict(reversed(list(table.items())))
    from_file = make_plan(replace(request, dit_tensors=shuffled))
    assert from_file.stages == make_plan(request).stages
    assert from_file.stage("dit").blocks[:2] == ("noise_refiner.0", "noise_refiner.1")


def test_a_block_tensor_missing_from_the_table_is_an_error():
    table = dict(recipe_table(TURBO.dit, "Q4_K_M"))
    del table["layers.7.feed_forward.w2.weight"]
    with pytest.raises(CheckpointError, match=r"no tensor layers\.7\.feed_forward\.w2\.weight"):
        make_plan(PlanRequest(config=TURBO, budget=24 * GB, dit_tensors=table))


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

def test_cpu_demo_at_its_smallest_budget_streams_every_dit_block():
    # fp32: in bf16 the VAE decode (vae.decode_memory) sets the floor, above the resident DiT's need
    request = PlanRequest(config=PRESETS["demo"], budget=1, quant="Q4_K_M", width=64, height=64, device="cpu",
                          dtype="fp32", caption_tokens=32)
    least = minimum_budget(request)
    assert least < 2.5 * MB  # 2.06 MB: the DiT streamed, VAE and text encoder at their smallest
    plan = make_plan(replace(request, budget=least))
    dit = plan.stage("dit")
    assert dit.resident == () and len(dit.streamed) == len(dit.blocks) == 4
    assert dit.n_slots == 1  # one block read from the memory map at a time
    assert plan.peak_bytes <= least


def test_cpu_keeps_quantized_blocks_packed():
    """On the CPU a quantized block stays packed in the memory map; only one Linear at a time is dequantized."""
    roomy = plan_for("turbo", "Q4_K_M", 512, 512, False, "cpu", None, parse_size("8GB", "--ram"), dtype="bf16")
    assert not roomy.stage("dit").streamed  # 4.98 GB of packed weights fit in 8 GB
    plan = plan_for("turbo", "Q4_K_M", 512, 512, False, "cpu", None, parse_size("4GB", "--ram"), dtype="bf16")
    dit = plan.stage("dit")
    assert dit.streamed and dit.n_slots == 1
    assert all(name.startswith("layers.") for name in dit.streamed)  # the BF16 refiners are the ones kept
    assert dit.slot_bytes == Q4_K_M_LAYER_PACKED + 2 * LAYER_VECTORS  # held: packed, vectors cast to bf16
    assert dit.transfer_bytes == len(dit.streamed) * (Q4_K_M_LAYER_PACKED + 4 * LAYER_VECTORS)  # read as stored
    # one reused bf16 output + the temporaries of the chunks in flight on the worker threads
    assert dit.scratch_bytes == LARGEST_LINEAR * 2 + MAX_WORKERS * DEQUANT_CHUNK_WEIGHTS * DEVICE_CHUNK_TEMP_BYTES


def test_cpu_chunks_attention_when_math_scores_do_not_fit():
    small = plan_for("turbo", "Q8_0", 512, 512, False, "cpu", None, parse_size("16GB", "--ram"), dtype="bf16")
    assert small.stage("dit").attention == "sdpa"
    big = plan_for("turbo", "Q8_0", 2048, 2048, False, "cpu", None, parse_size("16GB", "--ram"), dtype="bf16")
    dit = big.stage("dit")
    assert dit.attention == "chunked" and dit.attention_chunk & (dit.attention_chunk - 1) == 0


# ---- host memory ---------------------------------------------------------------------------------------------------

def test_cuda_stages_state_their_host_memory():
    plan = cuda_plan("Q4_K_M", 1024, "4GB")
    dit, text = plan.stage("dit"), plan.stage("text_encoder")
    # the streamed Q4_K_M layers (118 MB each) share 1 GiB chunks, 9 to a chunk: 18 layers in 2 GiB (1.01x their
    # bytes, where a power-of-two chunk per layer would take 128 MiB each, 1.14x)
    held = Q4_K_M_LAYER_PACKED + 2 * LAYER_VECTORS
    assert len(dit.streamed) == 18 and PINNED_CHUNK < held <= 128 * MIB
    assert dit.pinned_bytes == 2 * GIB and dit.pinned_bytes < 1.02 * len(dit.streamed) * held
    # the BF16 text encoder's streamed layers (201 MB): five to a 1 GiB chunk (0.94 full), not one to 256 MiB (0.75)
    assert text.pinned_bytes <= 1.1 * len(text.streamed) * text.slot_bytes / text.n_slots
    # placement reads one tensor at a time: the largest is a BF16 refiner's w1, read as it is (no cast in bf16)
    assert dit.staging_bytes == 10240 * 3840 * 2 and dit.host_weight_bytes == 0
    # the embedding table stays on the host as stored, a view of the file, in every compute dtype...
    assert text.host_weight_bytes == 0
    assert cuda_plan("Q4_K_M", 1024, "4GB", dtype="fp16").stage("text_encoder").host_weight_bytes == 0
    # ...unless it is quantized in a way it cannot stay packed in (a bitsandbytes table is dequantized: a copy)
    table = dict(recipe_table(TURBO.text_encoder, "BF16"))
    table["embed_tokens.weight"] = (table["embed_tokens.weight"][0], "int8")
    request = PlanRequest(config=TURBO, budget=24 * GB, dtype="fp16", text_tensors=table)
    assert make_plan(request).stage("text_encoder").host_weight_bytes == 151936 * 2560 * 2
    for s in plan.stages:
        assert s.host_bytes == s.pinned_bytes + s.host_weight_bytes + s.staging_bytes > 0
    assert plan.host_peak_bytes == max(s.host_bytes for s in plan.stages)
    resident = cuda_plan("Q4_K_M", 1024, "24GB").stage("dit")
    assert resident.pinned_bytes == 0  # nothing streams, nothing pinned


def test_cpu_host_memory_is_the_stage_peak():
    plan = plan_for("turbo", "Q4_K_M", 512, 512, False, "cpu", None, parse_size("4GB", "--ram"), dtype="fp32")
    for s in plan.stages:
        assert s.host_bytes == s.peak_bytes and s.pinned_bytes == 0
    # fp32 on a CPU without bf16: the BF16 embedding table is still not cast (its rows are, as they are looked up)
    assert plan.stage("text_encoder").weight_bytes == 0


# ---- keep_loaded ---------------------------------------------------------------------------------------------------

def test_keep_loaded_stages_hold_the_other_components():
    alone, kept = cuda_plan("Q4_K_M", 1024, "6GB"), cuda_plan("Q4_K_M", 1024, "6GB", keep_loaded=True)
    budget = parse_size("6GB", "--vram") - CUDA_HEADROOM
    loaded = {s.name: s.weight_bytes + s.resident_bytes + s.slot_bytes for s in kept.stages}
    for s in kept.stages:
        assert s.kept_bytes == sum(loaded.values()) - loaded[s.name] > 0
        assert s.peak_bytes <= budget
        assert s.kept_host_bytes == sum(o.pinned_bytes + o.host_weight_bytes for o in kept.stages if o is not s)
    assert all(s.kept_bytes == 0 for s in alone.stages)
    # alone, the DiT keeps every block at 6 GB; beside the text encoder and the VAE some of them stream
    assert not alone.stage("dit").streamed and kept.stage("dit").streamed
    assert "kept loaded beside it" in format_plan(kept)


def test_keep_loaded_refuses_a_budget_that_only_fits_one_stage_at_a_time():
    request = PlanRequest(config=TURBO, budget=1, quant="Q4_K_M", device="cuda")
    least = minimum_budget(request)
    make_plan(replace(request, budget=least))  # the stages fit one after another...
    with pytest.raises(BudgetError, match=r"kept loaded .*keep_loaded=False"):  # ...but not all loaded at once
        make_plan(replace(request, budget=least, keep_loaded=True))
    assert minimum_budget(replace(request, keep_loaded=True)) > least


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
    hosts = re.findall(r"^  host memory: (\d+\.\d\d) GiB", text, re.MULTILINE)
    assert hosts == [f"{s.host_bytes / GIB:.2f}" for s in plan.stages]
    host_peak = re.findall(r"^peak host memory: (\d+\.\d\d) GiB", text, re.MULTILINE)
    assert host_peak == [f"{plan.host_peak_bytes / GIB:.2f}"]
    assert "pinned chunks" in text


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
    assert gib(int(3.42 * GIB)) == "3.42 GiB" and gib(GIB, unit=False) == "1.00"
    assert gib(3 * MIB) == "0.00 GiB (3.00 MiB)"  # a figure that rounds to nothing also shows its exact size
    assert gb(4.98e9) == "4.98 GB" and format_si(6.15e9, "") == "6.15 G" and format_si(17) == "17 B"
    assert format_option_size(int(1.61 * GB), round_up=True) == "1.7GB"
    assert parse_size(format_option_size(1_612_345_678, round_up=True), "--vram") >= 1_612_345_678


@pytest.mark.parametrize("sizes", [[118 * MB] * 18, [201 * MB] * 20, [30 * MB, 200 * MB, 30 * MB, 90 * MB] * 3,
                                   [MB] * 5])
def test_pinned_layout_packs_one_block_at_a_time(sizes):
    """Placement packs each block as it reads it: the first k blocks lie where the whole layout puts them."""
    places, chunks = pinned_layout(sizes)
    for k in range(1, len(sizes) + 1):
        got_places, got_chunks = pinned_layout(sizes[:k], count=len(sizes))
        assert got_places == places[:k] and got_chunks == chunks[:len(got_chunks)]
    for (chunk, offset), size in zip(places, sizes, strict=True):  # inside its chunk, no two blocks overlap
        assert offset + size <= chunks[chunk]
    ends = sorted((c, o, o + s) for (c, o), s in zip(places, sizes, strict=True))
    assert all(a[0] != b[0] or a[2] <= b[1] for a, b in zip(ends, ends[1:], strict=False))
    assert all(c & (c - 1) == 0 for c in chunks)  # powers of two: what the host allocator would round to anyway
