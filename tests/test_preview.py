"""Live previews (zimage_lite/preview.py, preview_fit.py): the latent -> RGB projection, its least-squares fit, the
previews step events carry, the --preview file rewritten after every step, and the paths --preview refuses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fixtures import refused
from PIL import Image

import zimage_lite
from zimage_lite.cli import main
from zimage_lite.errors import OptionError
from zimage_lite.preview import FLUX, PREVIEW_KEY, PREVIEW_SCALE, PreviewFile, Projection, is_preview, preview_image
from zimage_lite.preview_fit import fit_projection, fit_vae, random_pairs

SMALL = ["--seed", "5", "--steps", "2", "--width", "48", "--height", "32"]


# --- the projection and its fit -----------------------------------------------------------------------------------

def _known_decoder(weight: torch.Tensor, bias: torch.Tensor, scale: int):
    """A 'VAE' that is exactly linear per latent cell: RGB = latents . weight + bias, each cell painted scale x scale
    pixels, with zero-mean detail inside the cell (a checkerboard) that the cell average must cancel."""
    checker = (torch.arange(scale)[:, None] + torch.arange(scale)[None, :]) % 2 * 0.2 - 0.1

    def decode(latents: torch.Tensor) -> torch.Tensor:
        rgb = torch.einsum("bchw,cr->brhw", latents, weight) + bias[:, None, None]
        pixels = F.interpolate(rgb, scale_factor=scale, mode="nearest")
        return pixels + checker.repeat(latents.shape[2], latents.shape[3])
    return decode


def test_fit_recovers_a_known_linear_map():
    generator = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(16, 3, generator=generator) * 0.1, torch.randn(3, generator=generator) * 0.1
    pairs = random_pairs(_known_decoder(weight, bias, 8), 16, samples=4, size=8)
    fitted, rms = fit_projection(pairs, 8)
    # float64 normal equations on fp32 images: measured max error 3.0e-8 (weight), 1.5e-8 (bias), RMS 9.6e-8;
    # tolerances 3e-7, 3e-7, 1e-6
    assert (fitted.weight - weight).abs().max() < 3e-7
    assert (fitted.bias - bias).abs().max() < 3e-7
    assert rms < 1e-6


def test_fit_tool_runs_on_a_vae_folder(tiny_model):
    """The tool's path from files: a random-weight VAE is no linear map, so only sanity is checked: the fit beats
    the best constant colour (its error at most the spread of the cells' colours) and the published factors."""
    result = fit_vae(tiny_model / "vae", samples=2, size=8)
    assert np.array(result["weight"]).shape == (16, 3) and len(result["bias"]) == 3
    assert result["rms"] < result["published_rms"]
    assert result["cells"] == 2 * 8 * 8


@pytest.mark.parametrize("samples, size", [(0, 8), (1, 1), (1, 8)])
def test_fit_tool_refuses_too_few_cells(tiny_model, capsys, samples, size):
    """0 samples, 1 cell (singular) or 64 cells for 17 numbers per colour (a fit that says nothing): one line."""
    from zimage_lite.preview_fit import main as fit_main

    assert fit_main([str(tiny_model / "vae"), "--samples", str(samples), "--size", str(size)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "too few" in err and "--samples" in err and "Traceback" not in err


def test_fit_reads_images_as_every_input_is(tmp_path):
    """--images are read as the run's inputs are (inputs.open_image, to_mode): a photo stored on its side with an
    EXIF orientation comes upright, a grey or RGBA one in RGB: the pixels fitted are the ones the user sees."""
    from zimage_lite.preview_fit import image_pairs

    upright = Image.fromarray(np.random.default_rng(1).integers(0, 256, (24, 40, 3), dtype=np.uint8), "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "side.png", exif=exif)
    upright.save(tmp_path / "upright.png")
    upright.convert("RGBA").save(tmp_path / "rgba.png")
    upright.convert("L").save(tmp_path / "grey.png")
    levels = np.asarray(upright.convert("L")).astype(np.uint16) * 257  # the same greys in 16 bits
    Image.fromarray(levels).save(tmp_path / "grey16.png")  # uint16: mode I;16
    names = ("upright", "side", "rgba", "grey", "grey16")
    pairs = image_pairs(lambda pixels: pixels[:, :, ::8, ::8], [tmp_path / f"{n}.png" for n in names], 8)
    assert [tuple(p.shape) for _, p in pairs] == [(1, 3, 24, 40)] * 5
    assert torch.equal(pairs[1][1], pairs[0][1]) and torch.equal(pairs[2][1], pairs[0][1])
    grey = pairs[3][1]
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 0], grey[:, 2])
    assert torch.equal(pairs[4][1], grey)  # scaled by its range, not clipped to white
    Image.new("RGB", (6, 30)).save(tmp_path / "thin.png")
    with pytest.raises(OptionError, match="thin.png: 6x30 is smaller than one latent cell"):
        image_pairs(lambda pixels: pixels, [tmp_path / "thin.png"], 8)


def test_preview_is_oriented_and_sized_as_the_image():
    """Latent row 0 is the image's top, column 0 its left; the preview is PREVIEW_SCALE pixels per cell."""
    eye = Projection(torch.eye(3), torch.full((3,), -1.0))  # channel c -> colour c, from -1 (black) up
    latents = torch.zeros(1, 3, 3, 5)  # 3 cells high, 5 wide
    latents[0, 0, 0, 0] = 2.0  # red at the top left
    latents[0, 2, 2, 4] = 2.0  # blue at the bottom right
    image = preview_image(latents, eye)
    assert image.size == (5 * PREVIEW_SCALE, 3 * PREVIEW_SCALE)
    pixels = np.asarray(image)
    assert tuple(pixels[0, 0]) == (255, 0, 0) and tuple(pixels[-1, -1]) == (0, 0, 255)
    assert tuple(pixels[0, -1]) == (0, 0, 0)


def test_flux_factors_are_applied_in_the_samplers_space():
    """The published factors, as published: latent channel k with value 1 (sampler space) adds row k to the bias."""
    for k in (0, 9, 15):
        latents = torch.zeros(16, 1, 1)
        latents[k] = 1.0
        got = FLUX.rgb(latents)[:, 0, 0]
        assert torch.allclose(got, FLUX.weight[k] + FLUX.bias, atol=1e-7)
    assert torch.allclose(FLUX.weight[13], torch.tensor([-0.1264, -0.0522, -0.1103]))  # ComfyUI's row 14


# --- step events ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def events(tiny_model):
    pipe = zimage_lite.load(tiny_model, device="cpu", dtype="fp32")
    return list(pipe.generate("x", width=48, height=32, steps=3, seed=2))


def test_step_events_carry_previews(events):
    steps = [e for e in events if e.stage == "step"]
    assert len(steps) == 3
    for e in steps:
        assert isinstance(e.preview, Image.Image) and e.preview.size == (48 // 8 * PREVIEW_SCALE, 32 // 8 * 4)
    assert all(e.preview is None for e in events if e.stage != "step")
    assert steps[0].preview is steps[0].preview  # made once, when first read


def test_preview_shows_the_denoised_estimate(events):
    """x0 = x_t - sigma_t * v: at the last step (sigma 0 after it) it is the final latent, which the image decodes;
    earlier it differs from the noisy latent."""
    steps = [e for e in events if e.stage == "step"]
    # x + sigma * out against x + (0 - sigma) * (-out) in fp32: measured difference 0; tolerance 1e-6 (fp32 rounding)
    assert (steps[-1].denoised - steps[-1].latents).abs().max() < 1e-6
    assert (steps[0].denoised - steps[0].latents).abs().max() > 0.1


def test_inpaint_preview_keeps_the_original_outside_the_mask(tiny_model):
    """Inpainting keeps the original where the mask is black: the preview's estimate shows it there (not the model's
    guess), so at the last step it is again the final latent; inside the mask it is the model's estimate."""
    from fixtures import mask_picture, picture

    from zimage_lite.inputs import mask_tensor

    pipe = zimage_lite.load(tiny_model, device="cpu", dtype="fp32")
    events = list(pipe.generate("x", width=80, height=48, steps=3, seed=2, image=picture(80, 48),
                                mask=mask_picture(80, 48)))
    steps = [e for e in events if e.stage == "step"]
    # measured difference 0 (the same blend with the clean original); before the blend: 2.87
    assert (steps[-1].denoised - steps[-1].latents).abs().max() < 1e-6
    keep = (mask_tensor(mask_picture(80, 48), 80, 48, 6, 10) == 0).expand_as(steps[0].denoised)
    first = (steps[0].denoised - steps[-1].latents).abs()
    assert first[keep].max() == 0 and first[~keep].max() > 0.1


# --- the --preview file -----------------------------------------------------------------------------------------

def test_preview_file_is_rewritten_after_every_step(tiny_model, tmp_path, monkeypatch):
    seen = []
    write = PreviewFile.write

    def watch(self, image, step, steps):
        write(self, image, step, steps)
        with Image.open(self.path) as written:  # on disk right after the step, whole
            seen.append((step, written.size, written.info[PREVIEW_KEY]))

    monkeypatch.setattr(PreviewFile, "write", watch)
    preview, out = tmp_path / "p.png", tmp_path / "o.png"
    assert main(["run", "x", "--model", str(tiny_model), *SMALL, "--out", str(out), "--preview", str(preview)]) == 0
    assert seen == [(1, (24, 16), "step 1 of 2"), (2, (24, 16), "step 2 of 2")]
    assert out.is_file() and Image.open(out).size == (48, 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.png", "p.png"]  # no temporary left


def test_an_earlier_preview_is_replaced_without_force(tiny_model, tmp_path):
    preview = tmp_path / "p.png"
    for run in range(2):
        args = ["run", "x", "--model", str(tiny_model), *SMALL, "--out", str(tmp_path / f"o{run}.png")]
        assert main([*args, "--preview", str(preview)]) == 0
        assert is_preview(preview)


def test_a_failed_preview_write_does_not_stop_the_run(tmp_path):
    target = tmp_path / "gone" / "p.png"
    preview = PreviewFile(target)
    preview.write(Image.new("RGB", (4, 4)), 1, 2)
    assert preview.writes == 0 and "--preview" in str(preview.error)


@pytest.mark.parametrize("case", ["no folder", "a folder", "not png", "a user file", "same as out",
                                  "same as out by a link"])
def test_bad_preview_paths_are_refused(case, tmp_path, capsys, tiny_model):
    out = tmp_path / "o.png"
    user = tmp_path / "photo.png"
    Image.new("RGB", (2, 2)).save(user)
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "ln").symlink_to(tmp_path)
    path, names = {
        "no folder": (tmp_path / "missing" / "p.png", ("--preview", "does not exist")),
        "a folder": (tmp_path / "dir.png", ("--preview", "is a folder")),
        "not png": (tmp_path / "p.jpg", ("--preview", ".png")),
        "a user file": (user, ("--preview", "--force")),
        "same as out": (out, ("--preview", "--out")),
        "same as out by a link": (tmp_path / "ln" / "o.png", ("--preview", "--out")),  # refused before the run
    }[case]
    force = ["--force"] if case.startswith("same as out") else []  # else the --out check would refuse first
    refused(capsys, ["run", "x", "--model", str(tiny_model), *SMALL, "--out", str(out), "--preview", str(path),
                     *force], *names, watch=(tmp_path,))
