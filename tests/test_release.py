"""A stage's files are unmapped when the stage ends: the peak is the largest stage, not the sum of the stages.

A memory map keeps every page the stage touched resident (counted in RSS) for as long as the map lives; a quantized
model's weights are views of the map. So besides freeing the model, a stage must drop the sources' maps. Read off
/proc/self/maps (Linux): which of the model's files the process maps after each stage.
"""

from __future__ import annotations

import mmap
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import PROMPTS

import zimage_lite
from quantize.convert import convert
from zimage_lite.errors import CheckpointError
from zimage_lite.weights.components import identify
from zimage_lite.weights.gguf_source import GGUFSource
from zimage_lite.weights.sources import SafetensorsSource

pytestmark = pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads /proc/self/maps (Linux)")


def mapped(path: Path) -> list[str]:
    """The files under `path` (a file or a folder, symlinks resolved) that this process maps."""
    files = {str(p.resolve()) for p in ([path] if path.is_file() else path.iterdir())}
    with open("/proc/self/maps") as f:
        return sorted({line.split(maxsplit=5)[-1].strip() for line in f} & files)


@pytest.fixture(scope="module")
def ggufs(tiny_model, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("release")
    [dit] = convert(tiny_model, "Q8_0", out=out / "dit.gguf")
    [te] = convert(tiny_model, "Q8_0", component="text-encoder", out=out / "te.gguf")
    return {"dit": dit.path, "text_encoder": te.path}


@pytest.mark.parametrize("layout", ["folders", "gguf"])
def test_each_stage_unmaps_its_files(tiny_model, ggufs, layout):
    files = {"dit": tiny_model / "transformer", "text_encoder": tiny_model / "text_encoder", "vae": tiny_model / "vae"}
    if layout == "gguf":  # packed weights are views of the map: the model itself holds it while the stage runs
        files |= ggufs
    pipe = zimage_lite.load(tiny_model, dit=files["dit"], text_encoder=files["text_encoder"], device="cpu",
                            dtype="fp32")
    assert [mapped(p) for p in files.values()] == [[], [], []]  # opening reads headers, and maps nothing after
    seen = {}
    for event in pipe.generate(PROMPTS["en"], width=32, height=32, steps=2, seed=1):
        seen.setdefault(event.stage, {k: mapped(p) for k, p in files.items()})
    assert seen["encoded"] == {"dit": [], "text_encoder": [], "vae": []}
    assert seen["step"]["dit"] and not seen["step"]["text_encoder"]  # the DiT's file is mapped while it runs
    assert seen["decoded"] == {"dit": [], "text_encoder": [], "vae": []}


def test_a_run_stopped_early_lets_go_of_its_stage(tiny_model, ggufs):
    """A caller that stops reading events mid-denoise (a cancel button, an early `break`) closes the generator: the
    DiT it was running is freed and its file unmapped, as at the end of its stage."""
    pipe = zimage_lite.load(tiny_model, dit=ggufs["dit"], device="cpu", dtype="fp32")
    run = pipe.generate(PROMPTS["en"], width=32, height=32, steps=4, seed=1)
    for event in run:
        if event.stage == "step":
            assert "dit" in pipe._models and mapped(ggufs["dit"])  # precondition: mid-stage, it is held
            break
    run.close()
    assert pipe._models == {} and mapped(ggufs["dit"]) == []


def test_sources_reopen_after_a_stage(tiny_model, ggufs):
    """The next image reopens the maps (headers are not read again) and is the same image."""
    pipe = zimage_lite.load(tiny_model, dit=ggufs["dit"], text_encoder=ggufs["text_encoder"], device="cpu",
                            dtype="fp32")
    first, second = (np.asarray(pipe.text_to_image("a fox", width=32, height=32, steps=2, seed=5)) for _ in "ab")
    assert np.array_equal(first, second) and first.std() > 5


def test_kept_models_keep_their_maps(tiny_model, ggufs):
    pipe = zimage_lite.load(tiny_model, dit=ggufs["dit"], device="cpu", dtype="fp32", keep_loaded=True)
    pipe.text_to_image("a fox", width=32, height=32, steps=1, seed=5)
    assert mapped(ggufs["dit"])  # the kept DiT's packed weights still read the file


def test_identify_keeps_no_map(tiny_model, ggufs, tmp_path):
    (tmp_path / "dit").mkdir()
    for src in (ggufs["dit"], *(tiny_model / "transformer").iterdir()):  # fresh paths: not in identify's cache
        shutil.copy(src, tmp_path / "dit" / src.name)
    for path in (tmp_path / "dit" / ggufs["dit"].name, tmp_path / "dit"):
        assert identify(path).kind == "dit" and mapped(path) == []


def _check_close_and_reopen(src, name: str, path: Path) -> None:
    want = src.get(name).clone() if isinstance(src.get(name), torch.Tensor) else src.get(name).data.clone()
    assert mapped(path)
    src.close()
    assert mapped(path) == [] and src.shape(name) and src.qtype(name)  # the index outlives the map
    got = src.get(name)
    got = got if isinstance(got, torch.Tensor) else got.data
    assert torch.equal(got, want) and mapped(path)


def test_gguf_source_closes_and_reopens(ggufs):
    src = GGUFSource(ggufs["dit"])
    _check_close_and_reopen(src, "layers.0.attention.qkv.weight", ggufs["dit"])
    src.close()
    assert src.meta("general.architecture") == "lumina2" and mapped(ggufs["dit"]) == []  # metadata from the index


def test_safetensors_source_closes_and_reopens(tiny_model):
    src = SafetensorsSource.from_folder(tiny_model / "transformer")
    _check_close_and_reopen(src, "layers.0.attention.to_q.weight", tiny_model / "transformer")


@pytest.mark.parametrize("kind", ["gguf", "safetensors"])
def test_a_file_changed_while_closed_is_named(tiny_model, ggufs, tmp_path, kind):
    if kind == "gguf":
        path = Path(tmp_path / "dit.gguf")
        path.write_bytes(ggufs["dit"].read_bytes())
        src, name = GGUFSource(path), "layers.0.attention.qkv.weight"
    else:
        path = Path(tmp_path / "vae.safetensors")
        [vae] = (tiny_model / "vae").glob("*.safetensors")
        path.write_bytes(vae.read_bytes())
        src, name = SafetensorsSource([path]), "decoder.conv_in.weight"
    src.close()
    with open(path, "ab") as f:
        f.write(b"\0" * 64)  # another download or conversion in its place
    os.utime(path, ns=(1, 1))
    with pytest.raises(CheckpointError, match=rf"{path.name}: the file changed on disk since it was opened"):
        src.get(name)


def _mapped_tensor(tmp_path: Path, n: int = 4 * 2**20) -> tuple[torch.Tensor, np.ndarray, Path, object]:
    """A uint8 tensor of n random bytes read through safe_open (a view of its private copy-on-write map), faulted in;
    its bytes as written; the file; the handle (kept open by the caller)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    want = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8)
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(3), "w": torch.from_numpy(want.copy()), "z": torch.ones(5)}, str(path))
    handle = safe_open(str(path), framework="pt")
    t = handle.get_tensor("w")
    assert int(t.sum()) == int(want.sum(dtype=np.int64))  # read: resident
    return t, want, path, handle


def test_file_views_hand_back_a_tensors_pages_and_it_reads_the_same_after(tmp_path):
    """oneDNN's copy made (quant/qlinear.prepare_resident), the file's pages under an int8 weight leave RSS: a 4 MiB
    view hands back all its whole pages, and reads its bytes again from the file after."""
    from fixtures import resident_bytes_of

    from zimage_lite.runtime.memory import FileViews

    views = FileViews()  # made before the file is mapped (a source maps a file at its first read): reads the maps again
    t, want, path, _handle = _mapped_tensor(tmp_path)
    before = resident_bytes_of(path)
    assert before >= t.numel()  # precondition: its pages are resident
    released = views.release(t)
    assert t.numel() - 2 * mmap.PAGESIZE <= released <= t.numel()  # all but the edge pages (a neighbour may share them)
    assert resident_bytes_of(path) <= before - released
    assert np.array_equal(t.numpy(), want)  # valid still: read again from the file


def test_file_views_leave_memory_that_is_no_files_page_alone(tmp_path):
    """MADV_DONTNEED zero-fills anonymous memory, and a private map's written pages are the only copy of what was
    written: neither is handed back, both keep their bytes."""
    from zimage_lite.runtime.memory import FileViews

    anonymous = torch.arange(2**20, dtype=torch.int32)
    t, want, _, _handle = _mapped_tensor(tmp_path)
    written = mmap.PAGESIZE * 10
    t[written] = int(want[written]) ^ 0xFF  # one page written: a private copy
    views = FileViews()
    assert views.release(anonymous) == 0 and views.release(t) == 0
    assert torch.equal(anonymous, torch.arange(2**20, dtype=torch.int32))
    assert int(t[written]) == int(want[written]) ^ 0xFF and np.array_equal(t.numpy()[:written], want[:written])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_weight_cast_at_load_hands_back_its_files_pages(tmp_path, dtype):
    """A bf16 file loaded for fp32 compute: each weight is a copy, and the file's pages under it leave RSS as it is
    made (weights/load.py), as the plan counts the copy alone (full size, Q4_K_M DiT under --ram 3GB: its bf16
    refiners' pages, 1.35 GiB, stayed beside their fp32 copies). Loaded as stored (bf16), the weights are views of
    those pages, which stay. The tensors are 2 MiB: the kernel maps up to 64 KiB around each page read (fault-around),
    so the tiny checkpoints' tensors of a few pages fault their released neighbours back in (the tiny VAE in fp32:
    311 of its file's 536 KiB stay resident)."""
    from fixtures import resident_bytes_of
    from safetensors.torch import save_file

    from zimage_lite.weights.load import load_module

    weights = {f"{i}.weight": torch.randn(1024, 1024).to(torch.bfloat16) for i in range(3)}  # 2 MiB each
    path = tmp_path / "m.safetensors"
    save_file(weights, str(path))
    with torch.device("meta"):
        model = torch.nn.Sequential(*(torch.nn.Linear(1024, 1024, bias=False) for _ in weights))
    source = SafetensorsSource([path])
    load_module(model, source, dtype, "cpu", "test model")
    stored = sum(w.numel() * w.element_size() for w in weights.values())
    assert all(torch.equal(model[i].weight, w.to(dtype)) for i, w in enumerate(weights.values()))  # read
    resident = resident_bytes_of(path)
    if dtype == torch.bfloat16:
        assert resident >= stored  # views: the model reads the file's pages
    else:  # measured 16 KiB: the header's page and the weights' edge pages (6.3 MiB with the release removed)
        assert resident <= 2 * len(weights) * mmap.PAGESIZE + mmap.PAGESIZE, resident
    source.close()


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_a_packed_weight_moved_off_the_host_hands_back_its_files_pages(tmp_path, device):
    """A quantized Linear stays packed: on the CPU its weight is a view of the GGUF's map (its pages stay, read at each
    use); moved to another device (a GPU; `meta` stands in for one here) it is a copy, and the file's pages under it
    leave RSS as it is made (a GGUF VAE on a GPU kept them until its stage ended)."""
    import gguf
    from fixtures import resident_bytes_of

    from zimage_lite.weights.load import load_module

    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "test")
    q = gguf.quants.quantize(np.random.default_rng(0).standard_normal((1024, 2048), dtype=np.float32),
                             gguf.GGMLQuantizationType.Q8_0)  # 2.1 MiB packed
    writer.add_tensor("0.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(2048, 1024, bias=False))
    source = GGUFSource(path)
    assert int(source.get("0.weight").data.sum())  # faulted in, as a GPU copy reads it (`meta` copies nothing)
    load_module(model, source, torch.float32, device, "test model")
    assert model[0].weight.device.type == device and model[0].weight.dtype == torch.uint8  # packed, not dequantized
    if device == "cpu":
        assert int(model[0].weight.sum())  # read
    resident = resident_bytes_of(path)
    if device == "cpu":
        assert resident >= q.nbytes  # a view: its pages are the weight
    else:  # measured 4 KiB (the header's page); 2.2 MiB with the hand-back removed
        assert resident <= 4 * mmap.PAGESIZE, resident
    source.close()
