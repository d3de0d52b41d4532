"""stable-diffusion.cpp as a peer: whole images, prompt to pixels, ours and its `sd-cli` alternating in one run.

    flock /work/wt/fullsize.lock nice -n 5 python benchmarks/sdcpp.py --width 512 --steps 2 \
        --json benchmarks/results/cpu-sdcpp.json
    # a DiT file of ours that sd.cpp cannot read (INT8 ConvRot): name it with --dit and add a run for it; --te gives
    # that label's runs their own text encoder (sd.cpp's and the other runs keep the Q4_K_M GGUF)
    ... --dit int8-convrot=.bench_cache/turbo-dit-int8-convrot.safetensors --runs ours:int8-convrot:fp32 \
        --te int8-convrot=.bench_cache/turbo-text-encoder-int8-convrot.safetensors

Both read the very files our `zimage-lite quantize` wrote into the benchmark cache (benchmarks/run.py's
`weights_file`: the DiT as `--quant`, the Qwen3 text encoder as Q4_K_M unless `--te` names another for that label)
and the random Turbo checkpoint's VAE; same prompt, size, step count, seed and threads. Each run is a fresh process
under GNU time (peak RSS); runs follow the order of `--runs` (ours and sd.cpp alternating), so both see the same
machine drift. Our per-stage seconds come from the pipeline's events (run.py's `pipeline` worker), without placing
the stage's weights (`Event.load_seconds`, counted as loading: sd.cpp loads every model before its first stage);
sd.cpp's from its log: the text encoder (`get_learned_condition`), each step (from its progress line's running mean),
the VAE (`decode_first_stage`) and loading. sd-cli is built once (CPU, native) from the sdist of
stable-diffusion-cpp-python (`pip download --no-binary :all: --no-deps stable-diffusion-cpp-python==0.4.7`), unpacked
into CACHE/sdcpp: `cmake -S <sdist>/vendor/stable-diffusion.cpp -B CACHE/sdcpp/build -DCMAKE_BUILD_TYPE=Release &&
cmake --build CACHE/sdcpp/build --target sd-cli` (or `--sdcpp`). Ours tokenizes with Qwen's own merges, rebuilt from
that sdist (benchmarks/qwen_tokenizer.py), and both wrap the prompt in the same chat template: both encode the same
tokens (`--tokenizer checkpoint`: the random checkpoint's small tokenizer instead, 2.5x the tokens). Before each run
the three files are read once (`warm_files`), so that neither pays a disk read: ours maps its files and reads their
pages as a stage first touches them (a cold text encoder file put 4 s of disk reads into our text-encoder stage),
sd.cpp reads them while loading. Before each run of ours that computes in int8 (an int8 DiT file, or `+int8`), the
machine's int8 roof is measured again in this benchmark's own process, just before it starts the run's
(benchmarks/roofs.py `int8_roof`): the step against FLOPs over
that roof, with the roof as the machine runs then. `--preset demo --runs ours:Q4_K_M:fp32` is a seconds-long smoke
run of ours (tests/test_sdcpp_log.py).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.qwen_tokenizer import qwen_model  # noqa: E402
from benchmarks.roofs import int8_roof  # noqa: E402
from benchmarks.run import DEFAULT_CACHE, PROMPT, child, emit, machine, model_folder, weights_file  # noqa: E402
from zimage_lite.config import PRESETS, SEQ_MULTI_OF, DiTConfig  # noqa: E402

# ours Q4_K_M and Q8_0 in fp32 (what a CPU without native bf16 computes in) against sd.cpp on the same DiT files,
# then ours in bf16, the default on a CPU that has avx512_bf16
DEFAULT_RUNS = "ours:Q4_K_M:fp32,sdcpp:Q4_K_M,ours:Q8_0:fp32,sdcpp:Q8_0,ours:Q4_K_M:bf16"
TEXT_ENCODER_QUANT = "Q4_K_M"
# sd.cpp's settings for Z-Image Turbo (its docs/z_image.md): no CFG, flash attention in the DiT
SDCPP_FLAGS = ("--cfg-scale", "1.0", "--diffusion-fa")
_TAKING = {"load_seconds": "loading tensors completed", "text_encoder_seconds": "get_learned_condition completed",
           "sampling_seconds": "sampling completed", "vae_seconds": "decode_first_stage completed"}
_PROGRESS = re.compile(r"(\d+)/(\d+) - ([\d.]+)(s/it|it/s)")


def parse_sdcpp_log(text: str) -> dict:
    """sd-cli's stdout -> its stage seconds and per-step seconds.

    The progress line (rewritten with carriage returns) shows the running mean over the steps so far, in s/it or,
    below one second, it/s; step k took k * mean_k - (k - 1) * mean_(k-1). Its two decimals make a step's figure
    exact to about k * 0.005 s, far below a CPU step."""
    out: dict = {}
    for key, label in _TAKING.items():
        m = re.search(re.escape(label) + r", taking ([\d.]+)\s*s", text)
        if m:
            out[key] = float(m.group(1))
    means: dict[int, float] = {}
    for m in _PROGRESS.finditer(text):
        value = float(m.group(3))
        means[int(m.group(1))] = value if m.group(4) == "s/it" else 1 / value
    times, total = [], 0.0
    for k in sorted(means):
        times.append(k * means[k] - total)
        total = k * means[k]
    if times:
        out["step_times"] = times
    missing = [k for k in (*_TAKING, "step_times") if k not in out]
    if missing:
        raise ValueError(f"sd-cli log: no {', '.join(missing)} (the log format changed? last lines: "
                         f"{text.strip().splitlines()[-3:] if text.strip() else 'none'})")
    return out


def sdcpp_version(build: Path) -> str:
    """The sdist sd-cli was built from and the ggml version cmake printed (its 'commit' line names the enclosing
    git checkout, not sd.cpp's, when the sdist is unpacked inside one, so it is not used)."""
    sdists = sorted(p.parent.name for p in build.parent.glob("stable_diffusion_cpp_python-*/PKG-INFO"))
    ggml = ""
    log = build.parent / "cmake.log"
    if log.is_file():
        m = re.search(r"ggml version: (\S+)", log.read_text())
        ggml = f", ggml {m.group(1)}" if m else ""
    return f"{sdists[-1] if sdists else 'unknown sdist'} (vendor/stable-diffusion.cpp){ggml}"


def run_sdcpp(binary: Path, files: dict, size: tuple[int, int], steps: int, threads: int, out: Path) -> dict:
    """One sd-cli image: its log's stage times, process wall time and peak RSS."""
    cmd = [str(binary), "--diffusion-model", files["dit"], "--llm", files["text_encoder"], "--vae", files["vae"],
           "-p", PROMPT, "-W", str(size[0]), "-H", str(size[1]), "--steps", str(steps), "-s", "0",
           "-t", str(threads), *SDCPP_FLAGS, "-o", str(out)]
    result = child(cmd, keep_stdout=True)
    return {**result, **parse_sdcpp_log(result.pop("stdout")), "tool_command": " ".join(cmd)}


def dit_step_flops(cfg: DiTConfig, size: tuple[int, int], caption: int) -> float:
    """One DiT forward's FLOPs (2 per multiply-add): every Linear of the blocks (attention's q, k, v and out, the
    FFN's three: 2 x its weights per token) over the tokens it sees, the image and the caption padded to
    SEQ_MULTI_OF, together in the main layers and each alone in its refiners; plus attention's two S x S x dim
    products per layer. The embedders, modulation and final layer (per-sample vectors, or tiny) are left out."""
    def pad(n: int) -> int:
        return -(-n // SEQ_MULTI_OF) * SEQ_MULTI_OF

    patch = 8 * cfg.all_patch_size[0]  # the VAE's 8x, then the DiT's patches
    image, text = pad((size[0] // patch) * (size[1] // patch)), pad(caption)
    per_token = 2 * (4 * cfg.dim ** 2 + 3 * cfg.dim * cfg.ffn_dim)

    def block(tokens: int) -> int:
        return per_token * tokens + 4 * tokens * tokens * cfg.dim

    return float(cfg.n_layers * block(image + text) + cfg.n_refiner_layers * (block(image) + block(text)))


def run_ours(folder: Path, files: dict, dtype: str, size: tuple[int, int], steps: int, preset: str) -> dict:
    """One image through our public API (run.py's `pipeline` worker): stage seconds from its events."""
    spec = {"impl": "pipeline", "model": str(folder), "weights": files["dit"], "text_encoder": files["text_encoder"],
            "device": "cpu", "dtype": dtype.removesuffix("+int8"), "width": size[0], "height": size[1],
            "steps": steps, "int8_compute": dtype.endswith("+int8")}
    r = child([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--worker", json.dumps(spec)])
    events = r.pop("events")
    tokens = next((e["tokens"] for e in events if e.get("tokens")), None)
    # a stage's seconds without placing its weights, as sd.cpp's log times them (it loads every model first)
    seconds = {stage: [e["seconds"] - e["load_seconds"] for e in events if e["stage"] == stage]
               for stage in ("encoded", "step", "decoded")}
    loading = r["open_seconds"] + sum(e["wall_seconds"] - e["seconds"] + e["load_seconds"] for e in events)
    # the pipeline worker resets the kernel's peak RSS at every event (per-stage peaks), and GNU time reports the
    # peak since the last reset: the run's peak is the largest of the events' peaks
    peak = max(r["peak_rss_bytes"], r["host_peak_bytes"])
    return {"total_seconds": r["total_seconds"], "peak_rss_bytes": peak, "load_seconds": loading, "loads_apart": True,
            "text_encoder_seconds": sum(seconds["encoded"]), "step_times": seconds["step"],
            "sampling_seconds": sum(seconds["step"]), "vae_seconds": sum(seconds["decoded"]),
            "tokens": tokens, "dit_step_flops": dit_step_flops(PRESETS[preset].dit, size, tokens) if tokens else None,
            "stage_peak_bytes": {st: max(e["host_peak_bytes"] for e in events if e["stage"] == st) for st in seconds}}


def warm_files(paths: list[str], chunk: int = 16 << 20) -> float:
    """Read every file once (into the page cache; one reused buffer), returning the seconds it took."""
    start, buf = time.perf_counter(), bytearray(chunk)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - start


@contextmanager
def held(lock: str | None) -> Iterator[None]:
    """The shared full-size lock (the file `flock` uses) around one run, so that no other full-size job overlaps
    it; taken per run, not for the whole sequence, so that others get their turn between runs."""
    if not lock:
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def parse_runs(text: str) -> list[tuple[str, str, str]]:
    """'ours:Q4_K_M:fp32,sdcpp:Q8_0,ours:Q4_K_M:fp32+int8' -> [(impl, DiT label, dtype)]; sd.cpp computes in what
    its kernels choose; a dtype ending in +int8 runs ours with --int8-compute (the GGUF's Linears converted to int8
    rows at load, integer matmuls)."""
    runs = []
    for item in text.split(","):
        impl, quant, *dtype = item.strip().split(":")
        if impl not in ("ours", "sdcpp") or len(dtype) > 1 or (impl == "sdcpp" and dtype):
            raise SystemExit(f"--runs {item!r}: expected ours:QUANT:DTYPE[+int8] or sdcpp:QUANT")
        runs.append((impl, quant, dtype[0] if dtype else ("fp32" if impl == "ours" else "ggml")))
    return runs


def labelled_files(given: list[str], option: str, labels: set[str]) -> dict[str, str]:
    """--dit / --te values LABEL=FILE -> {label: file}; SystemExit with one line for a malformed value, a label no
    run has, or a file that is not there."""
    out = {}
    for item in given:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise SystemExit(f"{option} {item!r}: expected LABEL=FILE, e.g. int8-convrot=model.safetensors")
        if label not in labels:
            raise SystemExit(f"{option} {item!r}: no run in --runs has the label {label!r} (they have: "
                             f"{', '.join(sorted(labels))})")
        if not Path(path).is_file():
            raise SystemExit(f"{option} {item!r}: no file {path}")
        out[label] = path
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=DEFAULT_RUNS, help="in this order: ours:QUANT:DTYPE or sdcpp:QUANT, comma-"
                   f"separated (default {DEFAULT_RUNS})")
    p.add_argument("--dit", action="append", default=[], metavar="LABEL=FILE",
                   help="a DiT file for the label LABEL in --runs, instead of our GGUF of that type in the cache")
    p.add_argument("--te", action="append", default=[], metavar="LABEL=FILE",
                   help="the text encoder file of the runs (ours and sd.cpp's) whose DiT label is LABEL (default: our "
                        f"{TEXT_ENCODER_QUANT} GGUF)")
    p.add_argument("--preset", default="turbo", choices=["demo", "turbo"], help="demo: the tiny model (a smoke run)")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="sd-cli -t; ours uses torch's default, one per core")
    p.add_argument("--rounds", type=int, default=1, help="repeat the whole --runs sequence")
    p.add_argument("--cache", default=str(DEFAULT_CACHE))
    p.add_argument("--sdcpp", help="the sd-cli binary (default: CACHE/sdcpp/build/bin/sd-cli)")
    p.add_argument("--lock", help="hold this lock file (flock) during each run")
    p.add_argument("--note", default="", help="stored with every row (e.g. what else ran on the machine)")
    p.add_argument("--tokenizer", choices=("qwen", "checkpoint"), default="qwen",
                   help="ours tokenizes with Qwen's merges as sd.cpp does (benchmarks/qwen_tokenizer.py, default) or "
                        "with the random checkpoint's small tokenizer (2.5x the tokens)")
    p.add_argument("--json", help="append the rows to this JSON file (a list)")
    args = p.parse_args()
    cache = Path(args.cache)
    binary = Path(args.sdcpp or cache / "sdcpp" / "build" / "bin" / "sd-cli")
    runs = parse_runs(args.runs)
    if any(impl == "sdcpp" for impl, _, _ in runs) and not binary.is_file():
        raise SystemExit(f"no sd-cli at {binary}: build it (see the module docstring) or pass --sdcpp")
    extra, encoders = (labelled_files(given, option, {quant for _, quant, _ in runs})
                       for given, option in ((args.dit, "--dit"), (args.te, "--te")))
    cache.mkdir(parents=True, exist_ok=True)
    folder = model_folder(args.preset, cache)
    # ours reads the weights of `folder` through `ours`: the same files, with Qwen's own tokenizer unless asked not
    ours = qwen_model(folder, cache) if args.tokenizer == "qwen" and args.preset != "demo" else folder
    size = (args.width, args.height or args.width)
    info = {"component": "sdcpp", "preset": args.preset, "width": size[0], "height": size[1], "steps": args.steps,
            "threads": args.threads, "note": args.note, "machine": machine(), "date": time.strftime("%Y-%m-%d"),
            "command": f"python benchmarks/sdcpp.py {shlex.join(sys.argv[1:])}"}
    for round_ in range(args.rounds):
        for impl, quant, dtype in runs:
            files = {"dit": extra.get(quant) or str(weights_file(folder, quant, cache)[0]),
                     "text_encoder": encoders.get(quant)
                     or str(weights_file(folder, TEXT_ENCODER_QUANT, cache, "text-encoder")[0]),
                     "vae": str(folder / "vae" / "diffusion_pytorch_model.safetensors")}
            print(f"round {round_ + 1}: {impl} {quant} {dtype} ...", file=sys.stderr, flush=True)
            with held(args.lock):
                warm = warm_files(list(files.values()))
                load = os.getloadavg()[0]  # what else the machine runs: other jobs share its cores
                if impl == "ours":
                    # an int8 run's bound, FLOPs / the int8 roof, with the roof as the machine runs it now
                    roof = int8_roof(args.threads) if quant.startswith("int8") or dtype.endswith("+int8") else {}
                    r = {"impl": "zimage-lite", "tokenizer": "qwen" if ours != folder else "checkpoint", **roof,
                         **run_ours(ours, files, dtype, size, args.steps, args.preset)}
                else:
                    r = {"impl": "stable-diffusion.cpp", "version": sdcpp_version(binary.parent.parent),
                         **run_sdcpp(binary, files, size, args.steps, args.threads, cache / "sdcpp" / "out.png")}
            row = {**r, "quant": quant, "dtype": dtype, "round": round_ + 1, "dit_file": Path(files["dit"]).name,
                   "text_encoder_file": Path(files["text_encoder"]).name,
                   "load_average_before": load, "load_average_after": os.getloadavg()[0], "files_read_seconds": warm,
                   **info}
            emit(row, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
