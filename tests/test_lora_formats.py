"""Reading LoRA files (zimage_lite/weights/lora.py): every layout diffusers' Z-Image loader reads gives the deltas
diffusers computes, the bad inputs are refused by `read_lora` and by `zimage-lite info`, and `info` describes a LoRA.

The files come from `fixtures.write_lora`, which spells each layout out by hand; the reference is diffusers' own
`ZImagePipeline.lora_state_dict` (its key conversion, alpha folded into A and B), plus PEFT's lora_alpha / r for
a LoraConfig saved in the header (what `load_lora_weights` hands PEFT).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from fixtures import LORA_FORMATS, TINY, optional, refused, write_lora
from safetensors.torch import load_file, save_file

from zimage_lite.cli import main
from zimage_lite.errors import CheckpointError, ShapeError
from zimage_lite.weights.lora import read_lora

diffusers, needs_diffusers = optional("diffusers")
# fp32 factors; diffusers folds alpha/rank (7.3/4 here, not a power of two) into A in fp32, we scale the product:
# measured max |ours - diffusers| / max |diffusers| 5.6e-8 (0 without alpha); tolerance 5e-7.
TOL = 5e-7


def diffusers_deltas(path: Path) -> dict[str, torch.Tensor]:
    """Official linear name → B @ A as diffusers loads `path` (times PEFT's lora_alpha / r from the header)."""
    sd, meta = diffusers.ZImagePipeline.lora_state_dict(str(path), return_lora_metadata=True)
    out = {}
    for key, a in sd.items():
        if key.endswith(".lora_A.weight"):
            name = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            b = sd[key.replace(".lora_A.", ".lora_B.")]
            scale = meta["transformer.lora_alpha"] / a.shape[0] if meta else 1.0
            out[name] = scale * b.double() @ a.double()
    return out


@needs_diffusers
@pytest.mark.parametrize(("fmt", "alpha"), [(f, a) for f in LORA_FORMATS for a in (None, 7.3)
                                            if a is None or f != "dot"])  # the dot form carries no alpha
def test_matches_diffusers(tmp_path: Path, fmt: str, alpha: float | None) -> None:
    path = write_lora(tmp_path / "l.safetensors", TINY.dit, fmt, alpha=alpha, seed=3)
    lora = read_lora(path, TINY.dit)
    ref = diffusers_deltas(path)
    assert lora.format == fmt
    assert set(lora.adapters) == set(ref), set(lora.adapters) ^ set(ref)
    assert len(ref) == 52  # every linear of TINY's DiT, refiners and embedders too
    for name, a in lora.adapters.items():
        ours = a.scale * a.up.double() @ a.down.double()
        err = float((ours - ref[name]).abs().max() / ref[name].abs().max())
        assert err < TOL, (name, err)
    assert not lora.skipped


def test_fused_qkv_split_by_rows(tmp_path: Path) -> None:
    """ComfyUI's fused qkv (block-diagonal up of rank 3r, alpha x3) becomes three rank-r pairs, alpha/rank kept."""
    path = write_lora(tmp_path / "l.safetensors", TINY.dit, "comfyui", rank=4, alpha=2.0)
    lora = read_lora(path)
    q = lora.adapters["layers.1.attention.to_q"]
    assert (q.rank, q.alpha, q.scale) == (4, 2.0, 0.5)
    assert q.down.shape == (4, TINY.dit.dim)
    assert lora.keys["layers.1.attention.to_k"] == "lora_unet_layers_1_attention_qkv.lora_down.weight"


def test_redundant_keys_and_partial_match(tmp_path: Path, capsys) -> None:
    """Anime-Z's fused copies are redundant (not applied, not 'skipped'); a key for no DiT linear is skipped and the
    rest applies; `info` says which."""
    path = write_lora(tmp_path / "l.safetensors", TINY.dit, "dot", seed=1)
    lora = read_lora(path, TINY.dit)
    assert len(lora.duplicates) == 2 * 2 * 6 and not lora.skipped  # (qkv, out) x (down, up) x 6 blocks
    state = load_file(path)
    state["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 8)
    save_file(state, path)
    lora = read_lora(path, TINY.dit)
    assert lora.skipped == ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",)
    assert len(lora.adapters) == 52
    capsys.readouterr()
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "1 map onto nothing" in out and "proj_in" in out and "dot" in out


def test_info(tmp_path: Path, capsys) -> None:
    path = write_lora(tmp_path / "l.safetensors", TINY.dit, "kohya", rank=8, alpha=4.0,
                      modules=["layers.0.attention.to_q", "layers.0.attention.to_k", "noise_refiner.1.feed_forward.w2",
                               "t_embedder.mlp.0", "layers.1.adaLN_modulation.0"])
    lora = read_lora(path)
    capsys.readouterr()
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    for want in ("LoRA", "kohya", "rank 8", "alpha 4", "attention q 1", "attention k 1", "refiner feed_forward 1",
                 "adaLN 1", "embedders", "all keys map", lora.sha256[:16], "64 wide"):
        assert want in out, (want, out)
    assert main(["info", str(path), "--json"]) == 0
    desc = json.loads(capsys.readouterr().out)["sections"][0]
    assert desc["component"] == "lora" and desc["format"] == "kohya" and desc["ranks"] == {"8": 5}
    assert desc["all_keys_map"] is True and desc["sha256"] == lora.sha256


# --- bad input: each through read_lora and through `zimage-lite info` -------------------------------------------

def _edit(path: Path, fn) -> Path:
    state = load_file(path)
    fn(state)
    save_file(state, path)
    return path


def _kohya(tmp_path: Path) -> Path:
    return write_lora(tmp_path / "l.safetensors", TINY.dit, "kohya", alpha=4.0)


def _not_safetensors(tmp_path: Path) -> Path:
    path = tmp_path / "l.safetensors"
    path.write_bytes(b"\x80\x04PK pickled, not safetensors" * 10)
    return path


def _gguf(tmp_path: Path) -> Path:
    path = tmp_path / "l.gguf"
    w = gguf.GGUFWriter(str(path), "lumina2")
    w.add_tensor("layers.0.attention.to_q.lora_A.weight", np.ones((4, 64), dtype=np.float32))
    w.add_tensor("layers.0.attention.to_q.lora_B.weight", np.ones((64, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _other_model(tmp_path: Path) -> Path:
    keys = [f"lora_unet_down_blocks_{i}_attentions_0_proj_in.lora_{r}.weight" for i in range(3) for r in ("down", "up")]
    keys += [f"transformer.single_transformer_blocks.{i}.attn.to_q.lora_{r}.weight" for i in range(2) for r in "AB"]
    path = tmp_path / "l.safetensors"
    save_file({k: torch.zeros(4, 4) for k in keys}, path)
    return path


def _rank_mismatch(tmp_path: Path) -> Path:
    key = "lora_unet_layers_1_feed_forward_w2.lora_up.weight"
    return _edit(_kohya(tmp_path), lambda s: s.__setitem__(key, torch.zeros(64, 5)))


def _shape_mismatch(tmp_path: Path) -> Path:
    key = "lora_unet_layers_0_attention_to_v.lora_down.weight"
    return _edit(_kohya(tmp_path), lambda s: s.__setitem__(key, torch.zeros(4, 65)))


def _missing_up(tmp_path: Path) -> Path:
    return _edit(_kohya(tmp_path), lambda s: s.pop("lora_unet_cap_embedder_1.lora_up.weight"))


def _missing_down(tmp_path: Path) -> Path:
    return _edit(_kohya(tmp_path), lambda s: s.pop("lora_unet_noise_refiner_0_attention_to_k.lora_down.weight"))


def _non_finite(tmp_path: Path) -> Path:
    key = "lora_unet_layers_0_attention_to_out_0.lora_up.weight"
    return _edit(_kohya(tmp_path), lambda s: s[key].view(-1).__setitem__(3, float("nan")))


def _text_encoder(tmp_path: Path) -> Path:
    keys = [f"lora_te_layers_{i}_self_attn_q_proj.lora_{r}.weight" for i in range(2) for r in ("down", "up")]
    return _edit(_kohya(tmp_path), lambda s: s.update({k: torch.zeros(4, 4) for k in keys}))


def _lokr(tmp_path: Path) -> Path:
    path = tmp_path / "l.safetensors"
    save_file({"diffusion_model.layers.0.attention.to_q.lokr_w1": torch.zeros(4, 4),
               "diffusion_model.layers.0.attention.to_q.lokr_w2": torch.zeros(16, 16)}, path)
    return path


BAD = {  # case → (the file, the error type, what the message must name)
    "not safetensors": (_not_safetensors, CheckpointError, ["not a safetensors file", "pickled"]),
    "gguf": (_gguf, CheckpointError, ["a GGUF file", ".safetensors"]),
    "other model": (_other_model, CheckpointError, ["10 keys", "lora_unet_down_blocks_0_attentions_0_proj_in",
                                                    "another model"]),
    "rank mismatch": (_rank_mismatch, ShapeError, ["rank mismatch", "lora_unet_layers_1_feed_forward_w2.lora_up",
                                                   "(64, 5)", "rank 4"]),
    "shape mismatch": (_shape_mismatch, ShapeError, ["lora_unet_layers_0_attention_to_v.lora_down.weight", "64x65",
                                                     "64x64"]),
    "missing up": (_missing_up, CheckpointError, ["lora_unet_cap_embedder_1.lora_down.weight", "no up"]),
    "missing down": (_missing_down, CheckpointError, ["lora_unet_noise_refiner_0_attention_to_k", "no down"]),
    "non-finite": (_non_finite, CheckpointError, ["lora_unet_layers_0_attention_to_out_0.lora_up.weight", "NaN"]),
    "text encoder": (_text_encoder, CheckpointError, ["4 text-encoder LoRA key", "lora_te_layers_0", "DiT only"]),
    "lokr": (_lokr, CheckpointError, ["LoKr", "lokr_w1"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(tmp_path: Path, capsys, case: str) -> None:
    make, error, names = BAD[case]
    path = make(tmp_path)
    with pytest.raises(error) as e:
        read_lora(path, TINY.dit)
    for name in [str(path), *names]:
        assert name in str(e.value), (name, str(e.value))
    # `info` cannot tell an unreadable file is a LoRA: it says what it says of any corrupt safetensors file
    cli_names = ["corrupt safetensors file"] if case == "not safetensors" else names
    refused(capsys, ["info", str(path)], str(path), *cli_names, watch=(tmp_path,))
