"""GPTQ int4 weight quantization (Frantar et al., 2022) into the layout of qspec_jax.quant.

Our weights are [K, N] = (in, out), so GPTQ's "columns" (input features, quantized one at a
time with error feedback) are our rows k; every step is vectorized over the N outputs.

Scales are fixed before the error-feedback pass ("static groups"): per group of rows and
output column, a clipping search picks the ratio of max|w| / 7 in CLIP_GRID that minimizes
the quantization error weighted by the input energies diag(H). The same scales then serve all
rows of the group while GPTQ pushes each row's rounding error into the rows not yet quantized.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.linalg import cho_solve

from qspec_jax import quant

CLIP_GRID = tuple(np.linspace(1.0, 0.75, 11))  # clip ratios tried per group and column
_HIGHEST = lax.Precision.HIGHEST  # f32 must not be rounded to TF32 on GPU
_MAX_DAMP_RETRIES = 4  # each retry multiplies the dampening by 10


class HessianAccumulator:
    """Running H = sum_t x_t^T x_t over calibration tokens of one linear input (float32)."""

    def __init__(self, size):
        self.size = size
        self.hessian = jnp.zeros((size, size), jnp.float32)  # [K, K]
        self.count = 0  # tokens added

    def add(self, x):
        """Add activations x [..., K] (any float dtype), one row per token."""
        x2 = jnp.asarray(x).reshape(-1, self.size)  # [T, K]
        self.hessian = _add_gram(self.hessian, x2)
        self.count += x2.shape[0]


@jax.jit
def _add_gram(h, x):
    x = x.astype(jnp.float32)
    return h + jnp.dot(x.T, x, precision=_HIGHEST)


def clip_search_scales(w, h_diag, group_size=None, grid=CLIP_GRID):
    """Scales f32 [K//G, N] of w [K, N]: per group and column, the clip ratio in ``grid`` with
    the least sum_k h_diag[k] * (w - dequant(w))^2 (ties and dead groups keep ratio 1.0)."""
    w = jnp.asarray(w, jnp.float32)
    k, n = w.shape
    g = quant.resolve_group_size(k, group_size)
    weight = jnp.asarray(h_diag, jnp.float32).reshape(k // g, g, 1)  # [K/G, G, 1]

    def error(ratio):
        scales = quant.weight_scales(w, group_size, ratio)
        q = quant.quantize_with_scales(w, scales).astype(jnp.float32).reshape(k // g, g, n)
        return jnp.sum(weight * (w.reshape(k // g, g, n) - q * scales[:, None, :]) ** 2, 1)

    errors = jnp.stack([error(r) for r in grid])  # [len(grid), K/G, N]
    best = jnp.asarray(grid, jnp.float32)[jnp.argmin(errors, axis=0)]  # first minimum wins
    return quant.weight_scales(w, group_size, best)


def _inverse_hessian_factor(h, damp):
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 = U^T U, retrying with
    more dampening if float32 Cholesky breaks down."""
    k = h.shape[0]
    mean_diag = jnp.mean(jnp.diag(h))
    for attempt in range(_MAX_DAMP_RETRIES + 1):
        hd = h + (damp * 10.0 ** attempt) * mean_diag * jnp.eye(k, dtype=h.dtype)
        lower = jnp.linalg.cholesky(hd)
        hinv = cho_solve((lower, True), jnp.eye(k, dtype=h.dtype))
        upper = jnp.linalg.cholesky(hinv).T
        if bool(jnp.all(jnp.isfinite(upper))):
            return upper
    raise ValueError(f"Hessian is not positive definite even with dampening "
                     f"{damp * 10.0 ** _MAX_DAMP_RETRIES} x mean diagonal")


@functools.partial(jax.jit, static_argnames=("block",))
def _gptq_rows(w, hinv, row_scales, block):
    """Error-feedback rounding of w [Kp, N] (Kp a multiple of ``block``) with the upper
    Cholesky factor hinv [Kp, Kp] of H^-1 and per-row scales [Kp, N]: int4 values f32 [Kp, N].

    Row i's error, divided by hinv[i, i], is pushed into the later rows j of its block with
    weight hinv[i, j] at once, and into the rows after the block by one matmul per block."""
    def block_step(b, carry):
        w, q = carry
        i1 = b * block
        w1 = lax.dynamic_slice_in_dim(w, i1, block, 0)  # [B, N]
        s1 = lax.dynamic_slice_in_dim(row_scales, i1, block, 0)  # [B, N]
        hrows = lax.dynamic_slice_in_dim(hinv, i1, block, 0)  # [B, Kp]
        h1 = lax.dynamic_slice_in_dim(hrows, i1, block, 1)  # [B, B]

        def row_step(i, carry):
            w1, q1, err1 = carry  # [B, N] each
            qi = jnp.clip(jnp.round(w1[i] / s1[i]), quant.INT4_MIN, quant.INT4_MAX)  # [N]
            ei = (w1[i] - qi * s1[i]) / h1[i, i]
            later = jnp.where(jnp.arange(block) > i, h1[i], 0.0)  # [B]
            w1 = w1 - later[:, None] * ei[None, :]
            return w1, q1.at[i].set(qi), err1.at[i].set(ei)

        zeros = jnp.zeros_like(w1)
        _, q1, err1 = lax.fori_loop(0, block, row_step, (w1, zeros, zeros))
        # hinv is upper triangular: rows before the block get nothing, and the block's own
        # rows are already quantized, so the full-height update only matters after it.
        w = w - jnp.dot(hrows.T, err1, precision=_HIGHEST)
        return w, lax.dynamic_update_slice_in_dim(q, q1, i1, 0)

    _, q = lax.fori_loop(0, w.shape[0] // block, block_step, (w, jnp.zeros_like(w)))
    return q


def gptq_quantize(w, h, group_size=None, damp=0.01, clip_search=True, block_size=128):
    """GPTQ int4 quantization of w [K, N] (in, out) given H [K, K] = sum_t x_t^T x_t.

    Dead inputs (H[k, k] = 0) get weight 0 and a unit diagonal; the diagonal is dampened by
    ``damp`` times its mean. Returns (qweight int8 [K//2, N], scales f32 [K//G, N]) in the
    layout of qspec_jax.quant."""
    w = jnp.asarray(w, jnp.float32)
    h = jnp.asarray(h, jnp.float32)
    k, n = w.shape
    if h.shape != (k, k):
        raise ValueError(f"Hessian shape {h.shape} does not match the weight's K={k}")
    quant.check_even_k(k)
    if clip_search:
        scales = clip_search_scales(w, jnp.diag(h), group_size)
    else:
        scales = quant.weight_scales(w, group_size)

    dead = jnp.diag(h) == 0
    w = jnp.where(dead[:, None], 0.0, w)
    h = h + jnp.diag(dead.astype(h.dtype))
    upper = _inverse_hessian_factor(h, damp)

    # Pad K to a multiple of the block with inputs that couple to nothing (unit Hessian).
    block = min(block_size, k)
    pad = -k % block
    w = jnp.pad(w, ((0, pad), (0, 0)))
    upper = jnp.pad(upper, ((0, pad), (0, pad))) + jnp.diag(
        jnp.concatenate([jnp.zeros(k), jnp.ones(pad)]))
    row_scales = jnp.repeat(scales, k // scales.shape[0], axis=0)  # [K, N]
    row_scales = jnp.pad(row_scales, ((0, pad), (0, 0)), constant_values=1.0)

    q = _gptq_rows(w, upper, row_scales, block)[:k]
    return quant.pack_int4(q.astype(jnp.int8)), scales
