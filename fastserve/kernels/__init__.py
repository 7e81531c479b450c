"""fastserve's own CPU kernels, called from JAX as XLA FFI custom calls (C++ sources in csrc/).

- `int8_matmul`: x @ dequantize(int8 weights, per-channel or per-group scales), used by weight-only int8 layers
  (fastserve.models.compressed.QuantizedLinear). XLA:CPU materializes the dequantized kernel at every step, so
  int8 decoded slower than float32; the kernel streams the int8 codes once.
- `int8_matmul_nt`: x @ (int8 W [N, K] × per-row scales)ᵀ, the tied LM head of an int8 embedding table
  (fastserve.models.compressed.QuantizedEmbed).
  Both take `activations="int8"`: x quantized per block of 32 and multiplied in integers (W8A8; AVX-512 VNNI where
  the CPU has it, csrc/int8_q8*.cc), as llama.cpp's Q8_0 dot product.
- `attention` (fastserve.kernels.attention): softmax attention fused per (batch, KV head), forward and backward,
  each query over its own window of keys — bidirectional over padded keys for encoders, causal within packed
  documents for decoder training (`model.attention: auto | fused` on CPU).

The library builds on first use (fastserve.kernels.build: why, where, and the fallback when no compiler is
present). `python -m fastserve.kernels build` builds it ahead of time and prints where it is.
"""
from fastserve.kernels.build import KernelBuildError, load, status
from fastserve.kernels.int8 import (dequantize, int8_matmul, int8_matmul_kernel, int8_matmul_nt, int8_matmul_nt_kernel,
                                     int8_matmul_nt_q8_kernel, int8_matmul_q8_kernel, int8_matmul_xla)

__all__ = ["KernelBuildError", "dequantize", "int8_matmul", "int8_matmul_kernel", "int8_matmul_nt",
           "int8_matmul_nt_kernel", "int8_matmul_nt_q8_kernel", "int8_matmul_q8_kernel", "int8_matmul_xla", "load",
           "status"]
