"""Public Python API: ``load``, ``logits``, ``generate``.

```python
import qspec_jax as qj
model = qj.load(path, dtype="bfloat16")
logits = qj.logits(model, token_ids, mode="w16")   # mode=None: w4a16 if quantized, else w16
out = qj.generate(model, prompts, max_new_tokens=32, mode="w16", temperature=0.0)  # None: qspec if quantized
out.tokens, out.text, out.stats
```
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import model as model_module
from . import quant as quant_lib
from .config import (ModelConfig, QuantConfig, generation_eos_ids, model_config_from_hf,
                     read_hf_config, round_up)
from .cost_model import CACHE_BUCKET
from .generate import decode_autoregressive, prefill_chunk_size
from .model import KVCache, Transformer, fuse_projections, pure_dict
from .sampling import SamplingConfig

log = logging.getLogger("qspec_jax")

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}
PROMPT_BUCKET = 16
# gamma="auto" decodes plainly when the best predicted speedup at full acceptance is below this.
AUTO_MIN_GAIN = 1.03
# gamma="auto" calibration: the gammas whose verify width is timed (those <= max_gamma, plus 0 and
# max_gamma), the others interpolated: each timed width is one compiled program (~30 s on 8B).
AUTO_TIMED_GAMMAS = (0, 1, 3, 7)
# draft_window="auto" (with gamma="auto"): the window it may turn on, and the shortest cache
# (in multiples of the window's span) for which it is considered at all.
AUTO_DRAFT_WINDOW = (4, 1020)
AUTO_WINDOW_MIN_SPAN = 4
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclasses.dataclass
class QSpecModel:
    """A loaded model: config, NNX graph definition and parameter state, tokenizer."""

    cfg: ModelConfig
    qcfg: QuantConfig
    graphdef: Any
    state: Any
    dtype: Any
    tokenizer: Any = None
    eos_ids: tuple = ()
    path: str | None = None
    cycle_costs: dict = dataclasses.field(default_factory=dict)  # gamma="auto" calibrations

    @property
    def module(self) -> Transformer:
        return nnx.merge(self.graphdef, self.state)

    @property
    def weight_layout(self) -> str:
        """"half_split" (int8 [K/2, N], the stored format, Triton kernels) or "nk" (int4
        [N, K], the Mosaic GPU kernels; see ``with_weight_layout``); "none" if unquantized."""
        leaves = [v for p, v in nnx.to_flat_state(self.state) if p[-1] == "qweight"]
        return quant_lib.weight_layout(leaves[0][...]) if leaves else "none"

    @property
    def modes(self) -> tuple[str, ...]:
        """Execution modes this model's weights support."""
        return quant_lib.QUANT_MODES if self.qcfg.quantized else ("w16",)

    def default_mode(self, speculative: bool = True) -> str:
        """The mode ``generate`` / ``logits`` use when given none: "qspec" (``speculative``) or
        "w4a16" (verify mode) for a quantized model, "w16" for a 16-bit one."""
        if not self.qcfg.quantized:
            return "w16"
        return "qspec" if speculative else "w4a16"

    def check_mode(self, mode: str) -> None:
        quant_lib.check_mode(mode)
        if mode not in self.modes:
            kind = "quantized" if self.qcfg.quantized else "unquantized (16-bit)"
            raise ValueError(f"mode {mode!r} is not available for this {kind} model; available: "
                             f"{', '.join(self.modes)}" + ("" if self.qcfg.quantized else
                             ". Load with quant='w4' for the quantized modes"))


@dataclasses.dataclass
class GenerateOutput:
    tokens: list[list[int]]      # generated tokens only, stopped at EOS (EOS included)
    text: list[str] | None       # decoded continuations when the model has a tokenizer
    stats: dict


def resolve_dtype(dtype) -> Any:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    return jnp.dtype(dtype).type


def abstract_model(cfg: ModelConfig, qcfg: QuantConfig, dtype, fused: bool = False) -> Transformer:
    """The model with shapes only (no memory): its pure-dict state is the parameter schema
    (unfused: the checkpoint format; ``fused``: the runtime structure, see ``assemble``)."""
    return nnx.eval_shape(lambda: Transformer(cfg, qcfg, dtype=dtype, rngs=nnx.Rngs(0), fused=fused))


def flat_shapes(tree: dict, prefix=()) -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat_shapes(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = tuple(v.shape)
    return out


def assemble(cfg: ModelConfig, qcfg: QuantConfig, params: dict, dtype, *, tokenizer=None,
             eos_ids=(), path=None, fused: bool = True) -> QSpecModel:
    """Put a parameter pure dict (the unfused checkpoint format) into the NNX model structure.

    ``fused`` (default): q/k/v and gate/up become one linear layer each (``fuse_projections``),
    so a decoder layer runs 4 GEMMs instead of 7; outputs are the same columns.
    """
    if fused:
        params = fuse_projections(params)
    graphdef, state = nnx.split(abstract_model(cfg, qcfg, dtype, fused))
    nnx.replace_by_pure_dict(state, params)
    return QSpecModel(cfg, qcfg, graphdef, state, dtype, tokenizer, tuple(eos_ids), path)


def with_weight_layout(model: QSpecModel, layout: str, *, in_place: bool = False) -> QSpecModel:
    """The same model with every int4 weight in ``layout``: "half_split" (int8 [K/2, N], the
    checkpoint format; Pallas Triton kernels), "nk" (XLA's packed int4 [N, K]; the Mosaic GPU
    swap-AB kernel takes GEMMs of up to 64-256 rows, kernel_dispatch.mgpu_max_m, 1.2-1.4x faster
    per 8B layer on the H200, experiments/results/mgpu_h200.md, 1.08-1.23x end to end,
    mgpu_e2e_h200.md; wider GEMMs run on XLA) or "auto" (``auto_weight_layout``: nk where that
    kernel runs, else half_split). Same values and the same bytes in memory. The input model is left as it is (both copies live
    while both are held: drop it to free its weights) unless ``in_place=True``, which converts
    the input's own arrays one weight at a time (peak: one extra weight; the input then holds the
    new layout too), as ``load(..., weight_layout=...)`` does. Outputs may differ from the other
    layout's in the last bit of w4a16 sums (summation order); QSpec stays lossless against w4a16
    decoding in the same layout."""
    layout = _check_layout_request(model, layout)
    same = model.weight_layout in (layout, "none")  # nothing to convert: keep the cost tables
    if in_place:
        _convert_weights(model.state, layout)
        if not same:
            model.cycle_costs.clear()  # timed in the old layout
        return model
    state = jax.tree_util.tree_map(lambda v: v, model.state)  # new containers, same arrays
    _convert_weights(state, layout)
    return dataclasses.replace(model, state=state,
                               cycle_costs=dict(model.cycle_costs) if same else {})


def auto_weight_layout(model: QSpecModel) -> tuple[str, str]:
    """(layout, reason): "nk" where the Mosaic GPU kernel runs (a Hopper GPU, per-channel scales,
    every quantized layer a shape it takes; measured 1.08-1.23x faster end to end on the 8B shapes
    at batch 1-16, experiments/results/mgpu_e2e_h200.md), else "half_split" (the Triton kernels
    and the XLA reference path)."""
    from pallas_kernels import w4_mgpu
    from .kernel_dispatch import mgpu_unavailable
    if not model.qcfg.quantized:
        return "half_split", "the model has no int4 weights"
    why_not = mgpu_unavailable()
    if why_not:
        return "half_split", f"the Mosaic GPU kernel cannot run: {why_not}"
    if model.qcfg.group_size is not None:
        return "half_split", f"the Mosaic GPU kernel takes per-channel scales, not groups of {model.qcfg.group_size}"
    for path, var in nnx.to_flat_state(model.state):
        if path[-1] == "qweight":
            K, N = quant_lib.weight_shape(var[...])
            err = w4_mgpu.check(1, K, N, w4_mgpu.default_config(1, K, N))
            if err:
                return "half_split", f"the Mosaic GPU kernel cannot take {'.'.join(map(str, path[:-1]))} ({err})"
    return "nk", "the Mosaic GPU kernel runs the decode GEMMs"


LAYOUT_CHOICES = quant_lib.WEIGHT_LAYOUTS + ("auto",)


def _check_layout_name(layout: str) -> None:
    if layout not in LAYOUT_CHOICES:
        raise ValueError(f"unknown weight_layout {layout!r}; choose one of {', '.join(LAYOUT_CHOICES)}")


def _check_layout_request(model: QSpecModel, layout: str) -> str:
    """The layout to convert to (``auto`` resolved, logged once per choice), after checks."""
    _check_layout_name(layout)
    if layout == "auto":
        layout, reason = auto_weight_layout(model)
        from .kernel_dispatch import log_once
        log_once(("auto-layout", layout, reason),
                 f"qspec_jax: weight_layout='auto' -> {layout!r} ({reason})")
        return layout
    if not model.qcfg.quantized:
        raise ValueError("weight_layout applies to quantized models; load with quant='w4'")
    if model.qcfg.group_size is not None and layout == "nk":
        raise ValueError(f"weight_layout='nk' needs per-channel scales (the Mosaic GPU kernel), "
                         f"this model has groups of {model.qcfg.group_size}; convert without "
                         "--group-size or keep weight_layout='half_split'")
    return layout


def _convert_weights(state, layout: str) -> None:
    """Replace every qweight of ``state`` by ``layout`` in place (each old array is released as
    soon as its replacement exists, if nothing else holds it)."""
    for path, var in nnx.to_flat_state(state):
        if path[-1] == "qweight":
            var.value = quant_lib.to_weight_layout(var.value, layout)


def load_tokenizer(path: str):
    if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


def load(path: str | os.PathLike | None = None, dtype="bfloat16", *, quant: str | None = None,
         method: str = "rtn", rotate: bool | None = None, group_size: int | None = None,
         quantize_lm_head: bool = False, calib: str | None = None,
         calib_tokens: int = 16384, weight_layout: str = "auto",
         rotate_v_heads: bool = True) -> QSpecModel:
    """Load an HF checkpoint folder or a ``qspec-convert`` output.

    On an HF folder, ``quant="w4"`` quantizes on load (``method`` rtn|gptq, ``group_size``),
    ``rotate`` (default: True when quantizing) folds the QuaRot rotation in;
    ``quantize_lm_head`` stores the lm_head in int4 too (off by default); ``rotate_v_heads``
    (default True, QuaRot's recipe) folds the per-head part of o_proj's online Hadamard into
    v_proj so that only a mixing of the heads runs online (3-5% faster rotated 8B steps on the
    H200; its int4 v_proj error on tiny random models: experiments/results/vfold_quality.md;
    False keeps v_proj as it is). On a converted
    folder the stored settings are used and conflicting arguments are rejected.
    ``path=None`` loads the embedded default model. ``weight_layout`` of the int4 weights in
    memory: "auto" (default: "nk" where the Mosaic GPU kernel runs, i.e. on a Hopper GPU with
    per-channel scales and shapes it takes, else "half_split"; the choice is logged once),
    "half_split" (the stored format) or "nk" (int4 [N, K]; see ``with_weight_layout``).
    """
    from conversion import checkpoint, hf
    _check_layout_name(weight_layout)  # before the (long) load
    path = os.fspath(path) if path is not None else default_model_path()
    dtype = resolve_dtype(dtype)
    if checkpoint.is_converted(path):
        model = checkpoint.load_converted(path, dtype=dtype, quant=quant, method=method,
                                          rotate=rotate, group_size=group_size,
                                          quantize_lm_head=quantize_lm_head or None)
        return _with_own_layout(model, weight_layout)
    cfg = model_config_from_hf(read_hf_config(path))
    qcfg = make_quant_config(quant, method, rotate, group_size, quantize_lm_head, rotate_v_heads)
    params = hf.load_hf_params(path, cfg, flat_shapes(
        pure_dict(abstract_model(cfg, QuantConfig(), dtype))), dtype)
    if qcfg.rotate or qcfg.quantized:
        from conversion.quantize import prepare_params
        cfg, params = prepare_params(cfg, qcfg, params, dtype, calib=calib, calib_tokens=calib_tokens,
                                     tokenizer_path=path)
    model = assemble(cfg, qcfg, params, dtype, tokenizer=load_tokenizer(path),
                     eos_ids=generation_eos_ids(path, cfg), path=path)
    return _with_own_layout(model, weight_layout)


def _with_own_layout(model: QSpecModel, layout: str) -> QSpecModel:
    """load's conversion: in place on a model nobody else holds."""
    if layout == "half_split":
        return model
    return with_weight_layout(model, layout, in_place=True)


def make_quant_config(quant, method, rotate, group_size, quantize_lm_head=False,
                      rotate_v_heads: bool = True) -> QuantConfig:
    if quant not in (None, "w4"):
        raise ValueError(f"unknown quant={quant!r}; use 'w4' (4-bit weights) or None (16-bit)")
    if method not in ("rtn", "gptq"):
        raise ValueError(f"unknown quantization method {method!r}; use 'rtn' or 'gptq'")
    if group_size is not None and (not isinstance(group_size, int) or group_size <= 0):
        raise ValueError(f"group_size must be a positive integer or None, got {group_size!r}")
    if rotate is None:
        rotate = quant is not None
    if quantize_lm_head and quant is None:
        raise ValueError("quantize_lm_head needs quant='w4'")
    return QuantConfig(quant=quant, method=method if quant else None,
                       group_size=group_size if quant else None, rotate=bool(rotate),
                       quantize_lm_head=bool(quantize_lm_head),
                       rotate_v_heads=bool(rotate_v_heads))


def default_model_path() -> str:
    path = os.path.join(os.path.dirname(__file__), "default_model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError("the embedded default model is not installed with this package "
                                f"(expected {path}); pass a model folder instead")
    return path


# ---------------------------------------------------------------------------------------------
# logits


@partial(jax.jit, static_argnames=("graphdef", "mode", "kernels", "window", "layers"))
def _logits_jit(graphdef, state, tokens, *, mode, kernels, window=None, layers=None):
    model = nnx.merge(graphdef, state)
    B, T = tokens.shape
    cache = KVCache(jnp.zeros((model.cfg.num_hidden_layers, 2, B, model.cfg.num_key_value_heads,
                               T, model.cfg.head_dim), model.dtype))
    logits, _ = model(tokens, cache, jnp.zeros((B,), jnp.int32), mode=mode, kernels=kernels,
                      window=window, layers=layers)
    return logits


def logits(model: QSpecModel, token_ids, mode: str | None = None, kernels: str = "auto", *,
           window: tuple[int, int] | None = None, layers=None) -> jax.Array:
    """token_ids int [B, T] -> logits float32 [B, T, vocab] (a full causal pass, no cache).

    mode: an execution mode; None: w4a16 (verify mode) for a quantized model, else w16.
    kernels: "auto" (Pallas kernels on GPU, XLA elsewhere), "pallas" or "xla".
    window=(sink, recent) / layers=[...]: the cheaper-draft options of ``generate``.
    """
    from .speculative import normalize_draft_options
    window, layers = normalize_draft_options(model, window, layers)
    mode = model.default_mode(speculative=False) if mode is None else mode
    model.check_mode(mode)
    check_kernels(kernels)
    try:
        tokens = jnp.asarray(token_ids, jnp.int32)
    except ValueError as e:  # ragged rows
        raise ValueError("token_ids must be a rectangular [batch, length] array of token ids (pad "
                         f"the rows to one length; generate() takes ragged prompts): {e}") from None
    if tokens.ndim != 2:
        raise ValueError(f"token_ids must be [batch, length], got shape {tokens.shape}")
    check_token_range(np.asarray(tokens), model.cfg.vocab_size)
    return _logits_jit(model.graphdef, model.state, tokens, mode=mode, kernels=kernels,
                       window=window, layers=layers)


def check_kernels(kernels: str) -> None:
    from .layers import KERNEL_BACKENDS
    if kernels not in KERNEL_BACKENDS:
        raise ValueError(f"unknown kernels={kernels!r}; choose one of {', '.join(KERNEL_BACKENDS)}")


def check_token_range(tokens: np.ndarray, vocab: int) -> None:
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
        raise ValueError(f"token ids must be in [0, {vocab}); got values in "
                         f"[{tokens.min()}, {tokens.max()}]")


# ---------------------------------------------------------------------------------------------
# generate


def stop_ids(model: QSpecModel, stop_token_ids=None) -> tuple[int, ...]:
    """The model's EOS ids plus ``stop_token_ids`` (validated), without repeats: a sequence stops
    after emitting any of them."""
    extra = [] if stop_token_ids is None else stop_token_ids
    if isinstance(extra, (int, np.integer)):
        extra = [extra]
    V = model.cfg.vocab_size
    if (not isinstance(extra, Sequence) or isinstance(extra, str)
            or not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) and 0 <= t < V
                       for t in extra)):
        raise ValueError(f"stop_token_ids must be token ids in [0, {V}), got {stop_token_ids!r}")
    return tuple(dict.fromkeys([*model.eos_ids, *(int(t) for t in extra)]))


def _is_conversation(p) -> bool:
    """A chat conversation: a non-empty list of message dicts ({"role": ..., "content": ...})."""
    return (isinstance(p, Sequence) and not isinstance(p, str) and len(p) > 0
            and all(isinstance(m, dict) for m in p))


def chat_prompt_ids(model: QSpecModel, messages) -> list[int]:
    """Token ids of a conversation in the model's chat template, ending with the assistant
    turn's opening (add_generation_prompt), as the model was trained to see it. messages: a list
    of {"role": "system" | "user" | "assistant", "content": str}."""
    if model.tokenizer is None:
        raise ValueError("this model has no tokenizer files; a chat conversation needs its "
                         "tokenizer and chat template (pass token-id lists instead)")
    if not getattr(model.tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template (tokenizer_config.json "
                         "'chat_template' or chat_template.jinja: base models usually have none); "
                         "pass the prompt as plain text instead of a conversation")
    for m in messages:
        if not (isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"each chat message must be a dict with string 'role' and 'content', "
                             f"got {m!r}")
    # Render, then tokenize without adding special tokens: the template writes BOS itself.
    text = model.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True,
                                               tokenize=False)
    return list(model.tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompts(model: QSpecModel, prompts) -> list[list[int]]:
    """prompts: one prompt or a list of them; a prompt is text, a token-id list or a chat
    conversation (a list of message dicts, formatted with the tokenizer's chat template)."""
    if isinstance(prompts, str) or _is_conversation(prompts):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of strings, token-id lists or chat "
                         "conversations (lists of {'role', 'content'} dicts)")
    out = []
    for p in prompts:
        if _is_conversation(p):
            p = chat_prompt_ids(model, p)
        elif isinstance(p, str):
            if model.tokenizer is None:
                raise ValueError("this model has no tokenizer files; pass prompts as token-id lists")
            p = model.tokenizer(p)["input_ids"]
        p = [int(t) for t in p]
        if not p:
            raise ValueError("empty prompt: every prompt needs at least one token")
        out.append(p)
    check_token_range(np.asarray([t for p in out for t in p]), model.cfg.vocab_size)
    return out


def pad_prompts(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to a length bucket so nearby prompt lengths share one compilation."""
    width = round_up(max(len(p) for p in prompts), PROMPT_BUCKET)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    return tokens, np.asarray([len(p) for p in prompts], np.int32)


def cache_length(model: QSpecModel, padded_prompt: int, longest_prompt: int, max_new_tokens: int,
                 lookahead: int, max_len: int | None) -> int:
    """Static cache length: room for the prompt, the new tokens and a verify window."""
    needed = longest_prompt + max_new_tokens + lookahead
    if max_len is None:
        max_len = round_up(max(needed, padded_prompt), CACHE_BUCKET)
        window = model.cfg.sliding_window
        if window is not None and needed <= window < max_len:
            max_len = window
    elif needed > max_len:
        raise ValueError(f"the KV cache (max_len={max_len}) cannot hold the longest prompt "
                         f"({longest_prompt} tokens) + max_new_tokens ({max_new_tokens})"
                         + (f" + {lookahead} speculative positions" if lookahead else "")
                         + f" = {needed}; raise max_len or shorten the request")
    model.cfg.check_cache_len(max_len)
    if longest_prompt + max_new_tokens > model.cfg.max_position_embeddings:
        log.warning("qspec_jax: prompt + max_new_tokens = %d exceeds the model's "
                    "max_position_embeddings (%d); quality past that length is not what the model "
                    "was trained for", longest_prompt + max_new_tokens,
                    model.cfg.max_position_embeddings)
    return max_len


def _device_memory() -> tuple[int, int] | None:
    """(bytes the allocator may use, bytes in use) on the default device; on the CPU backend
    the host's physical memory and what is not available of it; None where unknown."""
    dev = jax.devices()[0]
    try:
        stats = dev.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory statistics
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]), int(stats.get("bytes_in_use", 0))
    if dev.platform == "cpu":
        try:
            page = os.sysconf("SC_PAGE_SIZE")
            total, avail = page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
        except (AttributeError, ValueError, OSError):  # not a POSIX host that reports them
            return None
        if total > 0 and 0 <= avail <= total:
            return total, total - avail
    return None


def check_cache_fits(model: QSpecModel, batch: int, max_len: int) -> None:
    """Refuse a request whose KV cache alone exceeds the device memory left (instead of an
    out-of-memory error from inside XLA after compiling); positions are int32."""
    if max_len >= 2 ** 31:
        raise ValueError(f"max_len={max_len}: cache positions are int32, so the KV cache holds "
                         f"at most {2 ** 31 - 1} positions; shorten the request")
    mem = _device_memory()
    if mem is None:
        return
    need = KVCache.nbytes(model.cfg, batch, max_len, model.dtype)
    limit, used = mem
    if need > limit - used:
        gib = 2 ** 30
        cpu = jax.devices()[0].platform == "cpu"
        raise ValueError(
            f"the KV cache for batch {batch} x {max_len} positions needs {need / gib:.1f} GiB, but "
            f"the {'host (CPU backend)' if cpu else 'device'} has {(limit - used) / gib:.1f} GiB "
            f"free ({limit / gib:.1f} GiB {'in all' if cpu else 'usable'}, {used / gib:.1f} GiB in "
            "use); use a smaller batch, fewer new tokens or a shorter max_len"
            + ("" if cpu else " (JAX may use more of the device with XLA_PYTHON_CLIENT_MEM_FRACTION)"))


def _cycle_costs(model: QSpecModel, batch: int, context: int, max_gamma: int, draft: str,
                 kernels: str, given, draft_window=None, draft_layers=None) -> jax.Array:
    """Validated user costs, or measured ones cached per (batch, context bucket, ...)."""
    if given is not None:
        costs = np.asarray(given, np.float32)
        if costs.shape != (max_gamma + 1,) or not np.all(np.isfinite(costs)) or np.any(costs <= 0):
            raise ValueError(f"cycle_costs must be {max_gamma + 1} positive numbers (seconds per "
                             f"cycle for gamma = 0..{max_gamma}), got {given!r}")
        return jnp.asarray(costs)
    from .cost_model import measure_cycle_costs
    key = (batch, round_up(context, 256), max_gamma, draft, kernels, draft_window, draft_layers)
    if key not in model.cycle_costs:
        from . import persist
        costs = persist.load_costs(model, key)
        if costs is None:
            log.info("qspec_jax: gamma='auto': timing the draft and verify steps once for batch "
                     "%d, context %d (cached on the model%s)", batch, key[1],
                     " and in " + persist.cache_dir() if persist.cache_dir() else "")
            costs = measure_cycle_costs(model, batch, key[1], max_gamma, draft, kernels=kernels,
                                        draft_window=draft_window, draft_layers=draft_layers,
                                        verify_gammas=AUTO_TIMED_GAMMAS,
                                        early_exit_gain=AUTO_MIN_GAIN)
            persist.save_costs(model, key, np.asarray(costs))
        model.cycle_costs[key] = costs
    return jnp.asarray(model.cycle_costs[key], jnp.float32)


def _can_pay(costs) -> bool:
    """Whether some gamma beats plain decoding by AUTO_MIN_GAIN at full acceptance."""
    from .cost_model import predicted_speedup
    return bool(predicted_speedup(costs, 1.0).max() >= AUTO_MIN_GAIN)


def _choose_draft_window(model: QSpecModel, batch: int, context: int, cache_len: int,
                         max_gamma: int, draft: str, kernels: str, draft_layers):
    """draft_window="auto": the full-cache draft where it can pay, else AUTO_DRAFT_WINDOW where
    that can (long caches, where the KV bytes a windowed draft skips dominate a step), else
    None (the caller's guard then decodes plainly). Returns (window or None, its cycle costs)."""
    full = _cycle_costs(model, batch, context, max_gamma, draft, kernels, None, None, draft_layers)
    window = AUTO_DRAFT_WINDOW
    if _can_pay(full) or cache_len < AUTO_WINDOW_MIN_SPAN * sum(window):
        return None, full
    windowed = _cycle_costs(model, batch, context, max_gamma, draft, kernels, None, window,
                            draft_layers)
    if not _can_pay(windowed):
        return None, full
    from .kernel_dispatch import log_once
    log_once(("auto-window", batch, context // 256), f"qspec_jax: draft_window='auto' at batch "
             f"{batch}, context {context}: the full-cache draft cannot pay, a {window[0]} + "
             f"{window[1]}-token window can: drafting windowed")
    return window, windowed


def _speculation_cannot_pay(costs: np.ndarray, batch: int) -> bool:
    """gamma="auto" guard: True (and one log line) when even full acceptance would not make any
    gamma pay by AUTO_MIN_GAIN over plain decoding; then plain w4a16 decoding runs, which is
    exactly what the speculative loop would emit, without the loop's per-cycle overhead."""
    if _can_pay(costs):
        return False
    from .cost_model import predicted_speedup
    best = predicted_speedup(costs, 1.0)
    from .kernel_dispatch import log_once
    log_once(("auto-plain", batch, tuple(np.round(costs, 9))),
             f"qspec_jax: gamma='auto' at batch {batch}: drafting cannot pay here (best predicted "
             f"speedup {best.max():.3f}x at acceptance 1.0 from cycle costs "
             f"{', '.join(f'{c:.3g}' for c in costs)} s); decoding plain w4a16", logging.WARNING)
    return True


def _to_lists(tokens: np.ndarray, counts: np.ndarray) -> list[list[int]]:
    return [tokens[i, :counts[i]].tolist() for i in range(tokens.shape[0])]


@dataclasses.dataclass
class DecodeCall:
    """A decode program and its arguments, as ``decode_call`` prepares them for ``generate``."""

    fn: Any                 # decode_autoregressive or decode_speculative (jitted)
    args: tuple
    kwargs: dict
    plain: bool             # gamma="auto" found that no gamma pays: plain w4a16 decoding
    max_gamma: int
    draft_window: Any
    cache_len: int
    prefill_chunk: int
    prompt_lens: np.ndarray
    speculative: bool
    mode: str               # the mode that ran ("qspec" or a weight mode; None resolved)

    def run(self):
        """Decode (the cache argument is donated: a DecodeCall runs once)."""
        return self.fn(*self.args, **self.kwargs)

    def memory_analysis(self):
        """XLA's memory plan of the compiled program (argument, output, temporary bytes)."""
        return self.fn.lower(*self.args, **self.kwargs).compile().memory_analysis()


def decode_call(model: QSpecModel, prompts, max_new_tokens: int = 32, mode: str | None = None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, *,
             draft: str = "w4a8", gamma: int | str = "auto", max_gamma: int = 7, cycle_costs=None,
             draft_window: tuple[int, int] | str | None = None, draft_layers=None,
             max_len: int | None = None, prefill_chunk: int | None = None,
             kernels: str = "auto", stop_token_ids=None) -> DecodeCall:
    """The jitted decode program ``generate`` would run for these arguments, with its arguments,
    without running it (same validation, same gamma="auto" calibration and cache allocation):
    ``call.run()`` decodes; ``call.memory_analysis()`` is XLA's memory plan for the program
    (compiled once: jit keeps it for a later ``run`` or ``generate`` with the same shapes);
    ``call.fn.lower(*call.args, **call.kwargs)`` gives its HLO. Arguments: see ``generate``.
    """
    check_kernels(kernels)
    eos_ids = stop_ids(model, stop_token_ids)
    mode = model.default_mode() if mode is None else mode
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    sampling = SamplingConfig(float(temperature) if isinstance(temperature, (int, float)) else temperature,
                              top_k, float(top_p) if isinstance(top_p, (int, float)) else top_p)
    speculative = mode == "qspec"
    window_auto = isinstance(draft_window, str)
    if speculative:
        from .speculative import check_speculation, normalize_draft_options
        check_speculation(model, draft, gamma, max_gamma)
        if window_auto:
            if draft_window != "auto" or gamma != "auto" or cycle_costs is not None:
                raise ValueError(f"draft_window={draft_window!r}: the only string is 'auto', which "
                                 "chooses from gamma='auto''s measured cost tables (pass "
                                 "gamma='auto' and no cycle_costs), or give (sink, window)")
            draft_window = None
        draft_window, draft_layers = normalize_draft_options(model, draft_window, draft_layers)
    else:
        model.check_mode(mode)
    prompt_ids = encode_prompts(model, prompts)
    pad_id = model.cfg.pad_token_id if model.cfg.pad_token_id is not None else 0
    tokens, lens = pad_prompts(prompt_ids, pad_id)
    prefill_chunk = prefill_chunk_size(len(prompt_ids), tokens.shape[1], prefill_chunk)
    auto = speculative and gamma == "auto"
    lookahead = ((max_gamma if auto else gamma) + 1) if speculative else 0
    L = cache_length(model, tokens.shape[1], int(lens.max()), max_new_tokens, lookahead, max_len)
    check_cache_fits(model, len(prompt_ids), L)
    plain = False
    if auto:  # (before the cache exists: the timed forwards allocate one of their own)
        if window_auto:
            draft_window, cycle_costs = _choose_draft_window(
                model, len(prompt_ids), int(lens.max()), L, max_gamma, draft, kernels, draft_layers)
        else:
            cycle_costs = _cycle_costs(model, len(prompt_ids), int(lens.max()), max_gamma, draft,
                                       kernels, cycle_costs, draft_window, draft_layers)
        plain = _speculation_cannot_pay(np.asarray(cycle_costs), len(prompt_ids))
        if plain:  # no speculation lookahead: the very program (and cache) of w4a16 decoding
            L = cache_length(model, tokens.shape[1], int(lens.max()), max_new_tokens, 0, max_len)
    cache = KVCache.create(model.cfg, len(prompt_ids), L, model.dtype)
    eos = jnp.asarray(eos_ids, jnp.int32).reshape(-1)
    args = (model.graphdef, model.state, jnp.asarray(tokens), jnp.asarray(lens), cache,
            jax.random.PRNGKey(seed), sampling.arrays(), eos)
    if speculative and not plain:
        from .speculative import DEFAULT_MAX_GAMMA, decode_speculative
        fn, kw = decode_speculative, dict(draft_mode=draft, verify_mode="w4a16", gamma=gamma,
                                          max_gamma=max_gamma if auto else DEFAULT_MAX_GAMMA,
                                          cycle_costs=cycle_costs, draft_window=draft_window,
                                          draft_layers=draft_layers)
    else:
        fn, kw = decode_autoregressive, dict(mode="w4a16" if plain else mode)
    kw.update(max_new_tokens=max_new_tokens, greedy=sampling.greedy, kernels=kernels,
              prefill_chunk=prefill_chunk, cache_write=model_module.CACHE_WRITE)
    return DecodeCall(fn, args, kw, plain=plain, max_gamma=max_gamma,
                      draft_window=draft_window if speculative else None, cache_len=L,
                      prefill_chunk=prefill_chunk, prompt_lens=lens, speculative=speculative,
                      mode=mode)


def generate(model: QSpecModel, prompts, max_new_tokens: int = 32, mode: str | None = None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, *,
             draft: str = "w4a8", gamma: int | str = "auto", max_gamma: int = 7, cycle_costs=None,
             draft_window: tuple[int, int] | str | None = None, draft_layers=None,
             max_len: int | None = None, prefill_chunk: int | None = None,
             kernels: str = "auto", stop_token_ids=None) -> GenerateOutput:
    """Generate continuations. ``prompts``: one prompt or a list; each is text, a token-id list
    or a chat conversation ([{"role": "user", "content": "..."}, ...], formatted with the
    tokenizer's chat template and its assistant-turn opening: ``chat_prompt_ids``).
    ``mode``: a weight mode for plain decoding, or "qspec"; None
    (the default): "qspec" for a quantized model (as the CLI), "w16" for a 16-bit one.

    ``kernels``: "auto" (Pallas kernels on GPU, XLA reference elsewhere), "pallas", "xla".
    ``gamma="auto"`` (the default) picks gamma in {0..max_gamma} every cycle from
    ``cycle_costs`` (seconds per cycle for each gamma; measured once per batch size and cached on
    the model and on disk when None, see ``qspec_jax.cost_model``) and the running acceptance
    rate, and decodes plainly in w4a16 where the costs say no gamma can pay, so QSpec is never
    slower than its own verify mode; an int fixes gamma (the paper used 3), which on an H200 at
    short contexts is 0.74-1.06x plain w4a16 decoding even when every draft is accepted.
    ``draft_window=(sink, window)`` and ``draft_layers=[...]`` make the draft cheaper (windowed
    attention over the shared cache, a subset of layers); the output stays exact.
    ``draft_window="auto"`` (with ``gamma="auto"``): a windowed draft (AUTO_DRAFT_WINDOW) only
    where the cost tables say the full-cache draft cannot pay and the windowed one can (long
    caches); ``stats["draft_window"]`` says what ran.
    ``stop_token_ids``: token ids that end a sequence besides the model's EOS ids (kept in
    the output, as EOS is).
    ``max_len``: KV cache positions (default: what the request needs, rounded up to 64).
    ``prefill_chunk``: prompt positions per sequence per prefill forward (default: about 16k
    tokens per forward over the batch, so long prompts prefill in bounded memory).
    """
    t0 = time.perf_counter()
    call = decode_call(model, prompts, max_new_tokens, mode, temperature, top_k, top_p, seed,
                       draft=draft, gamma=gamma, max_gamma=max_gamma, cycle_costs=cycle_costs,
                       draft_window=draft_window, draft_layers=draft_layers, max_len=max_len,
                       prefill_chunk=prefill_chunk, kernels=kernels, stop_token_ids=stop_token_ids)
    res = call.run()
    if call.plain:  # report it in QSpec's terms: every cycle was a gamma = 0 cycle
        steps = int(res.stats["decode_steps"])
        per_seq = np.asarray(res.num_generated) - 1
        res.stats.update(cycles=steps, seq_cycles=per_seq, drafted=0 * per_seq,
                         accepted=0 * per_seq, acceptance_rate=0.0, tokens_per_cycle=1.0,
                         committed_tokens_per_cycle=1.0, plain_decoding=True,
                         gamma_cycles=[steps] + [0] * call.max_gamma)
    out_tokens, counts = np.asarray(res.tokens), np.asarray(res.num_generated)
    wall = time.perf_counter() - t0
    new = int(counts.sum())
    lens = call.prompt_lens
    stats = {"mode": call.mode, "batch": len(lens), "prompt_tokens": int(lens.sum()),
             "new_tokens": new, "new_tokens_per_sequence": counts.tolist(), "wall_s": wall,
             "tokens_per_s": new / wall if wall > 0 else float("nan"), "cache_len": call.cache_len,
             "prefill_chunk": call.prefill_chunk}
    if call.speculative:
        stats["draft_window"] = list(call.draft_window) if call.draft_window else None
    stats.update({k: np.asarray(v).tolist() for k, v in res.stats.items()})
    token_lists = _to_lists(out_tokens, counts)
    text = None
    if model.tokenizer is not None:
        text = [model.tokenizer.decode(t, skip_special_tokens=True) for t in token_lists]
    return GenerateOutput(token_lists, text, stats)
