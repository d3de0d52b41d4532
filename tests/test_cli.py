"""The CLI and the Python API on the demo model and the tiny fixture."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from PIL import Image

import zimage_lite
from zimage_lite.cli import main


def test_run_demo_writes_png_with_metadata(tmp_path, capsys):
    out = tmp_path / "cat.png"
    assert main(["run", "a cat, 猫", "--seed", "5", "--steps", "2", "--width", "64", "--height", "48",
                 "--out", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert str(out) in last and "peak memory" in last and " s," in last
    img = Image.open(out)
    assert img.size == (64, 48)
    assert img.text["prompt"] == "a cat, 猫" and img.text["seed"] == "5" and img.text["steps"] == "2"
    assert img.text["model"] == "demo" and {"cfg", "negative_prompt", "width", "height", "quant"} <= set(img.text)


def test_random_seed_is_printed_and_stored(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "x", "--steps", "1", "--width", "32", "--height", "32"]) == 0
    out = capsys.readouterr().out
    seed = out.split("seed: ")[1].split()[0]
    assert Image.open(tmp_path / f"zimage-{seed}.png").text["seed"] == seed


def test_same_seed_same_image(tiny_model):
    pipe = zimage_lite.load(tiny_model, device="cpu", dtype="fp32", keep_loaded=True)
    a = np.asarray(pipe.text_to_image("x", width=32, height=32, steps=2, seed=11))
    b = np.asarray(pipe.text_to_image("x", width=32, height=32, steps=2, seed=11))
    c = np.asarray(pipe.text_to_image("x", width=32, height=32, steps=2, seed=12))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_generate_yields_stages(tiny_model):
    pipe = zimage_lite.load(tiny_model, device="cpu", dtype="fp32")
    events = list(pipe.generate("x", width=32, height=32, steps=3, seed=1))
    assert [e.stage for e in events] == ["encoded", "step", "step", "step", "decoded"]
    assert [e.step for e in events[1:4]] == [1, 2, 3]
    assert events[-1].image.size == (32, 32) and events[1].latents.shape == (1, 16, 4, 4)
    assert pipe._models == {}  # every component freed after its stage


def test_long_prompt_is_cut_and_reported(tmp_path, capsys):
    out = tmp_path / "o.png"
    assert main(["run", "cat " * 600, "--steps", "1", "--width", "32", "--height", "32", "--out", str(out)]) == 0
    assert "cut to 512" in capsys.readouterr().out


def test_python_dash_m_is_the_same_entry_point(tmp_path):
    res = subprocess.run([sys.executable, "-m", "zimage_lite", "run", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--negative" in res.stdout and "--vae" in res.stdout
