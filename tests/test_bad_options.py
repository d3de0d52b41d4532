"""Bad input, by class: what a user types. Every case is refused with one `error:` line naming the option and its
value, exit 2, no traceback, nothing written (fixtures.refused); the Python API refuses the same values with the same
words (zimage_lite/options.py is the one place that checks them)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures import TINY, make_checkpoint, refused

import zimage_lite
from zimage_lite.errors import OptionError

ROOT = Path(__file__).parent.parent  # `python -m zimage_lite` from here runs this checkout

# ---- options: each one's range, before anything is loaded --------------------------------------------------------

# (argv after `run PROMPT`, what the message must name). Seeds, steps and guidance as the unguarded run met them:
# 2**64 -> OverflowError in manual_seed, 10**12 steps -> MemoryError in linspace, --cfg -1 / nan silently accepted.
OPTIONS = [
    (["--seed", str(2**64)], ["--seed 18446744073709551616", "2**64"]),
    (["--seed", "-1"], ["--seed -1", "2**64"]),
    (["--steps", "0"], ["--steps 0", "1 to 1000"]),
    (["--steps", "1001"], ["--steps 1001", "1 to 1000"]),
    (["--steps", str(10**12)], [f"--steps {10**12}", "1 to 1000"]),
    (["--cfg", "-1"], ["--cfg -1", "0 to 100"]),
    (["--cfg", "nan"], ["--cfg nan", "finite"]),
    (["--cfg", "inf"], ["--cfg inf", "finite"]),
    (["--cfg", "101"], ["--cfg 101", "0 to 100"]),
    (["--cfg-normalization", "-1"], ["--cfg-normalization -1", "positive"]),
    (["--cfg-normalization", "nan"], ["--cfg-normalization nan", "finite"]),
    (["--cfg-truncation", "-0.5"], ["--cfg-truncation -0.5", "0 to 1"]),
    (["--cfg-truncation", "2"], ["--cfg-truncation 2", "0 to 1"]),
    (["--width", "-16"], ["--width -16", "use 16 or more"]),
    (["--width", "0"], ["--width 0", "use 16 or more"]),
    (["--height", "8"], ["--height 8", "use 16 or more"]),
    (["--width", "100"], ["--width 100", "multiple of 16", "use 96 or 112"]),
    (["--height", "8200"], ["--height 8200", "at most 8192"]),
    (["--width", "16384"], ["--width 16384", "at most 8192", "RoPE"]),
    (["--device", "cpu", "--vram", "4GB"], ["--vram 4GB", "CPU", "--ram"]),
    (["--device", "cuda", "--ram", "8GB"], ["--ram 8GB", "GPU", "--vram"]),
    (["--device", "cuda:0", "--ram", "8GB"], ["--ram 8GB", "GPU", "--vram"]),
]


def _id(case) -> str:
    return " ".join(case[0])[:40]


class TestOptions:
    @pytest.mark.parametrize("argv,names", OPTIONS, ids=[_id(c) for c in OPTIONS])
    def test_run_refuses(self, capsys, tmp_path, argv, names):
        # the demo model is never generated: each is refused before anything loads
        err = refused(capsys, ["run", "a fox", *argv, "--out", str(tmp_path / "o.png")], *names, watch=(tmp_path,))
        assert "seed:" not in capsys.readouterr().out + err  # no seed is printed for a run that never started

    @pytest.mark.parametrize("argv,names", [
        (["--preset", "turbo", "--device", "cpu", "--vram", "4GB"], ["--vram 4GB", "--device cuda"]),
        (["--preset", "turbo", "--device", "cuda", "--ram", "4GB"], ["--ram 4GB", "--vram"]),
        (["--preset", "turbo", "--width", "8200"], ["--width 8200", "at most 8192"]),
        (["--preset", "base", "--cfg", "nan"], ["--cfg nan", "finite"]),
    ], ids=["vram-on-cpu", "ram-on-cuda", "width", "cfg"])
    def test_plan_refuses(self, capsys, argv, names):
        refused(capsys, ["plan", *argv], *names)

    def test_vram_on_a_run_that_auto_puts_on_the_cpu(self, capsys, tmp_path, tiny_model, monkeypatch):
        """--device auto: the budget that applies is known once the device is (after the pre-load checks)."""
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        refused(capsys, ["run", "x", "--model", str(tiny_model), "--vram", "4GB", "--out", str(tmp_path / "o.png")],
                "--vram 4GB", "CPU", "--ram", watch=(tmp_path, tiny_model))
        refused(capsys, ["plan", "--preset", "turbo", "--vram", "4GB"], "--vram 4GB", "--device cuda")

    def test_bounds_of_the_model_itself(self, capsys, tmp_path):
        """After loading, the model's own bounds: its RoPE axes (here 32 tokens, 512 pixels) and its scheduler's
        num_train_timesteps (here 100); both pass the Turbo bounds checked before loading."""
        small = dataclasses.replace(TINY, dit=dataclasses.replace(TINY.dit, axes_lens=(96, 32, 48)))
        model = make_checkpoint(tmp_path / "model", small)
        sched = model / "scheduler" / "scheduler_config.json"
        sched.write_text(json.dumps({**json.loads(sched.read_text()), "num_train_timesteps": 100}))
        out = tmp_path / "out"
        out.mkdir()
        base = ["run", "x", "--model", str(model), "--width", "64", "--height", "64", "--out", str(out / "o.png")]
        refused(capsys, [*base, "--height", "528"], "--height 528", "at most 512", watch=(out, model))
        refused(capsys, [*base, "--width", "784"], "--width 784", "at most 768", watch=(out, model))
        refused(capsys, [*base, "--steps", "101"], "--steps 101", "1 to 100", watch=(out, model))
        refused(capsys, ["plan", "--model", str(model), "--width", "64", "--height", "528"], "--height 528",
                "at most 512")
        assert "seed:" not in capsys.readouterr().out


# ---- the Python API: the same checks, raised by generate() itself, before the first event ---------------------------

API = [
    ({"seed": 2**64}, "--seed"), ({"seed": 1.5}, "--seed 1.5"), ({"seed": True}, "--seed True"),
    ({"steps": 0}, "--steps 0"), ({"steps": 2.0}, "--steps 2.0"), ({"cfg": float("nan")}, "--cfg nan"),
    ({"cfg": -1}, "--cfg -1"), ({"cfg": "4"}, "--cfg '4'"), ({"cfg_truncation": 1.5}, "--cfg-truncation 1.5"),
    ({"cfg_normalization": -2}, "--cfg-normalization -2"), ({"width": -16}, "--width -16"),
    ({"height": 100}, "--height 100"), ({"width": 9000}, "--width 9000"), ({"negative": "\udcff"}, "--negative"),
]


class TestPythonAPI:
    @pytest.mark.parametrize("kwargs,message", API, ids=[f"{k}={v!r}"[:24] for c in API for k, v in c[0].items()])
    def test_generate_refuses(self, tiny_model, kwargs, message):
        pipe = zimage_lite.load(tiny_model, device="cpu", dtype="fp32")
        with pytest.raises(OptionError) as e:
            pipe.generate("a fox", **{"width": 32, "height": 32, "steps": 1, **kwargs})  # raised by the call
        assert message in str(e.value)
        assert pipe.plan is None and pipe._models == {}  # nothing planned, nothing loaded

    @pytest.mark.parametrize("prompt,message", [("", "PROMPT is empty"), (" \n", "PROMPT is empty"),
                                                ("caf\udce9", "byte 0xe9"), (b"a fox", "expected text")])
    def test_generate_refuses_prompts(self, tiny_model, prompt, message):
        pipe = zimage_lite.load(tiny_model, device="cpu", dtype="fp32")
        with pytest.raises(OptionError, match=message):
            pipe.generate(prompt, width=32, height=32, steps=1)

    def test_load_refuses_the_budget_that_does_not_apply(self, tiny_model):
        with pytest.raises(OptionError, match="--vram 4GB: this run is on the CPU"):
            zimage_lite.load(tiny_model, device="cpu", vram="4GB")
        with pytest.raises(OptionError, match="--vram 4GB: this run is on the CPU"):
            zimage_lite.load(tiny_model, device="cpu", vram=4 * 10**9)

    @pytest.mark.parametrize("kwargs,message", [
        ({"model": None}, "model=None"), ({"device": None}, "device=None"), ({"ram": 0}, "--ram 0"),
        ({"ram": -5}, "--ram -5"), ({"ram": True}, "--ram True"), ({"ram": [1]}, "--ram [1]"),
        ({"loras": ["x.safetensors"]}, "not a (file, scale) pair"),
        ({"loras": ("x.safetensors", 0.5)}, "'x.safetensors' is not a (file, scale) pair"),
    ], ids=lambda v: repr(v)[:20])
    def test_load_refuses_arguments_of_the_wrong_kind(self, tiny_model, kwargs, message):
        """Before: an AttributeError, TypeError or ValueError from deep inside (a budget of 0 only at the first
        image)."""
        with pytest.raises(OptionError, match=re.escape(message)):
            zimage_lite.load(kwargs.pop("model", tiny_model), device=kwargs.pop("device", "cpu"), **kwargs)

    def test_load_takes_a_torch_device_and_generate_names_an_unknown_argument(self, tiny_model):
        pipe = zimage_lite.load(tiny_model, device=torch.device("cpu"), dtype="fp32")
        assert pipe.device == torch.device("cpu")
        with pytest.raises(TypeError, match="unexpected keyword argument 'sead': generate\\(\\) takes"):
            pipe.text_to_image("a fox", sead=1)
        assert zimage_lite.load(tiny_model, device="cpu", ram=8e9).ram == 8 * 10**9  # a whole float is a size

    def test_control_args_are_control_requests(self):
        """generate() tells its own keywords from control_request's by CONTROL_ARGS: the two lists are one."""
        import inspect

        from zimage_lite.control import CONTROL_ARGS, control_request

        keywords = [n for n, p in inspect.signature(control_request).parameters.items() if n.startswith("control_")]
        assert keywords == list(CONTROL_ARGS)

    def test_step_events_carry_the_run_parameters(self, tiny_model):
        """As generate() says: every event's info holds them (a progress display reads info["steps"] there)."""
        pipe = zimage_lite.load(tiny_model, device="cpu", dtype="fp32")
        events = list(pipe.generate("a fox", width=32, height=32, steps=2, seed=3))
        assert all(e.info["seed"] == 3 and e.info["steps"] == 2 for e in events)

    def test_save_image_refuses_what_is_not_an_image_or_parameters(self, tmp_path):
        from PIL import Image

        from zimage_lite.image import save_image

        with pytest.raises(OptionError, match="not a PIL image"):
            save_image(None, tmp_path / "x.png")
        with pytest.raises(OptionError, match="give a mapping"):
            save_image(Image.new("RGB", (4, 4)), tmp_path / "x.png", [("a", 1)])
        assert list(tmp_path.iterdir()) == []


# ---- prompt input: PROMPT, --prompt-file FILE, --prompt-file - ------------------------------------------------------

def _file(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "prompt.txt"
    path.write_bytes(data)
    return path


PROMPT_FILES = [
    ("missing", None, ["--prompt-file", "cannot read it", "No such file"]),
    ("folder", "dir", ["--prompt-file", "cannot read it"]),
    ("latin-1", b"caf\xe9 au lait\n", ["--prompt-file", "not UTF-8", "byte 0xe9 at offset 3"]),
    ("empty", b"", ["--prompt-file", "is empty"]),
    ("blank", b" \n\n", ["--prompt-file", "is empty"]),
    ("too large", b"a" * (2**20 + 1), ["--prompt-file", "larger than 1 MiB"]),
]


class TestPromptInput:
    @pytest.mark.parametrize("what,data,names", PROMPT_FILES, ids=[c[0] for c in PROMPT_FILES])
    def test_bad_prompt_file(self, capsys, tmp_path, what, data, names):
        if data is None:
            path = tmp_path / "nope.txt"
        elif data == "dir":
            path = tmp_path
        else:
            path = _file(tmp_path, data)
        out = tmp_path / "out"
        out.mkdir()
        refused(capsys, ["run", "--prompt-file", str(path), "--out", str(out / "o.png")], *names, watch=(tmp_path,))

    def test_bad_prompt_on_stdin(self, capsys, tmp_path, monkeypatch):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xff\xfe fox")))
        refused(capsys, ["run", "--prompt-file", "-", "--out", str(tmp_path / "o.png")],
                "--prompt-file -", "not UTF-8", "byte 0xff", watch=(tmp_path,))

    @pytest.mark.parametrize("argv,names", [
        ([], ["no prompt", "PROMPT", "--prompt-file"]),
        (["a fox", "--prompt-file", "p.txt"], ["PROMPT", "--prompt-file", "not both"]),
        ([""], ["PROMPT is empty"]),
        (["  "], ["PROMPT is empty"]),
        (["caf\udce9"], ["PROMPT", "not valid UTF-8", "byte 0xe9 at character 3"]),
        (["a fox", "--negative", "\udcff"], ["--negative", "not valid UTF-8", "byte 0xff"]),
    ], ids=["none", "both", "empty", "blank", "PROMPT-not-utf8", "negative-not-utf8"])
    def test_bad_prompt_argument(self, capsys, tmp_path, argv, names):
        # "caf\udce9" is what Python makes of the argv bytes b"caf\xe9" (surrogateescape); a real process below
        refused(capsys, ["run", *argv, "--out", str(tmp_path / "o.png")], *names, watch=(tmp_path,))

    def test_argv_that_is_not_utf8_in_a_real_process(self, tmp_path):
        """Bytes in argv as a Latin-1 terminal sends them: unguarded, the tokenizer raised TypeError."""
        res = subprocess.run([sys.executable, "-m", "zimage_lite", "run", b"caf\xe9", "--out", str(tmp_path / "o.png")],
                             capture_output=True, env={**os.environ, "LC_ALL": "C.UTF-8"}, cwd=ROOT)
        err = res.stderr.decode()
        assert res.returncode == 2 and err.startswith("error: PROMPT: not valid UTF-8 text (byte 0xe9")
        assert "Traceback" not in err and list(tmp_path.iterdir()) == []


# -- devices ---------------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: --device cuda is valid here")
def test_cuda_without_a_gpu(tiny_model, tmp_path, capsys):
    refused(capsys, ["run", "x", "--model", str(tiny_model), "--device", "cuda", "--out", str(tmp_path / "o.png")],
            "--device cuda", "no CUDA GPU", watch=(tmp_path,))


@pytest.mark.parametrize("device", ["cudax", "cuda:x", "gpu", "cpu:1"])
def test_unknown_device_is_named(tiny_model, tmp_path, capsys, device):
    refused(capsys, ["run", "x", "--model", str(tiny_model), "--device", device, "--out", str(tmp_path / "o.png")],
            device, "cuda:N", watch=(tmp_path,))


def test_missing_gpu_index_is_named(tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    refused(capsys, ["run", "x", "--model", str(tiny_model), "--device", "cuda:7", "--out", str(tmp_path / "o.png")],
            "--device cuda:7", "cuda:0 to cuda:0", watch=(tmp_path,))
