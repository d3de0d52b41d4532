"""Random checkpoints in the exact official file layout: the embedded demo model, and the tests' fixtures.

`write_checkpoint` writes what `Tongyi-MAI/Z-Image-Turbo` holds (model_index.json, scheduler/, text_encoder/ and
transformer/ as sharded safetensors with an index, tokenizer/, vae/), with the official storage dtypes
(transformer F32, text encoder and VAE BF16) and all the tensors the official files have, including the ones this
runtime never reads (the text encoder's last layer and final norm). Weights are random and
deterministic per seed, so the demo's image is noise: it shows the machinery works, not what the model draws.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from .config import DEMO, ModelConfig, config_to_dict
from .errors import OptionError
from .models.dit import ZImageDiT
from .models.qwen3 import Qwen3Encoder
from .models.vae import AutoencoderDecoder
from .models.vae_encoder import AutoencoderEncoder
from .text import qwen_byte_level

DEMO_VERSION = 2
DIFFUSERS_VERSION = "0.36.0.dev0"
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>",
]
FIRST_SPECIAL_ID = 151643  # <|endoftext|>; Qwen's added tokens follow in this order
# A reduced Qwen3 chat template: the same rendering for one user message with add_generation_prompt.
CHAT_TEMPLATE_JINJA = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)
TOKENIZER_CORPUS = [
    "a photograph of a cat sitting on a red chair in the sun, highly detailed",
    "an astronaut riding a horse on the moon, digital art, 4k",
    "一只可爱的猫坐在窗台上，阳光明媚，高清摄影",
    "a watercolor painting of mountains and a lake at sunrise",
    "portrait of an old fisherman, dramatic lighting, 85mm lens",
    "東京の夜景、ネオンサイン、雨の街",
]


def cache_dir() -> Path:
    """The cache folder: $ZIMAGE_LITE_CACHE, else $XDG_CACHE_HOME/zimage-lite, else ~/.cache/zimage-lite."""
    var = "ZIMAGE_LITE_CACHE" if os.environ.get("ZIMAGE_LITE_CACHE") else "XDG_CACHE_HOME"
    root = os.environ.get("ZIMAGE_LITE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "zimage-lite")
    path = Path(root)
    blocker = next((p for p in (path, *path.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        where = f"${var}" if os.environ.get(var) else "the cache folder"
        what = f"{where} {path}" + ("" if blocker == path else f": {blocker}")
        raise OptionError(f"{what} is a file, not a folder; point $ZIMAGE_LITE_CACHE at a folder (it is created if "
                          "missing)")
    return path


def demo_path() -> Path:
    """The demo checkpoint, generated into the user's cache on first use.

    Built in a temporary folder and renamed into place, so two first runs at once cannot see each other's half-written
    files: the one that finishes second discards its copy and uses the first one's."""
    path = cache_dir() / f"demo-v{DEMO_VERSION}"
    if (path / "model_index.json").is_file():
        return path
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent))
        write_checkpoint(tmp, DEMO, seed=0)
        if path.exists() and not (path / "model_index.json").is_file():  # left by a version that built in place
            shutil.rmtree(path, ignore_errors=True)
        try:
            tmp.rename(path)
            tmp = None
        except OSError:
            if not (path / "model_index.json").is_file():  # not another run's complete copy: a real failure
                raise
    except OSError as e:
        raise OptionError(f"cannot write the demo model into the cache folder {path.parent} ({e.strerror or e}); "
                          "free some space, or point $ZIMAGE_LITE_CACHE at another folder") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _random_tensor(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if len(shape) == 1 and "norm" in name:
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    if len(shape) == 1:
        return 0.02 * torch.randn(shape, generator=g)
    if "pad_token" in name or "embed_tokens" in name:
        return torch.randn(shape, generator=g)
    fan_in = max(1, int(torch.tensor(shape[1:]).prod()))
    return torch.randn(shape, generator=g) / fan_in**0.5


def random_state(shapes: dict[str, tuple[int, ...]], seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random tensors for `shapes`; each tensor's values depend only on the seed and its name."""
    out = {}
    for n, s in shapes.items():
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(n.encode()))
        out[n] = _random_tensor(n, s, g).to(dtype).contiguous()
    return out


def meta_shapes(module: torch.nn.Module, prefix: str = "") -> dict[str, tuple[int, ...]]:
    return {prefix + n: tuple(p.shape) for n, p in module.named_parameters()}


def _write_sharded(folder: Path, stem: str, shapes: dict[str, tuple[int, ...]], seed: int, dtype: torch.dtype,
                   shards: int) -> None:
    """Random tensors written shard by shard, so a full-size model never has to fit in memory at once."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(shapes)
    if shards <= 1:
        save_file(random_state(shapes, seed, dtype), str(folder / f"{stem}.safetensors"), metadata={"format": "pt"})
        return
    weight_map, start, total = {}, 0, 0
    for i in range(shards):
        end = len(names) if i == shards - 1 else (len(names) * (i + 1)) // shards
        fname = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = random_state({n: shapes[n] for n in names[start:end]}, seed, dtype)
        total += sum(t.numel() * t.element_size() for t in part.values())
        save_file(part, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
        start = end
        del part
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def _dump(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer(folder: Path, bpe: models.BPE | None = None) -> None:
    """A byte-level BPE with Qwen's normalizer, split rule, and special tokens at Qwen's ids: `bpe` (the benchmarks
    pass Qwen's own merges), else a small one trained here."""
    tok = qwen_byte_level(Tokenizer(bpe if bpe is not None else models.BPE()))
    if bpe is None:
        trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False, special_tokens=[])
        tok.train_from_iterator(TOKENIZER_CORPUS, trainer=trainer)
    data = json.loads(tok.to_str())
    data["post_processor"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                              "use_regex": False}
    # Special tokens live in the model vocab at Qwen's ids too, or the tokenizers library renumbers them.
    data["model"]["vocab"].update({t: FIRST_SPECIAL_ID + i for i, t in enumerate(QWEN_SPECIAL_TOKENS)})
    data["added_tokens"] = [
        {"id": FIRST_SPECIAL_ID + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, t in enumerate(QWEN_SPECIAL_TOKENS)
    ]
    _dump(folder / "tokenizer.json", data)
    _dump(folder / "tokenizer_config.json", {
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "add_bos_token": False, "add_prefix_space": False,
        "model_max_length": 131072, "errors": "replace", "split_special_tokens": False,
        "chat_template": CHAT_TEMPLATE_JINJA,
    })


def write_checkpoint(folder: Path, cfg: ModelConfig = DEMO, seed: int = 0, shards: int = 2,
                     transformer_dtype: torch.dtype = torch.float32,
                     text_dtype: torch.dtype = torch.bfloat16, vae_dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a random checkpoint of `cfg` in the official layout into `folder` (created)."""
    folder = Path(folder)
    _dump(folder / "model_index.json", {
        "_class_name": "ZImagePipeline", "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers", "Qwen3Model"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"], "transformer": ["diffusers", "ZImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
    _dump(folder / "scheduler" / "scheduler_config.json", {
        "_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION,
        **config_to_dict(cfg.scheduler)})
    with torch.device("meta"):
        dit = ZImageDiT(cfg.dit)
        full_te = dataclasses.replace(cfg.text_encoder, num_hidden_layers=cfg.text_encoder.num_hidden_layers + 1)
        te = Qwen3Encoder(full_te)  # builds every layer the checkpoint stores, the unused last one included
        vae = AutoencoderDecoder(cfg.vae)
        vae_encoder = AutoencoderEncoder(cfg.vae)  # stored in vae/ as in the official folder

    _dump(folder / "transformer" / "config.json", {
        "_class_name": "ZImageTransformer2DModel", "_diffusers_version": DIFFUSERS_VERSION,
        **config_to_dict(cfg.dit)})
    _write_sharded(folder / "transformer", "diffusion_pytorch_model", meta_shapes(dit), seed, transformer_dtype,
                   shards)

    t = cfg.text_encoder
    _dump(folder / "text_encoder" / "config.json", {
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": FIRST_SPECIAL_ID, "eos_token_id": FIRST_SPECIAL_ID + 2, "head_dim": t.head_dim,
        "hidden_act": "silu", "hidden_size": t.hidden_size, "initializer_range": 0.02,
        "intermediate_size": t.intermediate_size, "max_position_embeddings": t.max_position_embeddings,
        "max_window_layers": t.num_hidden_layers, "model_type": "qwen3", "num_attention_heads": t.num_attention_heads,
        "num_hidden_layers": t.num_hidden_layers, "num_key_value_heads": t.num_key_value_heads,
        "rms_norm_eps": t.rms_norm_eps, "rope_scaling": None, "rope_theta": t.rope_theta, "sliding_window": None,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.51.0",
        "use_cache": True, "use_sliding_window": False, "vocab_size": t.vocab_size,
    })
    te_shapes = meta_shapes(te, "model.")
    te_shapes["model.norm.weight"] = (t.hidden_size,)
    _write_sharded(folder / "text_encoder", "model", te_shapes, seed + 1, text_dtype, shards)
    write_tokenizer(folder / "tokenizer")

    v = cfg.vae
    _dump(folder / "vae" / "config.json", {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, "_name_or_path": "flux-dev",
        "act_fn": "silu", "block_out_channels": list(v.block_out_channels),
        "down_block_types": ["DownEncoderBlock2D"] * len(v.block_out_channels), "force_upcast": True,
        "in_channels": 3, "latent_channels": v.latent_channels, "latents_mean": None, "latents_std": None,
        "layers_per_block": v.layers_per_block, "mid_block_add_attention": v.mid_block_add_attention,
        "norm_num_groups": v.norm_num_groups, "out_channels": v.out_channels, "sample_size": 1024,
        "scaling_factor": v.scaling_factor, "shift_factor": v.shift_factor,
        "up_block_types": ["UpDecoderBlock2D"] * len(v.block_out_channels), "use_post_quant_conv": False,
        "use_quant_conv": False,
    })
    vae_shapes = {**meta_shapes(vae_encoder), **meta_shapes(vae)}
    _write_sharded(folder / "vae", "diffusion_pytorch_model", vae_shapes, seed + 2, vae_dtype, 1)
    return folder
