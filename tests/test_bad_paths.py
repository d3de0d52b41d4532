"""Bad input to what is written, and to the process: output paths and formats, the metadata round trip, signals,
disk full, concurrency. Each CLI case holds refused()'s promise (exit code, the thing named, no traceback, nothing
changed); real processes only where a signal or a race needs one."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fixtures import TINY, refused, snapshot
from PIL import Image

import zimage_lite
from zimage_lite.cli import main
from zimage_lite.image import read_params, save_image
from zimage_lite.quant.recipes import dit_shapes

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--seed", "5", "--steps", "1", "--width", "32", "--height", "32"]


def run_args(model: Path, out: Path, *more: str) -> list[str]:
    return ["run", "x", "--model", str(model), *SMALL, "--out", str(out), *more]


@pytest.fixture
def no_work(monkeypatch):
    """Any model load or quantized write fails the test: the output checks must come first."""
    import quantize.convert
    import zimage_lite.pipeline

    def work(*args, **kwargs):
        raise AssertionError("work started before the output was checked")

    monkeypatch.setattr(zimage_lite.pipeline, "load", work)
    monkeypatch.setattr(quantize.convert, "write_gguf", work)


def _mount_tmpfs(folder: Path, *options: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the monkeypatched cases cover the same error path)")
    folder.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(("size=256k", *options)), "tmpfs", str(folder)],
                         capture_output=True, text=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")


@pytest.fixture
def mount(tmp_path):
    mounted = []

    def make(name: str, *options: str) -> Path:
        _mount_tmpfs(tmp_path / name, *options)
        mounted.append(tmp_path / name)
        return tmp_path / name

    yield make
    for m in mounted:
        subprocess.run(["umount", str(m)], check=True)


# ---- paths: every output option checked before any work (15 cases) ---------------------------------------------------


@pytest.mark.parametrize("out,names", [
    ("missing/o.png", ["missing", "does not exist"]),
    ("afile/o.png", ["afile", "is a file, not a folder"]),
    ("o.txt", [".txt", ".png, .jpg, .jpeg, .webp"]),
    ("o.gif", [".gif", ".png, .jpg, .jpeg, .webp"]),
    ("o", ["(none)", ".png, .jpg, .jpeg, .webp"]),
    ("dangling.png", ["dangling.png", "link", "--force"]),  # a link that exists counts, dangling or not
    ("existing.png", ["existing.png", "--force"]),
    ("folder", ["zimage-5.png", "--force"]),  # --out DIR: the default name in DIR, which exists
])
def test_run_output_refused_before_work(tiny_model, tmp_path, capsys, no_work, out, names):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "existing.png").write_bytes(b"precious")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "zimage-5.png").write_bytes(b"precious")
    refused(capsys, run_args(tiny_model, tmp_path / out), *names, watch=(tmp_path,))


def test_read_only_folder(tiny_model, tmp_path, capsys, no_work, mount):
    ro = mount("ro", "ro") if os.geteuid() == 0 else tmp_path / "ro"
    if os.geteuid() != 0:
        ro.mkdir(mode=0o555)
    refused(capsys, run_args(tiny_model, ro / "o.png"), str(ro), "not writable", watch=(tmp_path,))
    refused(capsys, ["quantize", str(tiny_model), "--type", "Q8_0", "--out", str(ro)], str(ro), "not writable",
            watch=(tmp_path,))


def test_quantize_output_refused_before_work(tiny_model, tmp_path, capsys, no_work):
    (tmp_path / "z.gguf").symlink_to(tmp_path / "nowhere.gguf")
    refused(capsys, ["quantize", str(tiny_model), "--type", "Q8_0", "--out", str(tmp_path / "z.gguf")],
            "z.gguf", "link", "--force", watch=(tmp_path,))
    (tmp_path / "afile").write_text("x")
    refused(capsys, ["quantize", str(tiny_model), "--type", "Q8_0", "--out", str(tmp_path / "afile" / "z.gguf")],
            "is a file, not a folder", watch=(tmp_path,))


@pytest.mark.parametrize("kind, name, names", [
    ("Q8_0", "z.png", ("--out", "z.png", "writes a GGUF file", "ending in .gguf")),
    ("int8-convrot", "z.gguf", ("--out", "z.gguf", "writes a safetensors file", "ending in .safetensors")),
    ("nf4", "z.safetensors", ("--out", "writes a diffusers folder", "without a file extension")),
])
def test_quantize_output_named_for_another_format_is_refused(tiny_model, tmp_path, capsys, no_work, kind, name,
                                                             names):
    """A file name that says another format than the type writes (it would not load as what it says)."""
    refused(capsys, ["quantize", str(tiny_model), "--type", kind, "--out", str(tmp_path / name)], *names,
            watch=(tmp_path,))


def test_write_time_permission_error(kq_model, tmp_path, capsys, monkeypatch):
    import tempfile

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path))

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    refused(capsys, ["quantize", str(kq_model), "--type", "Q8_0", "--out", str(tmp_path / "z.gguf")],
            str(tmp_path / "z.gguf"), "cannot write", "Permission", watch=(tmp_path,))


def test_out_folder_takes_the_default_name(tiny_model, tmp_path, capsys):
    for force in ([], ["--force"]):
        assert main(run_args(tiny_model, tmp_path, *force)) == 0, capsys.readouterr().err
        assert Image.open(tmp_path / "zimage-5.png").format == "PNG"
        assert [p.name for p in tmp_path.iterdir()] == ["zimage-5.png"]


# ---- metadata round trip and formats (15 cases) ----------------------------------------------------------------------

PARAMS = {"prompt": "一只小狐狸 in the snow", "negative": "blurry", "seed": 2**63 + 5, "steps": 8, "cfg": 4.5,
          "cfg_normalization": 0.0, "cfg_truncation": 0.9, "width": 64, "height": 48, "model": "/models/Z-Image-Turbo",
          "dit": "/models/z_image_turbo-Q4_K_M.gguf", "dit_format": "Q4_K_M", "text_encoder_format": "BF16",
          "dtype": "bf16", "device": "cuda:0", "version": zimage_lite.__version__}


@pytest.mark.parametrize("suffix,fmt", [(".png", "PNG"), (".jpg", "JPEG"), (".JPEG", "JPEG"), (".webp", "WEBP")])
def test_formats_carry_every_parameter(tmp_path, suffix, fmt):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    save_image(image, tmp_path / f"o{suffix}", PARAMS)
    assert Image.open(tmp_path / f"o{suffix}").format == fmt
    got = read_params(tmp_path / f"o{suffix}")
    assert got == PARAMS and type(got["cfg_normalization"]) is float and type(got["seed"]) is int
    # what text_to_image leaves in image.info: the same values as text, typed again on the way in
    image.info.update({k: str(v) for k, v in PARAMS.items()})
    save_image(image, tmp_path / f"p{suffix}")
    assert read_params(tmp_path / f"p{suffix}") == PARAMS


def test_run_then_from_png_makes_the_same_image(tmp_path, capsys):
    a, b, c = tmp_path / "a.png", tmp_path / "b.webp", tmp_path / "c.png"
    assert main(["run", "a cat, 猫", "--model", "demo", *SMALL, "--out", str(a)]) == 0
    assert main(["run", "--from-png", str(a), "--out", str(c)]) == 0
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(c)))
    assert read_params(c) == read_params(a) and read_params(a)["prompt"] == "a cat, 猫"
    # an option given replaces the stored one alone; the run also reads its parameters back from a WebP
    assert main(["run", "--from-png", str(a), "--seed", "6", "--out", str(b)]) == 0
    assert main(["run", "--from-png", str(b), "--out", str(tmp_path / "d.png")]) == 0
    got = read_params(tmp_path / "d.png")
    assert got["seed"] == 6 and got["prompt"] == "a cat, 猫" and got["steps"] == 1 and got["width"] == 32


@pytest.mark.parametrize("make,names", [
    (lambda p: None, ["not found"]),
    (lambda p: p.write_bytes(b"not an image"), ["not an image Pillow can read"]),
    (lambda p: Image.new("RGB", (4, 4)).save(p), ["no zimage-lite parameters"]),
    (lambda p: p.mkdir(), ["a folder, not a file"]),
    (lambda p: os.mkfifo(p), ["a FIFO"]),  # would block a read
    (lambda p: Image.new("1", (20000, 20000)).save(p), ["too large to read safely"]),  # a decompression bomb
])
def test_from_png_without_parameters(tmp_path, capsys, no_work, make, names):
    src = tmp_path / "in.png"
    make(src)
    refused(capsys, ["run", "--from-png", str(src), "--out", str(tmp_path / "o.png")], str(src), *names,
            watch=(tmp_path,))


def test_from_png_with_bad_stored_values(tmp_path, capsys, no_work):
    from PIL.PngImagePlugin import PngInfo

    for stored, names in ((json.dumps({"prompt": "x", "seed": "five"}), ["seed", "whole number"]),
                          ("[1, 2]", ["not a JSON object"]), ("{nope", ["not valid JSON"])):
        info = PngInfo()
        info.add_itxt("zimage-lite", stored)
        Image.new("RGB", (4, 4)).save(tmp_path / "in.png", pnginfo=info)
        refused(capsys, ["run", "--from-png", str(tmp_path / "in.png")], "in.png", *names, watch=(tmp_path,))


def test_prompt_too_long_for_jpeg_metadata(tiny_model, tmp_path, capsys, no_work):
    argv = run_args(tiny_model, tmp_path / "o.jpg")
    argv[1] = "a fox " * 12000
    refused(capsys, argv, "o.jpg", "do not fit a JPEG", ".png or .webp", watch=(tmp_path,))


def test_run_needs_a_prompt(tmp_path, capsys, no_work):
    refused(capsys, ["run", "--out", str(tmp_path / "o.png")], "PROMPT", "--from-png", watch=(tmp_path,))


# ---- signals: Ctrl-C and SIGTERM (5 cases, 4 in real processes) ------------------------------------------------------

# Runs the CLI with one function wrapped: its `nth` call says "ready" and waits (the test's signal ends the wait).
CHILD = r"""
import importlib, sys, time
module, attr, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
mod = importlib.import_module(module)
real, calls = getattr(mod, attr), []
def wait(*args, **kwargs):
    calls.append(1)
    if len(calls) == nth:
        print("ready", flush=True)
        time.sleep(120)
    return real(*args, **kwargs)
setattr(mod, attr, wait)
from zimage_lite.cli import main
sys.exit(main(sys.argv[4:]))
"""


def interrupt(hook: tuple[str, str, int], argv: list[str], sig: signal.Signals, folder: Path) -> tuple[int, str]:
    """Start the CLI in a child process, wait until it reaches `hook` (a .part file in `folder` shows that it is
    mid-write), send `sig`; (exit code, stderr)."""
    # SIGINT at its default in the child: a shell's background job (`make test &`) starts with it ignored
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *map(str, hook), *argv], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        if "ready\n" not in proc.stdout:  # reads up to "ready"; the end of output means the child ended early
            pytest.fail(f"the child ended before the signal: {proc.communicate()[1]}")
        assert any(".part" in p.name for p in folder.iterdir()), "the signal must come while a .part file exists"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_quantize_leaves_nothing(tiny_model, tmp_path, sig):
    code, err = interrupt(("quantize.writing", "read", 3), ["quantize", tiny_model, "--type", "Q8_0", "--out",
                                                           tmp_path], sig, tmp_path)
    assert code == 128 + sig and "nothing was written" in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_signal_in_the_second_component_says_what_was_written(tiny_model, tmp_path):
    nth = len(dit_shapes(TINY.dit)) + 3  # a read of the text encoder: the DiT file is complete
    code, err = interrupt(("quantize.writing", "read", nth), ["quantize", tiny_model, "--type", "Q8_0",
                                                             "--component", "all", "--out", tmp_path],
                          signal.SIGINT, tmp_path)
    dit = tmp_path / "z_image_turbo-Q8_0.gguf"
    assert code == 130 and f"{dit} was written in full" in err and "nothing was written" not in err, err
    assert [p.name for p in tmp_path.iterdir()] == [dit.name]


def test_sigterm_mid_run_leaves_nothing(tiny_model, tmp_path):
    # The image is in its .part file. Ctrl-C in a run: test_bad_input.test_ctrl_c_leaves_no_file (in-process: a real
    # SIGINT raises the same KeyboardInterrupt, as the quantize cases above show in a real process).
    code, err = interrupt(("zimage_lite.output", "_public", 1), run_args(tiny_model, tmp_path / "o.png"),
                          signal.SIGTERM, tmp_path)
    assert code == 143 and "interrupted by SIGTERM: nothing was written" in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_sigterm_handler_is_restored(tiny_model, tmp_path, capsys):
    before = signal.getsignal(signal.SIGTERM)
    assert main(["info", str(tiny_model)]) == 0
    assert signal.getsignal(signal.SIGTERM) is before


# ---- disk full (6 cases: 3 injected, always; 3 on a full tmpfs, as root) ---------------------------------------------


def _fill(folder: Path) -> None:
    with open(folder / "filler", "wb", buffering=0) as f:  # unbuffered: close() has nothing left to write
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC


def test_disk_full_writing_the_image_injected(tiny_model, tmp_path, capsys, monkeypatch):
    def full(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"half an image")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    (tmp_path / "o.png").write_bytes(b"precious")
    refused(capsys, run_args(tiny_model, tmp_path / "o.png", "--force"), "o.png", "disk full", watch=(tmp_path,))


def test_disk_full_writing_a_gguf_injected(kq_model, tmp_path, capsys, monkeypatch):
    import gguf

    real, calls = gguf.GGUFWriter.write_tensor_data, []

    def fill_up(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", fill_up)
    refused(capsys, ["quantize", str(kq_model), "--type", "Q4_K_M", "--out", str(tmp_path / "z.gguf")],
            str(tmp_path / "z.gguf"), "disk full", "MB", watch=(tmp_path,))


@pytest.mark.parametrize("where", ["--out", "--model", "quantize --out"])
def test_a_path_too_long_is_one_line(tiny_model, tmp_path, capsys, where):
    """A name over the file system's limit (255 bytes) fails in the OS, wherever the path is first used: one line
    naming it (cut in the middle) and what to do, as for every other bad path."""
    long = tmp_path / ("a" * 300)
    argv = {"--out": run_args(tiny_model, long.with_suffix(".png")), "--model": ["plan", "--model", str(long)],
            "quantize --out": ["quantize", str(tiny_model), "--type", "Q8_0", "--out", f"{long}.gguf"]}[where]
    refused(capsys, argv, str(long)[:40] + "...", "File name too long", "give a shorter path", watch=(tmp_path,))


def test_an_os_error_about_no_path_keeps_its_traceback(monkeypatch):
    """The CLI's one line is for a path the file system refused; an OS error naming no file (out of memory, an I/O
    error mid-run) is not a usage error and goes up with its traceback."""
    from zimage_lite import cli

    def no_memory(args):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(cli, "cmd_info", no_memory)
    with pytest.raises(OSError, match="Cannot allocate memory"):
        main(["info", "x"])


def test_a_short_write_is_disk_full(kq_model, tmp_path, capsys, monkeypatch):
    """numpy's tofile (what the GGUF writer writes tensors with) reports a disk that fills mid-tensor as a short
    write, with no errno: "21760 requested and 672 written" (measured on a 64 KiB tmpfs)."""
    import gguf

    def short(self, *args, **kwargs):
        raise OSError("21760 requested and 672 written")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", short)
    refused(capsys, ["quantize", str(kq_model), "--type", "Q8_0", "--out", str(tmp_path / "z.gguf")],
            str(tmp_path / "z.gguf"), "disk full", watch=(tmp_path,))


def test_disk_full_in_the_second_component_says_what_was_written(tiny_model, tmp_path, capsys, monkeypatch):
    import gguf

    real = gguf.GGUFWriter.write_tensor_data

    def full(self, *args, **kwargs):
        if self.arch == "qwen3":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", full)
    err = refused(capsys, ["quantize", str(tiny_model), "--type", "Q8_0", "--component", "all", "--out",
                           str(tmp_path)], "Qwen3-4B-Q8_0.gguf", "disk full")
    assert f"{tmp_path / 'z_image_turbo-Q8_0.gguf'} was written in full" in err
    assert [p.name for p in tmp_path.iterdir()] == ["z_image_turbo-Q8_0.gguf"]


def test_disk_full_on_a_tmpfs(tiny_model, tmp_path, capsys, mount):
    disk = mount("disk")
    (disk / "o.png").write_bytes(b"precious")
    _fill(disk)
    refused(capsys, run_args(tiny_model, disk / "o.png", "--force"), str(disk / "o.png"), "disk full",
            watch=(disk,))
    refused(capsys, ["quantize", str(tiny_model), "--type", "Q8_0", "--out", str(disk)], "z_image_turbo-Q8_0.gguf",
            "disk full", watch=(disk,))


def test_demo_cache_on_a_full_disk(tmp_path, capsys, mount, monkeypatch):
    disk = mount("cache")
    _fill(disk)
    monkeypatch.setenv("ZIMAGE_LITE_CACHE", str(disk / "zimage-lite"))
    (tmp_path / "out").mkdir()
    refused(capsys, ["run", "x", *SMALL, "--out", str(tmp_path / "out" / "o.png")], str(disk), "ZIMAGE_LITE_CACHE",
            watch=(tmp_path / "out",))
    assert sorted(p.name for p in disk.rglob("*")) in (["filler"], ["filler", "zimage-lite"])  # no half a model


# ---- concurrency and the cache (4 cases) -----------------------------------------------------------------------------


def test_the_run_that_finishes_second_uses_the_first_ones_demo(tmp_path, monkeypatch):
    from zimage_lite import demo

    monkeypatch.setenv("ZIMAGE_LITE_CACHE", str(tmp_path))
    final = tmp_path / f"demo-v{demo.DEMO_VERSION}"
    real = demo.write_checkpoint

    winner = {}

    def other_run_finishes_first(folder, *args, **kwargs):  # TINY: the same mechanism, written 10x faster
        real(tmp_path / "other", TINY)
        (tmp_path / "other").rename(final)
        winner.update(snapshot(final))
        return real(folder, TINY)

    # Deterministic, unlike two real processes started at once (which race only by chance, at ~8 s of test time).
    monkeypatch.setattr(demo, "write_checkpoint", other_run_finishes_first)
    assert demo.demo_path() == final
    assert winner and snapshot(final) == winner  # the first run's files, untouched while it may be reading them
    assert [p.name for p in tmp_path.iterdir()] == [final.name]  # the loser's copy is gone


@pytest.mark.parametrize("where", ["file", "file/sub"])
def test_cache_variable_pointing_at_a_file(tmp_path, capsys, monkeypatch, where):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("ZIMAGE_LITE_CACHE", str(tmp_path / where))
    refused(capsys, ["run", "x", *SMALL, "--out", str(tmp_path / "o.png")], "$ZIMAGE_LITE_CACHE",
            str(tmp_path / "file"), "is a file, not a folder", watch=(tmp_path,))


def test_output_appearing_during_the_run_is_kept(tiny_model, tmp_path, capsys, monkeypatch):
    import zimage_lite.output as output

    real = output._public

    def other_process_writes(tmp):
        (tmp_path / "o.png").write_bytes(b"someone else's")
        real(tmp)

    monkeypatch.setattr(output, "_public", other_process_writes)
    refused(capsys, run_args(tiny_model, tmp_path / "o.png"), "o.png", "appeared", "--force")
    assert [p.name for p in tmp_path.iterdir()] == ["o.png"]
    assert (tmp_path / "o.png").read_bytes() == b"someone else's"


# ---- signals, continued: Ctrl-C in-process (2 cases)
def test_ctrl_c_mid_run_leaves_no_file(tiny_model, tmp_path, capsys, monkeypatch):
    import zimage_lite.pipeline as pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "euler_step", interrupted)
    before = snapshot(tmp_path)
    code = main(["run", "x", "--model", str(tiny_model), "--width", "32", "--height", "32",
                 "--out", str(tmp_path / "o.png")])
    assert code == 130 and "nothing was written" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_ctrl_c_after_a_preview_says_the_preview_was_written(tiny_model, tmp_path, capsys, monkeypatch):
    import zimage_lite.pipeline as pipeline

    real, calls = pipeline.euler_step, []

    def second_interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "euler_step", second_interrupted)
    preview = tmp_path / "p.png"
    code = main(["run", "x", "--model", str(tiny_model), "--width", "32", "--height", "32", "--steps", "3",
                 "--out", str(tmp_path / "o.png"), "--preview", str(preview)])
    err = capsys.readouterr().err
    assert code == 130 and f"interrupted: the preview {preview} (step 1 of 3) was written in full" in err
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]


def test_ctrl_c_while_writing_leaves_no_file(tmp_path, monkeypatch):
    def interrupted(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_image(Image.new("RGB", (8, 8)), tmp_path / "o.png", {"prompt": "x"})
    assert list(tmp_path.iterdir()) == []


# ---- a closed standard output (`zimage-lite plan | head`)
def test_closed_stdout_ends_quietly():
    read, write = os.pipe()
    os.close(read)  # the reader is gone: the first write fails with EPIPE
    try:
        done = subprocess.run([sys.executable, "-m", "zimage_lite", "plan", "--preset", "turbo", "--device", "cpu"],
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert done.returncode == 141 and "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


def test_jpeg_metadata_with_the_run_paths_is_checked_before_the_run(tiny_model, tmp_path, capsys, monkeypatch):
    """The prompt fits a JPEG's metadata on its own, but not with the model's long path the run records: refused
    once the model is loaded, before any stage runs (not after the whole run)."""
    import zimage_lite.pipeline as pipeline

    deep = tmp_path / ("d" * 200) / ("e" * 200) / ("f" * 200) / ("g" * 200)
    deep.mkdir(parents=True)
    (deep / "model").symlink_to(tiny_model)
    out = tmp_path / "out"
    out.mkdir()
    argv = ["run", "a" * 64300, "--model", str(deep / "model"), *SMALL, "--out", str(out / "o.jpg")]

    def no_stage(*args, **kwargs):
        raise AssertionError("a stage ran")

    monkeypatch.setattr(pipeline.ZImagePipeline, "_stages", no_stage)
    refused(capsys, argv, "o.jpg", "do not fit a JPEG", watch=(out,))
