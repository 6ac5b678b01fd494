"""CUDA path of linear cross-entropy and token log-probs: chunked cuBLAS GEMMs around
the Triton row kernel of ``cross_entropy_triton.py``.

The chunk loop itself (``chunk_loop`` in ``fastlora/ops/linear_cross_entropy.py``) is
shared with the CPU path; this module holds what is specific to CUDA: the chunk size
and the fp32-accumulating weight-gradient GEMM.

Why this design, for N=16384, H=4096, V=128256 on an H100 (target: <= 1.0x eager time,
<= 0.2x eager memory):

- FLOPs. Eager (``F.linear`` + ``F.cross_entropy``) runs three GEMMs of 2*N*H*V = 17.2
  TFLOP each (logits, dhidden, dweight) and about six passes over an fp32 [N, V]
  buffer (upcast, log_softmax, nll, and their backward): ~50 GB of traffic, ~15-20 ms
  on top of ~70 ms of GEMMs. We run the same three GEMMs (gradients computed in the
  forward when the loss is reduced to a scalar, backward only rescales) and the row
  kernel reads each bf16 chunk twice and writes it once in place: ~0.8 GB per 1024-row
  chunk, ~5 ms in all. So the time should be at or below eager; a fully fused
  tile kernel in the style of cut-cross-entropy saves the remaining ~5 ms of traffic
  but must beat cuBLAS at its own GEMMs, which is far more code for a few percent.
- Memory. Eager holds bf16 logits (4.2 GB), their fp32 upcast (8.4 GB) and an fp32
  gradient (8.4 GB). We hold one bf16 chunk (default 1024 rows: 0.26 GB), dhidden
  (N x H bf16: 0.13 GB) and, only when lm_head is trainable, an fp32 dweight
  accumulator (2.1 GB). With the usual frozen QLoRA lm_head that is ~2% of eager.
- Chunk size: 1024 rows already gives cuBLAS full-size tiles (M=1024, N=128256,
  K=4096), and more rows only add memory.

Unmeasured here (no GPU in this session): the timings and peak memory above are
estimates; the GPU tests in tests/test_linear_cross_entropy.py check the memory bound.
"""
from __future__ import annotations

import torch

from .. import _ext

# Elements of one (rows, V) logits chunk: 2**27 bf16 = 256 MB.
CHUNK_ELEMS = 1 << 27


def default_chunk_rows(vocab: int) -> int:
    rows = CHUNK_ELEMS // max(vocab, 1)
    return max(128, rows // 128 * 128)  # whole 128-row GEMM tiles


def acc_mm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b for bf16/fp16 a, b without a (V, H) low-precision temporary:
    cuBLAS accumulates in fp32 and writes fp32 directly (addmm with out_dtype)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    try:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    except (RuntimeError, TypeError) as e:  # older torch: no fp32-output GEMM
        _ext.warn_once(
            "lce:addmm_out_dtype",
            f"fastlora: linear_cross_entropy weight gradient uses a bf16 GEMM + fp32 add ({e})",
        )
        acc.add_(torch.mm(a, b))
