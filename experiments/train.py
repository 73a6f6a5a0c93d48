"""Train the qspec-jax default model: a small Llama (GQA, RoPE, SwiGLU) through our Flax model.

Data: multi-step arithmetic word problems (most of the tokens) and Python standard-library
source, packed into fixed-length rows (experiments/data.py). Optimizer: optax AdamW with linear
warmup and cosine decay; f32 master weights, bf16 compute. At the end: held-out arithmetic exact
match by number of steps (greedy, KV-cache decoding of ``qspec_jax.generate``), perplexity on
held-out stdlib files, a JSON report, and a Hugging Face export (LlamaForCausalLM, bf16
safetensors shards under 15 MB, tokenizer files).

    PYTHONPATH=. python3 experiments/train.py --minutes 7 --out out/train      # H200
    PYTHONPATH=. python3 experiments/train.py --smoke --out /tmp/smoke        # CPU, seconds

The learning-rate schedule needs a step count: ``--steps N`` fixes it; with ``--minutes`` the
step time is measured on the first steps and the step count derived from the budget (the number
used is written to the report, so ``--steps`` reproduces the run).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import queue
import struct
import sys
import threading
import time

import numpy as np

if __package__ in (None, ""):  # run as a script: make `experiments` and `qspec_jax` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import data as D  # noqa: E402

# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainConfig:
    # model (Llama; intermediate 1536 = 12 * 128: a non-power-of-two Hadamard factor)
    hidden_size: int = 384
    intermediate_size: int = 1536
    num_hidden_layers: int = 7
    num_attention_heads: int = 6
    num_key_value_heads: int = 2
    head_dim: int = 64
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    # optimization
    batch_size: int = 128
    seq_len: int = 512
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 200
    weight_decay: float = 0.1
    beta2: float = 0.95
    grad_clip: float = 1.0
    steps: int | None = None
    minutes: float | None = None
    code_fraction: float = 0.04  # fraction of rows that are stdlib source
    code_max_files: int = 0       # 0: all train stdlib files
    seed: int = 0
    # evaluation
    eval_per_steps: int = 200     # held-out problems per number of steps (2..6)
    eval_batch: int = 1000
    ppl_max_tokens: int = 400_000
    max_new_tokens: int = 128
    log_every: int = 50
    workers: int = 6
    attention: str = "auto"       # "auto" (cuDNN flash on GPU, XLA elsewhere) | "xla" | "model"


SMOKE = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, batch_size=8, seq_len=128, lr=3e-3,
             warmup_steps=5, steps=20, eval_per_steps=4, eval_batch=20, ppl_max_tokens=4096,
             max_new_tokens=48, log_every=5, workers=0, code_fraction=0.25,
             code_max_files=40)


def hf_config(tc: TrainConfig, vocab_size: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": tc.hidden_size,
        "intermediate_size": tc.intermediate_size,
        "num_hidden_layers": tc.num_hidden_layers,
        "num_attention_heads": tc.num_attention_heads,
        "num_key_value_heads": tc.num_key_value_heads,
        "head_dim": tc.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": tc.max_position_embeddings,
        "rms_norm_eps": tc.rms_norm_eps,
        "rope_theta": tc.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": tc.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "bfloat16",
    }


# ----------------------------------------------------------------------------------------------
# Data pipeline: packed rows of seq_len + 1 tokens
# ----------------------------------------------------------------------------------------------

CHUNK_PROBLEMS = 2048


def _arith_chunk(args) -> np.ndarray:
    """Worker: token ids of train problems [c * CHUNK, (c + 1) * CHUNK) as one flat stream."""
    tok_path, seed, c = args
    tok = _worker_tokenizer(tok_path)
    docs = D.encode_docs(tok, [p.text for p in D.problems("train", CHUNK_PROBLEMS, seed=seed,
                                                          start=c * CHUNK_PROBLEMS)])
    return np.fromiter((t for d in docs for t in d), dtype=np.uint16)


_TOK_CACHE: dict = {}


def _worker_init():
    # one tokenizer thread per worker process: the processes are the parallelism
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"


def _worker_tokenizer(path):
    if path not in _TOK_CACHE:
        _TOK_CACHE[path] = D.load_tokenizer(path)
    return _TOK_CACHE[path]


class Packer:
    """Deterministic row stream: each row is seq_len + 1 consecutive tokens of either the
    arithmetic stream or the code stream (a row is code with probability code_fraction)."""

    def __init__(self, tok_path: str, tc: TrainConfig, code_tokens: np.ndarray):
        self.tc = tc
        self.tok_path = tok_path
        self.row = tc.seq_len + 1
        self.code = code_tokens
        self.code_pos = 0
        self.rng = np.random.default_rng(tc.seed + 1)
        self.arith = np.zeros((0,), np.uint16)
        self.next_chunk = 0
        self.pool = None
        if tc.workers > 0:
            # Bounded look-ahead (Pool.imap would run the workers flat out and starve the
            # accelerator runtime's host threads of CPU): at most 3 chunks per worker in flight.
            import multiprocessing as mp
            self.pool = mp.get_context("spawn").Pool(tc.workers, initializer=_worker_init)
            self.it = self._pooled(3 * tc.workers)
        else:
            self.it = (_arith_chunk((tok_path, tc.seed, c)) for c in _count())

    def _pooled(self, ahead: int):
        import collections
        pending = collections.deque()
        c = 0
        while True:
            while len(pending) < ahead:
                pending.append(self.pool.apply_async(_arith_chunk, ((self.tok_path, self.tc.seed, c),)))
                c += 1
            yield pending.popleft().get()

    def _arith_rows(self, n: int) -> np.ndarray:
        need = n * self.row
        parts = [self.arith]
        have = len(self.arith)
        while have < need:
            a = next(self.it)
            parts.append(a)
            have += len(a)
        buf = np.concatenate(parts)
        self.arith = buf[need:]
        return buf[:need].reshape(n, self.row)

    def _code_rows(self, n: int) -> np.ndarray:
        out = np.empty((n, self.row), np.uint16)
        for i in range(n):
            if self.code_pos + self.row > len(self.code):
                self.code_pos = 0
            out[i] = self.code[self.code_pos:self.code_pos + self.row]
            self.code_pos += self.row
        return out

    def batch(self) -> np.ndarray:
        B = self.tc.batch_size
        is_code = self.rng.random(B) < self.tc.code_fraction
        rows = np.empty((B, self.row), np.uint16)
        nc = int(is_code.sum())
        if nc:
            rows[is_code] = self._code_rows(nc)
        if B - nc:
            rows[~is_code] = self._arith_rows(B - nc)
        return rows.astype(np.int32)

    def close(self):
        if self.pool is not None:
            self.pool.terminate()


def _count():
    c = 0
    while True:
        yield c
        c += 1


def code_stream(tok, files: list[str], seed: int, max_files: int = 0) -> np.ndarray:
    """The train stdlib files in a seeded order, each as <s> text </s>, concatenated."""
    order = np.random.default_rng(seed + 2).permutation(len(files))
    if max_files:
        order = order[:max_files]
    texts = list(D.read_code([files[i] for i in order]))
    docs = D.encode_docs(tok, texts)
    return np.concatenate([np.asarray(d, np.uint16) for d in docs])


def prefetch(fn, n: int, depth: int = 6):
    """Yield fn() n times, computed ahead in a background thread."""
    q: queue.Queue = queue.Queue(depth)

    def work():
        try:
            for _ in range(n):
                q.put(fn())
        except BaseException as e:  # surface errors in the consumer
            q.put(e)

    threading.Thread(target=work, daemon=True).start()
    for _ in range(n):
        item = q.get()
        if isinstance(item, BaseException):
            raise item
        yield item


# ----------------------------------------------------------------------------------------------
# Model: forward for training, loss, step
# ----------------------------------------------------------------------------------------------


def forward_train(model, tokens, attention: str = "xla"):
    """Causal logits [B, T, V] f32 of tokens [B, T] (positions 0..T-1) through our model's
    modules. ``attention="model"`` calls ``Transformer.__call__`` with a fresh KV cache (the
    inference path); "xla"/"cudnn" use ``jax.nn.dot_product_attention`` (same math, no cache)."""
    import jax
    import jax.numpy as jnp
    from qspec_jax.layers import apply_rope, rope_inv_freq
    from qspec_jax.model import KVCache

    B, T = tokens.shape
    cfg = model.cfg
    if attention == "model":
        cache = KVCache.create(cfg, B, T, model.dtype)
        logits, _ = model(tokens, cache, jnp.zeros((B,), jnp.int32), mode="w16")
        return logits
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T))
    inv_freq = rope_inv_freq(cfg.rope, cfg.head_dim)
    H, KH, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    x = model.embed(tokens).astype(model.dtype)
    for layer in model.layers:
        h = layer.attn_norm(x)
        a = layer.attn
        q = apply_rope(a.q_proj(h, "w16").reshape(B, T, H, hd), positions, inv_freq)
        k = apply_rope(a.k_proj(h, "w16").reshape(B, T, KH, hd), positions, inv_freq)
        v = a.v_proj(h, "w16").reshape(B, T, KH, hd)
        o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=attention)
        x = x + a.o_proj(o.reshape(B, T, H * hd), "w16")
        x = x + layer.mlp(layer.mlp_norm(x), "w16", "xla")
    x = model.final_norm(x)
    return model.head(x, "w16")


def build_model(tc: TrainConfig, vocab_size: int, dtype=None):
    import jax.numpy as jnp
    from flax import nnx
    from qspec_jax.config import model_config_from_hf
    from qspec_jax.model import Transformer
    cfg = model_config_from_hf(hf_config(tc, vocab_size))
    return Transformer(cfg, dtype=dtype or jnp.bfloat16, rngs=nnx.Rngs(tc.seed))


def param_count(state) -> int:
    import jax
    return int(sum(x.size for x in jax.tree_util.tree_leaves(state)))


# ----------------------------------------------------------------------------------------------
# HF export (our [in, out] kernels -> HF [out, in] weights), bf16 safetensors shards
# ----------------------------------------------------------------------------------------------


def hf_tensors(pure: dict, num_layers: int) -> dict[str, np.ndarray]:
    """Our pure param dict (docs/DESIGN.md) -> {HF name: float32 array in HF layout}."""
    f = lambda x: np.asarray(x, np.float32)  # noqa: E731
    out = {"model.embed_tokens.weight": f(pure["embed"]["embedding"])}
    for i in range(num_layers):
        L = pure["layers"][i]
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[p + f"self_attn.{n}.weight"] = f(L["attn"][n]["kernel"]).T
        for n in ("gate_proj", "up_proj", "down_proj"):
            out[p + f"mlp.{n}.weight"] = f(L["mlp"][n]["kernel"]).T
        out[p + "input_layernorm.weight"] = f(L["attn_norm"]["scale"])
        out[p + "post_attention_layernorm.weight"] = f(L["mlp_norm"]["scale"])
    out["model.norm.weight"] = f(pure["final_norm"]["scale"])
    if "lm_head" in pure:
        out["lm_head.weight"] = f(pure["lm_head"]["kernel"]).T
    return out


def _bf16_bytes(x: np.ndarray) -> bytes:
    """float32 -> bfloat16 bytes, round to nearest even (as jnp.astype(bfloat16))."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return rounded.tobytes()


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> int:
    """Minimal safetensors writer (bf16); returns the bytes of tensor data."""
    header, blobs, off = {}, [], 0
    for name, x in tensors.items():
        b = _bf16_bytes(x)
        header[name] = {"dtype": "BF16", "shape": list(x.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(h)))
        fh.write(h)
        for b in blobs:
            fh.write(b)
    return off


def export_hf(out_dir: str, pure: dict, hfcfg: dict, tok_dir: str,
              max_shard_bytes: int = 12 * 2**20) -> list[str]:
    """Write config.json, generation_config.json, sharded bf16 safetensors + index, tokenizer."""
    import shutil
    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(out_dir):
        if f.endswith(".safetensors") or f == "model.safetensors.index.json":
            os.remove(os.path.join(out_dir, f))
    tensors = hf_tensors(pure, hfcfg["num_hidden_layers"])
    shards, cur, cur_bytes = [], {}, 0
    for name, x in tensors.items():
        nb = x.size * 2
        if cur and cur_bytes + nb > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = {}, 0
        cur[name] = x
        cur_bytes += nb
    if cur:
        shards.append(cur)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(os.path.join(out_dir, fname), shard)
        weight_map.update({n: fname for n in shard})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        json.dump(hfcfg, fh, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as fh:
        json.dump({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": False,
                   "max_new_tokens": 128}, fh, indent=2)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        src = os.path.join(tok_dir, f)
        if os.path.isfile(src) and os.path.abspath(src) != os.path.abspath(os.path.join(out_dir, f)):
            shutil.copy(src, os.path.join(out_dir, f))
    return sorted(os.listdir(out_dir))


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Read the shards written by ``write_safetensors`` (or any BF16/F32 file) as float32."""
    out = {}
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(n))
        data = fh.read()
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        a, b = meta["data_offsets"]
        if meta["dtype"] == "BF16":
            x = (np.frombuffer(data[a:b], np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif meta["dtype"] == "F32":
            x = np.frombuffer(data[a:b], np.float32)
        else:
            raise ValueError(meta["dtype"])
        out[name] = x.reshape(meta["shape"])
    return out


def load_hf_pure(path: str) -> tuple[dict, dict]:
    """(HF config dict, our pure param dict in float32) from an exported folder."""
    with open(os.path.join(path, "config.json")) as fh:
        hfcfg = json.load(fh)
    with open(os.path.join(path, "model.safetensors.index.json")) as fh:
        files = sorted(set(json.load(fh)["weight_map"].values()))
    t = {}
    for f in files:
        t.update(read_safetensors(os.path.join(path, f)))
    pure = {"embed": {"embedding": t["model.embed_tokens.weight"]}, "layers": {},
            "final_norm": {"scale": t["model.norm.weight"]}}
    for i in range(hfcfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        pure["layers"][i] = {
            "attn_norm": {"scale": t[p + "input_layernorm.weight"]},
            "attn": {n: {"kernel": t[p + f"self_attn.{n}.weight"].T}
                     for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
            "mlp_norm": {"scale": t[p + "post_attention_layernorm.weight"]},
            "mlp": {n: {"kernel": t[p + f"mlp.{n}.weight"].T}
                    for n in ("gate_proj", "up_proj", "down_proj")},
        }
    if "lm_head.weight" in t:
        pure["lm_head"] = {"kernel": t["lm_head.weight"].T}
    return hfcfg, pure


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


def eval_arithmetic(graphdef, state, tok, tc: TrainConfig, dtype) -> dict:
    """Greedy KV-cache decoding of the held-out set; exact match overall and by steps."""
    import jax
    import jax.numpy as jnp
    from qspec_jax.generate import decode_autoregressive
    from qspec_jax.model import KVCache
    from qspec_jax.sampling import SamplingConfig
    from flax import nnx

    cfg = nnx.merge(graphdef, state).cfg
    test = D.test_set(tc.eval_per_steps)
    prompts = [e.ids for e in tok.encode_batch([p.prompt for p in test], add_special_tokens=True)]
    P = int(math.ceil(max(map(len, prompts)) / 16) * 16)
    eos = jnp.asarray([tok.token_to_id(D.EOS)], jnp.int32)
    results = []
    t0 = time.time()
    for s in range(0, len(test), tc.eval_batch):
        chunk = prompts[s:s + tc.eval_batch]
        B = len(chunk)
        arr = np.zeros((B, P), np.int32)
        for i, ids in enumerate(chunk):
            arr[i, :len(ids)] = ids
        lens = np.asarray([len(x) for x in chunk], np.int32)
        cache = KVCache.create(cfg, B, P + tc.max_new_tokens, dtype)
        res = decode_autoregressive(graphdef, state, jnp.asarray(arr), jnp.asarray(lens), cache,
                                    jax.random.PRNGKey(0), SamplingConfig().arrays(), eos,
                                    max_new_tokens=tc.max_new_tokens, greedy=True, mode="w16")
        out = np.asarray(res.tokens)
        for row in out:
            ids = [int(t) for t in row if t >= 0 and t != int(eos[0])]
            results.append(tok.decode(ids, skip_special_tokens=True))
    secs = time.time() - t0
    by = {}
    for p, c in zip(test, results):
        by.setdefault(p.n_steps, []).append(D.score(c, p))
    report = {
        "n": len(test),
        "accuracy": float(np.mean([D.score(c, p) for p, c in zip(test, results)])),
        "accuracy_by_steps": {str(k): float(np.mean(v)) for k, v in sorted(by.items())},
        "seconds": secs,
        "examples": [{"prompt": p.prompt, "expected": p.solution, "completion": c}
                     for p, c in list(zip(test, results))[:: max(1, len(test) // 5)]],
    }
    return report


def eval_perplexity(graphdef, state, tok, tc: TrainConfig, attention: str) -> dict:
    """Token perplexity on the held-out stdlib files (non-overlapping seq_len windows)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    _, held = D.code_split()
    stream = np.concatenate([np.asarray(d, np.int32) for d in
                             D.encode_docs(tok, list(D.read_code(held)))])
    T = tc.seq_len
    n_win = max(1, min(len(stream) - 1, tc.ppl_max_tokens) // T)
    n_win = min(n_win, (len(stream) - 1) // T)
    rows = np.stack([stream[i * T:(i + 1) * T + 1] for i in range(n_win)])

    @jax.jit
    def nll(state, x):
        model = nnx.merge(graphdef, state)
        logits = forward_train(model, x[:, :-1], attention)
        return optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).sum(-1)

    total, B = 0.0, 32
    for s in range(0, n_win, B):
        chunk = rows[s:s + B]
        n = len(chunk)
        if n < B:  # keep one compiled shape
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], B - n, 0)])
        total += float(np.asarray(nll(state, jnp.asarray(chunk)))[:n].sum())
    n_tok = n_win * T
    return {"files": len(held), "tokens": int(n_tok), "nll": total / n_tok,
            "perplexity": float(math.exp(total / n_tok)),
            "bytes_per_token": float(sum(len(t) for t in D.read_code(held)) / max(1, len(stream)))}


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="out/train", help="output folder (report, hf/ export)")
    ap.add_argument("--export", default=None, help="HF export folder (default OUT/hf)")
    ap.add_argument("--tokenizer", default=os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "qspec_jax", "default_model"),
        help="folder with tokenizer.json (trained and saved to OUT/tokenizer if absent)")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU configuration, a few steps")
    ap.add_argument("--minutes", type=float, help="training time budget (sets the step count)")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--no-export", action="store_true")
    ap.add_argument("--orbax", action="store_true", help="also save the params with orbax")
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("steps", "minutes"):
            continue
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default) if f.default is not None
                        else str, default=None)
    args = ap.parse_args(argv)

    tc = TrainConfig(**(SMOKE if args.smoke else {}))
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            setattr(tc, f.name, v)
    if args.steps is not None:
        tc.steps = args.steps
    if args.minutes is not None:
        tc.minutes = args.minutes
        if args.steps is None:
            tc.steps = None
    if tc.steps is None and tc.minutes is None:
        tc.steps = 1000
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()

    # tokenizer (before JAX starts: the worker pool is spawned from a clean process)
    tok_dir = args.tokenizer
    if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        tok_dir = os.path.join(args.out, "tokenizer")
        print(f"training tokenizer -> {tok_dir}", flush=True)
        D.save_tokenizer(D.train_tokenizer(D.tokenizer_corpus()), tok_dir)
    tok = D.load_tokenizer(tok_dir)
    vocab = tok.get_vocab_size()
    train_files, held_files = D.code_split()
    code = code_stream(tok, train_files, tc.seed, tc.code_max_files)
    print(f"stdlib {D.stdlib_dir()}: {len(train_files)} train files ({len(code)} tokens), "
          f"{len(held_files)} held-out files; data ready in {time.time() - t_start:.1f}s", flush=True)
    packer = Packer(os.path.join(tok_dir, "tokenizer.json"), tc, code)

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    backend = jax.default_backend()
    attention = tc.attention
    if attention == "auto":
        attention = "cudnn" if backend == "gpu" else "xla"
    print(f"jax {jax.__version__} backend {backend} devices {jax.devices()} attention {attention}",
          flush=True)

    model = build_model(tc, vocab)
    hfcfg = hf_config(tc, vocab)
    graphdef, state = nnx.split(model)
    n_params = param_count(state)
    print(f"model: {n_params / 1e6:.2f}M params, bf16 {2 * n_params / 2**20:.1f} MiB; "
          f"config {json.dumps({k: hfcfg[k] for k in ('hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads', 'num_key_value_heads', 'head_dim', 'vocab_size')})}",
          flush=True)
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), state)

    def decay_mask(p):
        return jax.tree_util.tree_map(lambda x: x.ndim >= 2, p)

    opt = optax.chain(
        optax.clip_by_global_norm(tc.grad_clip),
        optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, b1=0.9, b2=tc.beta2,
                                              weight_decay=tc.weight_decay, mask=decay_mask))
    opt_state = opt.init(params)

    def make_step(attention):
        def loss_fn(p, x):
            m = nnx.merge(graphdef, jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), p))
            logits = forward_train(m, x[:, :-1], attention)
            return optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).mean()

        @partial_jit(donate=(0, 1))
        def train_step(p, o, x, lr):
            loss, grads = jax.value_and_grad(loss_fn)(p, x)
            o[1].hyperparams["learning_rate"] = lr
            updates, o = opt.update(grads, o, p)
            p = optax.apply_updates(p, updates)
            return p, o, loss, optax.global_norm(grads)
        return train_step

    train_step = make_step(attention)

    def lr_at(step, total):
        if step < tc.warmup_steps:
            return tc.lr * (step + 1) / tc.warmup_steps
        prog = min(1.0, (step - tc.warmup_steps) / max(1, total - tc.warmup_steps))
        return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog)))

    max_steps = tc.steps if tc.steps is not None else 10**7
    total = tc.steps
    budget_mode = tc.steps is None
    batches = prefetch(packer.batch, max_steps)
    history = []
    t_train = time.time()
    t_log, tok_log, loss_acc, n_acc = time.time(), 0, 0.0, 0
    t_measure = None
    step = 0
    tokens_seen = 0
    compile_s = None
    wait_s = 0.0
    while step < (total if total is not None else max_steps):
        t_wait = time.time()
        x = jnp.asarray(next(batches))
        wait_s += time.time() - t_wait
        plan_total = total if total is not None else 10**6  # warmup does not depend on it
        lr = jnp.float32(lr_at(step, plan_total))
        if step == 0 and attention == "cudnn":
            try:  # compile first so that a cuDNN refusal falls back before any donation
                train_step.lower(params, opt_state, x, lr).compile()
            except Exception as e:  # noqa: BLE001
                print(f"cuDNN attention unavailable ({type(e).__name__}: {str(e)[:200]}); "
                      "using XLA attention", flush=True)
                attention = "xla"
                train_step = make_step(attention)
        params, opt_state, loss, gnorm = train_step(params, opt_state, x, lr)
        step += 1
        tokens_seen += x.shape[0] * (x.shape[1] - 1)
        if step == 1:
            loss.block_until_ready()
            compile_s = time.time() - t_train
            print(f"step 1 (compile) {compile_s:.1f}s loss {float(loss):.4f}", flush=True)
            t_log, tok_log = time.time(), 0
        else:
            tok_log += x.shape[0] * (x.shape[1] - 1)
            loss_acc += float(loss) if step % 10 == 0 or step % tc.log_every == 0 else 0.0
            n_acc += 1 if step % 10 == 0 or step % tc.log_every == 0 else 0
        if budget_mode and step == 21:
            loss.block_until_ready()
            t_measure, step_measure = time.time(), step
        if budget_mode and step > 21 and (step == 61 or step % 100 == 0):
            # derive (and keep re-deriving) the step count from the time budget, so that a
            # change of speed during the run cannot overrun it
            loss.block_until_ready()
            step_s = (time.time() - t_measure) / (step - step_measure)
            remaining = tc.minutes * 60 - (time.time() - t_start)
            new_total = step + max(0, int(remaining / step_s))
            if total is None or abs(new_total - total) > 0.01 * total:
                print(f"step {step}: {step_s * 1e3:.1f} ms/step -> {new_total} steps for the budget",
                      flush=True)
            total = new_total
            tc.steps = total
        if budget_mode and time.time() - t_start > tc.minutes * 60 + 5:
            print(f"time budget reached at step {step}", flush=True)
            total = tc.steps = step
        if step % tc.log_every == 0 or step == total:
            loss_v = float(loss)
            dt = time.time() - t_log
            tps = tok_log / dt if dt > 0 else 0.0
            rec = {"step": step, "loss": loss_v, "loss_avg": loss_acc / max(1, n_acc),
                   "grad_norm": float(gnorm), "lr": lr_at(step - 1, total or plan_total),
                   "tokens_per_s": tps, "tokens": tokens_seen, "elapsed_s": time.time() - t_start,
                   "data_wait_s": wait_s}
            history.append(rec)
            print(f"step {step}/{total or '?'} loss {loss_v:.4f} (avg {rec['loss_avg']:.4f}) "
                  f"gnorm {rec['grad_norm']:.2f} lr {rec['lr']:.2e} {tps / 1e3:.0f}k tok/s "
                  f"tokens {tokens_seen / 1e6:.1f}M elapsed {rec['elapsed_s']:.0f}s "
                  f"data-wait {wait_s:.1f}s", flush=True)
            t_log, tok_log, loss_acc, n_acc = time.time(), 0, 0.0, 0
    train_s = time.time() - t_train
    packer.close()

    final_bf16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
    report = {"config": dataclasses.asdict(tc), "hf_config": hfcfg, "params": n_params,
              "bf16_bytes": 2 * n_params, "jax": jax.__version__, "backend": backend,
              "device": str(jax.devices()[0]), "attention": attention,
              "steps": step, "tokens": tokens_seen, "train_seconds": train_s,
              "compile_seconds": compile_s,
              "tokens_per_s": tokens_seen / train_s, "history": history,
              "stdlib": D.stdlib_dir(), "heldout_files": held_files,
              "command": "PYTHONPATH=. python3 experiments/train.py " + " ".join(
                  argv if argv is not None else sys.argv[1:])}
    try:
        import flax
        report["flax"] = flax.__version__
    except Exception:  # pragma: no cover
        pass

    if args.orbax:
        try:
            import orbax.checkpoint as ocp
            ckptr = ocp.PyTreeCheckpointer()
            ckptr.save(os.path.abspath(os.path.join(args.out, "orbax")),
                       nnx.State(final_bf16).to_pure_dict() if not hasattr(final_bf16, "to_pure_dict")
                       else final_bf16.to_pure_dict(), force=True)
        except Exception as e:  # pragma: no cover - optional
            print(f"orbax save failed: {e!r}", flush=True)

    if not args.no_eval:
        t0 = time.time()
        ppl = eval_perplexity(graphdef, final_bf16, tok, tc, attention)
        print(f"code perplexity {ppl['perplexity']:.3f} on {ppl['tokens']} held-out tokens "
              f"({ppl['files']} files) in {time.time() - t0:.1f}s", flush=True)
        if backend == "cpu":  # XLA:CPU lacks some bf16 x bf16 -> f32 dots: decode in f32 there
            eval_dtype = jnp.float32
            eval_graphdef, _ = nnx.split(build_model(tc, vocab, jnp.float32))
            eval_state = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), final_bf16)
        else:
            eval_dtype, eval_graphdef, eval_state = jnp.bfloat16, graphdef, final_bf16
        acc = eval_arithmetic(eval_graphdef, eval_state, tok, tc, eval_dtype)
        print(f"arithmetic exact match {acc['accuracy']:.4f} over {acc['n']} held-out problems "
              f"in {acc['seconds']:.1f}s; by steps {acc['accuracy_by_steps']}", flush=True)
        for ex in acc["examples"][:2]:
            print("--- example\n" + ex["prompt"] + ex["completion"], flush=True)
        report["perplexity"] = ppl
        report["arithmetic"] = acc

    if not args.no_export:
        export_dir = args.export or os.path.join(args.out, "hf")
        files = export_hf(export_dir, final_bf16.to_pure_dict(), hfcfg, tok_dir)
        report["export"] = {"dir": export_dir, "files": files}
        print(f"exported {export_dir}: {files}", flush=True)
    report["total_seconds"] = time.time() - t_start
    with open(os.path.join(args.out, "report.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    print(f"done in {report['total_seconds']:.0f}s", flush=True)
    return report


def partial_jit(donate=()):
    import jax
    return lambda f: jax.jit(f, donate_argnums=donate)


if __name__ == "__main__":
    main()
