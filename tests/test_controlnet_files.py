"""ControlNet files and options: the alibaba-pai single file loads to the diffusers folder's weights and config (the
release read off the tensors), a Q8_0 file from our quantize runs as diffusers does on its dequantized weights,
`info` and `plan` know it, the command line runs and re-runs it (--from-png), and bad input is refused naming what
is wrong: a ControlNet of another family, options that do not go together, a scale that is not a number."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures import PROMPTS, TINY, make_controlnet, mask_picture, optional, picture, refused, rel_err
from PIL import Image
from safetensors.torch import save_file
from test_controlnet import assert_same, theirs

import zimage_lite
from zimage_lite.cli import main
from zimage_lite.control import ControlResizeWarning
from zimage_lite.image import read_params
from zimage_lite.weights.control_files import open_control

diffusers, _ = optional("diffusers")
transformers, _ = optional("transformers")
needs_pipeline = pytest.mark.skipif(diffusers is None or transformers is None,
                                    reason="needs diffusers and transformers (diffusers' Z-Image pipelines)")

# Q8_0 ControlNet (and F32 DiT), ours dequantizing per matmul against diffusers on the dequantized weights: the same
# weights in the same precision, measured latents 2.1e-7 and 0 levels; the parity tolerances apply. Against diffusers
# on the unquantized ControlNet (the quantization error itself): measured latents 4.6e-3, 1 level; tolerance 0.03.
Q8_LATENT_TOL = 1e-5
Q8_VS_F32_TOL = 0.03


@pytest.fixture(scope="module")
def controlnets(tmp_path_factory) -> dict[str, tuple]:
    root = tmp_path_factory.mktemp("controlnet-files")
    return {kind: make_controlnet(root, kind) for kind in ("1.0", "2.1", "2.0")}


@pytest.mark.parametrize("kind", ["1.0", "2.1", "2.0"])
def test_single_file_loads_to_the_folder(controlnets, kind):
    folder, single = controlnets[kind]
    cfg_a, src_a = open_control(folder, TINY.dit)
    cfg_b, src_b = open_control(single, TINY.dit)
    assert cfg_a == cfg_b  # the release, blocks, places and input width read off the tensors
    assert sorted(src_a.names()) == sorted(src_b.names())
    for name in src_a.names():
        assert torch.equal(src_a.get(name), src_b.get(name)), name


def test_version_from_tensors_not_file_name(controlnets, tmp_path):
    """A 2.1 file under a 1.0-looking name is still 2.1; a 2.1 file whose control-refiner before_proj is all zero
    reads as 2.0 (diffusers' rule)."""
    single = controlnets["2.1"][1]
    renamed = tmp_path / "Z-Image-Turbo-Fun-Controlnet-Union.safetensors"
    renamed.write_bytes(single.read_bytes())
    assert open_control(renamed, TINY.dit)[0].add_control_noise_refiner == "control_noise_refiner"
    from safetensors.torch import load_file

    state = load_file(str(single))
    state["control_noise_refiner.0.before_proj.weight"].zero_()
    save_file(state, str(tmp_path / "zeroed.safetensors"))
    assert open_control(tmp_path / "zeroed.safetensors", TINY.dit)[0].add_control_noise_refiner == "control_layers"


@needs_pipeline
def test_q8_control_matches_diffusers_on_dequantized_weights(tiny_model, controlnets, tmp_path):
    from quantize.convert import convert

    folder = controlnets["2.1"][0]
    [res] = convert(folder, "Q8_0", component="controlnet", out=tmp_path / "control-Q8_0.gguf")
    cfg, src = open_control(res.path, TINY.dit)
    assert cfg == open_control(folder, TINY.dit)[0]
    assert src.qtype("control_layers.1.attention.to_q.weight") == "Q8_0"
    assert src.qtype("control_noise_refiner.0.attention.to_q.weight") == "BF16"  # refiners kept, as the DiT's
    state = {n: (t.dequantize() if hasattr(t, "dequantize") else t).float() for n in src.names()
             for t in [src.get(n)]}
    image = picture(64, 64, seed=3)
    pipe = zimage_lite.load(tiny_model, device="cpu", dtype="fp32", control=res.path)
    done = next(e for e in pipe.generate(PROMPTS["en"], control_image=image, seed=7) if e.stage == "decoded")
    want_lat, want = theirs(tiny_model, folder, PROMPTS["en"], image, 64, 64, state=state)
    assert_same(done.latents, done.image, want_lat, want, latent_tol=Q8_LATENT_TOL)
    f32_lat, _ = theirs(tiny_model, folder, PROMPTS["en"], image, 64, 64)
    assert rel_err(done.latents, f32_lat) <= Q8_VS_F32_TOL


def test_info_and_plan_know_the_controlnet(tiny_model, controlnets, capsys):
    single = controlnets["2.1"][1]
    assert main(["info", str(single)]) == 0
    out = capsys.readouterr().out
    assert "ControlNet" in out and "2.1 (2 control blocks, 33-channel input)" in out and "MB" in out
    assert main(["plan", "--model", str(tiny_model), "--control", str(single), "--device", "cpu", "--width", "64",
                 "--height", "64"]) == 0
    out = capsys.readouterr().out
    assert "controlnet: 4 blocks" in out and "ControlNet 2.1" in out and "vae_encode" in out
    assert "beside it, every step: the ControlNet's" in out


def _write(path, names: list[str]) -> None:
    save_file({n: torch.zeros(4, 4) for n in names}, str(path))


@pytest.mark.parametrize("names,what", [
    (["controlnet_blocks.0.weight", "controlnet_x_embedder.weight", "transformer_blocks.0.attn.to_q.weight"],
     "a Flux ControlNet"),
    (["controlnet_cond_embedding.conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"],
     "an SD/SDXL (UNet) ControlNet"),
    (["control_model.input_hint_block.0.weight", "control_model.zero_convs.0.0.weight"],
     "an SD/SDXL (UNet) ControlNet"),
])
def test_other_controlnets_are_refused(tiny_model, tmp_path, capsys, names, what):
    bad = tmp_path / "controlnet.safetensors"
    _write(bad, names)
    Image.new("RGB", (64, 64)).save(tmp_path / "pose.png")
    refused(capsys, ["run", "x", "--model", str(tiny_model), "--control", str(bad), "--control-image",
                     str(tmp_path / "pose.png"), "--out", str(tmp_path / "o.png")], str(bad), what,
            watch=(tmp_path,))


def test_a_dit_as_controlnet_is_refused(tiny_model, tmp_path, capsys):
    Image.new("RGB", (64, 64)).save(tmp_path / "pose.png")
    dit = tiny_model / "transformer"
    refused(capsys, ["run", "x", "--model", str(tiny_model), "--control", str(dit), "--control-image",
                     str(tmp_path / "pose.png"), "--out", str(tmp_path / "o.png")], "a Z-Image DiT, not a ControlNet",
            watch=(tmp_path,))


@pytest.mark.parametrize("kind,extra,names", [
    (None, ["--control-image", "{pose}"], ["--control-image needs --control"]),
    ("1.0", ["--control-image", "{pose}", "--image", "{pose}", "--mask", "{mask}"], ["--mask", "16-channel"]),
    ("1.0", ["--control-image", "{pose}", "--image", "{pose}"], ["--image", "no inpaint input"]),
    ("2.1", ["--control-image", "{pose}", "--mask", "{mask}"], ["needs both --image and --mask", "give --image"]),
    ("2.1", ["--control-image", "{pose}", "--control-scale", "strong"], ["--control-scale 'strong'",
                                                                          "not a number"]),
    ("2.1", ["--control-image", "{pose}", "--control-scale", "nan"], ["--control-scale", "not a number"]),
    ("2.1", [], ["--control-image FILE"]),
    ("2.1", ["--control-image", "{pose}", "--image", "{pose}", "--mask", "{mask}", "--strength", "0.5"],
     ["--strength does not apply"]),
])
def test_bad_control_options_are_refused(tiny_model, controlnets, tmp_path, capsys, kind, extra, names):
    pose, m = tmp_path / "pose.png", tmp_path / "mask.png"
    picture(64, 64).save(pose)
    mask_picture(64, 64).save(m)
    argv = ["run", "x", "--model", str(tiny_model), "--out", str(tmp_path / "o.png")]
    if kind:
        argv += ["--control", str(controlnets[kind][1])]
    argv += [a.format(pose=pose, mask=m) for a in extra]
    refused(capsys, argv, *names, watch=(tmp_path,))


def test_cli_runs_and_reruns_from_png(tiny_model, controlnets, tmp_path, capsys):
    single = controlnets["2.1"][1]
    pose, image, m = tmp_path / "pose.png", tmp_path / "photo.png", tmp_path / "mask.png"
    picture(80, 64, seed=1).save(pose)
    picture(64, 48, seed=2).save(image)
    mask_picture(64, 48).save(m)
    out = tmp_path / "a.png"
    assert main(["run", "a fox", "--model", str(tiny_model), "--control", str(single), "--control-image", str(pose),
                 "--image", str(image), "--mask", str(m), "--width", "64", "--height", "48", "--seed", "3",
                 "--control-scale", "0.6", "--out", str(out), "--device", "cpu", "--dtype", "fp32"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: --control-image is 80x64: resized to 64x48") == 1  # once, not per request made
    params = read_params(out)
    assert params["control"] == single.name and len(params["control_sha256"]) == 16
    assert params["control_scale"] == 0.6 and "control_image_sha256" in params and "mask_sha256" in params
    # the control file and image are not in the PNG: refused until given again, then the same image
    inputs = ["--image", str(image), "--mask", str(m)]
    refused(capsys, ["run", "--from-png", str(out), *inputs, "--out", str(tmp_path / "b.png")], "--control FILE",
            "sha256", watch=(tmp_path,))
    refused(capsys, ["run", "--from-png", str(out), *inputs, "--control", str(single), "--out",
                     str(tmp_path / "b.png")], "--control-image FILE", watch=(tmp_path,))
    again = tmp_path / "b.png"
    assert main(["run", "--from-png", str(out), "--control", str(single), "--control-image", str(pose), "--image",
                 str(image), "--mask", str(m), "--out", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    assert "not the one" not in capsys.readouterr().err
    # other inputs than the image was made from: a note for each (the run goes on), as for img2img's --image
    other_pose, other_net = tmp_path / "pose2.png", controlnets["2.0"][1]
    picture(80, 64, seed=5).convert("RGBA").save(other_pose)  # read with a conversion note, as --image is
    assert main(["run", "--from-png", str(out), "--control", str(other_net), "--control-image", str(other_pose),
                 "--image", str(image), "--mask", str(m), "--out", str(tmp_path / "c.png")]) == 0
    err = capsys.readouterr().err
    assert f"note: --control-image {other_pose} is not the one {out} was made from" in err
    assert f"note: --control {other_net} is not the ControlNet {out} was made with" in err
    assert "note: --control-image: RGBA converted to RGB" in err
    assert "note: --image" not in err and "note: --mask" not in err


def test_control_image_sets_the_size(tiny_model, controlnets):
    """Without width and height the size is the control image's, rounded down to the grid (16 px), and the user is
    told the image is resized to it."""
    pipe = zimage_lite.load(tiny_model, device="cpu", dtype="fp32", control=controlnets["1.0"][1])
    with pytest.warns(ControlResizeWarning, match="70x50: resized to 64x48"):
        params = pipe.run_params("x", control_image=picture(70, 50), seed=1)
    assert (params["width"], params["height"]) == (64, 48)
    assert rel_err(torch.tensor([params["control_scale"]]), torch.tensor([0.75])) == 0


def _full_size(n_blocks: int) -> tuple:
    """A full-size 2.1-shaped ControlNet's config and BF16 tensor table (what `plan` reads from a file's header):
    lite 2.1 (3 control blocks) or full 2.1 (15)."""
    from zimage_lite.config import ControlNetConfig
    from zimage_lite.models.controlnet import ZImageControlNet

    cfg = ControlNetConfig(control_layers_places=tuple(range(0, 30, 30 // n_blocks)),
                           control_refiner_layers_places=(0, 1), control_in_dim=33,
                           add_control_noise_refiner="control_noise_refiner")
    with torch.device("meta"):
        table = {n: (tuple(t.shape), "BF16") for n, t in ZImageControlNet(cfg).state_dict().items()}
    return cfg, table


@pytest.mark.parametrize("n_blocks", [3, 15])
def test_plan_counts_the_controlnet_beside_the_dit(n_blocks):
    """1024x1024 under --vram 4GB: the DiT's and the ControlNet's stages each count the other's loaded weights, the
    hints sit in the DiT's activations, and both fit the budget (the full 2.1 by streaming its blocks)."""
    from zimage_lite.runtime.plan import plan_for

    cfg, table = _full_size(n_blocks)
    args = ("turbo", "Q4_K_M", 1024, 1024, False, "cuda", 4 * 10**9, None)
    base = plan_for(*args)
    plan = plan_for(*args, control=(cfg, table))
    dit, ctrl = plan.stage("dit"), plan.stage("controlnet")
    assert dit.partner_bytes == ctrl.loaded_bytes > 0 and ctrl.partner_bytes == dit.loaded_bytes
    seq = 4096 + 512  # image tokens + caption tokens planned for
    assert dit.activation_bytes - base.stage("dit").activation_bytes == n_blocks * seq * cfg.dim * 2
    assert max(dit.peak_bytes, ctrl.peak_bytes) <= plan.request.budget
    assert len(ctrl.blocks) == n_blocks + 2 and (n_blocks == 3 or ctrl.streamed)


def test_canny_finds_a_square_outline():
    """A grey square on black: one closed outline, 1-2 px thick, nothing inside or outside it."""
    from zimage_lite.canny import canny

    arr = np.zeros((64, 64), np.uint8)
    arr[16:48, 16:48] = 180
    edges = np.asarray(canny(Image.fromarray(arr, "L")))[..., 0] > 0
    assert edges[16:48, 15:17].any(axis=1).all() and edges[15:17, 16:48].any(axis=0).all()  # left and top sides
    assert edges[16:48, 47:49].any(axis=1).all() and edges[47:49, 16:48].any(axis=0).all()  # right and bottom
    assert not edges[19:45, 19:45].any() and not edges[:13].any() and not edges[51:].any()
    assert (edges[20:44].sum(axis=1) == 2).all()  # each row crosses two sides, 1 px each (non-maximum suppression)


def _grown(thin, low, high):
    """Hysteresis the slow, obvious way: strong pixels, grown through weak ones (8-connected) until nothing changes."""
    weak, edges = thin > low, thin > high
    while True:
        p = np.pad(edges, 1)
        grown = weak & (p[:-2, :-2] | p[:-2, 1:-1] | p[:-2, 2:] | p[1:-1, :-2] | p[1:-1, 2:] | p[2:, :-2]
                        | p[2:, 1:-1] | p[2:, 2:] | edges)
        if np.array_equal(grown, edges):
            return edges
        edges = grown


def test_hysteresis_keeps_exactly_the_weak_pixels_joined_to_strong_ones():
    """Labelled components (canny._components) keep what growing the strong pixels one ring at a time keeps: on
    noise (many small components), on a long snaking weak path with one strong end, and across diagonal joins."""
    from zimage_lite.canny import hysteresis

    rng = np.random.default_rng(7)
    noise = rng.uniform(0, 300, (90, 70)) * (rng.uniform(size=(90, 70)) < 0.55)
    snake = np.zeros((41, 41))
    for k in range(10):  # rows 4 apart, joined at alternating ends: one weak path of ~500 pixels
        snake[4 * k, 1:40] = snake[4 * k + 4, 1:40] = 150
        snake[4 * k + 1:4 * k + 4, 39 if k % 2 == 0 else 1] = 150
    snake[0, 1] = 250  # strong at the path's start
    snake[40, 20] = 0  # a cut in the last row: the piece past it stays out
    diagonal = np.eye(30)[:, ::-1] * 150
    diagonal[0, -1] = 250
    for thin in (noise, snake, diagonal):
        assert np.array_equal(hysteresis(thin, 100, 200), _grown(thin, 100, 200))
    kept = hysteresis(snake, 100, 200)
    assert kept[36, 39] and kept[40, 19] and not kept[40, 21]
    assert hysteresis(diagonal, 100, 200).sum() == 30


def test_control_preprocess_canny_equals_its_map(tiny_model, controlnets):
    """--control-preprocess canny is the run with the canny map as the control image; the image records it."""
    from zimage_lite.canny import canny

    photo = picture(64, 64, seed=9)
    pipe = zimage_lite.load(tiny_model, device="cpu", dtype="fp32", control=controlnets["1.0"][1])
    a = next(e for e in pipe.generate("x", control_image=photo, control_preprocess="canny", seed=2)
             if e.stage == "decoded")
    b = next(e for e in pipe.generate("x", control_image=canny(photo), seed=2) if e.stage == "decoded")
    assert torch.equal(a.latents, b.latents) and a.info["control_preprocess"] == "canny"
    c = next(e for e in pipe.generate("x", control_image=photo, seed=2) if e.stage == "decoded")
    assert rel_err(c.latents, a.latents) > 1e-3  # the photo itself gives another image


def test_the_command_line_makes_the_canny_map_once(tiny_model, controlnets, tmp_path, monkeypatch):
    """The run checks its output's metadata before it starts and then runs the same prepared request: the control
    image is read and its edges found once per image, not once for the check and again for the run."""
    from zimage_lite import control

    maps = []
    monkeypatch.setattr(control, "canny", lambda image: maps.append(image) or image.convert("L").convert("RGB"))
    picture(64, 48, seed=9).save(tmp_path / "photo.png")
    assert main(["run", "x", "--model", str(tiny_model), "--control", str(controlnets["1.0"][1]), "--control-image",
                 str(tmp_path / "photo.png"), "--control-preprocess", "canny", "--out", str(tmp_path / "o.png"),
                 "--device", "cpu", "--dtype", "fp32", "--steps", "1"]) == 0
    assert len(maps) == 1 and read_params(tmp_path / "o.png")["control_preprocess"] == "canny"


def test_unknown_preprocessor_is_refused(tiny_model, controlnets, tmp_path, capsys):
    picture(64, 64).save(tmp_path / "photo.png")
    refused(capsys, ["run", "x", "--model", str(tiny_model), "--control", str(controlnets["1.0"][1]),
                     "--control-image", str(tmp_path / "photo.png"), "--control-preprocess", "sobel", "--out",
                     str(tmp_path / "o.png")], "--control-preprocess 'sobel'", "canny", watch=(tmp_path,))


def test_quantize_finds_a_controlnet_file_and_refuses_int8_for_it(controlnets, tmp_path, capsys):
    """A single ControlNet file is read off its tensor names without --component; INT8 (ComfyUI) files exist for the
    DiT and the text encoder only: refused by name before anything is written."""
    from quantize.convert import convert

    single = controlnets["2.1"][1]
    [res] = convert(single, "Q8_0", out=tmp_path / "c.gguf")
    assert res.path.is_file()
    out = tmp_path / "int8"
    out.mkdir()
    for kind in ("int8-convrot", "int8-rowwise"):
        argv = ["quantize", str(single), "--type", kind, "--out", str(out / "c.safetensors")]
        refused(capsys, argv, f"--type {kind}", "ControlNet", "Q8_0", watch=(out,))


@pytest.mark.parametrize("change,names", [({"control_in_dim": 20}, ["control_in_dim", "16", "33"]),
                                          ({"add_control_noise_refiner": None}, ["control_refiner_layers_places"])])
def test_a_config_that_cannot_run_is_refused(controlnets, tmp_path, change, names):
    """A diffusers folder whose config no ControlNet of these releases has: one error naming the field at open,
    not an IndexError or a shape error mid-run."""
    import json
    import shutil

    from zimage_lite.errors import CheckpointError

    folder = tmp_path / "cn"
    shutil.copytree(controlnets["2.1"][0], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError) as e:
        open_control(folder, TINY.dit)
    assert all(n in str(e.value) for n in names), str(e.value)
