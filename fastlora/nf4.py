"""NF4 weights as bitsandbytes stores them: quantize, dequantize, and zero-copy views.

Contract (bit-exact with bitsandbytes 0.50, see shared/reference/nf4.md):

* ``packed``: uint8, ``(ceil(n/2), 1)``; element 2i of the flattened row-major
  ``[out, in]`` weight is the HIGH nibble of byte i. Blocks are runs of ``blocksize``
  elements of that flat array (a block may span two rows).
* ``absmax``: float32 ``(ceil(n/bs),)``, or uint8 when double-quantized ("nested"):
  then ``absmax_f32[i] = state2_code[absmax[i]] * state2_absmax[i // 256] + offset``,
  computed as two separately rounded fp32 operations (no FMA), as bitsandbytes does.
* dequantized value: ``cast_T(fp32(code[nib]) * fp32(absmax_f32[block]))`` with a
  round-to-nearest-even cast.

Every backend (REFERENCE, CPP, TRITON, CUDA) produces the same bits. The pure-torch
functions here are the spec and the test oracle; the backends are dispatched through
``fastlora.backend.select`` inside ``torch.library`` custom ops (with fake kernels), so
``torch.compile`` sees one opaque op. bitsandbytes is imported lazily, only by
``to_bnb`` (``from_bnb`` reads attributes and never imports it).

What "bit-exact" means where bitsandbytes disagrees with itself (0.50.2, measured):
* Double quantization: bitsandbytes' CPU kernel rounds the statistics to the 8-bit
  dynamic map with an approximate search (thresholds off the midpoints), and its CUDA
  kernel (per its source; not run here) with midpoint rounding, so the devices differ. We
  follow the CPU kernel on every device (``_STATS8_THRESHOLD_BITS``): that is what the
  test oracle runs. The offset is torch's ``absmax.mean()`` on the weight's device, as in
  bitsandbytes.
* bitsandbytes' AVX-512 CPU ``dequantize_4bit`` returns wrong values when blocks do not
  tile the rows (``in_features % blocksize != 0`` with even ``in_features``, blocksize <
  2048); its default (pure torch) kernel, and ours, follow the format.
"""
from __future__ import annotations

import functools
import math
import sys
from typing import Optional

import torch

from . import _ext
from .backend import Backend, select

__all__ = ["NF4Weight", "quantize_nf4", "NF4_CODE", "VALID_BLOCKSIZES"]

# The 16 NF4 code values, float32 (repr of each float32 value, so exact). Index = nibble.
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
STATE2_BLOCKSIZE = 256  # bitsandbytes' fixed blocksize for the double-quant statistics
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DEVICES = ("cpu", "cuda")


# ----------------------------------------------------------------------------------------
# Code tables
# ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _nf4_code(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=None)
def _nf4_midpoints(device: torch.device) -> torch.Tensor:
    # fp32 midpoints between neighbouring codes: the quantization thresholds.
    c = _nf4_code(device)
    return (c[:-1] + c[1:]) / 2


@functools.lru_cache(maxsize=None)
def _dynamic_code_cpu() -> torch.Tensor:
    # bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True,
    # max_exponent_bits=7, total_bits=8)): for exponent e = 0..6 the 2**e midpoints of a
    # float32 linspace(0.1, 1, 2**e + 1), scaled by 10**(e-6), with both signs; plus 0
    # and 1.0; sorted. The float32 arithmetic is what makes it bit-exact.
    values = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scaled = (10 ** (e - 6)) * mids
        values += scaled.tolist() + (-scaled).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_code(device="cpu") -> torch.Tensor:
    """The 256-entry float32 code of the double-quant statistics (a fresh tensor)."""
    return _dynamic_code_cpu().to(device, copy=True)


# ----------------------------------------------------------------------------------------
# Pure-torch reference (the spec)
# ----------------------------------------------------------------------------------------
def _reference_decode_absmax(absmax, state2_absmax, state2_code, offset, state2_blocksize):
    """float32 (nblocks,) statistics. Nested: code2[q] * absmax2[i // 256], then + offset,
    as two separately rounded fp32 ops (bitsandbytes adds the offset in a separate op)."""
    if state2_absmax is None:
        return absmax.float()
    nb = absmax.numel()
    scale = state2_absmax.repeat_interleave(state2_blocksize)[:nb]
    out = state2_code[absmax.long()] * scale
    return out + offset


def _reference_dequantize(packed, absmax_f32, code, blocksize, shape, dtype):
    n = math.prod(shape)
    flat = packed.reshape(-1)
    nib = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:n]  # (n,) high first
    vals = code[nib.long()]
    scale = absmax_f32.repeat_interleave(blocksize)[:n]
    return (vals * scale).to(dtype).reshape(shape)


def _reference_quantize(weight: torch.Tensor, blocksize: int):
    """(packed uint8 (ceil(n/2), 1), absmax float32 (ceil(n/bs),)), bit-exact with
    bitsandbytes' quantize_4bit. Full blocks multiply by the fp32 reciprocal of the
    absmax (clamped to 1e-38); a trailing partial block divides by its clamped absmax,
    and stores the CLAMPED value, exactly as bitsandbytes 0.50 does."""
    x = weight.reshape(-1).float()
    n = x.numel()
    full = n - n % blocksize
    blocks = x[:full].reshape(-1, blocksize)  # (nb_full, bs)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1).reshape(-1)
    if full < n:
        tail_max = x[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.reshape(1)])
        scaled = torch.cat([scaled, (x[full:] / tail_max).clamp(-1, 1)])
    # A value exactly on a midpoint goes to the lower code (x > mid moves up).
    q = torch.bucketize(scaled, _nf4_midpoints(x.device), right=False).to(torch.uint8)
    if n % 2:  # bitsandbytes pads the scaled values with 0.0, which is code 7
        q = torch.cat([q, q.new_full((1,), 7)])
    packed = ((q[0::2] << 4) | q[1::2]).unsqueeze(1)
    return packed, absmax


# Thresholds of bitsandbytes 0.50's CPU blockwise 8-bit quantizer for the dynamic map
# (float32 bit patterns): v gets index #{k : v >= T[k]}. They are NOT the midpoints of
# the code: bitsandbytes' CPU search is approximate (up to ~1% of a code gap off the
# midpoint, and the 8 codes nearest 0 are unreachable). Measured by bisecting its CPU
# kernel over float32 bit patterns with absmax 1, then checked on random data; the
# double-quant statistics are bit-exact with bitsandbytes only with these.
_STATS8_THRESHOLD_BITS = (
    0xbf7c66fc, 0xbf78ccf8, 0xbf7532f5, 0xbf7198f1, 0xbf6e00ee, 0xbf6a66ea, 0xbf66cce6, 0xbf6332e3,
    0xbf5f98df, 0xbf5c00dc, 0xbf5866d8, 0xbf54ccd4, 0xbf5132d1, 0xbf4d98cd, 0xbf4a00ca, 0xbf4666c6,
    0xbf42ccc2, 0xbf3f32bf, 0xbf3b98bb, 0xbf3800b8, 0xbf3466b4, 0xbf30ccb1, 0xbf2d32ad, 0xbf2998a9,
    0xbf2600a6, 0xbf2266a2, 0xbf1ecc9f, 0xbf1b329b, 0xbf179a97, 0xbf140094, 0xbf106690, 0xbf0ccc8d,
    0xbf093289, 0xbf059a85, 0xbf020082, 0xbefcccfd, 0xbef598f6, 0xbeee64ee, 0xbee734e9, 0xbee000e1,
    0xbed8ccd9, 0xbed198d2, 0xbeca64ca, 0xbec334c5, 0xbebc00bd, 0xbeb4ccb5, 0xbead98ae, 0xbea664a6,
    0xbe9f34a1, 0xbe980099, 0xbe90cc91, 0xbe89988a, 0xbe826482, 0xbe7668fa, 0xbe6800ea, 0xbe5998da,
    0xbe4b30cd, 0xbe3cd0bd, 0xbe2e68b2, 0xbe2000a2, 0xbe119892, 0xbe033085, 0xbde9a0eb, 0xbdd290d4,
    0xbdc710cb, 0xbdc140c4, 0xbdbb80bb, 0xbdb5c0bb, 0xbdb000b4, 0xbdaa40ab, 0xbda480ab, 0xbd9eb0a4,
    0xbd98f09b, 0xbd933094, 0xbd8d7094, 0xbd87b08b, 0xbd81f084, 0xbd786108, 0xbd6cc0f7, 0xbd6140e8,
    0xbd55c0d7, 0xbd4a40d7, 0xbd3ec0c8, 0xbd3340b7, 0xbd27a0a8, 0xbd1c20a8, 0xbd10a097, 0xbd052088,
    0xbcf34110, 0xbcdc40ef, 0xbcc500d0, 0xbcae00af, 0xbc9700af, 0xbc800090, 0xbc5200df, 0xbc2d00df,
    0xbc1a80a0, 0xbc1180a0, 0xbc0800a0, 0xbbfe0140, 0xbbec0140, 0xbbd90140, 0xbbc70140, 0xbbb400bf,
    0xbba200bf, 0xbb8f00bf, 0xbb7a017f, 0xbb54017f, 0xbb30017f, 0xbb0c017f, 0xbacc0100, 0xba900100,
    0xba680200, 0xba480200, 0xba300200, 0xba100200, 0xb9e00400, 0xb9b00400, 0xb9600800, 0xb9000800,
    0xb8c01000, 0xb8801000, 0xb8002000, 0xb3000000, 0xb3000000, 0xb3000000, 0xb3000000, 0xb3000000,
    0xb3000000, 0xb3000000, 0xb3000000, 0x37ff8000, 0x387fc000, 0x38bfe000, 0x38ffe000, 0x395ff000,
    0x39aff800, 0x39dff800, 0x3a0ffc00, 0x3a2ffc00, 0x3a47fc00, 0x3a67fc00, 0x3a8ffe00, 0x3acbfe00,
    0x3b0bff00, 0x3b2fff00, 0x3b53ff00, 0x3b79ff00, 0x3b8f0081, 0x3ba20081, 0x3bb40081, 0x3bc70081,
    0x3bd90081, 0x3bec0081, 0x3bfe0081, 0x3c080041, 0x3c118041, 0x3c1a8041, 0x3c2d0041, 0x3c5200c0,
    0x3c800060, 0x3c970060, 0x3cae00a1, 0x3cc500a1, 0x3cdc40a1, 0x3cf340e0, 0x3d052070, 0x3d10a091,
    0x3d1c2091, 0x3d27a091, 0x3d3340b0, 0x3d3ec0b0, 0x3d4a40b0, 0x3d55c0d1, 0x3d6140d1, 0x3d6cc0d1,
    0x3d7860f0, 0x3d81f078, 0x3d87b078, 0x3d8d7089, 0x3d933089, 0x3d98f098, 0x3d9eb098, 0x3da48098,
    0x3daa40a9, 0x3db000a9, 0x3db5c0a9, 0x3dbb80b8, 0x3dc140b8, 0x3dc710b8, 0x3dd290c9, 0x3de9a0e9,
    0x3e03307c, 0x3e11988c, 0x3e20009c, 0x3e2e68ac, 0x3e3cd0bc, 0x3e4b30c5, 0x3e5998d5, 0x3e6800e5,
    0x3e7668f5, 0x3e826483, 0x3e899886, 0x3e90cc8e, 0x3e980096, 0x3e9f349e, 0x3ea664a6, 0x3ead98ab,
    0x3eb4ccb3, 0x3ebc00bb, 0x3ec334c3, 0x3eca64cb, 0x3ed198ce, 0x3ed8ccd6, 0x3ee000de, 0x3ee734e6,
    0x3eee64ee, 0x3ef598f3, 0x3efcccfb, 0x3f020082, 0x3f059a86, 0x3f09328a, 0x3f0ccc8b, 0x3f10668f,
    0x3f140093, 0x3f179a97, 0x3f1b329b, 0x3f1ecc9e, 0x3f2266a2, 0x3f2600a6, 0x3f2998aa, 0x3f2d32ae,
    0x3f30ccaf, 0x3f3466b3, 0x3f3800b7, 0x3f3b98bb, 0x3f3f32bf, 0x3f42ccc2, 0x3f4666c6, 0x3f4a00ca,
    0x3f4d98ce, 0x3f5132d2, 0x3f54ccd3, 0x3f5866d7, 0x3f5c00db, 0x3f5f98df, 0x3f6332e3, 0x3f66cce6,
    0x3f6a66ea, 0x3f6e00ee, 0x3f7198f2, 0x3f7532f6, 0x3f78ccf7, 0x3f7c66fb, 0x3f7f18ff,
)


@functools.lru_cache(maxsize=None)
def _stats8_thresholds(device: torch.device) -> torch.Tensor:
    bits = torch.tensor(_STATS8_THRESHOLD_BITS, dtype=torch.int64).to(torch.int32)
    return bits.view(torch.float32).to(device)


def _reference_quantize_stats8(x: torch.Tensor, blocksize: int):
    """Blockwise 8-bit quantize of float32 ``x`` with the dynamic map, as bitsandbytes'
    CPU kernel does it: absmax per block; v = x * (1/absmax) (fp32 reciprocal, then a
    multiply); index = #{k : v >= T[k]}. A block whose absmax is 0 gives 0 * inf = NaN,
    which is below every threshold: index 0 (it dequantizes to 0 * 0 = 0)."""
    x = x.reshape(-1).float()
    n = x.numel()
    nb = -(-n // blocksize)
    padded = torch.nn.functional.pad(x, (0, nb * blocksize - n)).reshape(nb, blocksize)
    absmax = padded.abs().amax(dim=1)
    v = (padded * (1.0 / absmax).unsqueeze(1)).reshape(-1)[:n]
    idx = torch.bucketize(v, _stats8_thresholds(x.device), right=True)
    idx = torch.where(torch.isnan(v), torch.zeros_like(idx), idx)
    return idx.to(torch.uint8), absmax


# ----------------------------------------------------------------------------------------
# Backend implementations (imported lazily) and the torch.library ops
# ----------------------------------------------------------------------------------------
def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _dequantize_into(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    state2_absmax: Optional[torch.Tensor],
    state2_code: Optional[torch.Tensor],
    offset: Optional[torch.Tensor],
    blocksize: int,
    shape: list[int],
    dtype: torch.dtype,
    backend: str,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    # ``out`` (eager calls only; the registered op always allocates) is a checked,
    # contiguous buffer of ``shape`` and ``dtype`` to write into.
    b = Backend(backend)
    n = math.prod(shape)
    if b is Backend.REFERENCE:
        a = _reference_decode_absmax(absmax, state2_absmax, state2_code, offset, STATE2_BLOCKSIZE)
        ref = _reference_dequantize(packed, a, code, blocksize, shape, dtype)
        return ref if out is None else out.copy_(ref)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=packed.device)
    if n == 0:
        return out
    if b is Backend.TRITON:
        from .kernels.nf4_triton import nf4_dequantize_triton

        nf4_dequantize_triton(packed, absmax, code, state2_absmax, state2_code, offset, blocksize, out)
        return out
    nested = state2_absmax is not None
    if b is Backend.CPP:
        _ext.require("NF4 dequantize (cpp)").nf4_dequantize_cpu(
            _ptr(packed), _ptr(absmax), _ptr(code), _ptr(state2_absmax), _ptr(state2_code),
            float(offset) if nested else 0.0, nested, n, blocksize, STATE2_BLOCKSIZE,
            _ptr(out), _DTYPE_CODE[dtype],
        )  # fmt: skip
        return out
    if b is Backend.CUDA:
        ext = _ext.require("NF4 dequantize (cuda)", cuda=True)
        with torch.cuda.device(packed.device):
            stream = torch.cuda.current_stream().cuda_stream
            ext.nf4_dequantize_cuda(
                _ptr(packed), _ptr(absmax), _ptr(code), _ptr(state2_absmax), _ptr(state2_code),
                _ptr(offset), nested, n, blocksize, STATE2_BLOCKSIZE, _ptr(out), _DTYPE_CODE[dtype],
                stream,
            )  # fmt: skip
        return out
    raise ValueError(f"nf4_dequantize: unknown backend {backend!r}")


def _nf4_dequantize_impl(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    state2_absmax: Optional[torch.Tensor],
    state2_code: Optional[torch.Tensor],
    offset: Optional[torch.Tensor],
    blocksize: int,
    shape: list[int],
    dtype: torch.dtype,
    backend: str,
) -> torch.Tensor:
    return _dequantize_into(
        packed, absmax, code, state2_absmax, state2_code, offset, blocksize, shape, dtype, backend
    )  # fmt: skip


_nf4_dequantize_op = torch.library.custom_op("fastlora::nf4_dequantize", _nf4_dequantize_impl, mutates_args=())


def _eager(t: torch.Tensor) -> bool:
    # Eager calls on plain tensors run the implementation directly: the custom op's Python
    # dispatch costs ~50 us a call (more than dequantizing a small weight, and patched
    # layers dequantize on every forward) and its first call imports torch._dynamo (~1 s).
    # torch.compile, fake tensors and tensor subclasses go through the registered op (and
    # its fake kernel).
    return type(t) is torch.Tensor and not torch.compiler.is_compiling()


@_nf4_dequantize_op.register_fake
def _(packed, absmax, code, state2_absmax, state2_code, offset, blocksize, shape, dtype, backend):
    return packed.new_empty(shape, dtype=dtype)


def _nf4_quantize_impl(weight: torch.Tensor, blocksize: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    b = Backend(backend)
    if b is Backend.REFERENCE:
        return _reference_quantize(weight, blocksize)
    n = weight.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=weight.device)
    absmax = torch.empty((-(-n // blocksize),), dtype=torch.float32, device=weight.device)
    if b is Backend.TRITON:
        from .kernels.nf4_triton import nf4_quantize_triton

        nf4_quantize_triton(weight, blocksize, _nf4_midpoints(weight.device), packed, absmax)
        return packed, absmax
    if b is Backend.CPP:
        _ext.require("NF4 quantize (cpp)").nf4_quantize_cpu(
            _ptr(weight), _DTYPE_CODE[weight.dtype], n, blocksize, _ptr(packed), _ptr(absmax)
        )
        return packed, absmax
    raise ValueError(f"nf4_quantize: unknown backend {backend!r}")


_nf4_quantize_op = torch.library.custom_op("fastlora::nf4_quantize", _nf4_quantize_impl, mutates_args=())


@_nf4_quantize_op.register_fake
def _(weight, blocksize, backend):
    n = weight.numel()
    return (
        weight.new_empty(((n + 1) // 2, 1), dtype=torch.uint8),
        weight.new_empty((-(-n // blocksize),), dtype=torch.float32),
    )


def _quantize_stats8_impl(x: torch.Tensor, blocksize: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    b = Backend(backend)
    if b is Backend.REFERENCE:
        return _reference_quantize_stats8(x, blocksize)
    n = x.numel()
    q = torch.empty((n,), dtype=torch.uint8, device=x.device)
    absmax = torch.empty((-(-n // blocksize),), dtype=torch.float32, device=x.device)
    if b is Backend.TRITON:
        from .kernels.nf4_triton import nf4_quantize_stats_triton

        nf4_quantize_stats_triton(x, _stats8_thresholds(x.device), blocksize, q, absmax)
        return q, absmax
    if b is Backend.CPP:
        _ext.require("NF4 double-quant statistics (cpp)").nf4_quantize_stats_cpu(
            _ptr(x), n, blocksize, _ptr(q), _ptr(absmax)
        )
        return q, absmax
    raise ValueError(f"nf4_quantize_stats: unknown backend {backend!r}")


_quantize_stats8_op = torch.library.custom_op("fastlora::nf4_quantize_stats", _quantize_stats8_impl, mutates_args=())


@_quantize_stats8_op.register_fake
def _(x, blocksize, backend):
    n = x.numel()
    return x.new_empty((n,), dtype=torch.uint8), x.new_empty((-(-n // blocksize),), dtype=torch.float32)


def _cuda_kernel_built() -> bool:
    ext = _ext.load()
    return ext is not None and hasattr(ext, "nf4_dequantize_cuda")


def _select(op: str, device: torch.device, backend, cuda_kernels=(Backend.CUDA, Backend.TRITON)) -> Backend:
    if torch.compiler.is_compiling():
        forced = Backend.parse(backend) if backend is not None else None
        kernels = tuple(b.value for b in cuda_kernels)
        args = (op, str(device), None if forced is None else forced.value, kernels)
        if getattr(_select_traced, "_fastlora_constant", False):
            # Decided once, at trace time, and baked into the graph as a constant.
            return Backend(_select_traced(*args))
        # Not marked yet (see _mark_select_constant): dynamo breaks the graph here.
        return _select_eager(op, device, backend, cuda_kernels)
    _mark_select_constant()
    return _select_eager(op, device, backend, cuda_kernels)


def _select_traced(op: str, device: str, backend, cuda_kernels) -> str:
    return _select_eager(op, torch.device(device), backend, tuple(Backend(b) for b in cuda_kernels)).value


def _mark_select_constant() -> None:
    # torch.compiler.assume_constant_result imports torch._dynamo (about a second), so we
    # mark _select_traced only once dynamo is loaded anyway (torch.compile loads it), from
    # an eager call. A trace before any eager NF4 call breaks the graph at the backend
    # choice instead of failing.
    if not getattr(_select_traced, "_fastlora_constant", False) and "torch._dynamo" in sys.modules:
        torch.compiler.assume_constant_result(_select_traced)
        _select_traced._fastlora_constant = True


def _select_eager(op: str, device: torch.device, backend, cuda_kernels) -> Backend:
    if device.type == "cuda":
        # An extension built with CUDA but without this file's kernel cannot run CUDA.
        supported = [b for b in cuda_kernels if b is not Backend.CUDA or _cuda_kernel_built()]
    elif device.type == "cpu":
        # AUTO on CPU picks CPP; TRITON on CPU tensors only runs under Triton's
        # interpreter (the tests), so it is available only when asked for.
        supported = [Backend.CPP, Backend.TRITON]
    else:
        supported = []
    return select(op, device, supported, backend)


def _check_device(device: torch.device, what: str) -> None:
    if device.type not in _DEVICES:
        raise ValueError(f"{what}: tensors on {device} are not supported (only {', '.join(_DEVICES)})")


# ----------------------------------------------------------------------------------------
# NF4Weight
# ----------------------------------------------------------------------------------------
class NF4Weight:
    """A bitsandbytes NF4 weight, read as it is stored (no copy).

    A plain object holding tensors, not a tensor subclass. Decoded statistics are never
    cached on it: PEFT's merge and ``Params4bit`` moves replace the underlying tensors,
    and ``fastlora.patch`` rebuilds this view on every forward.
    """

    __slots__ = (
        "packed", "absmax", "code", "shape", "dtype", "blocksize", "nested", "offset",
        "state2_absmax", "state2_code", "state2_blocksize", "_lora_storage",
    )  # fmt: skip

    def __init__(
        self,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        shape,
        dtype: torch.dtype,
        blocksize: int = 64,
        code: Optional[torch.Tensor] = None,
        offset: Optional[torch.Tensor] = None,
        state2_absmax: Optional[torch.Tensor] = None,
        state2_code: Optional[torch.Tensor] = None,
        state2_blocksize: int = STATE2_BLOCKSIZE,
    ):
        shape = torch.Size(shape)
        if len(shape) != 2:
            raise ValueError(f"NF4Weight: shape must be [out_features, in_features], got {tuple(shape)}")
        if blocksize not in VALID_BLOCKSIZES:
            raise ValueError(f"NF4Weight: blocksize {blocksize} is not one of {VALID_BLOCKSIZES}")
        if dtype not in _FLOAT_DTYPES:
            raise TypeError(f"NF4Weight: dtype {dtype} is not one of {_FLOAT_DTYPES}")
        if packed.dtype != torch.uint8:
            if not packed.is_contiguous():
                raise ValueError(f"NF4Weight: packed storage of dtype {packed.dtype} must be contiguous")
            packed = packed.view(torch.uint8).reshape(-1, 1)
        n = shape.numel()
        if packed.numel() < (n + 1) // 2:
            raise ValueError(
                f"NF4Weight: packed data holds {packed.numel()} bytes but shape {tuple(shape)} "
                f"needs {(n + 1) // 2}"
            )
        nblocks = -(-n // blocksize)
        if absmax.numel() != nblocks:
            raise ValueError(
                f"NF4Weight: absmax has {absmax.numel()} entries but shape {tuple(shape)} with "
                f"blocksize {blocksize} has {nblocks} blocks"
            )
        nested = state2_absmax is not None
        if nested:
            if absmax.dtype != torch.uint8:
                raise TypeError(f"NF4Weight: nested absmax must be uint8, got {absmax.dtype}")
            if state2_code is None or offset is None:
                raise ValueError("NF4Weight: nested statistics need state2_code and offset")
            if state2_blocksize != STATE2_BLOCKSIZE:
                raise ValueError(f"NF4Weight: state2 blocksize must be {STATE2_BLOCKSIZE}, got {state2_blocksize}")
            if state2_absmax.numel() != -(-nblocks // state2_blocksize):
                raise ValueError(
                    f"NF4Weight: state2 absmax has {state2_absmax.numel()} entries, expected "
                    f"{-(-nblocks // state2_blocksize)} for {nblocks} blocks"
                )
            if state2_code.numel() != 256:
                raise ValueError(f"NF4Weight: state2 code must have 256 entries, got {state2_code.numel()}")
        elif absmax.dtype != torch.float32:
            raise TypeError(f"NF4Weight: absmax must be float32 (or uint8 when nested), got {absmax.dtype}")
        code = _nf4_code(packed.device) if code is None else code
        if code.dtype != torch.float32 or code.numel() != 16:
            raise ValueError(f"NF4Weight: code must be 16 float32 values, got {code.numel()} of {code.dtype}")
        # The kernels read raw pointers: every tensor must live with the packed bytes, in the
        # dtypes above (checked here, once, so no kernel sees a mismatched input).
        extra = (
            ("absmax", absmax), ("code", code), ("offset", offset), ("state2_absmax", state2_absmax),
            ("state2_code", state2_code),
        )  # fmt: skip
        for name, t in extra:
            if t is not None and t.device != packed.device:
                raise ValueError(f"NF4Weight: {name} is on {t.device} but the packed data is on {packed.device}")
        if nested and (offset.numel() != 1 or offset.dtype != torch.float32 or state2_absmax.dtype != torch.float32
                       or state2_code.dtype != torch.float32):  # fmt: skip
            raise TypeError(
                "NF4Weight: nested statistics need a float32 scalar offset and float32 state2 absmax/code, got "
                f"{offset.dtype} offset of {offset.numel()} values, {state2_absmax.dtype}, {state2_code.dtype}"
            )
        self.packed = packed
        self.absmax = absmax
        self.code = code
        self.shape = shape
        self.dtype = dtype
        self.blocksize = int(blocksize)
        self.nested = nested
        self.offset = offset
        self.state2_absmax = state2_absmax
        self.state2_code = state2_code
        self.state2_blocksize = int(state2_blocksize)
        self._lora_storage = None  # lora_linear's checked view of these tensors, built once

    # -- properties -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    def __repr__(self) -> str:
        dq = f", nested (offset={float(self.offset):.6g})" if self.nested else ""
        return (
            f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}"
            f"{dq}, device={self.device})"
        )

    # -- statistics and values ----------------------------------------------------------------
    def absmax_f32(self) -> torch.Tensor:
        """float32 (nblocks,) block scales, bit-exact with bitsandbytes' decode."""
        if not self.nested:
            return self.absmax
        return _reference_decode_absmax(
            self.absmax, self.state2_absmax, self.state2_code, self.offset, self.state2_blocksize
        )

    def dequantize(
        self, dtype: Optional[torch.dtype] = None, *, out: Optional[torch.Tensor] = None, backend=None
    ) -> torch.Tensor:
        """The weight as a dense ``[out_features, in_features]`` tensor in ``dtype``
        (default: the original dtype, or ``out.dtype``). Bit-exact with
        ``bitsandbytes.functional.dequantize_4bit``.

        ``out``: an optional contiguous ``[out_features, in_features]`` buffer on the
        weight's device to write into and return. Reusing one saves the allocation, which on
        CPU (fresh pages) costs far more than the dequantize itself for large weights.
        """
        if out is not None:
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"NF4Weight.dequantize: out must be a tensor, got {type(out).__name__}")
            if dtype is not None and dtype != out.dtype:
                raise TypeError(f"NF4Weight.dequantize: dtype {dtype} does not match out.dtype {out.dtype}")
            if out.shape != self.shape or out.device != self.device or not out.is_contiguous():
                raise ValueError(
                    f"NF4Weight.dequantize: out must be a contiguous tensor of shape {tuple(self.shape)} on "
                    f"{self.device}, got shape {tuple(out.shape)} on {out.device}"
                    f"{'' if out.is_contiguous() else ' (not contiguous)'}"
                )
            dtype = out.dtype
        dtype = self.dtype if dtype is None else dtype
        if dtype not in _FLOAT_DTYPES:
            raise TypeError(f"NF4Weight.dequantize: dtype {dtype} is not one of {_FLOAT_DTYPES}")
        _check_device(self.device, "NF4Weight.dequantize")
        b = _select("nf4_dequantize", self.device, backend)
        def c(t):  # the kernels index raw memory: contiguous views (no copy when they are)
            return None if t is None else t.contiguous()

        packed = c(self.packed)
        args = (
            packed, c(self.absmax), c(self.code), c(self.state2_absmax), c(self.state2_code), c(self.offset),
            self.blocksize, list(self.shape), dtype, b.value,
        )  # fmt: skip
        if _eager(packed):
            return _dequantize_into(*args, out=out)
        result = _nf4_dequantize_op(*args)
        return result if out is None else out.copy_(result)

    # -- conversions ----------------------------------------------------------------------------
    @classmethod
    def from_bnb(cls, param_or_pair) -> "NF4Weight":
        """A view of a bitsandbytes NF4 weight: a ``bitsandbytes.nn.Params4bit`` (its
        ``quant_state``) or a ``(packed, QuantState)`` pair. No copy, no kernel launch."""
        if isinstance(param_or_pair, (tuple, list)):
            if len(param_or_pair) != 2:
                raise ValueError(f"NF4Weight.from_bnb: expected a (packed, QuantState) pair, got {len(param_or_pair)} items")
            packed, qs = param_or_pair
        else:
            packed, qs = param_or_pair, getattr(param_or_pair, "quant_state", None)
        if not isinstance(packed, torch.Tensor):
            raise TypeError(f"NF4Weight.from_bnb: packed data must be a tensor, got {type(packed).__name__}")
        if qs is None:
            raise ValueError(
                "NF4Weight.from_bnb: the weight has no quant_state; it is not quantized yet "
                "(bitsandbytes quantizes a Params4bit when it is moved to its device)"
            )
        quant_type = getattr(qs, "quant_type", None)
        if quant_type != "nf4":
            raise ValueError(f"NF4Weight.from_bnb: quant_type is {quant_type!r}; fastlora reads only 'nf4' weights")
        if getattr(qs, "packing_format_for_cpu", False):
            raise ValueError(
                "NF4Weight.from_bnb: this weight was repacked in place by bitsandbytes' CPU "
                "inference path (quant_state.packing_format_for_cpu=True): on CPUs with "
                "AVX512-BF16, Linear4bit.forward in eval mode without grad rewrites weight.data "
                "into another layout and converts absmax, so the bytes are no longer NF4 and "
                "training on them diverges. Prevent it by setting "
                "`support_avx512bf16_for_cpu = False` on every bnb Linear4bit before any "
                "eval/no-grad forward (fastlora.patch does this), and reload the model."
            )
        shape = torch.Size(qs.shape)
        if len(shape) != 2:
            raise ValueError(f"NF4Weight.from_bnb: quant_state.shape {tuple(shape)} is not 2-D")
        # A plain tensor view of the bytes; Params4bit's __torch_function__ would make
        # every later call on the parameter itself slow (this runs on every forward).
        data = packed if type(packed) is torch.Tensor else packed.data
        n = shape.numel()
        itemsize = data.element_size()
        expected = (n + 1) // (2 * itemsize) if itemsize > 1 else (n + 1) // 2
        if data.numel() != expected or data.numel() * itemsize < (n + 1) // 2:
            raise ValueError(
                f"NF4Weight.from_bnb: packed data has shape {tuple(data.shape)} ({data.dtype}) "
                f"but quant_state.shape {tuple(shape)} needs {(n + 1) // 2} bytes"
            )
        state2 = getattr(qs, "state2", None) if getattr(qs, "nested", False) else None
        return cls(
            data, qs.absmax, shape, qs.dtype, qs.blocksize, code=qs.code,
            offset=qs.offset if state2 is not None else None,
            state2_absmax=None if state2 is None else state2.absmax,
            state2_code=None if state2 is None else state2.code,
            state2_blocksize=STATE2_BLOCKSIZE if state2 is None else state2.blocksize,
        )  # fmt: skip

    def to_bnb(self):
        """A ``bitsandbytes.nn.Params4bit`` sharing this weight's tensors, with a
        ``QuantState`` that bitsandbytes' ``dequantize_4bit`` and ``Linear4bit`` accept."""
        import bitsandbytes as bnb
        from bitsandbytes.functional import QuantState

        state2 = None
        if self.nested:
            state2 = QuantState(
                absmax=self.state2_absmax, code=self.state2_code,
                blocksize=self.state2_blocksize, dtype=torch.float32,
            )  # fmt: skip
        qs = QuantState(
            absmax=self.absmax, shape=self.shape, code=self.code, blocksize=self.blocksize,
            quant_type="nf4", dtype=self.dtype, offset=self.offset, state2=state2,
        )  # fmt: skip
        return bnb.nn.Params4bit(
            data=self.packed, requires_grad=False, quant_state=qs, blocksize=self.blocksize,
            compress_statistics=self.nested, quant_type="nf4", quant_storage=torch.uint8,
            bnb_quantized=True,
        )  # fmt: skip

    def to(self, device) -> "NF4Weight":
        """A copy on ``device`` (or self when already there)."""
        device = torch.device(device)
        _check_device(device, "NF4Weight.to")

        def mv(t):
            return None if t is None else t.to(device)

        return NF4Weight(
            mv(self.packed), mv(self.absmax), self.shape, self.dtype, self.blocksize,
            code=mv(self.code), offset=mv(self.offset), state2_absmax=mv(self.state2_absmax),
            state2_code=mv(self.state2_code), state2_blocksize=self.state2_blocksize,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------
# quantize_nf4
# ----------------------------------------------------------------------------------------
def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True, *, backend=None) -> NF4Weight:
    """Quantize a 2-D ``[out_features, in_features]`` float weight to NF4.

    Bit-exact with ``bitsandbytes.functional.quantize_4bit(weight, blocksize=blocksize,
    compress_statistics=double_quant, quant_type="nf4")`` on the same device: packed
    bytes, absmax, and (double_quant) the offset, the uint8 statistics and their float32
    absmax. weight: (out, in) fp32/fp16/bf16, finite, on CPU or CUDA.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"quantize_nf4: weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"quantize_nf4: weight dtype {weight.dtype} is not supported; use one of "
            "float32, float16, bfloat16"
        )
    if weight.ndim != 2:
        raise ValueError(f"quantize_nf4: weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if weight.numel() == 0:
        raise ValueError(f"quantize_nf4: weight of shape {tuple(weight.shape)} is empty")
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"quantize_nf4: blocksize {blocksize!r} is not supported; valid: {VALID_BLOCKSIZES}")
    _check_device(weight.device, "quantize_nf4")
    if not bool(torch.isfinite(weight).all()):
        bad = int((~torch.isfinite(weight)).sum())
        raise ValueError(f"quantize_nf4: weight of shape {tuple(weight.shape)} has {bad} non-finite values (inf/nan)")
    weight = weight.detach().contiguous()
    b = _select("nf4_quantize", weight.device, backend, cuda_kernels=(Backend.TRITON,))
    eager = _eager(weight)
    packed, absmax = (_nf4_quantize_impl if eager else _nf4_quantize_op)(weight, blocksize, b.value)
    if not double_quant:
        return NF4Weight(packed, absmax, weight.shape, weight.dtype, blocksize)
    # The mean is torch's, on the weight's device, as in bitsandbytes: its summation order
    # is part of the bit-exact contract.
    offset = absmax.mean()
    q2, absmax2 = (_quantize_stats8_impl if eager else _quantize_stats8_op)(absmax - offset, STATE2_BLOCKSIZE, b.value)
    code2 = dynamic_code(weight.device)
    return NF4Weight(
        packed, q2, weight.shape, weight.dtype, blocksize, offset=offset,
        state2_absmax=absmax2, state2_code=code2,
    )  # fmt: skip
