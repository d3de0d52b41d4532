"""Bad input that is READ, by class: files, configs, components, weights.

Every case builds its bad input here and goes through `refused` (fixtures.py): exit 2, one `error:` line naming the
file, key or tensor and what to do, no traceback, and the watched folder (the model copy and where the image would
go) exactly as it was. Cases run the tiny model at 32x32, one step, fp32 on the CPU.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from fixtures import TINY, make_checkpoint, refused
from PIL import Image
from safetensors.torch import load_file, save_file

from zimage_lite.cli import main

DIT_SHARD = "transformer/diffusion_pytorch_model-00002-of-00002.safetensors"
TE_SHARD = "text_encoder/model-00001-of-00002.safetensors"
VAE_FILE = "vae/diffusion_pytorch_model.safetensors"


@pytest.fixture
def ckpt(tiny_model: Path, tmp_path: Path) -> Path:
    """A copy of the tiny model to break (the session's stays intact)."""
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


def run_argv(model: Path, out_dir: Path, *extra: str, dtype: str = "fp32") -> list[str]:
    return ["run", "x", "--model", str(model), "--width", "32", "--height", "32", "--steps", "1", "--seed", "1",
            "--device", "cpu", "--dtype", dtype, "--out", str(out_dir / "o.png"), *extra]


def tiny_gguf(path: Path, cut: int = 0) -> Path:
    """A one-tensor GGUF; with `cut`, that many bytes short."""
    w = gguf.GGUFWriter(str(path), "lumina2")
    w.add_tensor("x_pad_token", np.ones((1, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if cut:
        data = path.read_bytes()
        path.write_bytes(data[:-cut])
    return path


def edit_tensor(folder: Path, shard: str, suffix: str, value: float, where: slice | int = 0) -> str:
    """Set part of the first tensor of `shard` whose name ends with `suffix` to `value`; returns its name."""
    state = load_file(folder / shard)
    name = next(n for n in state if n.endswith(suffix))
    t = state[name].clone()
    t.view(-1)[where] = value
    state[name] = t
    save_file(state, folder / shard)
    return name


# ---- files: paths that are not what they must be -------------------------------------------------------------------


def _fifo(p: Path) -> Path:
    os.mkfifo(p)
    return p


def _garbage(p: Path) -> Path:
    p.write_bytes(bytes(range(256)) * 64)
    return p


def _empty(p: Path) -> Path:
    p.write_bytes(b"")
    return p


def _folder(p: Path) -> Path:
    p.mkdir()
    return p


# (case id, make(tmp, ckpt) -> (argv, names that the message must hold))
FILE_CASES = {
    "fifo as --dit": lambda t, m: (run_argv(m, t, "--dit", str(_fifo(t / "d.gguf"))), ["d.gguf", "--dit", "FIFO"]),
    "fifo as --model": lambda t, m: (run_argv(_fifo(t / "m.gguf"), t), ["m.gguf", "--model", "FIFO"]),
    "/dev/null as --text-encoder": lambda t, m: (run_argv(m, t, "--text-encoder", os.devnull),
                                                 [os.devnull, "--text-encoder", "character device"]),
    "/dev/null as --model": lambda t, m: (run_argv(Path(os.devnull), t), [os.devnull, "--model", "character device"]),
    "empty folder as --vae": lambda t, m: (run_argv(m, t, "--vae", str(_folder(t / "v"))), [str(t / "v"), "none"]),
    "garbage .safetensors as --dit": lambda t, m: (run_argv(m, t, "--dit", str(_garbage(t / "d.safetensors"))),
                                                   ["d.safetensors", "corrupt"]),
    "garbage without suffix as --dit": lambda t, m: (run_argv(m, t, "--dit", str(_garbage(t / "d.bin"))),
                                                     ["d.bin", "neither a GGUF nor a safetensors"]),
    "empty .gguf as --dit": lambda t, m: (run_argv(m, t, "--dit", str(_empty(t / "d.gguf"))), ["d.gguf", "empty"]),
    "empty .safetensors as --vae": lambda t, m: (run_argv(m, t, "--vae", str(_empty(t / "v.safetensors"))),
                                                 ["v.safetensors", "--vae", "empty"]),
    "config.json is a folder": lambda t, m: (
        run_argv(m, t), (os.remove(m / "transformer/config.json"), _folder(m / "transformer/config.json"))
        and ["transformer/config.json", "a folder, not a file"]),
    "config.json is a fifo": lambda t, m: (
        run_argv(m, t), (os.remove(m / "vae/config.json"), _fifo(m / "vae/config.json"))
        and ["vae/config.json", "FIFO"]),
    "shard is a fifo": lambda t, m: (run_argv(m, t), (os.remove(m / TE_SHARD), _fifo(m / TE_SHARD))
                                     and [TE_SHARD.split("/")[1], "FIFO"]),
    "tokenizer.json is a fifo": lambda t, m: (
        run_argv(m, t), (os.remove(m / "tokenizer/tokenizer.json"), _fifo(m / "tokenizer/tokenizer.json"))
        and ["tokenizer/tokenizer.json", "FIFO"]),
    "missing component folder": lambda t, m: (run_argv(m, t), shutil.move(m / "vae", m / "VAE")
                                              and ["no vae/ folder", str(m)]),
    "missing shard": lambda t, m: (run_argv(m, t), os.remove(m / DIT_SHARD) or [DIT_SHARD.split("/")[1], "missing"]),
    "index not JSON": lambda t, m: (run_argv(m, t), (m / "text_encoder/model.safetensors.index.json")
                                    .write_text("{not json") and ["model.safetensors.index.json", "not valid JSON"]),
    "config.json cut": lambda t, m: (run_argv(m, t), (m / "transformer/config.json").write_text('{"dim": 6')
                                     and ["transformer/config.json", "not valid JSON"]),
    "info /dev/null": lambda t, m: (["info", os.devnull], [os.devnull, "character device"]),
    "info fifo": lambda t, m: (["info", str(_fifo(t / "f.gguf"))], ["f.gguf", "FIFO"]),
    "info truncated gguf": lambda t, m: (["info", str(tiny_gguf(t / "cut.gguf", cut=100))], ["cut.gguf", "truncated"]),
    "info garbage": lambda t, m: (["info", str(_garbage(t / "g.safetensors"))], ["g.safetensors", "corrupt"]),
}


@pytest.mark.parametrize("case", FILE_CASES)
def test_files(case, ckpt, tmp_path, capsys):
    argv, names = FILE_CASES[case](tmp_path, ckpt)
    refused(capsys, argv, *names, watch=(tmp_path,))


def test_wrong_tensor_shape(ckpt, tmp_path, capsys):
    state = load_file(ckpt / DIT_SHARD.replace("00002-of", "00001-of"))
    name = next(n for n in state if n.endswith("attention.to_q.weight"))
    state[name] = torch.zeros(32, 64)
    save_file(state, ckpt / DIT_SHARD.replace("00002-of", "00001-of"))
    refused(capsys, run_argv(ckpt, tmp_path), name, "[32, 64]", "[64, 64]", watch=(tmp_path,))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files without read permission")
def test_unreadable_file(ckpt, tmp_path, capsys):
    (ckpt / VAE_FILE).chmod(0)
    refused(capsys, run_argv(ckpt, tmp_path), "diffusion_pytorch_model.safetensors", "permission denied",
            watch=(tmp_path,))


def test_info_on_one_bad_file_prints_only_the_error(tmp_path, capsys):
    assert main(["info", str(tiny_gguf(tmp_path / "cut.gguf", cut=100))]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "truncated" in err


def test_info_on_a_folder_with_one_bad_part_fails_after_describing_the_rest(ckpt, tmp_path, capsys):
    _garbage(ckpt / "extra.safetensors")
    refused(capsys, ["info", str(ckpt)], "extra.safetensors", "1 of 4 parts cannot be read", watch=(tmp_path,))


# ---- configs: JSON that parses but is wrong ------------------------------------------------------------------------

TE_INDEX = "text_encoder/model.safetensors.index.json"
# (file, change: a dict merged in / a key to delete / raw text, names the message must hold)
CONFIG_CASES = [
    ("transformer/config.json", {"dim": "3840"}, ['"dim" is "3840" (a string)', "positive integer"]),
    ("transformer/config.json", {"dim": True}, ['"dim" is true (a boolean)']),
    ("transformer/config.json", {"n_heads": 0}, ['"n_heads" is 0', "positive integer"]),
    ("transformer/config.json", {"dim": 65}, ['"dim" 65', '"n_heads" 2']),
    ("transformer/config.json", {"n_kv_heads": 3}, ['"n_heads" 2', '"n_kv_heads" 3']),
    ("transformer/config.json", {"axes_dims": [8, 12, 10]}, ['"axes_dims" [8, 12, 10]', "32"]),
    ("transformer/config.json", {"axes_dims": [8, "12", 12]}, ['"axes_dims"', "list of positive integers"]),
    ("transformer/config.json", {"all_patch_size": 2}, ['"all_patch_size" is 2']),
    ("transformer/config.json", '{"norm_eps": NaN}', ['"norm_eps" is nan', "finite positive number"]),
    ("transformer/config.json", {"rope_theta": -1.0}, ['"rope_theta" is -1.0', "finite positive number"]),
    ("transformer/config.json", "[64, 2]", ["[64, 2] (a list)", "not a JSON object"]),
    ("transformer/config.json", "3", ["3 (a number)", "not a JSON object"]),
    ("transformer/config.json", b"\x89PNG\r\n\x1a\n\xff\xfe", ["not a JSON text file"]),
    ("text_encoder/config.json", {"hidden_size": -48}, ['"hidden_size" is -48']),
    ("text_encoder/config.json", {"num_key_value_heads": 3}, ['"num_attention_heads" 4', '"num_key_value_heads" 3']),
    ("text_encoder/config.json", {"rope_theta": "1e6"}, ['"rope_theta" is "1e6" (a string)']),
    ("text_encoder/config.json", {"rope_parameters": [1]}, ['"rope_parameters" is [1] (a list)', "an object"]),
    ("text_encoder/config.json", {"rope_theta": None, "rope_parameters": {"rope_theta": "x"}},
     ['"rope_parameters.rope_theta" is "x"']),
    ("text_encoder/config.json", {"vocab_size": 1.5}, ['"vocab_size" is 1.5 (a number)', "positive integer"]),
    ("text_encoder/config.json", {"num_hidden_layers": 1}, ['"num_hidden_layers" is 1', "at least 2"]),
    ("vae/config.json", {"block_out_channels": []}, ['"block_out_channels" is [] (a list)']),
    ("vae/config.json", {"norm_num_groups": 3}, ['"norm_num_groups" 3', '"block_out_channels"']),
    ("vae/config.json", {"latent_channels": None}, ['"latent_channels" is null']),
    ("vae/config.json", {"scaling_factor": "0.36"}, ['"scaling_factor" is "0.36" (a string)']),
    ("vae/config.json", {"out_channels": 1}, ['"out_channels" is 1', "RGB"]),
    ("vae/config.json", {"mid_block_add_attention": "yes"}, ['"mid_block_add_attention"', "true or false"]),
    ("vae/config.json", {"quantization_config": ["bnb"]}, ["quant_method"]),
    ("scheduler/scheduler_config.json", {"shift": "3.0"}, ['"shift" is "3.0" (a string)']),
    ("scheduler/scheduler_config.json", {"shift": -1}, ['"shift" is -1', "finite positive number"]),
    ("scheduler/scheduler_config.json", {"num_train_timesteps": 0}, ['"num_train_timesteps" is 0']),
    (TE_INDEX, "[]", ["[] (a list)", "not a JSON object"]),
    (TE_INDEX, {"weight_map": ["model-00001-of-00002.safetensors"]}, ['"weight_map"', "(a list)"]),
    (TE_INDEX, {"weight_map": {"model.embed_tokens.weight": 1}}, ['"weight_map"', "shard file name"]),
    (TE_INDEX, {"weight_map": {"model.embed_tokens.weight": "../x.safetensors"}}, ['"weight_map"']),
    (TE_INDEX, {"weight_map": None}, ['"weight_map"', "found null)"]),
]


@pytest.mark.parametrize("file,change,names", CONFIG_CASES,
                         ids=[f"{f.split('/')[0]}-{str(c)[:30]}" for f, c, _ in CONFIG_CASES])
def test_configs(file, change, names, ckpt, tmp_path, capsys):
    path = ckpt / file
    if isinstance(change, bytes):
        path.write_bytes(change)
    elif isinstance(change, str):
        path.write_text(change if not change.startswith("{") else
                        json.dumps(json.loads(path.read_text()))[:-1] + ", " + change[1:])
    else:
        data = json.loads(path.read_text())
        data.update({k: v for k, v in change.items() if v is not None or k != "rope_theta"})
        if change.get("rope_theta", 0) is None:
            del data["rope_theta"]  # only rope_parameters spells it
        path.write_text(json.dumps(data))
    refused(capsys, run_argv(ckpt, tmp_path), file, *names, watch=(tmp_path,))


def test_config_errors_come_before_any_compute(ckpt, tmp_path, capsys):
    """`plan` reads the same files: a bad config fails it too, naming the file and key."""
    (ckpt / "transformer/config.json").write_text(json.dumps({"dim": "3840"}))
    refused(capsys, ["plan", "--model", str(ckpt), "--device", "cpu", "--dtype", "fp32"],
            "transformer/config.json", '"dim"', watch=(tmp_path,))


# ---- components: parts of different models ------------------------------------------------------------------------

# Self-consistent, but narrower than TINY everywhere one component hands to another.
NARROW = dataclasses.replace(
    TINY, dit=dataclasses.replace(TINY.dit, cap_feat_dim=32, in_channels=8),
    text_encoder=dataclasses.replace(TINY.text_encoder, hidden_size=32, vocab_size=1000),
    vae=dataclasses.replace(TINY.vae, latent_channels=8))


@pytest.fixture(scope="module")
def narrow(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("narrow") / "Z-Image-Narrow", NARROW)


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory) -> Path:
    """TINY's text encoder with 1000 embedding rows: the tokenizer's special tokens sit at 151643+."""
    cfg = dataclasses.replace(TINY, text_encoder=dataclasses.replace(TINY.text_encoder, vocab_size=1000))
    return make_checkpoint(tmp_path_factory.mktemp("vocab") / "Z-Image-Vocab", cfg)


@pytest.mark.parametrize("command", ["run", "plan"])
@pytest.mark.parametrize("option,folder,names", [
    ("--text-encoder", "text_encoder", ["hidden_size", "32", "cap_feat_dim", "48"]),
    ("--vae", "vae", ["latent_channels", "8", "in_channels", "16"]),
    ("--dit", "transformer", ["hidden_size", "48", "cap_feat_dim", "32"]),
])
def test_components_from_another_model(command, option, folder, names, tiny_model, narrow, tmp_path, capsys):
    argv = run_argv(tiny_model, tmp_path, option, str(narrow / folder))
    if command == "plan":
        argv = ["plan", "--model", str(tiny_model), "--device", "cpu", option, str(narrow / folder)]
    mine = narrow / folder
    theirs = [tiny_model / f for f in ("transformer", "text_encoder", "vae") if f != folder]
    other = str(theirs[0] if folder != "transformer" else tiny_model / "text_encoder")
    refused(capsys, argv, str(mine), other, *names, watch=(tmp_path,))


def test_one_folder_holding_parts_of_two_models(ckpt, narrow, tmp_path, capsys):
    shutil.rmtree(ckpt / "text_encoder")
    shutil.copytree(narrow / "text_encoder", ckpt / "text_encoder")
    refused(capsys, run_argv(ckpt, tmp_path), str(ckpt / "text_encoder"), str(ckpt / "transformer"), "32", "48",
            watch=(tmp_path,))


def test_tokenizer_beyond_the_embedding_table(tiny_model, small_vocab, tmp_path, capsys):
    refused(capsys, run_argv(tiny_model, tmp_path, "--text-encoder", str(small_vocab / "text_encoder")),
            str(tiny_model / "tokenizer/tokenizer.json"), str(small_vocab / "text_encoder"), "151668", "1000",
            watch=(tmp_path,))


# ---- weights: NaN/inf in the files ---------------------------------------------------------------------------------

# (file, tensor suffix, value, stage named, dtype)
WEIGHT_CASES = {
    "DiT NaN": (DIT_SHARD, "feed_forward.w2.weight", float("nan"), "DiT", "fp32"),
    "DiT inf": (DIT_SHARD, "attention.to_out.0.weight", float("inf"), "DiT", "fp32"),
    "DiT NaN in a norm, bf16": (DIT_SHARD, "attention_norm1.weight", float("nan"), "DiT", "bf16"),
    "text encoder NaN": (TE_SHARD, "mlp.down_proj.weight", float("nan"), "text encoder", "fp32"),
    "VAE NaN": (VAE_FILE, "decoder.conv_out.weight", float("nan"), "VAE", "fp32"),
    "VAE -inf": (VAE_FILE, "decoder.conv_in.weight", float("-inf"), "VAE", "fp32"),
}


@pytest.mark.parametrize("case", WEIGHT_CASES)
def test_nonfinite_weights_are_named(case, ckpt, tmp_path, capsys):
    file, suffix, value, stage, dtype = WEIGHT_CASES[case]
    name = edit_tensor(ckpt, file, suffix, value, slice(0, 3))
    err = refused(capsys, run_argv(ckpt, tmp_path, dtype=dtype), f"the {stage} produced NaN/inf", name,
                  str(ckpt / file), "3 of", "download or convert it again", watch=(tmp_path,))
    assert "fp16" not in err  # the weights are at fault, not the dtype


def test_nonfinite_vae_encoder_weight_is_named(ckpt, tmp_path, capsys):
    """img2img: a NaN in the encoder's weights stops the run at the encoder stage, named, before the DiT runs."""
    name = edit_tensor(ckpt, VAE_FILE, "encoder.conv_in.weight", float("nan"), slice(0, 3))
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "in.png")
    err = refused(capsys, run_argv(ckpt, tmp_path, "--image", str(tmp_path / "in.png")),
                  "the VAE encoder produced NaN/inf", name, str(ckpt / VAE_FILE), "3 of", watch=(tmp_path,))
    assert "DiT" not in err


def test_ordinary_finite_weights_are_not_called_large(ckpt, tmp_path, capsys, monkeypatch):
    """NaN from a stage whose weights are all finite and ordinary: no claim that they are too large."""
    import zimage_lite.stage_models as stage_models

    real = stage_models.finite
    monkeypatch.setattr(stage_models, "finite", lambda t: real(t) and t.dim() != 4)  # the DiT prediction "overflows"
    err = refused(capsys, run_argv(ckpt, tmp_path), "the DiT produced NaN/inf", "ordinary size",
                  "an input or an intermediate overflowed", watch=(tmp_path,))
    assert "weights that large" not in err


def test_fp16_is_blamed_only_when_the_weights_are_finite(ckpt, tmp_path, capsys):
    # 1e5 is finite in the fp32 file and beyond fp16's 65504: an fp16 run overflows (the adaLN scales are not
    # clamped as the FFN's outputs are), an fp32 run does not
    name = edit_tensor(ckpt, DIT_SHARD, "layers.0.adaLN_modulation.0.weight", 1e5, slice(None))
    refused(capsys, run_argv(ckpt, tmp_path, dtype="fp16"), "the DiT produced NaN/inf", "fp16 overflowed",
            "weights are all finite", name, "--dtype bf16 or fp32", watch=(tmp_path,))
    assert main(run_argv(ckpt, tmp_path, dtype="fp32")) == 0


def test_finite_but_huge_weights_in_fp32_are_not_blamed_on_fp16(ckpt, tmp_path, capsys):
    name = edit_tensor(ckpt, DIT_SHARD, "feed_forward.w2.weight", 3e38, slice(None))
    err = refused(capsys, run_argv(ckpt, tmp_path), "the DiT produced NaN/inf", "computing in fp32", name,
                  "3e+38", watch=(tmp_path,))
    assert "fp16" not in err


@pytest.fixture
def q8_dit(tiny_model: Path, tmp_path: Path) -> tuple[Path, str]:
    """The tiny DiT as Q8_0, with the fp16 scale of one block of one Q8_0 tensor set to NaN: (file, tensor)."""
    from quantize.convert import convert

    (tmp_path / "q8").mkdir()
    [res] = convert(tiny_model, "Q8_0", out=tmp_path / "q8")
    reader = gguf.GGUFReader(res.path)
    t = next(t for t in reader.tensors if t.tensor_type == gguf.GGMLQuantizationType.Q8_0)
    with open(res.path, "r+b") as f:
        f.seek(int(t.data_offset) + 34)  # the second block of 34 bytes: fp16 scale, then 32 int8
        f.write(np.array([np.nan], dtype=np.float16).tobytes())
    return res.path, t.name


def test_nan_scale_in_a_quantized_block_is_named(q8_dit, tiny_model, tmp_path, capsys):
    path, stored = q8_dit
    refused(capsys, run_argv(tiny_model, tmp_path, "--dit", str(path)), "the DiT produced NaN/inf", stored,
            str(path), "32 of", watch=(tmp_path,))


def test_scan_reads_in_pieces(q8_dit, ckpt, monkeypatch):
    """Pieces of a few rows find what the whole tensor shows, for packed and plain tensors alike."""
    from zimage_lite.runtime import numerics
    from zimage_lite.weights.components import open_component

    path, _ = q8_dit
    name = edit_tensor(ckpt, TE_SHARD, "embed_tokens.weight", float("nan"), slice(-5, None))
    cases = [(open_component(path, "dit"), "dit"), (open_component(ckpt / "text_encoder", "text_encoder"),
                                                    "text_encoder")]
    for comp, kind in cases:
        names = numerics.weight_names(kind, comp.config)
        whole = numerics.scan_weights(comp.source, names)
        monkeypatch.setattr(numerics, "SCAN_PIECE", 4096)  # 64 rows of 64 a piece: several per tensor
        pieces = numerics.scan_weights(comp.source, names)
        monkeypatch.undo()
        assert [(b.name, b.count) for b in pieces.bad] == [(b.name, b.count) for b in whole.bad] != []
        assert pieces.largest == whole.largest
    assert whole.bad[0].name == name.removeprefix("model.") and whole.bad[0].count == 5
