"""Attention of T new queries per sequence over the static KV cache (issue 7).

One kernel serves decode (T = 1), speculative verify (T = gamma + 1 <= 16) and prefill (T up to
the cache length): query t of sequence b sees cache key s iff s <= q_pos[b, t] (and s < kv_len[b]
when given). The new tokens' K/V are already written into the cache by the model step, so the
causal mask among the new tokens falls out of the position test. Semantics are those of
qspec_jax.model.attention_reference; `cached_attention_reference` below is the plain-jnp twin.

Cache layout (docs/DESIGN.md, unchanged): [B, KVH, S, hd] per layer (the model's KVCache is
[L, B, KVH, S, hd]; pass the whole 5-D array with `layer=i` to read layer i in place, without
XLA materialising the slice; `layer` is a run-time value, so all layers share one kernel).
One (b, kv_head) is a contiguous [S, hd] slab: every K/V tile the kernel loads is a contiguous,
fully coalesced [block_k, hd] run of memory. This layout is kept: it is already the fastest for
this kernel.

Design (Pallas Triton backend, runs in interpret mode on CPU):
- GQA packing: the G = H / KVH query heads of a KV head and all T queries form one query block of
  R = T * G rows (row r = query t = r // G of head kv_head * G + r % G), padded to a power of two
  >= 16 (tl.dot minimum). K and V of a KV head are thus read once for all its query heads and all
  T queries. The rows are gathered straight from q [B, T, H, hd] and the results scattered
  straight into the [B, T, H, hd] output (padding rows repeat the last real row), so no XLA
  transpose/pad runs around the kernel: one launch without splits, two with.
- R > 128 (prefill) is tiled over the grid in blocks of `block_q` rows; each tile reads only the
  keys its own rows can see (causal skip).
- Grid (B, KVH, cdiv(R, block_q), num_splits). Flash-decoding: the keys a query tile needs,
  [0, max over its rows of q_pos + 1), are cut into `num_splits` contiguous chunks of whole
  blocks *at run time*, so the splits stay balanced whatever the actual lengths are, and blocks
  past a sequence's last visible key are never read (the loop stops there). num_splits is chosen
  statically from B * KVH * tiles and S to give about two programs per SM (132 SMs on H200);
  one per SM when there are few base programs (batch 1: attention_sweep_b1_h200.md).
- Online softmax per program in f32 (running max m, sum l, unnormalised accumulator o). With one
  split the kernel normalises and writes the output in q.dtype; with several it writes (o, m, l)
  in f32 and a second small Pallas kernel merges them (log-sum-exp) into the output.
- Rows with no visible key (padding rows with q_pos < 0) give 0 (the model reference gives NaN).
- Prefill uses the same kernel (query tiles of 64/128 rows, tensor-core dots); it is written for
  correctness and reuse, not tuned as a compute-bound flash-attention forward.

- Windowed (draft) attention, window=(sink, recent) (issue 9): key s is also visible only if
  s < sink or q_pos - s < recent. A query tile's rows are one sequence's consecutive positions,
  so the keys it needs are [0, sink) and [min q_pos - recent + 1, max q_pos]: the tile loops over
  just those blocks (one loop over n_sink + n_recent steps, the step index mapped to the block),
  the splits divide those blocks, and partially covered blocks are masked. The skipped blocks
  of the cache are never loaded, so the draft reads about (sink + recent) / context of the KV
  bytes the full kernel reads.

Public: cached_attention, cached_attention_reference, supported, default_config, window_blocks.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import sm_count

try:  # Triton-specific Pallas API (deprecated in jax 0.11 but present).
    from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover
    pltriton = None

_NEG = -1e30        # finite "minus infinity" for masked scores / empty running max
MIN_BLOCK_K = 16    # tl.dot minimum
MAX_Q_ROWS = 128    # largest query block kept in one program (decode / verify)
PROGRAMS_PER_SM = 2  # flash-decoding target: about this many programs per SM
MIN_BLOCKS_PER_SPLIT = 4  # H200 sweep, batch 1 at 8k: 4 blocks per split 27.8 us, 2 blocks 36.7 us
SHORT_CACHE_BLOCKS = 2     # fewer 128-key blocks than this per SM (all programs): 64-key blocks
KV_TILE_BYTES = 64 * 1024  # K + V tile bytes per pipeline stage (default block_k)
# Few base programs (batch 1): when one wave of programs already holds ONE_WAVE_MIN_SPLITS splits
# per (b, kv_head, query tile) (base * 16 <= SMs: Llama-3-8B batch 1, 8 base programs on 132 SMs),
# target one program per SM, keep 128-key blocks while they leave two splits of
# MIN_BLOCKS_PER_SPLIT blocks, and take 3 pipeline stages (192 KB, fits with one program per SM).
# H200 sweep at batch 1 (experiments/results/attention_sweep_b1_h200.md): 32k T=1/4
# k128/s16/st2 57.2/58.3 us vs the old s33 78.4/78.1 us; 8k k128/s16/st3 24.8 vs st2 28.2 us; 2k
# k128/s4/st3 12.8 vs k64/s8 13.8 us (3 stages then only for splits of <= 8 blocks; since
# 1f8d2a6 at every length: the 1f8d2a6 sweep (attention_sweep_b1_h200_1f8d2a6.md)
# timed 16 splits x 3 stages at 32k, 49.9 / 49.7 us (T = 1 / 4) vs 56.2 / 57.6 with 2 stages).
# Splits: a full wave of programs (down to one key block per split). Since the split combine
# loads all splits at once (6c256a0: 1.9-2.7 us at batch 1-8 instead of 3.9-11.3) more splits pay: the c64168d batch-1 sweep
# (attention_sweep_b1_h200_c64168d.md; 8 base programs on 132 SMs) timed 16 splits fastest at
# 2k / 8k / 32k: 9.2 / 15.8 / 42.6 us vs 11.3 / 18.0 with the earlier sqrt(key blocks) cap (4 / 8
# splits; the cap was the fastest while the combine cost 4-11 us, attention_sweep_b1_h200_1f8d2a6.md).
# Short caches too: the fffd870 sweep (attention_sweep_b248_h200_fffd870.md) timed batch 1 x 256
# keys (the short-context decode's cache) with 4 splits of one 64-key block at 5.5 / 5.7 us (T = 1 /
# 4) vs 6.3 / 6.7 with the earlier minimum of 16 key blocks before splitting down to one block.
ONE_WAVE_MIN_SPLITS = 16
# Few base programs but more than one wave's worth of splits (2 * base <= SMs: Llama-3-8B batch
# 2-8, 16-64 base programs): 64-key blocks (3 stages) up to FEW_PROGRAMS_MAX_KEYS keys. H200 sweep
# at batch 8 (attention_sweep_b8_h200_1f8d2a6.md): 2k T = 1 / 4 / 8 27.6 / 28.2 / 30.2 us vs
# 29.5 / 29.9 / 33.9 with 128-key blocks x 2 stages; 8k 76.1 vs 78.0. Longer caches keep 128-key
# blocks (batch 8 x 32k: 80-85% of HBM in attention_h200_full.md; 64-key blocks not timed there).
FEW_PROGRAMS_MAX_KEYS = 8192
# ... and at most FEW_PROGRAMS_SPLITS splits there: the 74ec0d1 sweep at batch 2 / 4
# (attention_sweep_b248_h200_74ec0d1.md) timed 4 splits fastest at every point, where the wave
# rule chose 8: batch 2 x 2k 15.3 vs 16.6 us (64-key blocks), batch 4 x 2k 17.8 vs 21.6, batch 4 x
# 8k 43.7 vs 46.8; batch 8 x 2k / 8k already took 4 (27.6 vs 29.2 with 2 splits, 38.5 with 1).
# With the cheap split combine (6c256a0) up to one wave of programs pays where that is more
# splits: the fffd870 sweep (attention_sweep_b248_h200_fffd870.md) timed batch 2 (16 base
# programs) fastest with 8 splits, 11.1 / 24.8 us at 2k / 8k vs 12.7 / 33.2 with 4; batch 4 / 8
# still fastest with 4 (2 at batch 8: 25.0 / 75.7 vs 24.9 / 74.9 us).
FEW_PROGRAMS_SPLITS = 4
SMEM_PER_SM = 227 * 1024        # H100 / H200 shared memory per SM (per block at most)
ONE_PROGRAM_SMEM = 200 * 1024   # shared memory one program may take when alone on its SM (227 KB)
SUPPORTED_DTYPES = ("bfloat16", "float16", "float32")


# ----------------------------------------------------------------------------- reference
def cached_attention_reference(q, k_cache, v_cache, q_pos, kv_len=None, *, layer=None,
                               window=None):
    """Plain-jnp reference with the kernel's signature and semantics.

    q [B, T, H, hd]; k_cache, v_cache [B, KVH, S, hd] (or [L, B, KVH, S, hd] with `layer`);
    q_pos int [B, T]; kv_len optional int [B]. Key s is visible to query (b, t) iff
    s <= q_pos[b, t] and s < kv_len[b]; with window=(sink, recent) also only if s < sink or
    q_pos[b, t] - s < recent (the unclipped q_pos, as qspec_jax.model.attention_reference).
    f32 scores and softmax; the probabilities are cast to
    v's dtype for the PV product (as qspec_jax.model.attention_reference). Rows that see no key
    give 0. Returns [B, T, H, hd] in q.dtype.
    """
    if layer is not None:
        k_cache, v_cache = k_cache[layer], v_cache[layer]
    B, T, H, hd = q.shape
    kvh, S = k_cache.shape[1], k_cache.shape[2]
    G = H // kvh
    hp = lax.Precision.HIGHEST
    f32 = jnp.float32
    up = (lambda a: a.astype(f32)) if jax.default_backend() == "cpu" else (lambda a: a)
    qg = q.reshape(B, T, kvh, G, hd)
    scores = jnp.einsum("btkgd,bksd->bkgts", up(qg), up(k_cache), precision=hp,
                        preferred_element_type=f32)
    scores = scores / jnp.sqrt(f32(hd))
    lim = _row_limits(q_pos, kv_len, S)  # [B, T]
    key_pos = jnp.arange(S)[None, None, :]
    visible = key_pos <= lim[:, :, None]  # [B, T, S]
    if window is not None:
        sink, recent = _check_window(window)
        visible &= (key_pos < sink) | (q_pos.astype(jnp.int32)[:, :, None] - key_pos < recent)
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(scores - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    probs = p / jnp.where(l > 0, l, 1.0)
    out = jnp.einsum("bkgts,bksd->btkgd", up(probs.astype(v_cache.dtype)), up(v_cache),
                     precision=hp, preferred_element_type=f32)
    return out.reshape(B, T, H, hd).astype(q.dtype)


def _row_limits(q_pos, kv_len, S):
    """Last visible key per query: min(q_pos, kv_len - 1, S - 1), -1 when none. int32 [B, T]."""
    lim = q_pos.astype(jnp.int32)
    if kv_len is not None:
        lim = jnp.minimum(lim, kv_len.astype(jnp.int32)[:, None] - 1)
    return jnp.clip(lim, -1, S - 1)


def _check_window(window):
    """(sink, recent) as Python ints; ValueError unless sink >= 0 and recent >= 1."""
    ok = (isinstance(window, (tuple, list)) and len(window) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in window))
    if not ok or window[0] < 0 or window[1] < 1:
        raise ValueError(f"window must be (sink, recent) with integers sink >= 0 and recent >= 1, "
                         f"got {window!r}")
    return int(window[0]), int(window[1])


def window_blocks(lim, anchor, block_k, sink, recent, S):
    """Key blocks one query tile reads with window=(sink, recent): (n_sink, start, n_all).

    lim [rows]: last visible key of each row (-1: none); anchor [rows]: its q_pos. The tile reads
    blocks [0, n_sink) (the sink keys) then [start, n_all) (from the block of the smallest window
    start min(q_pos) - recent + 1 to the block of the last visible key): n_sink + n_all - start
    blocks in all; no other block of the cache is loaded. Every block read holds a key that some
    row of the tile sees. jnp values (in the kernel) or numpy arrays (benchmark byte counts)."""
    if isinstance(lim, jax.Array):
        xp, div = jnp, (lambda a, b: lax.div(a, jnp.int32(b)))   # operands >= 0: truncation is floor
    else:
        import numpy as xp
        div = xp.floor_divide
    n_all = div(xp.max(lim) + block_k, block_k)         # cdiv(max(lim) + 1, block_k); lim >= -1
    n_sink = xp.minimum(min(-(-sink // block_k), S // block_k), n_all)
    big = S + block_k                                   # rows without keys impose nothing
    wlo = xp.where(lim >= 0, anchor - min(recent, 1 << 30) + 1, big)
    wlo = xp.clip(xp.min(wlo), 0, big)                  # smallest key of any row's recent window
    start = xp.clip(div(wlo, block_k), n_sink, n_all)
    return n_sink, start, n_all


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class AttnConfig:
    """Static launch configuration. block_q: query rows (T*G packed) per program; block_k: keys
    per loop step; num_splits: programs along the key axis (flash-decoding)."""
    block_q: int
    block_k: int
    num_splits: int
    num_warps: int
    num_stages: int


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _one_wave(base: int, sms: int) -> bool:
    """Few base programs (batch 1): one wave already gives ONE_WAVE_MIN_SPLITS splits each."""
    return base * ONE_WAVE_MIN_SPLITS <= sms


def _choose_splits(base: int, n_blocks: int, sms: int, programs_per_sm: int = PROGRAMS_PER_SM,
                   min_blocks: int = MIN_BLOCKS_PER_SPLIT) -> int:
    """Flash-decoding splits: up to `programs_per_sm` waves of programs, whole waves preferred.

    Among 1 .. min(n_blocks // min_blocks, cdiv(programs_per_sm * sms, base)) splits,
    take the one whose programs fill their waves best (p / (waves * sms), or p / sms below one
    wave); ties (within 2%) go to more splits (more programs to hide latency). No splits when
    there are already a wave of programs (large batches, prefill tiles). default_config passes
    programs_per_sm=1 for few base programs (_one_wave): at batch 1 on the H200, 16 splits (128
    programs, one wave) beat 33 (two waves) by 1.37x at 32k (attention_sweep_b1_h200.md)."""
    if base >= sms:
        return 1
    top = max(1, min(n_blocks // min_blocks, pl.cdiv(programs_per_sm * sms, base)))
    best, best_eff = 1, -1.0
    for ns in range(1, top + 1):
        p = base * ns
        eff = p / sms if p < sms else p / (pl.cdiv(p, sms) * sms)
        if eff >= best_eff - 0.02:
            best, best_eff = ns, max(eff, best_eff)
    return best


def default_config(B: int, T: int, H: int, KVH: int, S: int, hd: int, itemsize: int = 2, *,
                   block_q: int | None = None, block_k: int | None = None,
                   num_splits: int | None = None, num_warps: int | None = None,
                   num_stages: int | None = None,
                   window: tuple[int, int] | None = None) -> AttnConfig:
    """The launch configuration for a shape; explicit arguments override the heuristics.

    With window=(sink, recent) the block size and the splits are chosen for the keys a query
    tile actually reads (about sink + recent + T - 1 of them), not for the whole cache.

    Tuned on the H200 grid (experiments/results/attention_h200_full.md) and, for few base
    programs (batch 1, `_one_wave`), on the batch-1 sweep
    (experiments/results/attention_sweep_b1_h200.md): one wave of programs instead of two,
    128-key blocks at 2k too, 3 stages (attention_sweep_b1_h200_1f8d2a6.md). Llama-3-8B heads,
    batch 1: 32k T=1/4, 8k, 2k -> k128/s16/w4/st3 (a full wave of splits since the split combine
    got cheap: attention_sweep_b1_h200_c64168d.md). Batch 2-8
    up to FEW_PROGRAMS_MAX_KEYS keys: 64-key blocks (attention_sweep_b8_h200_1f8d2a6.md: batch 8 x
    2k / 8k -> k64/s4/w4/st3), at most one wave of programs or FEW_PROGRAMS_SPLITS splits
    (batch 2: 8, batch 4 / 8: 4; attention_sweep_b248_h200_fffd870.md). One program per SM with
    128-key bf16 blocks (batch 8 x 32k, batch 32 / 64): 3 stages (attention_sweep_b64_h200_6d65aa3.md);
    32-row query blocks (T 8) there: 64-key blocks (attention_sweep_t8_h200_77a681c.md)."""
    R = T * (H // KVH)
    S_read = S  # keys one query tile reads at most (decode / verify: the cache)
    if window is not None:
        sink, recent = _check_window(window)
        S_read = min(S, sink + recent + T - 1)
    if block_q is None:
        block_q = max(16, _next_pow2(R)) if R <= MAX_Q_ROWS else (64 if hd >= 128 else 128)
    block_q = max(16, _next_pow2(block_q))
    n_q = pl.cdiv(R, block_q)
    base = B * KVH * n_q          # programs without splitting
    sms = sm_count()
    one_wave = _one_wave(base, sms)
    few_programs = not one_wave and 2 * base <= sms and S_read <= FEW_PROGRAMS_MAX_KEYS
    if block_k is None:
        # One K tile + one V tile <= 64 KB of shared memory per pipeline stage (bf16 hd 128: 128 keys,
        # f32 hd 128: 64); 128-row query blocks (T * G = 128) take 64 keys to bound registers.
        block_k = min(128, KV_TILE_BYTES // (2 * hd * itemsize))
        if block_q >= 128:
            block_k = min(block_k, 64)
        # 32-row query blocks (verify T = 8 at GQA 4) from a wave of programs on: 64 keys
        # (batch 32 x 8k: 264.6 us vs 307.0 / 311.1 with 128 keys x 3 / 2 stages,
        # attention_sweep_t8_h200_77a681c.md); batch 1 keeps 128 (47.7 vs 50.9 us at 32k).
        elif block_q >= 32 and not one_wave:
            block_k = min(block_k, 64)
        # Short caches: smaller key blocks leave enough of them to split over the SMs. Few base
        # programs: only when the larger blocks cannot make two splits of the minimum length
        # (batch 1 x 2k: 128-key blocks x 4 splits beat 64 x 8 on the H200, 12.8 vs 13.8 us).
        if one_wave:
            if S_read // block_k < 2 * MIN_BLOCKS_PER_SPLIT:
                block_k = min(block_k, 64)
        elif few_programs:
            block_k = min(block_k, 64)
        elif base * (S_read // block_k) < sms * SHORT_CACHE_BLOCKS:
            block_k = min(block_k, 64)
    block_k = max(MIN_BLOCK_K, _next_pow2(block_k))
    while block_k > MIN_BLOCK_K and S % block_k:
        block_k //= 2
    n_blocks = S // block_k
    if window is not None:  # sink blocks + the recent window's blocks (+1: not block-aligned)
        n_blocks = min(n_blocks, -(-sink // block_k) + -(-(recent + T - 1) // block_k) + 1)
    if num_splits is None:
        num_splits = _choose_splits(base, n_blocks, sms, 1 if one_wave else PROGRAMS_PER_SM,
                                    1 if one_wave else MIN_BLOCKS_PER_SPLIT)
        if few_programs:  # at most one wave, or FEW_PROGRAMS_SPLITS where that is more
            num_splits = min(num_splits, max(FEW_PROGRAMS_SPLITS, sms // base))
    num_splits = max(1, min(int(num_splits), n_blocks))
    if num_warps is None:
        num_warps = 4 if block_q * hd <= 64 * 128 else 8
    if num_stages is None:
        stage_bytes = 2 * block_k * hd * itemsize  # one K and one V tile
        num_stages = 3 if 3 * stage_bytes <= 160 * 1024 else 2  # 227 KB of shared memory per SM
        # Where two programs of two stages cannot share an SM anyway (bf16 hd 128 x 128 keys:
        # 64 KB a stage), the one program per SM takes a third stage: batch 64 x 8k / 32k
        # 554 / 2290 -> 498 / 1975 us (attention_sweep_b64_h200_6d65aa3.md), batch 1 x 32k
        # 56.2 -> 49.9 (attention_sweep_b1_h200_1f8d2a6.md).
        if (num_stages == 2 and 2 * 2 * stage_bytes > SMEM_PER_SM
                and 3 * stage_bytes + block_q * hd * itemsize <= ONE_PROGRAM_SMEM):
            num_stages = 3
    return AttnConfig(block_q, block_k, num_splits, num_warps, num_stages)


def keys_shape(k_cache, v_cache) -> tuple:
    """The keys' shape, [B, KVH, S, hd] or [L, B, KVH, S, hd], of a separate K / V pair or (v_cache
    None) of the stacked [L, 2, B, KVH, S, hd] cache (qspec_jax.model.KVCache). ValueError for
    another shape without v_cache."""
    if v_cache is not None:
        return tuple(k_cache.shape)
    if k_cache.ndim != 6 or k_cache.shape[1] != 2:
        raise ValueError(f"cached_attention: without v_cache, k_cache must be the stacked "
                         f"[L, 2, B, KVH, S, hd] cache (got {tuple(k_cache.shape)})")
    return (k_cache.shape[0],) + tuple(k_cache.shape[2:])


def supported(q_shape, k_shape, dtype=None, window=None) -> tuple[bool, str]:
    """Whether cached_attention takes these shapes (and window). q [B, T, H, hd]; k
    [B, KVH, S, hd] or [L, B, KVH, S, hd]; window None or (sink >= 0, recent >= 1) ints.
    Returns (ok, reason)."""
    if len(q_shape) != 4:
        return False, f"q must be [B, T, H, hd], got shape {tuple(q_shape)}"
    if len(k_shape) not in (4, 5):
        return False, f"k cache must be [B, KVH, S, hd] or [L, B, KVH, S, hd], got {tuple(k_shape)}"
    B, T, H, hd = q_shape
    Bk, KVH, S, hdk = k_shape[-4:]
    if Bk != B:
        return False, f"batch of q ({B}) and of the cache ({Bk}) differ"
    if hdk != hd:
        return False, f"head_dim of q ({hd}) and of the cache ({hdk}) differ"
    if hd < 16 or hd > 256 or hd & (hd - 1):
        return False, f"head_dim={hd} must be a power of two in [16, 256] (tested: 64, 128)"
    if KVH < 1 or H % KVH:
        return False, f"query heads H={H} must be a multiple of kv heads KVH={KVH}"
    if S < MIN_BLOCK_K or S % MIN_BLOCK_K:
        return False, f"cache length S={S} must be a multiple of {MIN_BLOCK_K}"
    if T < 1 or B < 1:
        return False, f"empty batch or query block (B={B}, T={T})"
    if dtype is not None and jnp.dtype(dtype).name not in SUPPORTED_DTYPES:
        return False, f"dtype {jnp.dtype(dtype).name} not in {SUPPORTED_DTYPES}"
    if window is not None:
        try:
            _check_window(window)
        except ValueError as e:
            return False, str(e)
    return True, "ok"


# ----------------------------------------------------------------------------- kernel
def _packed_rows(tile, bq, R, G, kv_head):
    """Rows r = tile * bq + [0, bq) of one KV head's packed query block -> (t, head) int32 [bq].

    Row r is query t = r // G of query head kv_head * G + r % G. Rows past R (padding up to a
    power of two) repeat row R - 1: they load valid memory, compute that row's result again and
    store the same values to the same place, so neither loads nor stores need a mask."""
    r = jnp.minimum(tile * bq + lax.broadcasted_iota(jnp.int32, (bq,), 0), R - 1)
    return r // G, kv_head * G + r % G


def _attn_kernel(layer_ref, pos_ref, *refs, R, G, S, block_q, block_k, num_splits, scale,
                 partial, window, has_anchor, return_lse=False):
    # layer_ref: [1] int32      layer to read (0 for a single-layer cache)
    # pos_ref: [T] int32        q_pos of sequence b (clipped by kv_len; rows gathered below)
    # anchor_ref (has_anchor): [T] int32  unclipped q_pos (window anchor) when kv_len clipped pos
    # q_ref:   [T, H, hd]       all queries of sequence b, read in place (rows gathered below)
    # k_ref:   [L, S, hd]       key slabs of (b, kv_head) of every layer; only layer `layer`,
    # v_ref:   [L, S, hd]       blocks < n_blocks, are read
    # partial: out_refs = (o_ref [bq, hd] f32 unnormalised, m_ref [bq] f32, l_ref [bq] f32)
    # else:    out_refs = (o_ref [T, H, hd] q.dtype,)  rows scattered in place
    #          (return_lse: (o_ref [T, H, hd] f32, lse_ref [T, H] f32))
    if has_anchor:
        anchor_ref, q_ref, k_ref, v_ref, *out_refs = refs
    else:
        (q_ref, k_ref, v_ref, *out_refs), anchor_ref = refs, pos_ref
    hd = q_ref.shape[-1]
    bq = block_q
    h, tile, split = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    t_idx, head_idx = _packed_rows(tile, bq, R, G, h)      # [bq], [bq]
    q = q_ref[t_idx, head_idx, :]                          # [bq, hd]
    lim = jnp.clip(pos_ref[t_idx], -1, S - 1)              # [bq] last visible key (-1: none)
    layer = layer_ref[0]
    if window is None:
        # Blocks this tile needs: [0, cdiv(max(lim) + 1, block_k)) (lim >= -1: no negative division).
        n_blocks = lax.div(jnp.max(lim) + block_k, jnp.int32(block_k))
    else:
        # Windowed: blocks [0, n_sink) then [start, n_all); loop step i reads block
        # i (i < n_sink) or i + start - n_sink. The blocks in between are never loaded.
        sink, recent = window
        anchor = anchor_ref[t_idx]                           # [bq] unclipped q_pos
        n_sink, start_blk, n_all = window_blocks(lim, anchor, block_k, sink, recent, S)
        n_blocks = n_sink + n_all - start_blk
        skip = start_blk - n_sink
        wlo = anchor - min(recent, 1 << 30) + 1               # [bq] first key of each row's window
    # The needed blocks are cut into num_splits contiguous chunks at run time.
    per_split = lax.div(n_blocks + (num_splits - 1), jnp.int32(num_splits))
    lo = split * per_split
    hi = jnp.minimum(lo + per_split, n_blocks)
    hp = lax.Precision.HIGHEST  # f32 inputs: IEEE, not TF32; 16-bit inputs: unaffected
    key_iota = lax.broadcasted_iota(jnp.int32, (1, block_k), 1)  # [1, bk]

    def body(i, carry):
        o, m, l = carry                                      # [bq, hd], [bq], [bq] f32
        j = i if window is None else jnp.where(i < n_sink, i, i + skip)  # key block
        start = pl.multiple_of(j * block_k, block_k)
        k = k_ref[layer, pl.ds(start, block_k), :]           # [bk, hd]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=hp,
                            preferred_element_type=jnp.float32) * scale  # [bq, bk]
        key = start + key_iota                               # [1, bk]
        visible = key <= lim[:, None]                        # [bq, bk]
        if window is not None:
            visible &= (key < sink) | (key >= wlo[:, None])
        s = jnp.where(visible, s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))           # [bq]
        alpha = jnp.exp(m - m_new)                           # [bq]
        p = jnp.where(visible, jnp.exp(s - m_new[:, None]), 0.0)  # [bq, bk]
        l = alpha * l + jnp.sum(p, axis=1)
        v = v_ref[layer, pl.ds(start, block_k), :]           # [bk, hd]
        pv = jnp.dot(p.astype(v.dtype), v, precision=hp, preferred_element_type=jnp.float32)
        o = alpha[:, None] * o + pv                          # [bq, hd]
        return o, m_new, l

    init = (jnp.zeros((bq, hd), jnp.float32), jnp.full((bq,), _NEG, jnp.float32),
            jnp.zeros((bq,), jnp.float32))
    o, m, l = lax.fori_loop(lo, hi, body, init)
    if partial:
        o_ref, m_ref, l_ref = out_refs
        o_ref[...] = o
        m_ref[...] = m
        l_ref[...] = l
    else:
        _write_rows(out_refs, t_idx, head_idx, o, m, l)


def _write_rows(out_refs, t_idx, head_idx, o, m, l):
    """Normalised rows of (o, m, l) scattered into o_ref [T, H, hd] and, when a second ref is
    given, their log-sum-exp m + log(l) into lse_ref [T, H] (_NEG for rows without keys)."""
    inv = 1.0 / jnp.where(l > 0, l, 1.0)                     # rows without keys -> 0
    out_refs[0][t_idx, head_idx, :] = (o * inv[:, None]).astype(out_refs[0].dtype)
    if len(out_refs) > 1:
        out_refs[1][t_idx, head_idx] = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), _NEG)


def _pow2_chunks(n: int) -> list[tuple[int, int]]:
    """[0, n) as (start, size) chunks of power-of-two sizes, largest first (Triton blocks must
    have power-of-two shapes): 16 -> [(0, 16)], 6 -> [(0, 4), (4, 2)]."""
    chunks, start = [], 0
    for bit in reversed(range(max(1, n).bit_length())):
        if n >> bit & 1:
            chunks.append((start, 1 << bit))
            start += 1 << bit
    return chunks


def _combine_kernel(o_ref, m_ref, l_ref, *out_refs, R, G, block_q, num_splits):
    # o_ref:   [ns, bq, hdc] f32  unnormalised partial outputs of the splits (one head-dim chunk)
    # m_ref:   [ns, bq] f32       running max per split (_NEG: split saw no key)
    # l_ref:   [ns, bq] f32       softmax denominators per split
    # out_refs: (out [T, H, hdc],) this head-dim chunk of sequence b's output, rows scattered in
    #           place; with a second ref [T, H] f32: the rows' log-sum-exp (every chunk's program
    #           writes the same values)
    # All splits are loaded at once (one chunk per set bit of ns, so one for power-of-two ns) and
    # merged with a max / weighted sum over the split axis: no chain of dependent loads, which
    # cost ~0.7 us per split at batch 1 (attention_floor_h200_a7717e1.md: 11.3 us for 16 splits).
    bq = block_q
    hdc = o_ref.shape[-1]
    t_idx, head_idx = _packed_rows(pl.program_id(2), bq, R, G, pl.program_id(1))
    o = jnp.zeros((bq, hdc), jnp.float32)
    m = jnp.full((bq,), _NEG, jnp.float32)
    l = jnp.zeros((bq,), jnp.float32)
    for start, size in _pow2_chunks(num_splits):
        m_s = m_ref[pl.ds(start, size), :]                   # [size, bq]
        m_new = jnp.maximum(m, jnp.max(m_s, axis=0))         # [bq]
        a = jnp.exp(m - m_new)                               # [bq]
        w = jnp.exp(m_s - m_new[None, :])                    # [size, bq]
        l = a * l + jnp.sum(w * l_ref[pl.ds(start, size), :], axis=0)
        o = a[:, None] * o + jnp.sum(w[:, :, None] * o_ref[pl.ds(start, size), :, :], axis=0)
        m = m_new
    _write_rows(out_refs, t_idx, head_idx, o, m, l)


# Combine: f32 elements of the partial outputs one program loads at once (64 per thread at 4 warps)
# and the programs wanted (two per SM) before the head dim is cut into fewer, wider chunks.
COMBINE_TILE_ELEMS = 8192
COMBINE_PROGRAMS_PER_SM = 2


def combine_head_block(base: int, num_splits: int, block_q: int, hd: int) -> int:
    """Head-dim chunk of one split-combine program: the widest power of two <= hd whose
    [splits, block_q, chunk] partial-output tile has <= COMBINE_TILE_ELEMS elements, halved
    (down to 16) while base * hd / chunk programs would not give COMBINE_PROGRAMS_PER_SM per SM
    (batch 1: 8 kv heads x 1 query tile -> 8 x 8 chunks of 16 instead of 8 programs)."""
    tile = _next_pow2(num_splits) * block_q
    hdc = hd
    while hdc > 1 and tile * hdc > COMBINE_TILE_ELEMS:
        hdc //= 2
    while hdc > 16 and base * (hd // hdc) < COMBINE_PROGRAMS_PER_SM * sm_count():
        hdc //= 2
    return hdc


def _compiler_params(num_warps, num_stages):
    if pltriton is not None and hasattr(pltriton, "CompilerParams"):
        return {"compiler_params": pltriton.CompilerParams(num_warps=num_warps,
                                                           num_stages=num_stages)}
    return {}  # pragma: no cover


def _attention_call(q, q_pos, anchor, k_cache, v_cache, layer, cfg: AttnConfig, interpret: bool,
                    window, return_lse=False):
    B, T, H, hd = q.shape
    stacked = v_cache is None  # [L, 2, B, KVH, S, hd]: the same array read as K and as V
    L, KVH, S = k_cache.shape[0], k_cache.shape[-3], k_cache.shape[-2]
    G = H // KVH
    R = T * G
    bq, ns = cfg.block_q, cfg.num_splits
    n_q = pl.cdiv(R, bq)
    grid = (B, KVH, n_q, ns)
    partial = ns > 1
    has_anchor = anchor is not None
    kernel = functools.partial(_attn_kernel, R=R, G=G, S=S, block_q=bq, block_k=cfg.block_k,
                               num_splits=ns, scale=1.0 / math.sqrt(hd), partial=partial,
                               window=window, has_anchor=has_anchor, return_lse=return_lse)
    if stacked:
        k_spec, v_spec = (pl.BlockSpec((L, None, None, None, S, hd),
                                       lambda b, h, i, s, j=j: (0, j, b, h, 0, 0)) for j in (0, 1))
        v_cache = k_cache
    else:
        k_spec = v_spec = pl.BlockSpec((L, None, None, S, hd), lambda b, h, i, s: (0, b, h, 0, 0))
    seq_spec = pl.BlockSpec((None, T, H, hd), lambda b, h, i, s: (b, 0, 0, 0))  # q / out, in place
    pos_spec = pl.BlockSpec((None, T), lambda b, h, i, s: (b, 0))  # q_pos [B, T]
    in_specs = [pl.BlockSpec((1,), lambda b, h, i, s: (0,)),       # layer [1]
                pos_spec] + [pos_spec] * has_anchor + [seq_spec, k_spec, v_spec]
    pos_args = (q_pos, anchor) if has_anchor else (q_pos,)
    # Final outputs: [B, T, H, hd] in q.dtype, or in f32 with the [B, T, H] log-sum-exp.
    final_shape = [jax.ShapeDtypeStruct((B, T, H, hd), jnp.float32 if return_lse else q.dtype)]
    final_specs = [pl.BlockSpec((None, T, H, hd), lambda b, h, i, *s: (b, 0, 0, 0))]
    if return_lse:
        final_shape.append(jax.ShapeDtypeStruct((B, T, H), jnp.float32))
        final_specs.append(pl.BlockSpec((None, T, H), lambda b, h, i, *s: (b, 0, 0)))
    if partial:
        R_pad = n_q * bq
        out_shape = [jax.ShapeDtypeStruct((B, KVH, ns, R_pad, hd), jnp.float32),
                     jax.ShapeDtypeStruct((B, KVH, ns, R_pad), jnp.float32),
                     jax.ShapeDtypeStruct((B, KVH, ns, R_pad), jnp.float32)]
        out_specs = [pl.BlockSpec((None, None, None, bq, hd), lambda b, h, i, s: (b, h, s, i, 0)),
                     pl.BlockSpec((None, None, None, bq), lambda b, h, i, s: (b, h, s, i)),
                     pl.BlockSpec((None, None, None, bq), lambda b, h, i, s: (b, h, s, i))]
    else:
        out_shape, out_specs = final_shape, final_specs
    outs = pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
        interpret=interpret,
        name=f"cached_attn_q{bq}_k{cfg.block_k}_s{ns}" + ("_win" if window else ""),
        **_compiler_params(cfg.num_warps, cfg.num_stages))(layer, *pos_args, q, k_cache, v_cache)
    if not partial:
        return tuple(outs) if return_lse else outs[0]
    combine = functools.partial(_combine_kernel, R=R, G=G, block_q=bq, num_splits=ns)
    hdc = combine_head_block(B * KVH * n_q, ns, bq, hd)
    comb_specs = [pl.BlockSpec((None, T, H, hdc), lambda b, h, i, c: (b, 0, 0, c))]
    if return_lse:
        comb_specs.append(final_specs[1])
    res = pl.pallas_call(
        combine, out_shape=final_shape, grid=(B, KVH, n_q, hd // hdc),
        in_specs=[pl.BlockSpec((None, None, ns, bq, hdc), lambda b, h, i, c: (b, h, 0, i, c)),
                  pl.BlockSpec((None, None, ns, bq), lambda b, h, i, c: (b, h, 0, i)),
                  pl.BlockSpec((None, None, ns, bq), lambda b, h, i, c: (b, h, 0, i))],
        out_specs=comb_specs,
        interpret=interpret, name=f"cached_attn_combine_s{ns}",
        **_compiler_params(4, 1))(*outs)
    return tuple(res) if return_lse else res[0]


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "num_splits",
                                             "num_warps", "num_stages", "interpret", "window",
                                             "return_lse"))
def cached_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, q_pos: jax.Array,
                     kv_len: jax.Array | None = None, *, layer: int | jax.Array | None = None,
                     block_q: int | None = None, block_k: int | None = None,
                     num_splits: int | None = None, num_warps: int | None = None,
                     num_stages: int | None = None, interpret: bool = False,
                     window: tuple[int, int] | None = None, return_lse: bool = False):
    """Attention of T new queries per sequence over the KV cache (see the module docstring).

    q [B, T, H, hd] (bf16 / f16 / f32).
    k_cache, v_cache: [B, KVH, S, hd] in q's dtype (checked, never cast: a cast would copy the
      cache), or the model's whole [L, B, KVH, S, hd] cache with `layer` (a Python int or a
      traced int32 scalar: one compiled kernel serves every layer, whose slab is read in place),
      or v_cache None and k_cache the stacked [L, 2, B, KVH, S, hd] cache (qspec_jax.model.KVCache:
      K at [:, 0], V at [:, 1]) with `layer`, read in place the same way.
    q_pos int [B, T]: cache position of each query; key s is visible iff s <= q_pos[b, t].
    kv_len optional int [B]: keys s >= kv_len[b] are masked too. Without it the keys read per
      sequence are those up to max_t q_pos[b, t] (clipped to the cache).
    window (static) (sink, recent): windowed (draft) attention; key s is visible only if also
      s < sink or q_pos[b, t] - s < recent. Each query tile loads only the key blocks holding
      such keys (the first cdiv(sink, block_k) blocks and those from its smallest window start
      to its last visible key); the blocks in between are never read, and the flash-decoding
      splits divide the blocks actually read. None: full causal attention.
    Returns [B, T, H, hd] in q.dtype; f32 softmax statistics; scale 1 / sqrt(hd).
    return_lse (static): return (out [B, T, H, hd] in f32, lse [B, T, H] f32), lse the
      log-sum-exp of each row's visible scaled scores (-1e30 for rows without keys): what is
      needed to merge this attention with attention over other keys (attention_with_block).
    block_q / block_k / num_splits / num_warps / num_stages override default_config.
    interpret: Pallas interpreter (CPU tests). Raises ValueError for unsupported shapes.
    """
    if window is not None:
        window = _check_window(window)
    stacked = v_cache is None
    if stacked and layer is None:
        raise ValueError("cached_attention: the stacked cache (v_cache None) needs layer=i")
    k_shape = keys_shape(k_cache, v_cache)
    v_dtype = k_cache.dtype if stacked else v_cache.dtype
    ok, why = supported(q.shape, k_shape, q.dtype, window)
    if not ok:
        raise ValueError(f"cached_attention: {why}")
    if not stacked and k_cache.shape != v_cache.shape:
        raise ValueError(f"cached_attention: k {k_cache.shape} and v {v_cache.shape} differ")
    if (len(k_shape) == 5) != (layer is not None):
        raise ValueError("cached_attention: pass layer=i exactly when the cache is [L, B, KVH, S, hd]")
    B, T, H, hd = q.shape
    if q_pos.shape != (B, T):
        raise ValueError(f"cached_attention: q_pos shape {q_pos.shape} must be {(B, T)}")
    if kv_len is not None and kv_len.shape != (B,):
        raise ValueError(f"cached_attention: kv_len shape {kv_len.shape} must be {(B,)}")
    if k_cache.dtype != q.dtype or v_dtype != q.dtype:
        # Not cast here: a cast would copy the whole cache on every call.
        raise ValueError(f"cached_attention: cache dtype {k_cache.dtype}/{v_dtype} must equal "
                         f"q dtype {q.dtype}")
    KVH, S = k_shape[-3], k_shape[-2]
    cfg = default_config(B, T, H, KVH, S, hd, jnp.dtype(q.dtype).itemsize, block_q=block_q,
                         block_k=block_k, num_splits=num_splits, num_warps=num_warps,
                         num_stages=num_stages, window=window)
    q_pos = q_pos.astype(jnp.int32)
    anchor = None  # the window's anchor, when it differs from the clipped q_pos
    if kv_len is not None:  # one tiny fusion; without kv_len the kernel reads q_pos as is
        if window is not None:
            anchor = q_pos
        q_pos = jnp.minimum(q_pos, kv_len.astype(jnp.int32)[:, None] - 1)
    if k_cache.ndim == 4:  # a single layer: [1, B, KVH, S, hd] (a free reshape)
        k_cache, v_cache, layer = k_cache[None], v_cache[None], 0
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    return _attention_call(q, q_pos, anchor, k_cache, v_cache, layer, cfg, interpret, window,
                           return_lse)


__all__ = ["AttnConfig", "cached_attention", "cached_attention_reference", "default_config",
           "keys_shape", "supported", "window_blocks"]
