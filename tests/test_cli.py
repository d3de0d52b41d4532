"""The CLI and the Python API on the demo model and the tiny fixture."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import zimage_lite
from zimage_lite.cli import main
from zimage_lite.demo import demo_path

ROOT = Path(__file__).parent.parent  # `python -m zimage_lite` from here runs this checkout
# What every image carries (ISSUE10_SPLIT.md's contract), with the type of each value; dit / text_encoder / vae are
# added when they override the model's own files.
PARAMS = {"prompt": str, "negative": str, "seed": int, "steps": int, "cfg": float, "cfg_normalization": float,
          "cfg_truncation": float, "width": int, "height": int, "model": str, "dit_format": str,
          "text_encoder_format": str, "dtype": str, "device": str, "version": str}


def test_run_demo_writes_png_with_metadata(tmp_path, capsys):
    out = tmp_path / "cat.png"
    assert main(["run", "a cat, 猫", "--seed", "5", "--steps", "2", "--width", "64", "--height", "48",
                 "--out", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert str(out) in last and "peak memory" in last and " s," in last
    img = Image.open(out)
    assert img.size == (64, 48)
    assert img.text["prompt"] == "a cat, 猫" and img.text["seed"] == "5" and img.text["steps"] == "2"
    assert img.text["model"] == "demo" and set(PARAMS) <= set(img.text)


def test_random_seed_is_printed_and_stored(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "x", "--steps", "1", "--width", "32", "--height", "32"]) == 0
    out = capsys.readouterr().out
    seed = out.split("seed: ")[1].split()[0]
    assert Image.open(tmp_path / f"zimage-{seed}.png").text["seed"] == seed


def test_no_seed_is_printed_for_a_run_refused_after_loading(tiny_model, tmp_path, capsys):
    """A run the model refuses (its RoPE covers 8192 pixels; 9000 passes no check before loading but the size one)
    never started: printing its seed would suggest an image was made from it."""
    code = main(["run", "x", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o.png")])
    assert code == 2 and "seed:" not in capsys.readouterr().out
    code = main(["run", "x", "--model", str(tiny_model), "--out", str(tmp_path / "o.png"), "--steps", "1",
                 "--dtype", "bf16", "--device", "cpu", "--width", "32", "--height", "32", "--cfg", "0"])
    assert code == 0 and "seed:" in capsys.readouterr().out  # precondition: a run that starts prints it


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


# ---- start-up, version, prompt files -------------------------------------------------------------------------------

def test_version_is_the_packages(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"zimage-lite {zimage_lite.__version__}"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'attr = "zimage_lite.__version__"' in pyproject  # one source


# Each argv, then whether torch was imported once main() had answered it, in a fresh interpreter.
IMPORT_CHECK = """
import sys
from zimage_lite.cli import main
for argv in ({cases!r}):
    try:
        main(argv)
    except SystemExit:
        pass
    print(" ".join(argv) or "-", "torch" in sys.modules)
from zimage_lite import load  # the API still imports the pipeline (and torch) on first use
print("from zimage_lite import load", "torch" in sys.modules)
"""


def test_help_version_and_option_errors_do_not_import_torch(tmp_path):
    cases = [["--help"], ["--version"], ["run", "--help"], ["plan", "--help"], ["info", "--help"],
             ["run", "x", "--steps", "0"], ["run", "x", "--width", "-16"], ["run", "x", "--seed", str(2**64)],
             ["run", "x", "--cfg", "nan"], ["run", "x", "--device", "cpu", "--vram", "4GB"], ["run"],
             ["run", "--prompt-file", str(tmp_path / "missing.txt")], ["run", "x", "--vram", "4XB"],
             ["plan", "--width", "100"]]
    res = subprocess.run([sys.executable, "-c", IMPORT_CHECK.format(cases=cases)], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "COLUMNS": "80"})
    lines = dict(line.rsplit(" ", 1) for line in res.stdout.splitlines() if line.endswith(("True", "False")))
    assert lines.pop("from zimage_lite import load") == "True"  # precondition: the check sees torch when it is there
    assert len(lines) == len(cases) and set(lines.values()) == {"False"}, lines


def test_prompt_file_past_the_argument_limit(tmp_path, capsys):
    prompt = "a red fox in the snow, " * 8000  # 184 KB: past Linux's 128 KiB limit on one argument
    with pytest.raises(OSError, match="Argument list too long"):  # precondition: it cannot be given as PROMPT
        subprocess.run(["true", prompt])
    path = tmp_path / "prompt.txt"
    path.write_text(prompt + "\n", encoding="utf-8")  # the final line break an editor adds is not the prompt's
    out = tmp_path / "o.png"
    assert main(["run", "--prompt-file", str(path), "--seed", "1", "--steps", "1", "--width", "32", "--height", "32",
                 "--out", str(out)]) == 0
    assert Image.open(out).text["prompt"] == prompt and "cut to 512" in capsys.readouterr().out


def test_prompt_file_from_stdin(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("\ufeff一只狐狸\r\n".encode())))
    out = tmp_path / "o.png"
    assert main(["run", "--prompt-file", "-", "--seed", "1", "--steps", "1", "--width", "32", "--height", "32",
                 "--out", str(out)]) == 0
    assert Image.open(out).text["prompt"] == "一只狐狸"  # byte-order mark and line break dropped


# ---- defaults from the model; the run parameters -----------------------------------------------------------------

def test_the_demo_folder_renders_at_the_demos_defaults(tmp_path, capsys):
    """A path to the demo's folder is the demo model: 256x256 as with `--model demo`, not Turbo's 1024x1024."""
    for model in ("demo", str(demo_path())):
        out = tmp_path / f"{len(model)}.png"
        assert main(["run", "x", "--model", model, "--steps", "1", "--seed", "1", "--out", str(out)]) == 0
        assert Image.open(out).size == (256, 256)
        assert main(["plan", "--model", model, "--device", "cpu", "--ram", "8GB"]) == 0
        assert "256x256, cfg off" in capsys.readouterr().out


def test_python_api_takes_the_models_defaults(tiny_model):
    demo = zimage_lite.load(demo_path(), device="cpu").run_params("x")
    assert (demo["width"], demo["height"], demo["steps"], demo["cfg"]) == (256, 256, 8, 0.0)
    other = zimage_lite.load(tiny_model, device="cpu").run_params("x")  # not the demo's DiT: Turbo's defaults
    assert (other["width"], other["height"], other["steps"], other["cfg"]) == (1024, 1024, 8, 0.0)


def test_run_parameters_are_complete(tiny_model, tmp_path):
    dit = tiny_model / "transformer"
    pipe = zimage_lite.load(Path(os.path.relpath(tiny_model)), dit=Path(os.path.relpath(dit)), device="cpu",
                            dtype="fp32")
    events = list(pipe.generate("a fox", negative="blur", width=32, height=32, steps=2, seed=7, cfg=2.5,
                                cfg_normalization=1.5, cfg_truncation=0.9))
    info = events[-1].info
    assert {k: type(v) for k, v in info.items()} == {**PARAMS, "dit": str}
    assert info == {"prompt": "a fox", "negative": "blur", "seed": 7, "steps": 2, "cfg": 2.5, "cfg_normalization": 1.5,
                    "cfg_truncation": 0.9, "width": 32, "height": 32, "model": str(tiny_model),
                    "dit": str(dit), "dit_format": "F32", "text_encoder_format": "BF16", "dtype": "fp32",
                    "device": "cpu", "version": zimage_lite.__version__}
    assert events[0].info.items() >= info.items()  # the encoded event carries them too
    image = pipe.text_to_image("a fox", width=32, height=32, steps=1, seed=7)
    assert image.info["negative"] == "" and image.info["cfg"] == "0.0"  # no CFG: no negative was used


def test_plan_help_names_its_model_default(capsys):
    """`plan` without --model plans for a preset; its help said 'demo (default)', the run's default."""
    for command, default in (("plan", "(default: none: plan for --preset turbo without files)"),
                             ("run", "(default: demo)")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert default in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("argv, names", [
    (["run", "x", "--width", "abc"], ("zimage-lite run: argument --width", "invalid int value", "--help")),
    (["run", "x", "--dtype", "bf8"], ("argument --dtype", "invalid choice", "--help")),
    (["plan", "--preset", "demo", "--prompt-tokens", "-5"], ("--prompt-tokens -5", "1 to 512")),
    (["plan", "--preset", "demo", "--ram", "1e400"], ("--ram '1e400'", "too large")),
])
def test_option_errors_are_one_line(argv, names, capsys):
    """argparse's own refusals too (a value of the wrong type, an unknown choice): one line, no usage block."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse exits itself
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    for name in names:
        assert name in err, err


def test_plan_names_where_its_budget_came_from(capsys):
    """A budget measured from the machine is called so, not printed as a byte count posing as an option value."""
    assert main(["plan", "--preset", "demo", "--device", "cpu"]) == 0
    assert "budget: available RAM = " in capsys.readouterr().out
    assert main(["plan", "--preset", "demo", "--device", "cpu", "--ram", "8GB"]) == 0
    assert "budget: --ram 8GB = " in capsys.readouterr().out
