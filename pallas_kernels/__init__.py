"""Pallas GPU kernels for QSpec's two int4 GEMMs (issue 6).

- w4a16_matmul(x, qweight, scales): verify mode, bf16/f32 activations, f32 accumulation.
- w4a8_matmul(xq, sx, qweight, scales, out_dtype=bf16): draft mode (w4a8 and w4a4), int8 MMA,
  int32 accumulation, scales in the epilogue.
- rmsnorm_quant(x, gain, eps, bits) and row_quant(x, bits, prologue) (pallas_kernels.rmsnorm_quant):
  per-token quantization in one kernel after an RMSNorm, alone, or after the MLP's SwiGLU, one
  program per token; benchmarked against XLA's fusions by experiments/bench_fused.py, used by
  the model's draft modes under kernels="auto" only once they win there.
- supported(M, K, N, group_size) -> (ok, reason): whether the kernels take a shape; the model
  layer falls back to the XLA reference (and logs it) when not.
Weight layout: docs/DESIGN.md (qweight int8 [K//2, N] half-split nibbles, scales f32 [K//G, N]).
Backends, chosen by measurement (experiments/results/kernels_h200.md): Pallas Triton
(jax.experimental.pallas.triton) for w4a8 at every M and for w4a16 at M < 128; w4a16 at
M >= 128 with per-channel scales dequantizes exactly and calls XLA's GEMM (backend="xla").
Both kernels run in interpret mode on CPU for tests (interpret=True).
"""
from pallas_kernels._common import TileConfig, supported
from pallas_kernels.w4a16_matmul import w4a16_matmul, w4a16_matmul_reference
from pallas_kernels.w4a8_matmul import (w4a8_matmul, w4a8_matmul_reference,
                                        quantize_per_token_reference)

__all__ = ["TileConfig", "supported", "w4a16_matmul", "w4a16_matmul_reference", "w4a8_matmul",
           "w4a8_matmul_reference", "quantize_per_token_reference"]
