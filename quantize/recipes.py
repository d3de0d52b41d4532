"""The writer's side of the recipes: predicted file sizes, the GGUF header, and the text encoder's vocabulary.

The per-tensor type rules live in the runtime (zimage_lite/quant/recipes.py), which the planner reads too; here is
what only writing a file needs. Predicted full-size DiT files match the community's to the reported digit (Q8_0
7.22 GB, Q4_K_M 4.98 GB, ...), and the files written agree with `predicted_size` to within the KV estimate (3.6 KB
over, measured on the full DiT).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from gguf import GGUFReader, GGUFValueType, GGUFWriter, TokenType

from zimage_lite.config import DiTConfig, TextEncoderConfig
from zimage_lite.errors import CheckpointError
from zimage_lite.quant.recipes import TARGETS, TensorPlan, dit_plan, dit_shapes, te_plan, te_shapes

ALIGNMENT = 32  # GGUF default data alignment


# ---- predicted sizes ----------------------------------------------------------------------------------------------


def header_bytes(plan: list[TensorPlan], kv_bytes: int = 4096) -> int:
    """GGUF header size: magic/version/counts, the KV section (`kv_bytes`, an estimate), the tensor infos, and
    the padding to the data section (gguf-py GGUFWriter.write_ti_data_to_file)."""
    infos = sum(8 + len(t.name.encode()) + 4 + 8 * len(t.shape) + 4 + 8 for t in plan)
    return -(-(24 + kv_bytes + infos) // ALIGNMENT) * ALIGNMENT


def predicted_size(plan: list[TensorPlan], kv_bytes: int = 4096) -> int:
    """Predicted GGUF file size in bytes: tensor data padded to the alignment, plus the header."""
    data = sum(-(-t.nbytes // ALIGNMENT) * ALIGNMENT for t in plan)
    return header_bytes(plan, kv_bytes) + data


def predicted_sizes(component: str = "dit", cfg: DiTConfig | TextEncoderConfig | None = None) -> dict[str, int]:
    """{--type: predicted file bytes} for every GGUF target; full-size Z-Image-Turbo shapes by default."""
    if component == "dit":
        shapes, make = dit_shapes(cfg or DiTConfig()), dit_plan
        return {n: predicted_size(make(shapes, t)) for n, t in TARGETS.items() if t.is_gguf}
    te_cfg = cfg or TextEncoderConfig()
    shapes = te_shapes(te_cfg)
    # Qwen3's vocabulary (151,936 tokens and about 151k merges) adds some 7 MB of KV data
    return {n: predicted_size(te_plan(shapes, t, te_cfg), kv_bytes=7_000_000)
            for n, t in TARGETS.items() if t.is_gguf}


def type_histogram(plan: list[TensorPlan]) -> dict[str, int]:
    """{type name: tensor count}, for progress output and tests."""
    out: dict[str, int] = {}
    for t in plan:
        out[t.qtype.name] = out.get(t.qtype.name, 0) + 1
    return out


# ---- text-encoder vocabulary (tokenizer.ggml.*) ---------------------------------------------------------------------


def tokenizer_metadata(path: Path, vocab_size: int, te_config: dict | None) -> Callable[[GGUFWriter], None]:
    """The `tokenizer.ggml.*` keys llama.cpp's convert_hf_to_gguf writes for a Qwen2/Qwen3 tokenizer.json, as a
    function that adds them to a writer. Qwen's byte-level BPE is model `gpt2`, pre-tokenizer `qwen2`; the token
    list is padded to the embedding's row count with UNUSED `[PADn]` entries; added tokens are CONTROL when
    special, USER_DEFINED otherwise; bos/eos/pad ids come from config.json and tokenizer_config.json."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        vocab: dict[str, int] = data["model"]["vocab"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a BPE tokenizer.json ({type(e).__name__}: {e})") from None
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    by_id = {i: tok for tok, i in vocab.items()} | {i: t["content"] for i, t in added.items()}
    if by_id and max(by_id) >= vocab_size:
        raise CheckpointError(f"{path}: token id {max(by_id)} is outside the text encoder's {vocab_size} embeddings")
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
    tok_cfg_path = path.with_name("tokenizer_config.json")
    tok_cfg = json.loads(tok_cfg_path.read_text(encoding="utf-8")) if tok_cfg_path.is_file() else {}
    ids = {t: i for i, t in by_id.items()}

    def token_id(value) -> int | None:
        content = value.get("content") if isinstance(value, dict) else value
        return ids.get(content) if content else None

    bos = (te_config or {}).get("bos_token_id")
    eos = token_id(tok_cfg.get("eos_token")) or (te_config or {}).get("eos_token_id")
    pad = token_id(tok_cfg.get("pad_token"))

    def add(w: GGUFWriter) -> None:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        for fn, value in ((w.add_bos_token_id, bos), (w.add_eos_token_id, eos), (w.add_pad_token_id, pad)):
            if isinstance(value, int):
                fn(value)
        w.add_add_bos_token(bool(tok_cfg.get("add_bos_token", False)))
        if isinstance(tok_cfg.get("chat_template"), str):
            w.add_chat_template(tok_cfg["chat_template"])

    return add


def copied_metadata(path: Path, prefix: str = "tokenizer.") -> Callable[[GGUFWriter], None] | None:
    """The `prefix` keys of a source GGUF (a llama.cpp text encoder's vocabulary) with their value types, as a
    function that adds them to a writer; None when it has none. Read with gguf-py's own reader (a few seconds for
    Qwen3's 151k tokens and merges), decoded into plain lists, and the reader dropped."""
    reader = GGUFReader(path)
    kvs = []
    for name, f in reader.fields.items():
        if name.startswith(prefix):
            sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
            kvs.append((name, f.contents(), f.types[0], sub))
    del reader
    if not kvs:
        return None

    def add(w: GGUFWriter) -> None:
        for name, value, vtype, sub in kvs:
            w.add_key_value(name, value, vtype, sub_type=sub)

    return add
