"""QuaRot rotations: Hadamard matrices of any size, the fast online transform, and the
offline folding of norms and rotations into a pure-dict parameter tree.

Hadamard matrices
-----------------
``hadamard_matrix(n)`` is ``kron(B_m, S_p)`` with ``n = m * p``, ``p`` a power of two and
``S_p`` the Sylvester Hadamard matrix. ``m`` is the smallest ``odd(n) * 2^j`` (j <= the power
of two in n) that has a Paley construction from a prime q (at most MAX_PALEY_ORDER = 256):

- Paley I, order q + 1 for q = 3 (mod 4): 4, 8, 12, 20, 24, 32, 44, 48, 60, 68, 72, 80, ...
- Paley II, order 2 (q + 1) for q = 1 (mod 4): 12, 28, 36, 60, 76, 84, 108, ...

e.g. 14336 = 28 x 512 (Paley II, q = 13), 96 = 12 x 8, 80 = 20 x 4. Then ``H H^T = n I`` with
entries +-1. When no such m exists (n = 2 * odd: 6, 10, ...; or an odd factor without a
Paley order up to 256: 11008 = 43 x 256, 52 = 13 x 4), the odd part m = odd(n) gets an exact
orthogonal block instead of a Hadamard one, ``sqrt(m) * DCT-II`` (the orthonormal DCT-II of
size m), so every n works and ``H H^T = n I`` still holds. Everything is a deterministic
function of n.

``online_hadamard(x) = x @ hadamard_matrix(n) / sqrt(n)`` along the last axis, computed in one
of three ways (``HADAMARD_IMPLS``; the same values up to float32 summation order):

- "butterfly": a Walsh-Hadamard butterfly over the 2^k part (log2 p elementwise stages: XLA
  runs each as its own pass over the data, ~10 kernels for 14336 = 28 x 512) and one small m x m
  matmul;
- "dense": S_p split into Sylvester factors of at most ``DENSE_STAGE`` (S_p = S_r kron S_q), each
  applied as one GEMM along its axis, then the m x m block: 2 GEMMs for 14336 and 4096. The first
  GEMM takes bf16 / f16 input as it is (+-1 entries: exact products, float32 accumulation on
  tensor cores), the later ones run in float32 at HIGHEST precision;
- "pallas": one Pallas kernel (pallas_kernels/hadamard.py: S_p made in registers, the m x m
  block applied in the same program); shapes it cannot take (no Hadamard block, float32) run
  the GEMM form, said once. Not measured on the GPU yet (device stage ``hadamardk``).

``HADAMARD_IMPL`` picks the model's: "dense", measured faster on the H200 at every width and M
(``experiments/bench_hadamard.py``, experiments/results/hadamard_h200.md; summed device time
for width 14336: 4.4 vs 8.5 us at M = 1, 8.2 vs 32.0 at M = 64, 25.5 vs 89.1 at M = 256,
249 vs 1424 at M = 4096; width 4096: 1.4-6.4x). bf16 outputs equal the butterfly's but for
<= 0.005% last-bit flips.
"""

import functools
import math

import jax.numpy as jnp
import numpy as np
from jax import lax

# ----------------------------------------------------------------------------- matrices


def _is_prime(q):
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q):
    """Q[i, j] = Legendre symbol of (j - i) mod q, for prime q: [q, q]."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = np.array([0] + [1 if r in squares else -1 for r in range(1, q)], np.float64)
    idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
    return chi[idx]


def _paley1(q):
    """Hadamard matrix of order q + 1 for prime q = 3 (mod 4): I + [[0, 1^T], [-1, Q]]."""
    s = np.zeros((q + 1, q + 1))
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
    return np.eye(q + 1) + s


def _paley2(q):
    """Hadamard matrix of order 2 (q + 1) for prime q = 1 (mod 4): the symmetric conference
    matrix C = [[0, 1^T], [1, Q]] with 0 -> [[1, -1], [-1, -1]] and +-1 -> +-[[1, 1], [1, -1]]."""
    c = np.zeros((q + 1, q + 1))
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
    sign_block, zero_block = [[1.0, 1.0], [1.0, -1.0]], [[1.0, -1.0], [-1.0, -1.0]]
    return np.kron(c, sign_block) + np.kron(np.eye(q + 1), zero_block)


def _paley_kind(m):
    """Which Paley construction gives a Hadamard matrix of order m, or None."""
    if m % 4:
        return None
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return "paley1"
    if _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return "paley2"
    return None


# The online transform spends m multiply-adds per element on the m x m block, so a Paley
# block much larger than the odd factor it replaces (11008 = 43 x 256 would need 5504) is
# worse than the exact DCT block of size odd(n).
MAX_PALEY_ORDER = 256


def _decompose(n):
    """n -> (m, p, kind): n = m * p, p a power of two, kind of the m x m block
    ('sylvester' for m = 1, 'paley1', 'paley2', or 'dct' when no Hadamard block is known)."""
    if n < 1:
        raise ValueError(f"Hadamard size must be positive, got {n}")
    twos = (n & -n).bit_length() - 1  # n = odd * 2^twos
    odd = n >> twos
    if odd == 1:
        return 1, n, "sylvester"
    for j in range(twos + 1):
        if odd << j > MAX_PALEY_ORDER:
            break
        kind = _paley_kind(odd << j)
        if kind:
            return odd << j, n // (odd << j), kind
    return odd, n // odd, "dct"


@functools.lru_cache(maxsize=None)
def _block(m, kind):
    """The m x m block with B B^T = m I (read-only, cached)."""
    if kind == "sylvester":
        b = np.ones((1, 1))
    elif kind == "paley1":
        b = _paley1(m - 1)
    elif kind == "paley2":
        b = _paley2(m // 2 - 1)
    else:  # sqrt(m) * orthonormal DCT-II: rows k, columns i
        k, i = np.meshgrid(np.arange(m), np.arange(m), indexing="ij")
        b = np.sqrt(2.0) * np.cos(np.pi * (2 * i + 1) * k / (2 * m))
        b[0] = 1.0
    b.setflags(write=False)
    return b


@functools.lru_cache(maxsize=None)
def _sylvester(p):
    """The p x p Sylvester Hadamard matrix (read-only, cached)."""
    s = np.ones((1, 1))
    while s.shape[0] < p:
        s = np.block([[s, s], [s, -s]])
    s.setflags(write=False)
    return s


def has_hadamard(n):
    """Whether hadamard_matrix(n) is a true +-1 Hadamard matrix (not a DCT fallback)."""
    return _decompose(n)[2] != "dct"


def hadamard_matrix(n):
    """float64 [n, n] with H H^T = n I (a +-1 Hadamard matrix when ``has_hadamard(n)``).
    Dense: for offline use and tests; apply it to data with ``online_hadamard``."""
    m, p, kind = _decompose(n)
    return np.kron(_block(m, kind), _sylvester(p))


# ----------------------------------------------------------------------------- fast transform


def _walsh_hadamard(y, xp):
    """y @ S_p along the last axis (p a power of two) by log2(p) butterfly stages."""
    *lead, p = y.shape
    h = 1
    while h < p:
        y = y.reshape(*lead, p // (2 * h), 2, h)  # pairs (a, b) that are h apart
        a, b = y[..., 0, :], y[..., 1, :]
        y = xp.stack([a + b, a - b], axis=-2).reshape(*lead, p)
        h *= 2
    return y


def _fast_transform(x, xp, block_matmul):
    """x @ hadamard_matrix(n) / sqrt(n) along the last axis with array module ``xp``.

    With x reshaped to X [m, p] (index a * p + b), x @ kron(B, S) is B^T X S."""
    *lead, n = x.shape
    m, p, kind = _decompose(n)
    y = _walsh_hadamard(x.reshape(*lead, m, p), xp)  # [..., m, p]
    if m > 1:
        y = block_matmul(y, _block(m, kind))
    return y.reshape(*lead, n) * (1.0 / math.sqrt(n))


def _block_matmul_jnp(y, b):
    # HIGHEST: f32 must not be rounded to TF32 on GPU.
    return jnp.einsum("...ab,ac->...cb", y, jnp.asarray(b, jnp.float32),
                      precision=lax.Precision.HIGHEST)


def _block_matmul_np(y, b):
    return np.einsum("...ab,ac->...cb", y, b)


HADAMARD_IMPLS = ("butterfly", "dense", "pallas")
HADAMARD_IMPL = "dense"   # the model's (see the module docstring)
DENSE_STAGE = 512             # largest Sylvester factor applied as one dense GEMM


def _sylvester_factors(p):
    """p (a power of two) -> [q1, q2, ...], each <= DENSE_STAGE, product p, largest first."""
    out = []
    while p > 1:
        q = min(p, DENSE_STAGE)
        out.append(q)
        p //= q
    return out


def _dense_transform(x):
    """x @ hadamard_matrix(n) / sqrt(n) by one GEMM per Kronecker factor, float32 result."""
    *lead, n = x.shape
    m, p, kind = _decompose(n)
    qs = _sylvester_factors(p)
    # x index a * p + (i_k ... i_1) with S_p = S_qk kron ... kron S_q1: axes [m, qk, ..., q1].
    y = x.reshape(*lead, m, *reversed(qs))
    low = x.dtype in (jnp.bfloat16, jnp.float16)
    for j, q in enumerate(qs):
        axis = y.ndim - 1 - j                     # q1 is the last axis, q2 the one before, ...
        first_low = j == 0 and low               # +-1 in the input's dtype: exact products
        s = jnp.asarray(_sylvester(q), y.dtype if first_low else jnp.float32)
        y = _along(y.astype(y.dtype if first_low else jnp.float32), s, axis,
                   lax.Precision.DEFAULT if first_low else lax.Precision.HIGHEST)
    y = y.astype(jnp.float32)
    if m > 1:
        y = _along(y, jnp.asarray(_block(m, kind), jnp.float32), len(lead), lax.Precision.HIGHEST)
    return y.reshape(*lead, n) * (1.0 / math.sqrt(n))


def _along(y, mat, axis, precision):
    """y with ``axis`` replaced by (y along axis) @ mat, float32 accumulation."""
    out = lax.dot_general(y, mat, (((axis,), (0,)), ((), ())), precision=precision,
                          preferred_element_type=jnp.float32)
    return jnp.moveaxis(out, -1, axis)


def online_hadamard(x, impl: str | None = None):
    """Orthonormal Hadamard-type transform of x [..., n] along the last axis:
    ``x @ hadamard_matrix(n) / sqrt(n)``, float32 inside, returned in x.dtype. ``impl``:
    "butterfly", "dense" or "pallas" (default ``HADAMARD_IMPL``; see the module docstring)."""
    impl = impl or HADAMARD_IMPL
    x = jnp.asarray(x)
    if impl == "pallas":
        y = _pallas_transform(x)
        if y is not None:
            return y
        impl = "dense"
    if impl == "dense":
        return _dense_transform(x).astype(x.dtype)
    if impl != "butterfly":
        raise ValueError(f"unknown Hadamard implementation {impl!r}; choose one of "
                         f"{', '.join(HADAMARD_IMPLS)}")
    y = _fast_transform(x.astype(jnp.float32), jnp, _block_matmul_jnp)
    return y.astype(x.dtype)


def v_head_fold_ok(n: int, head_dim: int) -> bool:
    """Whether hadamard_matrix(n) for n = heads * head_dim factors as A kron S_head_dim (its
    Sylvester part p a multiple of head_dim, a power of two), so that the S_head_dim part can be
    folded into v_proj (rotate_params' v_heads) and only A runs online (online_hadamard_heads)."""
    _, p, _ = _decompose(n)
    return head_dim >= 1 and head_dim & (head_dim - 1) == 0 and n % head_dim == 0 and p % head_dim == 0


@functools.lru_cache(maxsize=None)
def _head_mixing(n, head_dim):
    """A with hadamard_matrix(n) = A kron S_head_dim (read-only, float64; +-1 where
    has_hadamard(n))."""
    m, p, kind = _decompose(n)
    a = np.kron(_block(m, kind), _sylvester(p // head_dim))
    a.setflags(write=False)
    return a


def online_hadamard_heads(x, head_dim: int):
    """The online o_proj transform of a model whose v_proj holds the per-head part
    (rotate_params(v_heads=True)): x [..., n] viewed as [..., n / head_dim, head_dim] (the
    attention heads), mixed across heads by A / sqrt(n / head_dim). Equal to online_hadamard(x)
    once x's heads are multiplied by S_head_dim / sqrt(head_dim) (what the rotated V does): with
    X the [heads, head_dim] view, x @ kron(A, S) is A^T X S. One small GEMM along the head axis
    (float32 accumulation; +-1 entries: exact products) instead of a transform of all n."""
    if not v_head_fold_ok(x.shape[-1], head_dim):
        raise ValueError(f"online_hadamard_heads: size {x.shape[-1]} does not factor into heads of "
                         f"{head_dim} (v_head_fold_ok); use online_hadamard")
    *lead, n = x.shape
    heads = x.reshape(*lead, n // head_dim, head_dim)
    if x.dtype in (jnp.bfloat16, jnp.float16) and has_hadamard(n):  # +-1 in x's dtype: exact
        mix, precision = jnp.asarray(_head_mixing(n, head_dim), x.dtype), lax.Precision.DEFAULT
    else:
        heads = heads.astype(jnp.float32)
        mix, precision = jnp.asarray(_head_mixing(n, head_dim), jnp.float32), lax.Precision.HIGHEST
    y = _along(heads, mix, len(lead), precision) * (1.0 / math.sqrt(n // head_dim))
    return y.reshape(*lead, n).astype(x.dtype)


def swiglu_hadamard(gate_up, impl: str | None = None):
    """online_hadamard(jax.nn.silu(gate) * up) of a fused [gate | up] GEMM output [..., 2n]. With
    impl "pallas" (where the kernel takes the shape) one kernel makes the SwiGLU and the
    transform (its SwiGLU rounds to the input dtype after each op); otherwise XLA's SwiGLU, then
    online_hadamard."""
    import jax
    impl = impl or HADAMARD_IMPL
    gate_up = jnp.asarray(gate_up)
    if impl == "pallas":
        y = _pallas_transform(gate_up, "swiglu")
        if y is not None:
            return y
    gate, up = jnp.split(gate_up, 2, axis=-1)
    return online_hadamard(jax.nn.silu(gate) * up, impl)


def _pallas_transform(x, prologue: str = "none"):
    """impl "pallas": the one-kernel transform (pallas_kernels/hadamard.py; the interpreter
    off the GPU), or None, said once per width / dtype, where the kernel cannot take x."""
    import jax

    from pallas_kernels import hadamard as kernel
    from qspec_jax.kernel_dispatch import log_once
    *lead, w = x.shape
    n = w // 2 if prologue == "swiglu" else w
    ok, why = kernel.supported((math.prod(lead), n), x.dtype)
    if not ok:
        log_once(("hadamard", n, str(x.dtype)), f"qspec_jax: the Pallas Hadamard kernel cannot "
                 f"take this transform ({why}): using the GEMM form (\"dense\")")
        return None
    on_gpu = jax.default_backend() == "gpu"
    log_once(("hadamard_pallas", on_gpu), "qspec_jax: online Hadamard transforms use the Pallas "
             "kernel" + ("" if on_gpu else " (interpreter: no GPU)"))
    y = kernel.hadamard(x.reshape(-1, w), prologue, interpret=not on_gpu)
    return y.reshape(*lead, n)


def hadamard_transform_np(x):
    """float64 NumPy twin of ``online_hadamard`` for offline folding: x [..., n] -> [..., n]."""
    return _fast_transform(np.asarray(x, np.float64), np, _block_matmul_np)


# ----------------------------------------------------------------------------- folding

_ROW_CHUNK = 8192  # rows transformed at once in float64, to bound host memory


def _out_dtype(a):
    """float64 stays float64 (exactness tests); bf16/f16/f32 come back as float32."""
    return np.float64 if np.asarray(a).dtype == np.float64 else np.float32


def _right(w, fn):
    """w @ R row-chunk by row-chunk, where fn(rows) = rows @ R in float64."""
    w = np.asarray(w)
    out = np.empty(w.shape, _out_dtype(w))
    for i in range(0, w.shape[0], _ROW_CHUNK):
        out[i:i + _ROW_CHUNK] = fn(w[i:i + _ROW_CHUNK].astype(np.float64))
    return out


def _left_t(w, fn):
    """R^T @ w for w [K, N], where fn(rows) = rows @ R: (w^T R)^T, chunked over columns."""
    return _right(np.asarray(w).T, fn).T


def _residual_rotation(d, seed):
    """(fn, note): fn(rows) = rows @ Q for the residual-stream rotation Q [D, D].

    Q = diag(+-1) @ H_D / sqrt(D) (randomized Hadamard) when D has a Hadamard matrix, else a
    seeded random orthogonal matrix (QR of a Gaussian, signs fixed by the diagonal of R)."""
    rng = np.random.default_rng(seed)
    if has_hadamard(d):
        signs = rng.choice([-1.0, 1.0], size=d)
        note = f"randomized_hadamard {_describe(d)}"
        return (lambda rows: hadamard_transform_np(rows * signs)), note
    qm, r = np.linalg.qr(rng.standard_normal((d, d)))
    qm = qm * np.sign(np.diag(r))
    return (lambda rows: rows @ qm), f"random_orthogonal {d}"


def _describe(n):
    m, p, kind = _decompose(n)
    return f"{n} = {m} x {p} ({kind})"


def rotate_params(params, config, seed=0, v_heads=True):
    """QuaRot folding on an unquantized pure-dict tree -> (new params, notes).

    The math runs in float64; arrays come back as float32 (float64 if they were float64).

    1. RMSNorm gains go into the following linears (attn_norm -> q/k/v, mlp_norm -> gate/up,
       final_norm -> lm_head) and become 1; a tied lm_head becomes an explicit
       ``{'kernel': embedding^T}`` first (the caller sets tie_word_embeddings False).
    2. The residual stream is rotated by an orthogonal Q (see _residual_rotation): E -> E Q,
       q/k/v/gate/up/lm_head W -> Q^T W, o/down W -> W Q (and their biases b -> b Q). RMSNorm
       without gain commutes with Q (mean(x^2) is invariant), so this is exact.
    3. Online rotations: with H_n = hadamard_matrix(n) / sqrt(n), o_proj W -> H_n^T W for
       n = num_heads * head_dim and down_proj W -> H_I^T W for I = intermediate_size, so that
       online_hadamard(a) @ W' == a @ W for the activations a the model rotates online.
    4. ``v_heads`` (where ``v_head_fold_ok(n, head_dim)``): hadamard_matrix(n) = A kron S for
       S = S_head_dim, and the S part of o_proj's online transform goes into v_proj instead:
       each KV head's output columns W_v[:, h] -> W_v[:, h] S / sqrt(head_dim) (and its bias).
       Attention's output per head is a weighted sum of V rows, so it comes out multiplied by S
       too (the cache holds V rotated), and the model mixes heads online by A only
       (online_hadamard_heads: one small GEMM instead of the transform of all n).

    ``config`` needs hidden_size, intermediate_size, num_attention_heads, head_dim and
    tie_word_embeddings (a tree without 'lm_head' counts as tied). ``notes`` records what
    was done (JSON-serializable)."""
    d = config.hidden_size
    n_attn = config.num_attention_heads * config.head_dim
    rot, rot_note = _residual_rotation(d, seed)
    ones = np.ones(d, _out_dtype(params["final_norm"]["scale"]))

    def input_side(lin, gain):
        """Q^T diag(gain) W for a linear that reads the normed residual stream."""
        g = np.asarray(gain, np.float64)
        # Columns of W are rows of W^T [N, D]: scale them by the gain, then rotate.
        return {**lin, "kernel": _left_t(lin["kernel"], lambda rows: rot(rows * g))}

    def output_side(lin, n_online):
        """H_n^T W Q for a linear that writes the residual stream after an online rotation."""
        if lin["kernel"].shape[0] != n_online:
            raise ValueError(f"online rotation size {n_online} from the config does not match "
                             f"the input size {lin['kernel'].shape[0]} of the weight")
        w = _left_t(lin["kernel"], hadamard_transform_np)
        out = {**lin, "kernel": _right(w, rot)}
        if "bias" in lin:
            out["bias"] = _right(np.asarray(lin["bias"])[None], rot)[0]
        return out

    hd = config.head_dim
    fold_v = bool(v_heads) and v_head_fold_ok(n_attn, hd)
    s_hd = _sylvester(hd) / math.sqrt(hd)

    def per_head(rows):
        """rows [r, KVH * hd] -> each head's hd columns times S_hd / sqrt(hd)."""
        return (rows.reshape(rows.shape[0], -1, hd) @ s_hd).reshape(rows.shape)

    def v_side(lin, gain):
        out = input_side(lin, gain)
        if not fold_v:
            return out
        out["kernel"] = _right(out["kernel"], per_head)
        if "bias" in lin:
            out["bias"] = _right(np.asarray(lin["bias"])[None], per_head)[0]
        return out

    layers = {}
    for idx, layer in params["layers"].items():
        attn, mlp = layer["attn"], layer["mlp"]
        g_attn, g_mlp = layer["attn_norm"]["scale"], layer["mlp_norm"]["scale"]
        layers[idx] = {
            **layer,
            "attn_norm": {"scale": ones},
            "attn": {**attn,
                     **{k: input_side(attn[k], g_attn) for k in ("q_proj", "k_proj")},
                     "v_proj": v_side(attn["v_proj"], g_attn),
                     "o_proj": output_side(attn["o_proj"], n_attn)},
            "mlp_norm": {"scale": ones},
            "mlp": {**mlp,
                    **{k: input_side(mlp[k], g_mlp) for k in ("gate_proj", "up_proj")},
                    "down_proj": output_side(mlp["down_proj"], config.intermediate_size)},
        }

    embedding = params["embed"]["embedding"]
    # A tied model reads the embedding as lm_head even if the tree also holds one.
    tied = bool(config.tie_word_embeddings) or "lm_head" not in params
    lm_head = {"kernel": np.asarray(embedding).T} if tied else params["lm_head"]
    out = {**params,
           "embed": {"embedding": _right(embedding, rot)},
           "layers": layers,
           "final_norm": {"scale": ones},
           "lm_head": input_side(lm_head, params["final_norm"]["scale"])}
    notes = {"seed": seed,
             "residual": rot_note,
             "online_o_proj": _describe(n_attn) + (f", S_{hd} per head in v_proj" if fold_v else ""),
             "v_heads": fold_v,
             "online_down_proj": _describe(config.intermediate_size),
             "untied_lm_head": tied}
    return out, notes
