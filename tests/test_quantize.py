"""The quantize tool: recipes on the full-size names (no weights), round trips through gguf-py on tiny
checkpoints, the bitsandbytes layouts, and bad input (each refused with a message, nothing written)."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from fixtures import KQUANT
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, TokenType
from safetensors import safe_open
from safetensors.torch import save_file

import zimage_lite
from quantize import bnb, recipes
from quantize.cli import TYPES
from quantize.convert import convert, summary
from zimage_lite.cli import main
from zimage_lite.config import DiTConfig, TextEncoderConfig
from zimage_lite.quant.recipes import TARGETS, dit_plan, dit_shapes, dit_tensor_type, te_plan, te_shapes
from zimage_lite.weights.names import dit_comfy_name

GGUF_TYPES = [n for n, t in TARGETS.items() if t.is_gguf]
# Bound on |dequantized - source| / |source| (L2 over a tensor) for each stored type, about twice what the KQUANT
# fixture's Gaussian weights measure (BF16 0.0017, Q8_0 0.0054, Q6_K 0.018, Q5_K 0.036, Q4_K 0.071, Q4_0 0.086,
# Q3_K 0.15, Q2_K 0.30).
NRMSE = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 4e-3, Q.Q8_0: 0.01, Q.Q6_K: 0.035, Q.Q5_K: 0.07, Q.Q5_0: 0.07,
         Q.Q5_1: 0.07, Q.Q4_K: 0.14, Q.Q4_0: 0.16, Q.Q4_1: 0.16, Q.Q3_K: 0.3, Q.Q2_K: 0.5}
# jayn7/Z-Image-Turbo-GGUF (ComfyUI-GGUF recipe), GB; gguf_interop.md section 5.
COMMUNITY_GB = {"BF16": 12.31, "Q8_0": 7.22, "Q6_K": 5.91, "Q5_K_M": 5.52, "Q5_K_S": 5.19, "Q4_K_M": 4.98,
                "Q4_K_S": 4.66, "Q3_K_M": 4.12, "Q3_K_S": 3.79}


def _official(folder: Path, strip: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k.removeprefix(strip): h.get_tensor(k) for k in h.keys()})
    return out


def _comfy_reference(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official DiT tensors under ComfyUI names, q/k/v fused: what the GGUF should hold."""
    groups: dict[str, list] = {}
    for name, t in official.items():
        comfy, part = dit_comfy_name(name)
        groups.setdefault(comfy, []).append((part[0] if part else 0, t))
    return {c: torch.cat([t for _, t in sorted(v, key=lambda p: p[0])]) for c, v in groups.items()}


def _dequant(t) -> torch.Tensor:
    return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))


def _nrmse(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.float().reshape(got.shape)
    return float((got - want).norm() / want.norm())


def _field(reader: GGUFReader, key: str):
    f = reader.get_field(key)
    return None if f is None else f.contents()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".gguf" or ".part" in p.name)


def test_cli_types_are_the_recipes():
    assert TYPES == tuple(TARGETS)


# ---- recipes on the full-size names -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_dit() -> dict[str, tuple[int, ...]]:
    return dit_shapes(DiTConfig())


def test_dit_q4_k_m_mix(full_dit):
    plan = {t.name: t for t in dit_plan(full_dit, TARGETS["Q4_K_M"])}
    assert len(plan) == 453
    assert plan["layers.0.attention.qkv.weight"].shape == (11520, 3840)
    for i in range(30):
        assert plan[f"layers.{i}.attention.qkv.weight"].qtype == Q.Q5_K
        assert plan[f"layers.{i}.feed_forward.w2.weight"].qtype == Q.Q6_K  # every layer: no use_more_bits here
        for w in ("attention.out", "feed_forward.w1", "feed_forward.w3", "adaLN_modulation.0"):
            assert plan[f"layers.{i}.{w}.weight"].qtype == Q.Q4_K
    for name in ("x_embedder.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.weight", "cap_embedder.1.weight",
                 "final_layer.linear.weight", "final_layer.adaLN_modulation.1.weight",
                 "noise_refiner.0.attention.qkv.weight", "context_refiner.1.feed_forward.w2.weight"):
        assert plan[name].qtype == Q.BF16, name
    for name in ("x_pad_token", "cap_pad_token"):
        assert plan[name].shape == (1, 3840) and plan[name].qtype == Q.F32
    assert all(t.qtype == Q.F32 for t in plan.values() if len(t.shape) == 1)
    assert not any(n.startswith("model.") or ".to_q." in n or "norm_final" in n for n in plan)


@pytest.mark.parametrize("name,qkv,w2,rest", [
    ("BF16", Q.BF16, Q.BF16, Q.BF16), ("Q8_0", Q.Q8_0, Q.Q8_0, Q.Q8_0), ("Q6_K", Q.Q6_K, Q.Q6_K, Q.Q6_K),
    ("Q5_K_M", Q.Q6_K, Q.Q6_K, Q.Q5_K), ("Q5_K_S", Q.Q5_K, Q.Q5_K, Q.Q5_K), ("Q4_K_S", Q.Q4_K, Q.Q5_K, Q.Q4_K),
    ("Q4_0", Q.Q4_0, Q.Q4_1, Q.Q4_0), ("Q3_K_M", Q.Q4_K, Q.Q4_K, Q.Q3_K), ("Q3_K_S", Q.Q3_K, Q.Q3_K, Q.Q3_K),
    ("Q2_K", Q.Q2_K, Q.Q2_K, Q.Q2_K),
])
def test_dit_mix_per_target(full_dit, name, qkv, w2, rest):
    plan = {t.name: t.qtype for t in dit_plan(full_dit, TARGETS[name])}
    assert plan["layers.7.attention.qkv.weight"] == qkv
    assert plan["layers.7.feed_forward.w2.weight"] == w2
    assert plan["layers.7.feed_forward.w1.weight"] == plan["layers.7.attention.out.weight"] == rest
    assert plan["context_refiner.0.attention.qkv.weight"] == Q.BF16 and plan["layers.7.ffn_norm1.weight"] == Q.F32


def test_rows_that_do_not_fit_fall_back():
    q4km = TARGETS["Q4_K_M"]
    assert dit_tensor_type("layers.0.attention.qkv.weight", (192, 64), q4km) == Q.Q5_1  # Q5_K -> Q5_1
    assert dit_tensor_type("layers.0.attention.out.weight", (64, 64), q4km) == Q.Q5_0  # Q4_K -> Q5_0
    assert dit_tensor_type("layers.0.feed_forward.w2.weight", (64, 170), q4km) == Q.F16  # 170 fits no block
    assert dit_tensor_type("layers.0.attention.q_norm.weight", (32,), q4km) == Q.F32


def _more_bits_layers(n: int) -> set[int]:
    # written out from llama.cpp's use_more_bits for 36 layers: i < 4, i >= 31, (i - 4) % 3 == 2
    return {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 31, 32, 33, 34, 35}


def test_text_encoder_q4_k_m_mix():
    cfg = TextEncoderConfig()
    plan = te_plan(te_shapes(cfg), TARGETS["Q4_K_M"], cfg)
    types = {t.name: t.qtype for t in plan}
    assert len(plan) == 398 and "output.weight" not in types  # tied to the embedding
    assert plan[0].name == "token_embd.weight" and plan[-1].name == "output_norm.weight"
    assert [t.name for t in plan].index("blk.2.attn_q.weight") < [t.name for t in plan].index("blk.10.attn_q.weight")
    assert types["token_embd.weight"] == Q.Q6_K
    for i in range(36):
        more = Q.Q6_K if i in _more_bits_layers(36) else Q.Q4_K
        assert types[f"blk.{i}.attn_v.weight"] == more and types[f"blk.{i}.ffn_down.weight"] == more, i
        for w in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert types[f"blk.{i}.{w}.weight"] == Q.Q4_K
        assert types[f"blk.{i}.attn_q_norm.weight"] == types[f"blk.{i}.ffn_norm.weight"] == Q.F32


def test_text_encoder_mix_other_targets():
    cfg = TextEncoderConfig()
    shapes = te_shapes(cfg)

    def types(name):
        return {t.name: t.qtype for t in te_plan(shapes, TARGETS[name], cfg)}

    q8 = types("Q8_0")
    assert q8["token_embd.weight"] == Q.Q8_0 and q8["blk.0.attn_v.weight"] == Q.Q8_0
    q2 = types("Q2_K")  # n_gqa = 32 / 8 = 4
    assert (q2["blk.5.attn_v.weight"], q2["blk.5.ffn_down.weight"], q2["blk.5.attn_output.weight"],
            q2["blk.5.attn_q.weight"], q2["token_embd.weight"]) == (Q.Q4_K, Q.Q3_K, Q.Q3_K, Q.Q2_K, Q.Q6_K)
    q3m = types("Q3_K_M")
    assert [q3m[f"blk.{i}.attn_v.weight"] for i in (0, 1, 2)] == [Q.Q5_K, Q.Q5_K, Q.Q4_K]
    assert [q3m[f"blk.{i}.ffn_down.weight"] for i in (1, 2)] == [Q.Q5_K, Q.Q4_K]  # i < 36 / 16
    q4s = types("Q4_K_S")
    assert [q4s[f"blk.{i}.attn_v.weight"] for i in (3, 4)] == [Q.Q5_K, Q.Q4_K]
    assert [q4s[f"blk.{i}.ffn_down.weight"] for i in (3, 4)] == [Q.Q5_K, Q.Q4_K]


def test_predicted_sizes_match_the_community_files():
    sizes = recipes.predicted_sizes("dit")
    for name, gb in COMMUNITY_GB.items():
        assert sizes[name] / 1e9 == pytest.approx(gb, rel=0.01), name
    assert sizes["Q4_K_M"] / 1e9 == pytest.approx(4.98, rel=0.01)
    assert sizes["Q8_0"] / 1e9 == pytest.approx(7.22, rel=0.01)
    # Qwen3-4B-Instruct-2507-Q4_K_S.gguf as koboldcpp ships it: 2.38 GB
    assert recipes.predicted_sizes("text_encoder")["Q4_K_S"] / 1e9 == pytest.approx(2.38, rel=0.01)


# ---- round trips through gguf-py ------------------------------------------------------------------------------------


@pytest.mark.parametrize("type_name", GGUF_TYPES)
def test_dit_round_trip(kq_model, tmp_path, type_name):
    [res] = convert(kq_model, type_name, out=tmp_path)
    assert res.path == tmp_path / f"z_image_turbo-{type_name}.gguf"
    r = GGUFReader(res.path)
    target = TARGETS[type_name]
    assert _field(r, "general.architecture") == "lumina2"
    assert _field(r, "general.quantization_version") == 2 and _field(r, "general.file_type") == int(target.ftype)
    assert type_name in _field(r, "zimage_lite.recipe") and _field(r, "zimage_lite.version") == zimage_lite.__version__
    assert len(_field(r, "zimage_lite.source_sha256")) == 64
    plan = dit_plan(dit_shapes(KQUANT.dit), target)
    assert [(t.name, t.tensor_type) for t in r.tensors] == [(p.name, p.qtype) for p in plan]
    ref = _comfy_reference(_official(kq_model / "transformer"))
    for t, p in zip(r.tensors, plan, strict=True):
        got = _dequant(t)
        assert tuple(got.shape) == p.shape == tuple(int(d) for d in reversed(t.shape.tolist()))
        assert _nrmse(got, ref[t.name]) <= NRMSE[t.tensor_type], (t.name, t.tensor_type.name)
    assert 0 <= recipes.predicted_size(plan) - res.path.stat().st_size <= 4096  # the KV estimate is an upper bound
    if type_name == "Q4_K_M":  # the 256-wide rows really are K-quants: the test is not all fallbacks
        assert {t.tensor_type for t in r.tensors} >= {Q.Q4_K, Q.Q5_K}


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_K_M"])
def test_text_encoder_round_trip(tiny_model, tmp_path, type_name):
    [res] = convert(tiny_model, type_name, component="text-encoder", out=tmp_path)
    assert res.path.name == f"Qwen3-4B-{type_name}.gguf"
    r = GGUFReader(res.path)
    t = zimage_lite.config.TextEncoderConfig.from_dict(json.loads((tiny_model / "text_encoder" / "config.json")
                                                                  .read_text()))
    keys = {"general.architecture": "qwen3", "qwen3.block_count": t.num_hidden_layers,
            "qwen3.context_length": t.max_position_embeddings, "qwen3.embedding_length": t.hidden_size,
            "qwen3.feed_forward_length": t.intermediate_size, "qwen3.attention.head_count": t.num_attention_heads,
            "qwen3.attention.head_count_kv": t.num_key_value_heads, "qwen3.attention.key_length": t.head_dim,
            "qwen3.attention.value_length": t.head_dim, "qwen3.rope.freq_base": t.rope_theta,
            "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.bos_token_id": 151643,
            "tokenizer.ggml.eos_token_id": 151645, "general.file_type": int(TARGETS[type_name].ftype)}
    for key, value in keys.items():
        assert _field(r, key) == value, key
    assert _field(r, "qwen3.attention.layer_norm_rms_epsilon") == pytest.approx(t.rms_norm_eps)
    tokens, types = _field(r, "tokenizer.ggml.tokens"), _field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == t.vocab_size
    assert tokens[151644] == "<|im_start|>" and types[151644] == TokenType.CONTROL and types[1000] == TokenType.UNUSED
    official = _official(tiny_model / "text_encoder", strip="model.")
    names = {x.name for x in r.tensors}
    assert "output.weight" not in names and {"token_embd.weight", "output_norm.weight"} <= names
    assert sum(n.endswith(".attn_q.weight") for n in names) == t.num_hidden_layers  # every layer, the last too
    from zimage_lite.weights.names import LLAMA_CPP_GLOBAL, LLAMA_CPP_LAYER

    for x in r.tensors:
        parts = x.name.split(".")
        if parts[0] == "blk":
            hf = f"layers.{parts[1]}.{LLAMA_CPP_LAYER[parts[2]]}.{parts[3]}"
        else:
            hf = f"{LLAMA_CPP_GLOBAL[parts[0]]}.{parts[1]}"
        assert _nrmse(_dequant(x), official[hf]) <= NRMSE[x.tensor_type], x.name


def test_text_encoder_from_a_bf16_gguf_keeps_its_vocabulary(tiny_model, tmp_path):
    [bf16] = convert(tiny_model, "BF16", component="text-encoder", out=tmp_path / "te-bf16.gguf")
    [q8] = convert(bf16.path, "Q8_0", out=tmp_path / "te-q8.gguf")  # no tokenizer.json beside it: copied over
    a, b = GGUFReader(bf16.path), GGUFReader(q8.path)
    keys = [k for k in a.fields if k.startswith("tokenizer.")]
    assert len(keys) >= 8 and keys == [k for k in b.fields if k.startswith("tokenizer.")]
    for k in keys:
        assert _field(a, k) == _field(b, k), k
    assert _field(b, "general.architecture") == "qwen3" and _field(b, "general.file_type") == int(TARGETS["Q8_0"].ftype)


def test_a_single_text_encoder_file_takes_the_tokenizer_folder_beside_it(tiny_model, tmp_path):
    """A folder of single files, as the runtime reads it (README: tokenizer/tokenizer.json in the folder): the GGUF
    carries that vocabulary (it was written without one, with a note that the file was missing)."""
    from safetensors.torch import load_file

    shutil.copytree(tiny_model / "tokenizer", tmp_path / "tokenizer")
    weights = {}
    for shard in sorted((tiny_model / "text_encoder").glob("*.safetensors")):
        weights.update(load_file(shard))
    save_file(weights, tmp_path / "qwen_3_4b.safetensors")
    [q8] = convert(tmp_path / "qwen_3_4b.safetensors", "Q8_0", out=tmp_path / "te.gguf")
    assert len([k for k in GGUFReader(q8.path).fields if k.startswith("tokenizer.")]) >= 8


def _comfy_single_file(kq_model: Path, path: Path) -> None:
    """The official DiT as a ComfyUI/stable-diffusion.cpp single file: fused qkv, prefix, BF16 weights (norms,
    biases and pad tokens F32, as in our BF16 GGUF, so both sources hold the same values)."""
    ref = _comfy_reference(_official(kq_model / "transformer"))
    save_file({f"model.diffusion_model.{k}": (v if v.dim() < 2 or "pad_token" in k else v.to(torch.bfloat16))
               .contiguous() for k, v in ref.items()}, path)


def test_any_source_layout_gives_the_same_tensors(kq_model, tmp_path):
    """Q8_0 from a BF16 GGUF (ours) and from a ComfyUI BF16 single file: the same bytes for every tensor."""
    [bf16] = convert(kq_model, "BF16", out=tmp_path / "bf16.gguf")
    [a] = convert(bf16.path, "Q8_0", out=tmp_path / "a.gguf")
    _comfy_single_file(kq_model, tmp_path / "comfy.safetensors")
    [b] = convert(tmp_path / "comfy.safetensors", "Q8_0", out=tmp_path / "b.gguf")
    ra, rb = GGUFReader(a.path), GGUFReader(b.path)
    assert [t.name for t in ra.tensors] == [t.name for t in rb.tensors]
    for x, y in zip(ra.tensors, rb.tensors, strict=True):
        assert x.tensor_type == y.tensor_type and np.array_equal(x.data, y.data), x.name
    assert _field(ra, "zimage_lite.source_sha256") != _field(rb, "zimage_lite.source_sha256")


# ---- bitsandbytes layouts -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("type_name", ["int8", "nf4"])
def test_bnb_layout(kq_model, tmp_path, type_name):
    [res] = convert(kq_model, type_name, out=tmp_path)
    assert res.path == tmp_path / f"z_image_turbo-{type_name}" and res.path.is_dir()
    config = json.loads((res.path / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc[f"load_in_{'8bit' if type_name == 'int8' else '4bit'}"]
    assert config["dim"] == KQUANT.dit.dim and config["_class_name"] == "ZImageTransformer2DModel"
    src = _official(kq_model / "transformer")
    with safe_open(str(res.path / "diffusion_pytorch_model.safetensors"), "pt") as f:
        st = {k: f.get_tensor(k) for k in f.keys()}
        assert f.metadata()["zimage_lite.recipe"].startswith(type_name)
    w = src["layers.0.attention.to_q.weight"]
    assert st["all_x_embedder.2-1.weight"].dtype == torch.bfloat16  # skipped module, not quantized
    assert st["x_pad_token"].dtype == torch.float32 and st["layers.0.attention_norm1.weight"].dtype == torch.float32
    if type_name == "int8":
        q, scb = st["layers.0.attention.to_q.weight"], st["layers.0.attention.to_q.SCB"]
        assert q.dtype == torch.int8 and scb.shape == (w.shape[0],) and "layers.0.attention.to_q.weight_format" in st
        got = q.float() * scb[:, None] / 127
    else:
        name = "layers.0.attention.to_q.weight"
        state = json.loads(bytes(st[f"{name}.quant_state.bitsandbytes__nf4"].tolist()))
        assert state == {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": list(w.shape)}
        assert st[name].shape == (w.numel() // 2, 1) and st[f"{name}.quant_map"].shape == (16,)
        got = bnb.dequantize_nf4(st[name], st[f"{name}.absmax"], tuple(w.shape))
    assert _nrmse(got, w) <= (0.02 if type_name == "int8" else 0.15)


def test_bnb_quantizers_match_bitsandbytes():
    bitsandbytes = pytest.importorskip("bitsandbytes")
    g = torch.Generator().manual_seed(0)
    for shape in [(256, 682), (48, 64), (7, 9)]:  # 7 x 9: odd count, a short last block
        w = torch.randn(shape, generator=g) * 0.05
        q, scb = bnb.quantize_int8(w)
        ref_q, ref_scb, _ = bitsandbytes.functional.int8_vectorwise_quant(w.half())
        assert torch.equal(q, ref_q) and torch.equal(scb, ref_scb)
        packed, absmax = bnb.quantize_nf4(w)
        ref_packed, state = bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
        assert torch.equal(packed, ref_packed) and torch.equal(absmax, state.absmax)
        assert torch.equal(state.code.float(), bnb.NF4_CODE)


# ---- bad input: a message naming what is wrong, nothing written -----------------------------------------------------


def quant(capsys, *args: str) -> tuple[int, str]:
    code = main(["quantize", *map(str, args)])
    return code, capsys.readouterr().err


def test_cli_writes_and_reports(kq_model, tmp_path, capsys):
    assert main(["quantize", str(kq_model), "--type", "Q8_0", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "z_image_turbo-Q8_0.gguf") in out and "peak memory" in out and "Q8_0" in out


def test_component_all_writes_both(tiny_model, tmp_path):
    results = convert(tiny_model, "Q8_0", component="all", out=tmp_path)
    assert [r.path.name for r in results] == ["z_image_turbo-Q8_0.gguf", "Qwen3-4B-Q8_0.gguf"]


def test_existing_output_needs_force(kq_model, tmp_path, capsys):
    out = tmp_path / "z.gguf"
    out.write_bytes(b"precious")
    code, err = quant(capsys, kq_model, "--type", "Q8_0", "--out", out)
    assert code == 2 and "--force" in err and str(out) in err and out.read_bytes() == b"precious"
    assert quant(capsys, kq_model, "--type", "Q8_0", "--out", out, "--force")[0] == 0
    umask = os.umask(0)
    os.umask(umask)
    assert out.read_bytes()[:4] == b"GGUF" and out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_an_earlier_bnb_folder_is_refused_then_replaced(kq_model, tmp_path, capsys):
    """A bitsandbytes output is itself a folder: given again as --out it is that output (refused without --force,
    replaced with it), not a parent folder to write the community-named one into."""
    out = tmp_path / "dit-nf4"
    assert quant(capsys, kq_model, "--type", "nf4", "--out", out)[0] == 0
    code, err = quant(capsys, kq_model, "--type", "nf4", "--out", out)
    assert code == 2 and "--force" in err and str(out) in err
    assert quant(capsys, kq_model, "--type", "nf4", "--out", out, "--force")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    # any other folder is a parent, even with a config.json and --force: a project's files are never replaced
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.json").write_text("{}")
    (project / "notes.txt").write_text("mine")
    assert quant(capsys, kq_model, "--type", "nf4", "--out", project, "--force")[0] == 0
    assert sorted(p.name for p in project.iterdir()) == ["config.json", "notes.txt", "z_image_turbo-nf4"]


def test_truncated_shard_is_named(kq_model, tmp_path, capsys):
    model = Path(shutil.copytree(kq_model, tmp_path / "model"))
    shard = sorted((model / "transformer").glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-1000])
    out = tmp_path / "out"
    out.mkdir()
    code, err = quant(capsys, model, "--type", "Q4_K_M", "--out", out)
    assert code == 2 and str(shard) in err and "truncated" in err
    assert _leftovers(out) == []


def test_unknown_layout(tmp_path, capsys):
    save_file({"foo.weight": torch.zeros(4, 4)}, tmp_path / "x.safetensors")
    code, err = quant(capsys, tmp_path / "x.safetensors", "--type", "Q8_0", "--out", tmp_path)
    assert code == 2 and "unknown layout" in err and "x.safetensors" in err and _leftovers(tmp_path) == []


def test_bnb_refused_for_the_text_encoder(tiny_model, tmp_path, capsys):
    code, err = quant(capsys, tiny_model, "--type", "int8", "--component", "text-encoder", "--out", tmp_path)
    assert code == 2 and "--type int8" in err and "DiT only" in err and list(tmp_path.iterdir()) == []


def test_requantizing_is_refused(kq_model, tmp_path, capsys):
    [q8] = convert(kq_model, "Q8_0", out=tmp_path / "q8.gguf")
    code, err = quant(capsys, q8.path, "--type", "Q4_K_M", "--out", tmp_path / "q4.gguf")
    assert code == 2 and str(q8.path) in err and "Q8_0" in err and "re-quantizing" in err
    assert not (tmp_path / "q4.gguf").exists() and _leftovers(tmp_path) == ["q8.gguf"]


def test_component_mismatch(tiny_model, tmp_path, capsys):
    te = tiny_model / "text_encoder"
    code, err = quant(capsys, te, "--type", "Q8_0", "--component", "dit", "--out", tmp_path)
    assert code == 2 and "--component dit" in err and "text encoder" in err and _leftovers(tmp_path) == []


@pytest.mark.parametrize("type_name", ["Q4_K_M", "nf4"])
def test_ctrl_c_leaves_nothing(kq_model, tmp_path, capsys, monkeypatch, type_name):
    import quantize.writing as writing

    calls = []
    real = writing.read

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(writing, "read", interrupted)  # every converter reads through it
    code, err = quant(capsys, kq_model, "--type", type_name, "--out", tmp_path)
    assert code == 130 and "nothing was written" in err and list(tmp_path.iterdir()) == []


# ---- the summary: fallbacks named, human units ----------------------------------------------------------------------


@pytest.mark.parametrize("type_name,wanted,got", [("Q4_K_M", "Q4_K", "Q5_0"), ("Q2_K", "Q2_K", "Q4_0")])
def test_summary_names_the_fallbacks(tiny_model, tmp_path, capsys, type_name, wanted, got):
    # TINY's 64-wide rows fit no K-quant block: the recipe's K types fall back, as llama.cpp's do
    assert main(["quantize", str(tiny_model), "--type", type_name, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    path = tmp_path / f"z_image_turbo-{type_name}.gguf"
    written = Counter(t.tensor_type.name for t in GGUFReader(path).tensors)
    assert "tensors: " + ", ".join(f"{k} {v}" for k, v in sorted(written.items())) in out
    assert f"{wanted} -> {got} {written[got]}" in out  # no recipe rule asks for {got}: each one fell back
    assert "fell back" in out and "64" in out
    assert "0.00 GB" not in out and re.search(rf"{path} +\(\d+\.\d\d [kM]B;", out), out  # human units


def test_summary_without_fallbacks(tiny_model, tmp_path):
    [res] = convert(tiny_model, "BF16", out=tmp_path)
    assert res.fallbacks == {} and "fell back" not in summary(res)
