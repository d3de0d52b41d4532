"""Reading every layout users have: ComfyUI / sd.cpp / llama.cpp / FLUX-ae names, GGUF and single safetensors.

The files are written here from the official-layout fixture (same weights, other names, other containers), then
read back through the runtime. Float storage of the same values must give bit-identical results (fp32 compute);
quantized storage within the error its type implies (bounds stated at the tests).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from fixtures import PROMPTS, TINY, make_checkpoint, rel_err
from gguf import GGMLQuantizationType as Q
from gguf import TokenType
from safetensors.torch import save_file

import zimage_lite
from zimage_lite.cli import main
from zimage_lite.config import VAEConfig
from zimage_lite.errors import CheckpointError
from zimage_lite.models.dit import ZImageDiT
from zimage_lite.models.qwen3 import Qwen3Encoder
from zimage_lite.models.vae import AutoencoderDecoder
from zimage_lite.quant.formats import quantize
from zimage_lite.quant.qlinear import QTensor
from zimage_lite.text import PromptTokenizer
from zimage_lite.weights.components import official_names, open_dit, open_text_encoder, open_vae, resolve_model
from zimage_lite.weights.gguf_source import GGUFSource
from zimage_lite.weights.load import load_module
from zimage_lite.weights.names import dit_comfy_name, te_llama_cpp_name, translate, vae_flux_name
from zimage_lite.weights.sources import RenamedSource, SafetensorsSource, TensorSource

# VAE widths that are multiples of 32: GroupNorm's group count is not in the weights, so a single-file VAE gets
# FLUX's 32 groups (TINY's VAE uses 4).
CFG = dataclasses.replace(TINY, vae=VAEConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1))
SDCPP = "model.diffusion_model."


class DictSource(TensorSource):
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors, self.path = tensors, Path("<memory>")

    def names(self):
        return self.tensors.keys()

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def get(self, name):
        return self.tensors[name]

    def qtype(self, name):
        return "F32"


def folder_state(folder: Path) -> dict[str, torch.Tensor]:
    src = SafetensorsSource.from_folder(folder)
    return {n: src.get(n) for n in src.names()}


# --- layout converters (official → other), from names.py's own table ------------------------------------------


def to_comfy(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list[torch.Tensor]] = {}
    for name, t in state.items():
        new, part = dit_comfy_name(name)
        if part is None:
            out[prefix + new] = t
        else:
            fused.setdefault(prefix + new, [None] * part[1])[part[0]] = t
    out.update({n: torch.cat(parts) for n, parts in fused.items()})
    out[prefix + "norm_final.weight"] = torch.ones(CFG.dit.dim)  # the Lumina-2 leftover ComfyUI files carry
    return out


def to_llama_cpp(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {te_llama_cpp_name(n.removeprefix("model.")): t for n, t in state.items()}


def to_flux_ae(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in state.items():
        new = vae_flux_name(name, len(CFG.vae.block_out_channels))
        # FLUX's attention projections are 1x1 convs
        out[new] = t[:, :, None, None] if ".attn_1." in new and t.ndim == 2 else t
    return out


def write_gguf(path: Path, tensors: dict[str, tuple[torch.Tensor | np.ndarray, str]], arch: str | None,
               kv: list[Callable[[gguf.GGUFWriter], None]] = ()) -> Path:
    """tensors: name → (values, GGML type name); an ndarray is written as raw bytes of that type."""
    w = gguf.GGUFWriter(str(path), arch or "none")
    if arch is None:
        del w.kv_data[0]["general.architecture"]  # GGUFWriter always adds it; sd.cpp writes no KV at all
    for add in kv:
        add(w)
    for name, (t, qtype) in tensors.items():
        q = Q[qtype]
        if isinstance(t, np.ndarray):
            w.add_tensor(name, t, raw_dtype=q)
        elif q == Q.F32:
            w.add_tensor(name, t.float().numpy())
        elif q == Q.F16:
            w.add_tensor(name, t.half().numpy())
        else:
            w.add_tensor(name, quantize(t, q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def sdcpp_type(name: str, t: torch.Tensor) -> str:
    """sd.cpp's converter (gguf_interop.md 2.6): keeps biases and embedders, quantizes the rest, norms included."""
    if "pad_token" in name:
        return "F16"
    if name.endswith(".bias") or any(k in name for k in ("final_layer.", "x_embedder.", "t_embedder.")):
        return "F32"
    return "Q8_0" if t.shape[-1] % 32 == 0 else "F32"


def comfy_type(name: str, t: torch.Tensor) -> str:
    """ComfyUI-GGUF's recipe (3.1): 1-D and pads F32, embedders and refiners BF16, main layers quantized."""
    if t.ndim == 1 or "pad_token" in name:
        return "F32"
    if any(k in name for k in ("x_embedder.", "t_embedder.", "final_layer.", "cap_embedder.", "_refiner.")):
        return "BF16"
    if ".attention.qkv." in name:
        return "Q8_0"
    return "Q4_0" if t.shape[-1] % 32 == 0 else "F16"


def tokenizer_kv(tokenizer_json: Path, n_vocab: int):
    """llama.cpp's gpt2-style tokenizer metadata, written as convert_hf_to_gguf.py does for Qwen."""
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    vocab = {i: t for t, i in data["model"]["vocab"].items()}
    added = {t["id"]: t for t in data["added_tokens"]}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in vocab:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(vocab[i])
            types.append(TokenType.NORMAL if i not in added else
                         TokenType.CONTROL if added[i]["special"] else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]

    def add(w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_eos_token_id(151645)
    return add


# --- fixtures -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("layouts") / "official", CFG)


@pytest.fixture(scope="module")
def files(official, tmp_path_factory) -> dict[str, Path]:
    """The official weights in every other layout and container."""
    out = tmp_path_factory.mktemp("single")
    dit, te, vae = (folder_state(official / f) for f in ("transformer", "text_encoder", "vae"))
    comfy = to_comfy(dit)
    paths = {"comfy_st": out / "comfy.safetensors", "sdcpp_st": out / "sdcpp.safetensors",
             "te_hf": out / "qwen_3_4b.safetensors", "ae": out / "ae.safetensors"}
    save_file(comfy, paths["comfy_st"])
    save_file(to_comfy(dit, SDCPP), paths["sdcpp_st"])
    # Qwen3ForCausalLM keys without the `model.` prefix, plus an lm_head that is never read
    lm_head = te["model.embed_tokens.weight"].clone()
    save_file({**{n.removeprefix("model."): t for n, t in te.items()}, "lm_head.weight": lm_head}, paths["te_hf"])
    save_file(to_flux_ae(vae), paths["ae"])
    paths["sdcpp"] = write_gguf(out / "z_image_turbo-Q8_0-sdcpp.gguf", {
        SDCPP + n: (t.flatten() if "pad_token" in n else t, sdcpp_type(n, t)) for n, t in to_comfy(dit).items()
        if n != "norm_final.weight"}, arch=None)
    paths["comfy"] = write_gguf(out / "z_image_turbo-Q4_0.gguf", {n: (t, comfy_type(n, t)) for n, t in comfy.items()},
                                arch="lumina2", kv=[lambda w: w.add_quantization_version(2)])
    singles = out / "singles"
    singles.mkdir()
    paths["singles"] = singles
    paths["dit_f32"] = write_gguf(out / "z_image_turbo-F32.gguf", {n: (t, "F32") for n, t in comfy.items()},
                                  arch="lumina2")
    # safetensors for the DiT here: an image is compared bit for bit (see test_dit_comfyui_layout_is_exact)
    save_file(comfy, singles / "z_image_turbo.safetensors")
    te_kv = [lambda w: w.add_float32("qwen3.rope.freq_base", CFG.text_encoder.rope_theta),
             lambda w: w.add_float32("qwen3.attention.layer_norm_rms_epsilon", CFG.text_encoder.rms_norm_eps),
             tokenizer_kv(official / "tokenizer" / "tokenizer.json", CFG.text_encoder.vocab_size)]
    paths["te_gguf"] = write_gguf(singles / "Qwen3-4B-BF16.gguf", {n: (t, "BF16") for n, t in to_llama_cpp(te).items()},
                                  arch="qwen3", kv=te_kv)
    paths["ae_in_singles"] = singles / "ae.safetensors"
    save_file(to_flux_ae(vae), paths["ae_in_singles"])
    return paths


def load(cls, opener, path, dtype=torch.float32):
    cfg, src = opener(path)
    with torch.device("meta"):
        model = cls(cfg)
    return load_module(model, src, dtype, "cpu", cls.__name__)


def dit_output(path: Path) -> torch.Tensor:
    model = load(ZImageDiT, open_dit, path)
    g = torch.Generator().manual_seed(0)
    x, caps = torch.randn(1, 16, 8, 6, generator=g), [torch.randn(9, CFG.dit.cap_feat_dim, generator=g)]
    with torch.no_grad():
        return model(x, torch.tensor([0.4]), caps)


# --- names.py both ways ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,convert,layout", [("dit", to_comfy, "comfyui"),
                                                 ("text_encoder", to_llama_cpp, "llama.cpp"),
                                                 ("vae", to_flux_ae, "flux")])
def test_names_round_trip(official, kind, convert, layout):
    folder = {"dit": "transformer", "text_encoder": "text_encoder", "vae": "vae"}[kind]
    state = folder_state(official / folder)
    # every tensor of the official files (the text encoder's unused last layer and final norm, the VAE encoder)
    full = {n.removeprefix("model.") if kind == "text_encoder" else n: t for n, t in state.items()}
    assert set(official_names(kind, getattr(CFG, kind))) <= set(full)
    other = convert(state)
    found, mapping = translate(kind, list(full), list(other), "x", len(CFG.vae.block_out_channels))
    back = RenamedSource(DictSource(other), mapping)
    assert found == layout and set(back.names()) == set(full)
    for name, want in full.items():
        assert torch.equal(back.get(name).reshape(want.shape), want), name
    # the official layout maps onto itself
    assert translate(kind, list(full), list(state), "x")[0] in ("official", "transformers", "diffusers")


# --- DiT ------------------------------------------------------------------------------------------------------


# The F32 GGUF gives the same weights, but MKL's matrix-vector kernel sums in an order that depends on the
# weight's address: mapped GGUF data sits at 32 bytes mod 64, safetensors' copies elsewhere. So fp32 rounding only.
@pytest.mark.parametrize("key,tol", [("comfy_st", 0.0), ("sdcpp_st", 0.0), ("dit_f32", 1e-6)])
def test_dit_comfyui_layout_is_exact(official, files, key, tol):
    """ComfyUI names (fused qkv), with and without the sd.cpp prefix, safetensors or F32 GGUF: the same output."""
    want = dit_output(official / "transformer")
    assert rel_err(dit_output(files[key]), want) <= tol
    assert open_dit(files[key])[0] == CFG.dit  # the config read off the shapes is the one config.json holds


def test_dit_quantized_gguf_within_quant_error(official, files):
    """sd.cpp-style Q8_0 (norms quantized too, pads [dim] F16, no metadata) and ComfyUI-GGUF-style Q4_0/Q8_0.

    Bounds (max |diff| / max |ref| of the DiT output, measured 1.6% and 12%): Q8_0 rounds each weight to 1/254 of
    its block's largest → below 3%; Q4_0 to 1/14, on most main-layer weights → below 25% and above the Q8_0 error.
    """
    assert GGUFSource(files["sdcpp"]).architecture is None
    src = open_dit(files["sdcpp"])[1]
    assert src.qtype("layers.0.attention_norm1.weight") == "Q8_0" and src.shape("x_pad_token") == (CFG.dit.dim,)
    assert isinstance(src.get("layers.0.attention.to_k.weight"), QTensor)
    want = dit_output(official / "transformer")
    err_q8, err_q4 = rel_err(dit_output(files["sdcpp"]), want), rel_err(dit_output(files["comfy"]), want)
    assert 0 < err_q8 < 0.03
    assert err_q8 < err_q4 < 0.25


def test_k_quants_read_from_gguf(tmp_path):
    """K-quants need rows of 256 (the tiny DiT has 64): a 256-wide tensor per type, read packed, as gguf-py reads."""
    t = torch.randn(6, 256, generator=torch.Generator().manual_seed(1))
    types = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
    path = write_gguf(tmp_path / "k.gguf", {f"w.{q}": (t, q) for q in types}, arch="lumina2")
    src = GGUFSource(path)
    for q in types:
        packed = src.get(f"w.{q}")
        assert isinstance(packed, QTensor) and src.shape(f"w.{q}") == (6, 256) and src.qtype(f"w.{q}") == q
        want = gguf.quants.dequantize(src.reader.tensors[types.index(q)].data, Q[q])
        assert np.array_equal(packed.dequantize().numpy(), want)
        # rows 2..4 of a fused tensor, straight from the packed bytes
        part = RenamedSource(src, {"k": (f"w.{q}", (1, 3))}).get("k")
        assert torch.equal(part.dequantize(), torch.from_numpy(want[2:4]))


# --- text encoder and VAE -------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["te_gguf", "te_hf"])
def test_text_encoder_layouts_are_exact(official, files, key):
    ids = PromptTokenizer(official / "tokenizer" / "tokenizer.json").encode(PROMPTS["en"]).ids
    with torch.no_grad():
        want = load(Qwen3Encoder, open_text_encoder, official / "text_encoder")(ids, "cpu", torch.float32)
        got = load(Qwen3Encoder, open_text_encoder, files[key])(ids, "cpu", torch.float32)
    assert torch.equal(got, want)
    assert open_text_encoder(files[key])[0] == open_text_encoder(official / "text_encoder")[0]


def test_tokenizer_from_gguf_metadata(official, files, tmp_path):
    text = GGUFSource(files["te_gguf"]).tokenizer_json()
    (tmp_path / "tokenizer.json").write_text(text, encoding="utf-8")
    ours = PromptTokenizer(tmp_path / "tokenizer.json")
    ref = PromptTokenizer(official / "tokenizer" / "tokenizer.json")
    for prompt in [*PROMPTS.values(), "<|im_start|>x<|im_end|> <think>", "cats' toys 12345 \n\n  tabs\t!"]:
        assert ours.encode(prompt).ids.tolist() == ref.encode(prompt).ids.tolist()


def test_vae_flux_ae_layout_is_exact(official, files):
    lat = torch.randn(1, 16, 6, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = load(AutoencoderDecoder, open_vae, official / "vae").decode(lat)
        got = load(AutoencoderDecoder, open_vae, files["ae"]).decode(lat)
    assert torch.equal(got, want)


# --- whole pipeline from a folder of single files -------------------------------------------------------------


def test_folder_of_single_files_renders_the_same_image(official, files):
    resolved = resolve_model(files["singles"])
    assert (resolved.dit.name, resolved.text_encoder.name, resolved.vae.name) == (
        "z_image_turbo.safetensors", "Qwen3-4B-BF16.gguf", "ae.safetensors")
    kwargs = {"width": 32, "height": 32, "steps": 2, "seed": 3}
    want = zimage_lite.load(official, device="cpu", dtype="fp32").text_to_image("a fox", **kwargs)
    got = zimage_lite.load(files["singles"], device="cpu", dtype="fp32").text_to_image("a fox", **kwargs)
    assert np.array_equal(np.asarray(got), np.asarray(want))


def test_folder_without_tokenizer_says_what_is_needed(files, tmp_path):
    for key in ("comfy_st", "te_hf", "ae"):
        (tmp_path / files[key].name).symlink_to(files[key])
    with pytest.raises(CheckpointError, match=r"tokenizer/tokenizer\.json"):
        resolve_model(tmp_path)


# --- bad input, through the CLI -------------------------------------------------------------------------------


def cli_run(capsys, tmp_path: Path, *args: str) -> str:
    out = tmp_path / "o.png"
    code = main(["run", "x", "--width", "32", "--height", "32", "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists(), err
    return err


def truncated(src: Path, dst: Path, keep: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[:int(len(data) * keep)])
    return dst


@pytest.mark.parametrize("key,keep", [("comfy", 0.6), ("comfy", 0.002), ("comfy_st", 0.6)])
def test_truncated_file(official, files, tmp_path, capsys, key, keep):
    bad = truncated(files[key], tmp_path / files[key].name, keep)
    err = cli_run(capsys, tmp_path, "--model", str(official), "--dit", str(bad))
    assert str(bad) in err and "truncated" in err


def test_bad_magic(official, files, tmp_path, capsys):
    bad = tmp_path / "z.gguf"
    bad.write_bytes(b"GGML" + files["comfy"].read_bytes()[4:])
    err = cli_run(capsys, tmp_path, "--model", str(official), "--dit", str(bad))
    assert f"{bad}: not a GGUF file" in err


def test_unknown_layout_lists_expected_names(official, tmp_path, capsys):
    bad = tmp_path / "mystery.safetensors"
    save_file({"foo.weight": torch.zeros(4, 4)}, bad)
    err = cli_run(capsys, tmp_path, "--model", str(official), "--dit", str(bad))
    assert str(bad) in err and "layers.0.attention.qkv.weight" in err and "layers.0.attention.to_q.weight" in err


def test_unsupported_quant_type(official, files, tmp_path, capsys):
    comfy = to_comfy(folder_state(official / "transformer"))
    tensors = {n: (t, "F32") for n, t in comfy.items()}
    name = "layers.1.feed_forward.w1.weight"  # [170, 64]: IQ4_NL blocks of 32 weights, 18 bytes
    tensors[name] = (np.random.default_rng(0).integers(0, 255, (170, 36), dtype=np.uint8), "IQ4_NL")
    bad = write_gguf(tmp_path / "iq.gguf", tensors, arch="lumina2")
    err = cli_run(capsys, tmp_path, "--model", str(official), "--dit", str(bad))
    assert name in err and "IQ4_NL" in err and str(bad) in err


def test_text_encoder_passed_as_dit(official, files, tmp_path, capsys):
    err = cli_run(capsys, tmp_path, "--model", str(official), "--dit", str(files["te_gguf"]))
    assert f"{files['te_gguf']} holds a text encoder, not a DiT (--dit)" in err


# --- zimage-lite info -----------------------------------------------------------------------------------------


def info(capsys, path: Path) -> str:
    assert main(["info", str(path)]) == 0
    return capsys.readouterr().out


def test_info_official_folder(official, capsys):
    out = info(capsys, official)
    assert "DiT, official (diffusers) layout" in out and "text encoder, transformers layout" in out
    assert "VAE, diffusers layout" in out and "F32 " in out and "BF16 " in out and "tokenizer.json" in out
    assert "zimage-lite: yes" in out and "diffusers: yes (from_pretrained)" in out


def test_info_comfyui_gguf(files, capsys):
    out = info(capsys, files["comfy"])
    assert "DiT, ComfyUI (fused qkv) layout" in out and "general.architecture = lumina2" in out
    for t in ("Q4_0", "Q8_0", "BF16", "F32", "F16"):
        assert f"{t} " in out
    assert "ComfyUI-GGUF: yes" in out and "stable-diffusion.cpp: yes" in out and "diffusers: yes" in out


def test_info_sdcpp_gguf(files, capsys):
    out = info(capsys, files["sdcpp"])
    assert "DiT, ComfyUI (fused qkv) layout, prefix model.diffusion_model." in out and "Q8_0 " in out
    assert "metadata     none" in out
    assert "ComfyUI-GGUF: no (1-D tensors quantized: Q8_0)" in out and "stable-diffusion.cpp: yes" in out
    assert "diffusers: no (norms or pad tokens stored as" in out and "zimage-lite: yes" in out


def test_info_folder_of_single_files(files, capsys):
    out = info(capsys, files["singles"])
    assert "text encoder, llama.cpp layout" in out and "VAE, FLUX ae layout" in out and "GGUF metadata" in out
