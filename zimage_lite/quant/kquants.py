"""K-quant quantizers (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) in torch, all super-blocks of a chunk at once.

The output is the bytes llama.cpp's reference quantizer writes (`quantize_row_qN_K_ref` in ggml-quants.c, which
llama-quantize uses when there is no imatrix): the same scale searches (make_qkx2_quants, make_q3_quants,
make_qx_quants), with every float expression evaluated in the same order and one fp32 rounding per operation,
left-to-right sums over a sub-block included. Loops run over the few elements of a sub-block or the few trial
scales, never over blocks.

Bit-exact against ggml's reference (ggml-org/ggml d99724f) built as llama.cpp builds ggml-base on x86-64, without
FMA: no differing block among 70,000 super-blocks per type (bf16-rounded gaussian, Student-t, lognormal, sparse and
grid data, and rows with zero, constant, tiny and outlier sub-blocks); tests/test_quant_formats.py pins the bytes.
A build that fuses a*b + c into FMA (e.g. aarch64, or x86 with -march=native) rounds some sums differently: it
differs from the x86 build, and so from this, in 1-2% of blocks on gaussian weights (Q3_K: none; Q2_K: up to 40% on
sparse data), by one step of a scale or level; on gaussian weights at the same RMS error (Q4_K: 7.131% both).

Bit-exactness needs plain IEEE fp32 ops, so a few torch shortcuts are avoided on purpose: `number / tensor` (torch
computes `reciprocal() * number`), fp32 `sqrt` (not correctly rounded on AVX-512 CPUs), `sum`/`cumsum` (other
summation orders). +, -, *, / and round-half-even are exact IEEE on CPU and CUDA alike.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .chunks import run_on

QK_K = 256  # elements per super-block
GROUP_MAX_EPS = float(np.float32(1e-15))  # ggml-quants.c: below this a sub-block counts as all zero
CHUNK_SUPER_BLOCKS = 2048  # CPU: 0.5M weights per chunk, fp32 temporaries of 2 MB that stay in cache
CHUNK_SUPER_BLOCKS_GPU = 16384  # CUDA: 4M weights per chunk, fewer kernel launches; ~0.3 GB of temporaries

Q = GGMLQuantizationType


def _f32(v: float) -> float:
    """Round a Python number to fp32, as a C `float` constant."""
    return float(np.float32(v))


def _div(a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
    """IEEE fp32 a / b. A Python-number operand becomes a full tensor: `2.0 / t` is reciprocal-times in torch."""
    like = a if isinstance(a, torch.Tensor) else b
    if not isinstance(a, torch.Tensor):
        a = torch.full_like(like, a)
    if not isinstance(b, torch.Tensor):
        b = torch.full_like(like, b)
    return a / b


def _sqrt(v: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 sqrt (via fp64, exact for fp32 inputs); sqrtf in C is correctly rounded."""
    return v.double().sqrt().float()


def _fp16(v: torch.Tensor) -> torch.Tensor:
    """The value GGML_FP32_TO_FP16 stores, read back as fp32 (both round to nearest even)."""
    return v.half().float()


def _seq_sum(p: torch.Tensor, from_zero: bool = True) -> torch.Tensor:
    """Sum over dim -2 from left to right in fp32, like the C loops `s += p[i]` (one rounding per add).

    p is (n, M) or (k, n, M), giving (M,) or (k, M): one add per element index, over all sub-blocks at once."""
    acc = p[..., 0, :] + 0.0 if from_zero else p[..., 0, :].clone()  # 0.0f + p[0] turns -0 into +0, as in C
    for i in range(1, p.shape[-2]):
        acc += p[..., i, :]
    return acc


def _select(keep: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """`new` where keep else `old`, for small-integer-valued fp32 levels (exact), keep broadcast along columns.
    Arithmetic, since torch.where on CPU is ~25x slower than a multiply at these sizes."""
    return (new - old).mul_(keep.to(new.dtype)).add_(old)


def _abs_max_pick(v: torch.Tensor) -> torch.Tensor:
    """Per column of v (n, M), the entry of largest |v|, the first one on ties: C's `if (ax > amax)` loop from 0.
    A loop of n steps over all columns: torch.argmax along dim 0 is several times slower here."""
    amax, pick = torch.zeros_like(v[0]), torch.zeros_like(v[0])
    for row in v:
        a = row.abs()
        bigger = a > amax
        amax, pick = torch.where(bigger, a, amax), torch.where(bigger, row, pick)
    return pick


def _running_max(v: torch.Tensor) -> torch.Tensor:
    """max(0, v...) over dim 1 as C's `if (v > m) m = v` from m = 0: +0.0 when nothing is positive, never -0.0."""
    m = v.amax(1)
    return torch.where(m > 0, m, torch.zeros_like(m))


def _round_clamp(v: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """MAX(lo, MIN(hi, nearest_int(v))) as fp32; nearest_int is round-half-to-even."""
    return v.round_().clamp_(lo, hi)


# ---- sub-block scale searches. x, w, L: (n, M), one column per sub-block, so row i is element i of every sub-block


def _make_qkx2_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                      use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale and min search of ggml's make_qkx2_quants: returns (scale, -min, L), L in [0, nmax]."""
    sum_w = _seq_sum(w, from_zero=False)
    sum_x = _seq_sum(w * x, from_zero=False)
    xmax = x.amax(0)
    xmin = x.amin(0)
    xmin = torch.where(xmin > 0, torch.zeros_like(xmin), xmin)  # the range always includes 0
    flat = xmax == xmin
    prods = x.new_empty((3, *x.shape))  # w*l, w*l*l, w*l*x of one trial, summed together

    def levels(iscale: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
        return _round_clamp((x - mn).mul_(iscale), 0, nmax)  # nearest_int(iscale*(x - min)), clamped

    def error(scale: torch.Tensor, mn: torch.Tensor, lv: torch.Tensor) -> torch.Tensor:
        diff = (scale * lv).add_(mn).sub_(x)  # scale*l + min - x
        diff = diff.abs_() if use_mad else diff.mul_(diff)
        return _seq_sum(diff.mul_(w))

    iscale = _div(float(nmax), xmax - xmin)
    best = error(_div(1.0, iscale), xmin, levels(iscale, xmin))
    scale = _div(1.0, iscale)
    # the levels L of the best fit so far are levels(best_iscale, best_lmin): kept as two numbers per sub-block
    best_iscale, best_lmin = iscale, xmin
    for step in range(nstep + 1):
        # rmin + rdelta*is + nmax, evaluated in fp32 as in C; min moves when a step wins, so is recomputed
        num = _f32(np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax))
        iscale = _div(num, xmax - xmin)
        lv = levels(iscale, xmin)
        torch.mul(w, lv, out=prods[0])
        torch.mul(prods[0], lv, out=prods[1])
        torch.mul(prods[0], x, out=prods[2])
        sum_l, sum_l2, sum_xl = _seq_sum(prods)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0  # a positive min is not allowed: refit the scale alone
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        cur = error(this_scale, this_min, lv)
        take = (det > 0) & (cur < best)
        best_iscale = torch.where(take, iscale, best_iscale)
        best_lmin = torch.where(take, xmin, best_lmin)
        best = torch.where(take, cur, best)
        scale = torch.where(take, this_scale, scale)
        xmin = torch.where(take, this_min, xmin)
    zero = torch.zeros_like(scale)
    L = levels(torch.where(flat, zero, best_iscale), best_lmin)  # flat sub-blocks: all levels 0
    return torch.where(flat, zero, scale), -xmin, L


def _make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_q3_quants with do_rmse: x²-weighted refinement, one element at a time. Returns (scale, L)."""
    xmax = _abs_max_pick(x)
    nonzero = xmax.abs() >= GROUP_MAX_EPS
    keep = nonzero.to(x.dtype)  # 0 for all-zero sub-blocks: scale 0, levels 0
    iscale = torch.where(nonzero, _div(float(-nmax), xmax), torch.zeros_like(xmax))  # 0, not inf: no nan levels
    L = _round_clamp(iscale * x, -nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx, suml2 = _seq_sum(wx * L), _seq_sum(w * L * L)
    cols = None  # the sub-blocks still changing; None: all of them
    for _ in range(5):
        xs, ws, wxs, Ls = (x, w, wx, L) if cols is None else (x[:, cols], w[:, cols], wx[:, cols], L[:, cols])
        slx_all, sl2_all = (sumlx, suml2) if cols is None else (sumlx[cols], suml2[cols])
        changed = torch.zeros_like(slx_all, dtype=torch.bool)
        for i in range(x.shape[0]):
            li = Ls[i]
            slx0 = slx_all - wxs[i] * li  # the sums without element i
            sl20 = sl2_all - ws[i] * li * li
            new_l = _round_clamp(xs[i] * sl20 / slx0, -nmax, nmax - 1)
            slx = slx0 + wxs[i] * new_l
            sl2 = sl20 + ws[i] * new_l * new_l
            take = (slx0 > 0) & (new_l != li) & (sl2 > 0) & (slx * slx * sl2_all > slx_all * slx_all * sl2)
            Ls[i] = torch.where(take, new_l, li)
            slx_all = torch.where(take, slx, slx_all)
            sl2_all = torch.where(take, sl2, sl2_all)
            changed |= take
        if cols is None:
            sumlx, suml2 = slx_all, sl2_all
            cols = changed.nonzero().squeeze(1)
        else:
            L[:, cols], sumlx[cols], suml2[cols] = Ls, slx_all, sl2_all
            # a sub-block with no change would repeat the same pass unchanged, so C's early break equals dropping it
            cols = cols[changed]
        if cols.numel() == 0:
            break
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    return scale * keep, (L + nmax).mul_(keep)


def _make_qx_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_qx_quants with rmse_type 1 (x² weights, no imatrix): 19 trial scales. Returns (scale, L)."""
    xmax = _abs_max_pick(x)
    nonzero = xmax.abs() >= GROUP_MAX_EPS
    keep = nonzero.to(x.dtype)  # 0 for all-zero sub-blocks: scale 0, levels 0
    w = x * x
    wx = w * x
    prods = x.new_empty((2, *x.shape))  # w*x*l and w*l*l of one trial, summed together

    def trial(num: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        iscale = torch.where(nonzero, _div(num, xmax), torch.zeros_like(xmax))  # 0, not inf: no nan levels
        lv = _round_clamp(iscale * x, -nmax, nmax - 1)
        torch.mul(wx, lv, out=prods[0])
        torch.mul(w, lv, out=prods[1]).mul_(lv)
        sumlx, suml2 = _seq_sum(prods)
        return iscale, sumlx, suml2

    best_iscale, sumlx, suml2 = trial(float(-nmax))
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    for step in (*range(-9, 0), *range(1, 10)):
        iscale, sumlx, suml2 = trial(-_f32(np.float32(nmax) + np.float32(0.1) * np.float32(step)))
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        best_iscale = torch.where(take, iscale, best_iscale)
        scale = torch.where(take, sumlx / suml2, scale)
        best = torch.where(take, scale * sumlx, best)
    L = _round_clamp(best_iscale * x, -nmax, nmax - 1).add_(nmax).mul_(keep)  # the levels of the winning trial
    return scale * keep, L


# ---- super-block quantizers: xb (N, 256) fp32 -> (N, type_size) uint8 in the ggml-common.h block layout


def _sub_blocks(xb: torch.Tensor, n: int) -> torch.Tensor:
    """(N, 256) -> (n, N*256/n): column m is sub-block m % (256/n) of super-block m // (256/n)."""
    return xb.reshape(-1, n).t().contiguous()


def _unsub(L: torch.Tensor) -> torch.Tensor:
    """Inverse of _sub_blocks, as uint8 levels: (n, M) -> (N, 256)."""
    return L.t().reshape(-1, QK_K).to(torch.uint8)


def _half_bytes(v: torch.Tensor) -> torch.Tensor:
    """(N,) fp32 -> (N, 2) uint8, the little-endian fp16 (ggml_half)."""
    return v.half().view(torch.uint8).reshape(-1, 2)


def _pack_bits(L: torch.Tensor, bits: int, groups: int) -> torch.Tensor:
    """Interleave `bits`-bit fields: L (N, groups*k, 32) -> (N, k*32) bytes, field j of a byte from group j."""
    L = L.reshape(L.shape[0], -1, groups, 32).to(torch.uint8)
    out = L[:, :, 0].clone()
    for j in range(1, groups):
        out |= L[:, :, j] << (bits * j)
    return out.reshape(L.shape[0], -1)


def _requant(xs: torch.Tensor, L: torch.Tensor, d: torch.Tensor, lo: int, hi: int,
             dm: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
    """Final levels nearest_int((x + dm) / d) + offset with the stored scales; where d == 0 C skips and keeps L."""
    ok = d != 0
    d = torch.where(ok, d, torch.ones_like(d))  # 1, not 0: no inf or nan among the values _select drops
    new = _round_clamp(xs / d if dm is None else (xs + dm).div_(d), lo, hi)
    return _select(ok, new.add_(offset) if offset else new, L)


def _pack_scale_min_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """8 six-bit scales and mins (N, 8) -> 12 bytes, the packing get_scale_min_k4 reads (Q4_K, Q5_K)."""
    ls, lm = ls.to(torch.uint8), lm.to(torch.uint8)
    lo = (ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6))
    return torch.cat([*lo, (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)], dim=1)


def _q2_k(xb: torch.Tensor) -> torch.Tensor:
    # block_q2_K: {uint8 scales[16] (scale | min << 4); uint8 qs[64]; half d; half dmin}
    x = _sub_blocks(xb, 16)
    scale, mins, L = _make_qkx2_quants(x, x.abs(), 3, -0.5, 0.1, 15, use_mad=True)
    scale, mins = scale.view(-1, 16), mins.view(-1, 16)
    max_scale = _running_max(scale)
    max_min = _running_max(mins)
    zero = torch.zeros_like(max_scale)
    has_s, has_m = max_scale > 0, max_min > 0
    ls = torch.where(has_s[:, None], _div(15.0, max_scale)[:, None] * scale, 0).round_().to(torch.int32)
    lm = torch.where(has_m[:, None], _div(15.0, max_min)[:, None] * mins, 0).round_().to(torch.int32)
    sc = (ls | (lm << 4)) & 0xFF  # stored into a uint8, as C does
    d = torch.where(has_s, _fp16(_div(max_scale, 15.0)), zero)
    dmin = torch.where(has_m, _fp16(_div(max_min, 15.0)), zero)
    dl = (d[:, None] * (sc & 0xF)).reshape(1, -1)
    ml = (dmin[:, None] * (sc >> 4)).reshape(1, -1)
    L = _requant(x, L, dl, 0, 3, ml)
    qs = _pack_bits(_unsub(L).view(-1, 2, 128), 2, 4)  # per 128: byte l holds elements l, l+32, l+64, l+96
    return torch.cat([sc.to(torch.uint8), qs, _half_bytes(d), _half_bytes(dmin)], dim=1)


def _q3_k(xb: torch.Tensor) -> torch.Tensor:
    # block_q3_K: {uint8 hmask[32]; uint8 qs[64]; uint8 scales[12] (6-bit); half d}
    x = _sub_blocks(xb, 16)
    scale, L = _make_q3_quants(x, 4)
    scale = scale.view(-1, 16)
    max_scale = _abs_max_pick(scale.t())
    has = max_scale != 0
    iscale = _div(-32.0, max_scale)
    ls = torch.where(has[:, None], (iscale[:, None] * scale).round_().clamp_(-32, 31) + 32, 0).to(torch.uint8)
    d = torch.where(has, _fp16(_div(1.0, iscale)), torch.zeros_like(max_scale))
    dl = (d[:, None] * (ls.float() - 32)).reshape(1, -1)
    L = _unsub(_requant(x, L, dl, -4, 3, offset=4))
    hmask = _pack_bits((L >> 2).view(-1, 8, 32), 1, 8)  # bit k of byte m: element 32k + m is > 3
    qs = _pack_bits((L & 3).view(-1, 2, 128), 2, 4)
    high = ls >> 4  # bits 4-5 of scale j go to byte 8 + j%4 at bit 2*(j//4)
    scales = torch.cat([(ls[:, :8] & 0xF) | ((ls[:, 8:] & 0xF) << 4), _q3_high(high)], dim=1)
    return torch.cat([hmask, qs, scales, _half_bytes(d)], dim=1)


def _q3_high(high: torch.Tensor) -> torch.Tensor:
    """(N, 16) two-bit values -> 4 bytes: scale j lands in byte j % 4 at bit 2 * (j // 4)."""
    h = high.view(-1, 4, 4)
    return h[:, 0] | (h[:, 1] << 2) | (h[:, 2] << 4) | (h[:, 3] << 6)


def _qk_4_5(xb: torch.Tensor, nmax: int, rmin: float, nstep: int) -> tuple[torch.Tensor, ...]:
    """Shared part of Q4_K / Q5_K: 8 sub-blocks of 32 with 6-bit scales and mins. Returns (d, dmin, scales, L)."""
    x = _sub_blocks(xb, 32)
    av_x = _sqrt(_div(_seq_sum(x * x), 32.0))
    scale, mins, L = _make_qkx2_quants(x, av_x + x.abs(), nmax, rmin, 0.1, nstep, use_mad=False)
    scale, mins = scale.view(-1, 8), mins.view(-1, 8)
    max_scale = _running_max(scale)
    max_min = _running_max(mins)
    zero = torch.zeros_like(max_scale)
    inv_scale = torch.where(max_scale > 0, _div(63.0, max_scale), zero)
    inv_min = torch.where(max_min > 0, _div(63.0, max_min), zero)
    # uint8_t ls = nearest_int(...): wraps mod 256 before MIN(63, .)
    ls = ((inv_scale[:, None] * scale).round_().to(torch.int32) & 0xFF).clamp_(max=63)
    lm = ((inv_min[:, None] * mins).round_().to(torch.int32) & 0xFF).clamp_(max=63)
    d, dmin = _fp16(_div(max_scale, 63.0)), _fp16(_div(max_min, 63.0))
    dl = (d[:, None] * ls).reshape(1, -1)
    ml = (dmin[:, None] * lm).reshape(1, -1)
    L = _unsub(_requant(x, L, dl, 0, nmax, ml))
    return d, dmin, _pack_scale_min_k4(ls, lm), L


def _q4_k(xb: torch.Tensor) -> torch.Tensor:
    # block_q4_K: {half d; half dmin; uint8 scales[12]; uint8 qs[128]}; per 64: byte l = element l | element l+32 << 4
    d, dmin, scales, L = _qk_4_5(xb, 15, -1.0, 20)
    return torch.cat([_half_bytes(d), _half_bytes(dmin), scales, _pack_bits(L.view(-1, 4, 64), 4, 2)], dim=1)


def _q5_k(xb: torch.Tensor) -> torch.Tensor:
    # block_q5_K: {half d; half dmin; uint8 scales[12]; uint8 qh[32]; uint8 qs[128]}; bit k of qh[m]: element 32k+m
    d, dmin, scales, L = _qk_4_5(xb, 31, -0.5, 15)
    qh = _pack_bits((L >> 4).view(-1, 8, 32), 1, 8)
    qs = _pack_bits((L & 0xF).view(-1, 4, 64), 4, 2)
    return torch.cat([_half_bytes(d), _half_bytes(dmin), scales, qh, qs], dim=1)


def _q6_k(xb: torch.Tensor) -> torch.Tensor:
    # block_q6_K: {uint8 ql[128]; uint8 qh[64]; int8 scales[16]; half d}
    x = _sub_blocks(xb, 16)
    scale, L = _make_qx_quants(x, 32)
    scale = scale.view(-1, 16)
    max_scale = _abs_max_pick(scale.t())
    empty = max_scale.abs() < GROUP_MAX_EPS  # C writes an all-zero block
    iscale = _div(-128.0, max_scale)
    d = torch.where(empty, torch.zeros_like(max_scale), _fp16(_div(1.0, iscale)))
    sc = torch.where(empty[:, None], 0, (iscale[:, None] * scale).round_().clamp_(-128, 127))
    dl = (d[:, None] * sc).reshape(1, -1)
    L = _unsub(_requant(x, L, dl, -32, 31, offset=32)) * (~empty[:, None]).to(torch.uint8)
    # per 128: ql byte l = element l | element l+64 << 4, ql byte 32+l = l+32 | l+96 << 4; qh 2 bits each
    ql = _pack_bits((L & 0xF).view(-1, 2, 2, 2, 32).transpose(2, 3).reshape(-1, 8, 32), 4, 2)
    qh = _pack_bits((L >> 4).view(-1, 2, 128), 2, 4)
    return torch.cat([ql, qh, sc.to(torch.int8).view(torch.uint8), _half_bytes(d)], dim=1)


_QUANTIZERS = {Q.Q2_K: _q2_k, Q.Q3_K: _q3_k, Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k}
K_QUANT_TYPES = frozenset(_QUANTIZERS)


def quantize_k(t: torch.Tensor, qtype: GGMLQuantizationType) -> np.ndarray:
    """Quantize `t` (last dim a multiple of 256, any float dtype and device) to a K-quant.

    Returns uint8 bytes of shape (*t.shape[:-1], bytes_per_row), as gguf.quants.quantize does. The caller checks the
    type and shape (formats.quantize raises UnsupportedQuantError); here they are asserted.
    """
    assert qtype in _QUANTIZERS and t.dim() >= 1 and t.shape[-1] % QK_K == 0, (qtype, tuple(t.shape))
    quantizer, type_size = _QUANTIZERS[qtype], GGML_QUANT_SIZES[qtype][1]
    blocks = t.detach().reshape(-1, QK_K)  # super-blocks never straddle rows, so rows can be flattened
    out = np.empty((blocks.shape[0], type_size), dtype=np.uint8)

    def run(start: int, stop: int) -> None:
        chunk = blocks[start:stop].to(torch.float32)  # fp32 one chunk at a time
        out[start:stop] = quantizer(chunk).cpu().numpy()

    run_on(blocks.device, blocks.shape[0], CHUNK_SUPER_BLOCKS, run, device_step=CHUNK_SUPER_BLOCKS_GPU)
    return out.reshape(*t.shape[:-1], t.shape[-1] // QK_K * type_size)
