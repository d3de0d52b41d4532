"""The prompt enhancer: the text encoder run as Qwen3's causal LM, against transformers' Qwen3ForCausalLM.generate.

The model is `fixtures.make_lm_checkpoint` (KQ_TEXT's 256-wide, 4-layer text encoder, scaled so that greedy decoding
says varied things; official layout, BF16, tied embeddings, no lm_head stored), computed in fp32 on the CPU. Parity
is exact: the same 32 token ids. The Q8_0 GGUF is the one `zimage-lite quantize` writes from it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from fixtures import PROMPTS, make_lm_checkpoint, optional, refused
from safetensors.torch import load_file, save_file

import zimage_lite
from zimage_lite.cli import main
from zimage_lite.enhance import chat, encode_chat, generate
from zimage_lite.enhance_options import CONTEXT
from zimage_lite.image import read_params
from zimage_lite.models.qwen3 import KVCache, Qwen3Encoder
from zimage_lite.weights.components import open_language_model
from zimage_lite.weights.load import load_module

transformers, needs_transformers = optional("transformers")
NEW = 32
SHORT_SYSTEM = "describe the picture"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def lm_model(tmp_path_factory) -> Path:
    return make_lm_checkpoint(tmp_path_factory.mktemp("lm"))


@pytest.fixture(scope="module")
def lm_q8(lm_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lm-q8")
    assert main(["quantize", str(lm_model), "--component", "text-encoder", "--type", "Q8_0", "--out", str(out)]) == 0
    [path] = out.glob("*.gguf")
    return path


@pytest.fixture(scope="module")
def chat_ids(lm_model) -> list[int]:
    """A short chat: with our whole system prompt (~1000 tokens in the tiny tokenizer) the random model soon loops
    over two tokens, which the checks below would see less of."""
    pipe = zimage_lite.load(lm_model, device="cpu", dtype="fp32")
    return encode_chat(pipe.tokenizer.tokenizer, SHORT_SYSTEM, PROMPTS["en"], CONTEXT)[0]


def _ours(path: Path) -> Qwen3Encoder:
    cfg, source = open_language_model(path)
    with torch.device("meta"):
        model = Qwen3Encoder(cfg, lm=True)
    return load_module(model, source, torch.float32, "cpu", "text encoder")


def _reference(folder: Path, weights: Path | None = None):
    ref = transformers.Qwen3ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert ref.config.tie_word_embeddings and ref.lm_head.weight is ref.model.embed_tokens.weight
    if weights is not None:  # a quantized file's weights, dequantized to fp32 (gguf-py's kernels' twins)
        source = open_language_model(weights)[1]
        state = {f"model.{n}": (t.dequantize() if hasattr(t := source.get(n), "dequantize") else t).float()
                 for n in source.names()}
        missing, unexpected = ref.load_state_dict(state, strict=False)
        assert set(missing) == {"lm_head.weight"} and not unexpected  # tied: the embedding is the head
    return ref


def _generate_reference(ref, ids: list[int]) -> list[int]:
    out = ref.generate(torch.tensor([ids]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                       eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@needs_transformers
def test_greedy_ids_equal_transformers(lm_model, chat_ids):
    ours, _, _ = generate(_ours(lm_model / "text_encoder"), chat_ids, NEW, set(), CPU, torch.float32)
    assert len(set(ours)) >= 8, f"a degenerate fixture would hide cache and position bugs: {ours}"  # precondition
    assert ours == _generate_reference(_reference(lm_model / "text_encoder"), chat_ids)


@needs_transformers
def test_q8_0_gguf_ids_equal_transformers_on_its_weights(lm_model, lm_q8, chat_ids):
    """Exact against transformers holding the same dequantized Q8_0 weights. Against the BF16 file's ids the Q8_0
    file's first diverge at the third new token (measured; 30 of the 32 differ, as each later token follows from the
    changed ones): Q8_0's weight error moves near-tied logits of this random model (scaled to talk, its top logits lie
    close), which says little of a trained one."""
    model = _ours(lm_q8)
    assert model.layers[0].mlp.up_proj.qtype.name == "Q8_0"  # precondition: the file really is quantized
    ours, _, _ = generate(model, chat_ids, NEW, set(), CPU, torch.float32)
    assert ours == _generate_reference(_reference(lm_model / "text_encoder", lm_q8), chat_ids)


def test_kv_cache_equals_the_uncached_run(lm_model, chat_ids):
    model = _ours(lm_model / "text_encoder")
    cached, _, _ = generate(model, chat_ids, NEW, set(), CPU, torch.float32)
    uncached, _, _ = generate(model, chat_ids, NEW, set(), CPU, torch.float32, cached=False)
    assert cached == uncached
    # the logits after the last token, the cache filled by the prompt's pass and one pass per token since
    seq = chat_ids + cached
    cache = KVCache(model.cfg, len(model.layers), len(seq), CPU, torch.float32)
    with torch.inference_mode():
        model.logits(torch.tensor(chat_ids), cache, CPU, torch.float32)
        for t in cached:
            last = model.logits(torch.tensor([t]), cache, CPU, torch.float32)
        full = model.logits(torch.tensor(seq), None, CPU, torch.float32)
    # measured max |diff| 3.8e-6 on logits of max |4.9| (fp32 summation order: SDPA over the cache vs the whole
    # sequence); tolerance 2e-5, 5x that
    assert cache.pos == len(seq)
    torch.testing.assert_close(last, full, rtol=0, atol=2e-5)


def test_sampling_is_reproducible_per_seed(lm_model, chat_ids):
    model = _ours(lm_model / "text_encoder")

    def sample(seed: int) -> list[int]:
        return generate(model, chat_ids, 16, set(), CPU, torch.float32, temperature=1.0, seed=seed)[0]

    greedy = generate(model, chat_ids, 16, set(), CPU, torch.float32)[0]
    first = sample(3)
    assert sample(3) == first
    assert sample(4) != first and first != greedy


@needs_transformers
def test_chat_template_is_qwen3s_with_thinking_off(lm_model):
    """The fixture tokenizer's chat template (Qwen3's rendering, demo.py) through transformers, and its ids."""
    tok = transformers.AutoTokenizer.from_pretrained(lm_model / "tokenizer")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPTS["cjk"]}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert chat("be brief", PROMPTS["cjk"]) == text
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    pipe = zimage_lite.load(lm_model, device="cpu", dtype="fp32")
    assert encode_chat(pipe.tokenizer.tokenizer, "be brief", PROMPTS["cjk"], CONTEXT) == (tok(text).input_ids, None)


def test_enhance_command_and_api(lm_model, chat_ids, tmp_path, capsys):
    """`enhance` prints what `pipe.enhance` returns: the greedy answer to the chat with the --system file's text."""
    system = tmp_path / "system.txt"
    system.write_text(SHORT_SYSTEM + "\n", encoding="utf-8")
    args = ["enhance", PROMPTS["en"], "--model", str(lm_model), "--dtype", "fp32", "--device", "cpu",
            "--max-tokens", "12", "--system", str(system)]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "prompt tokens at" in err and "tokens/s" in err
    pipe = zimage_lite.load(lm_model, device="cpu", dtype="fp32")
    result = pipe.enhance(PROMPTS["en"], max_tokens=12, system=system)
    ids, _, _ = generate(_ours(lm_model / "text_encoder"), chat_ids, 12, {151643, 151645}, CPU, torch.float32)
    assert out.strip() == result.prompt == pipe.tokenizer.tokenizer.decode(ids, skip_special_tokens=True).strip()
    assert result.prompt_tokens == len(chat_ids) and result.new_tokens == len(ids)
    assert result.prefill_tokens_per_second > 0 and result.tokens_per_second > 0


def test_streamed_blocks_generate_the_same_ids(lm_model, chat_ids, tmp_path):
    """A --ram budget that streams decoder layers (LazyBlocks) through the cached passes: the same answer."""
    system = tmp_path / "system.txt"
    system.write_text(SHORT_SYSTEM, encoding="utf-8")
    pipe = zimage_lite.load(lm_model, device="cpu", dtype="fp32", ram="230MiB")
    stage = pipe.make_plan(64, 64, 0.0, enhance_tokens=len(chat_ids) + 12).stage("enhance")
    assert stage.streamed  # precondition: this budget streams decoder layers
    resident = zimage_lite.load(lm_model, device="cpu", dtype="fp32")
    assert (pipe.enhance(PROMPTS["en"], max_tokens=12, system=system).prompt
            == resident.enhance(PROMPTS["en"], max_tokens=12, system=system).prompt)


def test_packed_layers_are_dequantized_once(lm_model, lm_q8, tmp_path, monkeypatch):
    """On the CPU, with room for the layers in the compute dtype, the enhancer dequantizes the Q8_0 Linears once
    (no QLinear runs per token) and answers as the packed model does. The float decode route: the packed one
    (test_decode_pack.py) requantizes Q8_0 to int8 rows, which changes the tiny random model's greedy ids."""
    from zimage_lite.quant.decode_linear import ROUTE_ENV
    from zimage_lite.quant.qlinear import QLinear

    monkeypatch.setenv(ROUTE_ENV, "float")

    system = tmp_path / "system.txt"
    system.write_text(SHORT_SYSTEM, encoding="utf-8")
    pipe = zimage_lite.load(lm_model, text_encoder=lm_q8, device="cpu", dtype="fp32")
    ids = encode_chat(pipe.tokenizer.tokenizer, SHORT_SYSTEM, PROMPTS["en"], CONTEXT)[0]
    packed, _, _ = generate(_ours(lm_q8), ids, 12, {151643, 151645}, CPU, torch.float32)
    calls = []
    forward = QLinear.forward
    monkeypatch.setattr(QLinear, "forward", lambda self, x: calls.append(self) or forward(self, x))
    result = pipe.enhance(PROMPTS["en"], max_tokens=12, system=system)
    assert calls == []
    assert result.prompt == pipe.tokenizer.tokenizer.decode(packed, skip_special_tokens=True).strip()


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads /proc/self/maps (Linux)")
def test_the_enhancer_lets_go_of_its_file(lm_model, lm_q8):
    """Its stage ends as the others do: the model freed, the text encoder's file unmapped (packed weights and the
    QEmbedding table are views of the map while it runs)."""
    def mapped() -> bool:
        with open("/proc/self/maps") as f:
            return str(lm_q8.resolve()) in f.read()

    pipe = zimage_lite.load(lm_model, text_encoder=lm_q8, device="cpu", dtype="fp32")
    pipe.enhance(PROMPTS["en"], max_tokens=2)
    assert not mapped() and pipe._models == {}


def test_run_enhance_stores_both_prompts_and_from_png_does_not_enhance_again(lm_model, tmp_path, capsys):
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    common = ["--model", str(lm_model), "--dtype", "fp32", "--device", "cpu", "--steps", "1", "--width", "64",
              "--height", "64"]
    assert main(["run", PROMPTS["en"], "--enhance", "--max-tokens", "12", "--seed", "1", "--out", str(first),
                 *common]) == 0
    out, err = capsys.readouterr()
    params = read_params(first)
    assert params["original_prompt"] == PROMPTS["en"] != params["prompt"]
    assert params["prompt"] in out and "tokens/s" in err
    assert main(["run", "--from-png", str(first), "--out", str(second)]) == 0
    assert "tokens/s" not in capsys.readouterr().err  # drawn from the stored enhanced prompt, not enhanced again
    assert read_params(second)["prompt"] == params["prompt"]
    from PIL import Image

    assert Image.open(first).tobytes() == Image.open(second).tobytes()


# --- bad input -------------------------------------------------------------------------------------------------


def _without(lm_model: Path, tmp_path: Path, drop: str) -> dict[str, torch.Tensor]:
    state = {}
    for shard in sorted((lm_model / "text_encoder").glob("*.safetensors")):
        state.update(load_file(shard))
    return {k: v for k, v in state.items() if not k.startswith(drop)}


def test_a_text_encoder_without_the_final_norm_cannot_enhance(lm_model, tmp_path, capsys):
    cut = tmp_path / "te.safetensors"
    save_file(_without(lm_model, tmp_path, "model.norm."), str(cut))
    base = ["--model", str(lm_model), "--text-encoder", str(cut), "--device", "cpu"]
    refused(capsys, ["enhance", "x", *base], str(cut), "the final norm (norm.weight)", "text_encoder/",
            "zimage-lite quantize")
    refused(capsys, ["run", "x", "--enhance", "--out", str(tmp_path / "o.png"), *base], str(cut), "final norm",
            watch=(tmp_path,))
    zimage_lite.load(lm_model, text_encoder=cut, device="cpu").encode("x")  # the image path does not need it
    assert main(["info", str(cut)]) == 0
    assert "zimage-lite enhance: no (lacks the final norm (norm.weight))" in capsys.readouterr().out


def test_a_text_encoder_without_its_last_layer_cannot_enhance(lm_model, tmp_path, capsys):
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    shutil.copy(lm_model / "text_encoder" / "config.json", folder)
    save_file(_without(lm_model, tmp_path, "model.layers.3."), str(folder / "model.safetensors"))
    refused(capsys, ["enhance", "x", "--model", str(lm_model), "--text-encoder", str(folder)], str(folder),
            "the last layer (layers.3)")


def _gguf(path: Path, state: dict[str, torch.Tensor], layers: int) -> Path:
    """An F32 llama.cpp-layout Qwen3 GGUF holding `state` (official names), saying it has `layers` blocks."""
    import gguf

    from zimage_lite.weights.names import te_llama_cpp_name

    w = gguf.GGUFWriter(str(path), "qwen3")
    w.add_block_count(layers)
    w.add_rope_freq_base(1_000_000.0)
    w.add_layer_norm_rms_eps(1e-6)
    for name, t in state.items():
        w.add_tensor(te_llama_cpp_name(name.removeprefix("model.")), t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_gguf_cut_for_images_keeps_the_image_path_and_cannot_enhance(lm_model, tmp_path, capsys):
    """A GGUF without the last layer and the final norm still says 4 blocks: the image path reads layer 2's output
    (the second-to-last of 4), as from the whole file; the enhancer refuses it, naming both."""
    full = _gguf(tmp_path / "full.gguf", _without(lm_model, tmp_path, "none"), 4)
    state = _without(lm_model, tmp_path, "model.layers.3.")
    cut = _gguf(tmp_path / "cut.gguf", {k: v for k, v in state.items() if k != "model.norm.weight"}, 4)
    feats = [zimage_lite.load(lm_model, text_encoder=f, device="cpu", dtype="fp32").encode(PROMPTS["en"])
             for f in (full, cut)]
    assert torch.equal(*feats)
    refused(capsys, ["enhance", "x", "--model", str(lm_model), "--text-encoder", str(cut)], str(cut),
            "the final norm (norm.weight) and the last layer (layers.3)")


@pytest.mark.parametrize("option", [["--max-tokens", "0"], ["--max-tokens", "-3"], ["--max-tokens", "100000"],
                                    ["--temperature", "-1"]])
def test_bad_enhance_options_are_refused(option, capsys, tmp_path):
    refused(capsys, ["enhance", "x", *option], option[0])
    refused(capsys, ["run", "x", "--enhance", "--out", str(tmp_path / "o.png"), *option], option[0],
            watch=(tmp_path,))


@pytest.mark.parametrize("option", [["--max-tokens", "50"], ["--temperature", "0.7"], ["--system", "s.txt"]])
def test_enhancer_options_without_enhance_are_refused(option, capsys, tmp_path):
    """`run` with an enhancer option but no --enhance would silently ignore it."""
    refused(capsys, ["run", "x", "--out", str(tmp_path / "o.png"), *option], option[0], "--enhance",
            watch=(tmp_path,))


def test_a_missing_system_file_is_refused(tmp_path, capsys):
    refused(capsys, ["enhance", "x", "--system", str(tmp_path / "nope.txt")], "--system", "nope.txt")


def test_an_empty_system_file_is_refused_as_the_system_prompt(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text(" \n")
    err = refused(capsys, ["enhance", "x", "--system", str(tmp_path / "empty.txt")], "--system", "empty.txt",
                  "instructions the enhancer follows")
    assert "image to draw" not in err  # the prompt's message, not this file's


def test_a_prompt_longer_than_the_context_is_cut_with_a_warning(lm_model, capsys):
    long = " ".join([PROMPTS["en"]] * 600)  # ~6000 tokens in the tiny tokenizer
    pipe = zimage_lite.load(lm_model, device="cpu", dtype="fp32")
    with pytest.warns(UserWarning, match="cut to"):
        result = pipe.enhance(long, max_tokens=4)
    assert result.truncated_from > CONTEXT and result.prompt_tokens == CONTEXT - 4
    assert main(["enhance", long, "--model", str(lm_model), "--device", "cpu", "--max-tokens", "4"]) == 0
    err = capsys.readouterr().err
    assert f"warning: the prompt is {result.truncated_from} tokens" in err and f"cut to {CONTEXT - 4}" in err


# --- the plan ----------------------------------------------------------------------------------------------------


def test_the_plan_has_an_enhance_stage_with_its_kv_cache(capsys, monkeypatch):
    from zimage_lite.config import PRESETS
    from zimage_lite.quant.decode_linear import ROUTE_ENV, decode_route
    from zimage_lite.runtime.plan import plan_for
    from zimage_lite.runtime.sizes import kv_cache_bytes, stored_bytes

    cfg = PRESETS["turbo"].text_encoder
    cache = KVCache(cfg, cfg.num_hidden_layers, 8, CPU, torch.bfloat16)  # the allocation the plan counts
    assert kv_cache_bytes(cfg, 8, 2) == cache.k.nbytes + cache.v.nbytes
    plan = plan_for("turbo", "Q4_K_M", 1024, 1024, False, "cpu", None, 16 * 2**30, "bf16", "Q4_K_M",
                    enhance_tokens=CONTEXT)
    enhance, text = plan.stage("enhance"), plan.stage("text_encoder")
    assert plan.stages[0] is enhance and len(enhance.blocks) == 36 and len(text.blocks) == 35
    # the whole context's cache (0.6 GB), the head as int8 rows (0.39 GB) and the mapped Q6_K table it is made from
    # (0.32 GB) are in it
    vocab = (cfg.vocab_size, cfg.hidden_size)
    monkeypatch.delenv(ROUTE_ENV, raising=False)
    packed = decode_route("cpu") == "packed"  # this torch has the weight-only int4/int8 CPU kernels
    assert enhance.head == ("int8" if packed else "bf16") and enhance.unpacked
    head = stored_bytes(vocab, "int8" if packed else "BF16")
    assert enhance.activation_bytes > kv_cache_bytes(cfg, CONTEXT, 2) + head + stored_bytes(vocab, "Q6_K")
    assert main(["plan", "--preset", "turbo", "--device", "cpu", "--ram", "16GB", "--text-quant", "Q4_K_M",
                 "--enhance"]) == 0
    out = capsys.readouterr().out
    assert "enhance: 36 blocks" in out and "transfer per token generated" in out


def test_int8_compute_is_refused_where_it_would_be_ignored(capsys):
    refused(capsys, ["enhance", "x", "--int8-compute"], "--int8-compute", "enhance")
    refused(capsys, ["plan", "--preset", "turbo", "--int8-compute"], "--int8-compute", "--model")
