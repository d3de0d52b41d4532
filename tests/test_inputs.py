"""Image inputs (zimage_lite/inputs.py): every mode Pillow opens becomes the RGB image or L mask the pipeline takes,
preprocessed exactly as diffusers' image and mask processors do; files that are not images are refused by name."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import optional, refused
from PIL import Image

from zimage_lite.errors import OptionError
from zimage_lite.inputs import check_mask_size, default_size, image_tensor, load_image, load_mask, mask_tensor
from zimage_lite.sampling import get_sigmas, start_index

diffusers, needs_diffusers = optional("diffusers")


def _rgb(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


@needs_diffusers
@pytest.mark.parametrize("size,target", [((64, 48), (64, 48)), ((70, 53), (64, 48)), ((40, 40), (64, 32))])
def test_image_tensor_matches_diffusers(size, target):
    from diffusers.image_processor import VaeImageProcessor

    img = _rgb(*size)
    ref = VaeImageProcessor(vae_scale_factor=16).preprocess(img, height=target[1], width=target[0])
    got = image_tensor(img, *target)
    assert got.shape == ref.shape and torch.equal(got, ref.float())


@needs_diffusers
def test_mask_tensor_matches_diffusers():
    from diffusers.image_processor import VaeImageProcessor

    rng = np.random.default_rng(1)
    # smooth values around the threshold, and exact 127/128 levels: binarization at 0.5 must agree everywhere
    smooth = Image.fromarray(np.clip(rng.normal(128, 40, (48, 80)), 0, 255).astype(np.uint8), "L")
    edge = Image.fromarray(rng.choice(np.array([126, 127, 128, 129], dtype=np.uint8), (48, 80)), "L")
    proc = VaeImageProcessor(vae_scale_factor=16, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    for mask, (w, h) in ((smooth, (80, 48)), (smooth, (64, 32)), (edge, (80, 48))):
        ref = torch.nn.functional.interpolate(proc.preprocess(mask, height=h, width=w), size=(h // 8, w // 8),
                                              mode="nearest")
        got = mask_tensor(mask, w, h, h // 8, w // 8)
        assert torch.equal(got, ref.float())
        assert 0 < got.mean() < 1  # both kinds of cells present: the comparison is not vacuous


@pytest.mark.parametrize("steps,strength,start", [(8, 1.0, 0), (8, 0.6, 3), (8, 0.5, 4), (9, 0.6, 3), (8, 0.01, 7),
                                                  (20, 0.33, 13)])
def test_start_index_matches_get_timesteps(steps, strength, start):
    # the reference's arithmetic: 8 * 0.6 = 4.8 -> 8 - 4.8 = 3.2 -> 3; 9 * 0.6 = 5.4 -> 3.6 -> 3; 20 * .33 = 6.6 -> 13
    assert start_index(steps, strength) == start
    assert len(get_sigmas(steps)[start:-1]) == steps - start


def test_modes_are_converted(tmp_path: Path):
    rgb = _rgb(32, 32)
    cases = {
        "cmyk.jpg": (rgb.convert("CMYK"), "CMYK converted"),
        "pal.png": (rgb.convert("P"), "P converted"),
        "rgba.png": (rgb.convert("RGBA"), "transparency dropped"),
    }
    for name, (img, note) in cases.items():
        img.save(tmp_path / name)
        loaded = load_image(tmp_path / name)
        assert loaded.image.mode == "RGB" and loaded.image.size == (32, 32)
        assert any(note in n for n in loaded.notes), (name, loaded.notes)
    # 16-bit gray: scaled by its range, not clipped to white by Pillow's own conversion
    levels = np.array([[0, 16384], [32768, 65535]], dtype=np.uint16)
    Image.fromarray(levels).save(tmp_path / "g16.png")
    loaded = load_image(tmp_path / "g16.png")
    assert np.asarray(loaded.image)[:, :, 0].tolist() == [[0, 64], [128, 255]]
    assert any("16-bit" in n for n in loaded.notes)


def test_animated_gif_gives_first_frame(tmp_path: Path):
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    loaded = load_image(tmp_path / "a.gif")
    assert loaded.image.getpixel((0, 0)) == (255, 0, 0)
    assert any("3 frames; the first is used" in n for n in loaded.notes)


def test_mask_any_mode_to_l(tmp_path: Path):
    Image.new("RGB", (16, 16), (255, 255, 255)).save(tmp_path / "m.png")
    assert load_mask(tmp_path / "m.png").image.mode == "L"


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = tmp_path / "good.png"
    _rgb(64, 64).save(good)
    data = good.read_bytes()
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "folder.png").mkdir()
    os.mkfifo(tmp_path / "fifo.png")  # would block a reader forever
    # 20000 x 20000 pixels in a 48 KB file: past Pillow's decompression-bomb limit (179 Mpx)
    Image.new("1", (20000, 20000)).save(tmp_path / "bomb.png")
    return {
        "empty": (tmp_path / "empty.png", "empty (0 bytes)"),
        "truncated": (tmp_path / "cut.png", "truncated"),
        "text": (tmp_path / "text.png", "not an image Pillow can read"),
        "folder": (tmp_path / "folder.png", "a folder, not a file"),
        "missing": (tmp_path / "nope.png", "not found"),
        "fifo": (tmp_path / "fifo.png", "a FIFO"),
        "device": (Path("/dev/null"), "a character device"),
        "bomb": (tmp_path / "bomb.png", "too large to read safely"),
    }


BAD_FILES = ["empty", "truncated", "text", "folder", "missing", "fifo", "device", "bomb"]


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_image_files_are_named(tmp_path: Path, case: str):
    path, why = _bad_files(tmp_path)[case]
    for loader, option in ((load_image, "--image"), (load_mask, "--mask")):
        with pytest.raises(OptionError) as e:
            loader(path)
        assert f"{path} ({option})" in str(e.value) and why in str(e.value)


def test_mask_size_rules():
    img = _rgb(64, 48)
    assert check_mask_size(Image.new("L", (64, 48)), img) is None
    assert "resized" in check_mask_size(Image.new("L", (128, 96)), img)
    with pytest.raises(OptionError, match="64x64 and --image 64x48"):
        check_mask_size(Image.new("L", (64, 64)), img)


def test_default_size_rounds_down():
    assert default_size(_rgb(70, 53), 16) == (64, 48)
    with pytest.raises(OptionError, match="smaller than 16x16"):
        default_size(_rgb(15, 40), 16)


# -- the CLI: image inputs refused by name before anything loads, nothing written ------------------------------
@pytest.mark.parametrize("case", BAD_FILES)
@pytest.mark.parametrize("option", ["--image", "--mask"])
def test_cli_refuses_bad_image_files(tiny_model, tmp_path: Path, capsys, case: str, option: str):
    path, why = _bad_files(tmp_path)[case]
    out = tmp_path / "out"
    out.mkdir()
    argv = ["run", "x", "--model", str(tiny_model), "--image", str(tmp_path / "good.png"), "--out", str(out / "o.png")]
    argv[argv.index(option) + 1 if option == "--image" else len(argv):] = (
        [str(path), "--out", str(out / "o.png")] if option == "--image" else ["--mask", str(path)])
    refused(capsys, argv, f"{path} ({option})", why, watch=(out,))


@pytest.mark.parametrize("extra,names", [
    (["--mask", "{img}"], ["--mask needs --image"]),
    (["--strength", "0.5"], ["--strength needs --image"]),
    (["--image", "{img}", "--strength", "0"], ["--strength 0", "(0, 1]"]),
    (["--image", "{img}", "--strength", "1.5"], ["--strength 1.5", "(0, 1]"]),
    (["--image", "{img}", "--strength", "nan"], ["--strength nan", "finite"]),
    (["--image", "{img}", "--mask", "{square}"], ["--mask is 64x64 and --image 64x48", "shapes differ"]),
    (["--image", "{img}", "--width", "64"], ["--width and --height go together with --image"]),
])
def test_cli_refuses_bad_image_options(tiny_model, tmp_path: Path, capsys, extra, names):
    _rgb(64, 48).save(tmp_path / "img.png")
    Image.new("L", (64, 64)).save(tmp_path / "square.png")
    out = tmp_path / "out"
    out.mkdir()
    subs = {"{img}": str(tmp_path / "img.png"), "{square}": str(tmp_path / "square.png")}
    argv = ["run", "x", "--model", str(tiny_model), *(subs.get(a, a) for a in extra), "--out", str(out / "o.png")]
    refused(capsys, argv, *names, watch=(out,))


def test_cli_img2img_and_inpainting(tiny_model, tmp_path: Path, capsys):
    """Both run from files, print how many DiT forwards ran, and record the strength and the inputs' hashes, which
    --from-png needs given again."""
    from zimage_lite.cli import main
    from zimage_lite.image import read_params
    from zimage_lite.init_image import pixels_sha256

    src = _rgb(70, 50)
    src.save(tmp_path / "in.png")
    Image.new("L", (70, 50), 255).save(tmp_path / "m.png")
    base = ["run", "a fox", "--model", str(tiny_model), "--steps", "8", "--seed", "3", "--image",
            str(tmp_path / "in.png")]
    assert main([*base, "--out", str(tmp_path / "a.png")]) == 0
    err = "".join(capsys.readouterr())  # notes on stderr, the stage lines with the progress bars
    assert "resized to 64x48" in err and "img2img at strength 0.6: 5 of 8 steps run (64x48)" in err
    params = read_params(tmp_path / "a.png")
    assert params["strength"] == 0.6 and params["image_sha256"] == pixels_sha256(src) and "mask_sha256" not in params
    assert main([*base, "--mask", str(tmp_path / "m.png"), "--strength", "0.3", "--out", str(tmp_path / "b.png")]) == 0
    assert "inpainting at strength 0.3: 3 of 8 steps run" in "".join(capsys.readouterr())
    assert read_params(tmp_path / "b.png")["mask_sha256"] == pixels_sha256(Image.open(tmp_path / "m.png"))
    refused(capsys, ["run", "--from-png", str(tmp_path / "b.png"), "--out", str(tmp_path / "c.png")],
            "made from an init image", "--image FILE", watch=(tmp_path,))
    argv = ["run", "--from-png", str(tmp_path / "b.png"), "--image", str(tmp_path / "in.png"), "--mask",
            str(tmp_path / "m.png"), "--out", str(tmp_path / "c.png")]
    assert main(argv) == 0  # the stored strength, seed and size: the same image again
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b.png")), np.asarray(Image.open(tmp_path / "c.png")))


def test_plan_with_an_image_plans_the_encoder_first(tiny_model, tmp_path: Path, capsys):
    from zimage_lite.cli import main

    _rgb(96, 64).save(tmp_path / "in.png")
    assert main(["plan", "--model", str(tiny_model), "--image", str(tmp_path / "in.png")]) == 0
    out = capsys.readouterr().out
    assert "96x64" in out and out.index("vae_encode:") < out.index("text_encoder:")
    assert main(["plan", "--model", str(tiny_model)]) == 0
    assert "vae_encode" not in capsys.readouterr().out


def test_checks_come_before_the_model_loads(tiny_model, tmp_path: Path, capsys, monkeypatch):
    """Every image option is checked before the model loads: the image's size against the model's bounds (an image
    too large says so, not "--width"), a mask of another shape, --width without --height."""
    import zimage_lite.pipeline as pipeline

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipeline, "load", no_load)
    Image.new("RGB", (8208, 64)).save(tmp_path / "wide.png")  # a panorama past the 8192-pixel grid
    _rgb(64, 48).save(tmp_path / "img.png")
    Image.new("L", (64, 64)).save(tmp_path / "square.png")
    out = tmp_path / "out"
    out.mkdir()
    base = ["run", "x", "--model", str(tiny_model), "--out", str(out / "o.png")]
    refused(capsys, [*base, "--image", str(tmp_path / "wide.png")], "--image is 8208x64", "at most 8192x8192",
            "give --width and --height", watch=(out,))
    refused(capsys, [*base, "--image", str(tmp_path / "img.png"), "--mask", str(tmp_path / "square.png")],
            "shapes differ", watch=(out,))
    refused(capsys, [*base, "--image", str(tmp_path / "img.png"), "--height", "64"], "go together", watch=(out,))
    refused(capsys, [*base, "--image", str(tmp_path / "img.png"), "--strength", "1e-300", "--steps", "8"],
            "runs no DiT step", "--strength 0.125 or more", watch=(out,))
    refused(capsys, ["plan", "--model", str(tiny_model), "--image", str(tmp_path / "img.png"), "--width", "64"],
            "go together")


def test_api_image_inputs(tmp_path: Path):
    """The Python API takes PIL images (also lazily opened ones, checked whole first) or paths, and any real
    number as the strength."""
    import zimage_lite

    pipe = zimage_lite.load("demo", device="cpu", dtype="fp32")
    _rgb(64, 64).save(tmp_path / "img.png")
    data = (tmp_path / "img.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(OptionError, match="--image: the image cannot be read"):
        pipe.generate("x", image=Image.open(tmp_path / "cut.png"), steps=1)
    with pytest.raises(OptionError, match="expected a PIL image or a path"):
        pipe.generate("x", image=np.zeros((64, 64, 3), np.uint8), steps=1)
    params = pipe.run_params("x", image=str(tmp_path / "img.png"), strength=np.float32(0.5), steps=2)
    assert params["strength"] == 0.5 and (params["width"], params["height"]) == (64, 64)


def test_from_png_notes_another_image(tiny_model, tmp_path: Path, capsys):
    from zimage_lite.cli import main

    _rgb(64, 48, seed=1).save(tmp_path / "a.png")
    _rgb(64, 48, seed=2).save(tmp_path / "b.png")
    base = ["--model", str(tiny_model), "--steps", "2", "--seed", "1"]
    assert main(["run", "x", *base, "--image", str(tmp_path / "a.png"), "--out", str(tmp_path / "r.png")]) == 0
    capsys.readouterr()
    again = ["run", "--from-png", str(tmp_path / "r.png"), "--out", str(tmp_path / "s.png"), "--image"]
    assert main([*again, str(tmp_path / "a.png")]) == 0
    assert "is not the one" not in capsys.readouterr().err
    assert main([*again, str(tmp_path / "b.png"), "--force"]) == 0
    assert "b.png is not the one" in capsys.readouterr().err


def test_a_request_runs_only_on_the_pipeline_that_prepared_it(tiny_model):
    """`prepare` checks and fills a run against one pipeline's model: another pipeline refuses it in one line, and
    its parameters cannot be changed past those checks."""
    import zimage_lite
    from zimage_lite.errors import OptionError

    one, other = (zimage_lite.load(tiny_model, device="cpu", dtype="fp32") for _ in range(2))
    request = one.prepare("x", width=64, height=64, steps=1, seed=3)
    with pytest.raises(OptionError, match="a Request runs on the pipeline whose prepare"):
        next(other.run(request))
    with pytest.raises(TypeError):
        request.params["width"] = 8
