"""Bad input: each case gives a message naming what is wrong, and leaves no output file behind. (Bad files, configs,
components and weights: test_bad_files.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from zimage_lite.cli import main


def run(capsys, *args: str) -> tuple[int, str]:
    code = main(["run", *args])
    return code, capsys.readouterr().err


def _outputs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix in (".png", ".part") or ".part" in p.name)






@pytest.mark.parametrize("flag,value,hint", [("--width", "100", "96 or 112"), ("--height", "8", "16"),
                                            ("--width", "-16", "16")])
def test_size_not_multiple_of_16(tiny_model, tmp_path, capsys, flag, value, hint):
    code, err = run(capsys, "x", "--model", str(tiny_model), flag, value, "--out", str(tmp_path / "o.png"))
    assert code == 2 and f"{flag} {value}" in err and hint in err
    assert _outputs(tmp_path) == []


def test_steps_below_one(tiny_model, tmp_path, capsys):
    code, err = run(capsys, "x", "--model", str(tiny_model), "--steps", "0", "--out", str(tmp_path / "o.png"))
    assert code == 2 and "--steps 0" in err
    assert _outputs(tmp_path) == []


def test_output_folder_missing(tiny_model, tmp_path, capsys):
    code, err = run(capsys, "x", "--model", str(tiny_model), "--out", str(tmp_path / "nope" / "o.png"))
    assert code == 2 and "does not exist" in err and "nope" in err


def test_existing_output_needs_force(tiny_model, tmp_path, capsys):
    out = tmp_path / "o.png"
    out.write_bytes(b"precious")
    code, err = run(capsys, "x", "--model", str(tiny_model), "--width", "32", "--height", "32", "--out", str(out))
    assert code == 2 and "--force" in err
    assert out.read_bytes() == b"precious"
    code, _ = run(capsys, "x", "--model", str(tiny_model), "--width", "32", "--height", "32", "--out", str(out),
                  "--force")
    assert code == 0 and out.read_bytes()[:4] == b"\x89PNG"



def test_ctrl_c_leaves_no_file(tiny_model, tmp_path, capsys, monkeypatch):
    import zimage_lite.pipeline as pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "euler_step", interrupted)
    code, err = run(capsys, "x", "--model", str(tiny_model), "--width", "32", "--height", "32",
                    "--out", str(tmp_path / "o.png"))
    assert code == 130 and "nothing was written" in err
    assert _outputs(tmp_path) == []


def test_ctrl_c_while_writing_leaves_no_file(tmp_path, monkeypatch):
    from PIL import Image

    from zimage_lite.image import save_image

    def interrupted(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_image(Image.new("RGB", (8, 8)), tmp_path / "o.png", {"prompt": "x"})
    assert list(tmp_path.iterdir()) == []


def test_bad_device(tiny_model, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code, err = run(capsys, "x", "--model", str(tiny_model), "--device", "cuda", "--out", str(tmp_path / "o.png"))
    assert code == 2 and "--device cuda" in err and "no CUDA GPU" in err


@pytest.mark.parametrize("device", ["cudax", "cuda:x", "gpu", "cpu:1"])
def test_unknown_device_is_named(tiny_model, tmp_path, capsys, device):
    code, err = run(capsys, "x", "--model", str(tiny_model), "--device", device, "--out", str(tmp_path / "o.png"))
    assert code == 2 and device in err and "cuda:N" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_missing_gpu_index_is_named(tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code, err = run(capsys, "x", "--model", str(tiny_model), "--device", "cuda:7", "--out", str(tmp_path / "o.png"))
    assert code == 2 and "--device cuda:7" in err and "cuda:0 to cuda:0" in err
    assert list(tmp_path.iterdir()) == []
