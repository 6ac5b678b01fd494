"""NF4 quantize / dequantize: every backend bit-exact with bitsandbytes (its CPU backend
is the oracle), the NF4Weight views of bitsandbytes' own weights, and bad input."""
from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch

from fastlora import _ext
from fastlora.backend import Backend
from fastlora.nf4 import NF4_CODE, VALID_BLOCKSIZES, NF4Weight, dynamic_code, quantize_nf4
from tests.helpers import has_module, requires_bnb, requires_triton

HAS_CUDA = torch.cuda.is_available()
# Triton runs on the GPU when there is one, else in its interpreter on CPU tensors
# (tests/conftest.py selects the interpreter only when no GPU is present).
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (out, in): odd n, n smaller than a block, rows that are not a multiple of any block,
# rows that blocks tile exactly, and more than 256 blocks at blocksizes 32/64 so the nested
# statistics have several blocks (a partial last one: test_quantize_nested_statistics_*).
SHAPES = ((1, 7), (33, 65), (45, 129), (128, 512), (24, 2048))

# Every CPU backend runs on every case. The C++ kernels must be built (`make test` builds
# them): a missing extension fails these tests rather than skipping them.
CPU_BACKENDS = [Backend.REFERENCE, Backend.CPP]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view, so that comparisons are bit-exact (and -0.0 != 0.0, nan == nan)."""
    return t.contiguous().view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
    if torch.equal(_bits(a), _bits(b)):
        return
    diff = (_bits(a) != _bits(b)).nonzero()
    assert diff.numel() == 0, f"{what}: {diff.shape[0]} of {a.numel()} differ, first at {diff[:3].tolist()}"


def make_weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Rows of different scale, so that blocks differ and the nested statistics matter.
    w = torch.randn(shape, generator=g) * (0.1 + 3 * torch.rand(shape[0], 1, generator=g))
    return w.to(dtype)


def bnb_quantize(w, blocksize, double_quant):
    import bitsandbytes.functional as F

    return F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")


def formula_dequantize(packed, absmax_f32, blocksize, shape, dtype):
    """The spec, written independently of fastlora: fp32 code[nib] * fp32 absmax, RNE cast."""
    n = math.prod(shape)
    b = packed.reshape(-1).long()
    nib = torch.empty(2 * b.numel(), dtype=torch.long)
    nib[0::2], nib[1::2] = b >> 4, b & 15
    code = torch.tensor(NF4_CODE, dtype=torch.float32)
    idx = torch.arange(n) // blocksize
    return (code[nib[:n]] * absmax_f32[idx]).to(dtype).reshape(shape)


def assert_matches_bnb(q: NF4Weight, packed, state, double_quant, what=""):
    assert_bits_equal(q.packed, packed, f"{what} packed")
    assert_bits_equal(q.absmax, state.absmax, f"{what} absmax")
    assert q.code.dtype == torch.float32 and torch.equal(q.code, state.code)
    assert q.nested == double_quant
    if double_quant:
        assert_bits_equal(q.offset, state.offset, f"{what} offset")
        assert_bits_equal(q.state2_absmax, state.state2.absmax, f"{what} state2 absmax")
        assert_bits_equal(q.state2_code, state.state2.code, f"{what} state2 code")
        assert q.state2_blocksize == state.state2.blocksize == 256


# ------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------
@requires_bnb
def test_code_tables_match_bnb():
    import bitsandbytes.functional as F

    assert_bits_equal(torch.tensor(NF4_CODE, dtype=torch.float32), F.get_4bit_type("nf4", device="cpu"), "nf4")
    assert_bits_equal(dynamic_code(), F.create_dynamic_map(), "dynamic map")


# ------------------------------------------------------------------------------------------
# quantize: bit-exact with bitsandbytes
# ------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def nf4_case(dtype, blocksize, double_quant, shape):
    """An NF4Weight from fastlora's own CPU quantizer (bit-exact with bitsandbytes, see
    test_quantize_bit_exact_with_bnb): the input of the tests that need no bitsandbytes."""
    w = make_weight(shape, dtype, seed=hash((shape, blocksize)) % 1000)
    return quantize_nf4(w, blocksize, double_quant, backend="cpp")


@functools.lru_cache(maxsize=None)
def bnb_case(dtype, blocksize, double_quant, shape):
    """(weight, bnb packed, bnb QuantState), computed once and shared by every backend."""
    w = make_weight(shape, dtype, seed=hash((shape, blocksize)) % 1000)
    return (w, *bnb_quantize(w, blocksize, double_quant))


@requires_bnb
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", VALID_BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_bit_exact_with_bnb(dtype, blocksize, double_quant):
    for shape, backend in itertools.product(SHAPES, CPU_BACKENDS):
        w, packed, state = bnb_case(dtype, blocksize, double_quant, shape)
        q = quantize_nf4(w, blocksize, double_quant, backend=backend)
        assert_matches_bnb(q, packed, state, double_quant, f"{backend.value} {shape}")
        assert q.shape == torch.Size(shape) and q.dtype == dtype and q.blocksize == blocksize


@requires_bnb
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_quantize_nested_statistics_many_blocks(backend):
    # 3 nested blocks with a partial last one, and statistics spanning orders of magnitude,
    # so the 8-bit dynamic map is exercised far from 1.0 as well as near it.
    w = make_weight((700, 256), torch.bfloat16, seed=7)
    w[::3] *= 1e-3
    packed, state = bnb_quantize(w, 64, True)
    assert_matches_bnb(quantize_nf4(w, 64, True, backend=backend), packed, state, True)


@requires_bnb
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_zero_and_constant_blocks(backend, dtype):
    w = make_weight((8, 200), dtype)
    w[1] = 0  # all-zero blocks: bitsandbytes' CPU path clamps absmax, every nibble is 7
    w[2] = 0.5  # constant blocks: every nibble is 15
    w[7, 192:] = 0  # an all-zero trailing partial block (it stores the clamped absmax)
    for bs, dq in itertools.product((64, 128), (False, True)):
        packed, state = bnb_quantize(w, bs, dq)
        q = quantize_nf4(w, bs, dq, backend=backend)
        assert_matches_bnb(q, packed, state, dq)
        out = q.dequantize(backend=backend)
        assert torch.all(out[1] == 0) and torch.all(out[7, 192:] == 0)
        assert_bits_equal(out, formula_dequantize(q.packed, q.absmax_f32(), bs, q.shape, dtype))


@requires_bnb
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_quantize_all_equal_absmax_nested(backend):
    # Every block has the same absmax, so absmax - mean is all zero and the nested block's
    # absmax is 0 (0 * inf = nan inside bitsandbytes): it must still round-trip.
    w = torch.sign(make_weight((64, 128), torch.float32)).to(torch.bfloat16)
    packed, state = bnb_quantize(w, 64, True)
    q = quantize_nf4(w, 64, True, backend=backend)
    assert_matches_bnb(q, packed, state, True)
    assert_bits_equal(q.dequantize(backend=backend), w, "dequantized signs")


# ------------------------------------------------------------------------------------------
# dequantize: bit-exact with bitsandbytes and with the formula
# ------------------------------------------------------------------------------------------
@requires_bnb
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", (32, 64, 256, 1024, 4096))
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_bit_exact(dtype, blocksize, double_quant):
    import bitsandbytes.functional as F

    for shape in SHAPES:
        w, packed, state = bnb_case(dtype, blocksize, double_quant, shape)
        nf4 = NF4Weight.from_bnb((packed, state))
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset if double_quant else state.absmax
        assert_bits_equal(nf4.absmax_f32(), absmax, "absmax_f32")
        # bitsandbytes 0.50's AVX512 CPU dequantize is wrong when blocks do not tile the
        # rows (in_features % blocksize != 0 with even in_features): compare with it only
        # where its C kernel runs and is right (its other CPU paths run torch.compile, too
        # slow for this suite). The independent formula covers every case.
        bnb_ok = shape[1] % blocksize == 0 and blocksize < 2048
        expected_bnb = F.dequantize_4bit(packed, state) if bnb_ok else None
        for out_dtype in DTYPES:
            expected = formula_dequantize(packed, absmax, blocksize, shape, out_dtype)
            for backend in CPU_BACKENDS:
                what = f"{backend.value} {shape} -> {out_dtype}"
                out = nf4.dequantize(out_dtype, backend=backend)
                assert_bits_equal(out, expected, what)
                if bnb_ok and out_dtype == dtype:
                    assert_bits_equal(out, expected_bnb, what + " vs bnb")
            if out_dtype == dtype:
                assert_bits_equal(nf4.dequantize(backend=Backend.CPP), expected, f"{shape} default dtype")


# ------------------------------------------------------------------------------------------
# NF4Weight and bitsandbytes' own modules
# ------------------------------------------------------------------------------------------
def _linear4bit(in_f=128, out_f=64, dq=True, dtype=torch.bfloat16, seed=0):
    import bitsandbytes as bnb

    torch.manual_seed(seed)
    lin = bnb.nn.Linear4bit(in_f, out_f, bias=True, compute_dtype=dtype, compress_statistics=dq, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(
        make_weight((out_f, in_f), dtype, seed), requires_grad=False, compress_statistics=dq, quant_type="nf4"
    )
    lin = lin.to(dtype).to("cpu")  # Params4bit quantizes on .to(device)
    if not lin.weight.bnb_quantized:
        lin.weight = lin.weight._quantize("cpu")
    return lin


@requires_bnb
@pytest.mark.parametrize("dq", [False, True])
def test_from_bnb_zero_copy(dq):
    lin = _linear4bit(dq=dq)
    lin.support_avx512bf16_for_cpu = False
    w = lin.weight
    nf4 = NF4Weight.from_bnb(w)
    assert nf4.packed.data_ptr() == w.data_ptr()
    assert nf4.absmax.data_ptr() == w.quant_state.absmax.data_ptr()
    assert nf4.shape == torch.Size([64, 128]) and nf4.out_features == 64 and nf4.in_features == 128
    assert nf4.numel == 64 * 128 and nf4.device == torch.device("cpu") and nf4.dtype == torch.bfloat16
    assert nf4.nested == dq and "NF4Weight(shape=(64, 128)" in repr(nf4)
    import bitsandbytes.functional as F

    expected = F.dequantize_4bit(w.data, w.quant_state)
    for backend in CPU_BACKENDS:
        assert_bits_equal(nf4.dequantize(backend=backend), expected, f"{backend.value} dequant")
    # The pair form views the same bytes too.
    assert NF4Weight.from_bnb((w, w.quant_state)).packed.data_ptr() == w.data_ptr()


@requires_bnb
def test_from_bnb_non_uint8_storage():
    import bitsandbytes.functional as F

    w = make_weight((16, 64), torch.bfloat16)
    packed, state = F.quantize_4bit(w, quant_type="nf4", quant_storage=torch.bfloat16)
    nf4 = NF4Weight.from_bnb((packed, state))
    assert nf4.packed.dtype == torch.uint8 and nf4.packed.data_ptr() == packed.data_ptr()
    ref_packed, _ = F.quantize_4bit(w, quant_type="nf4")
    assert_bits_equal(nf4.packed.reshape(-1), ref_packed.reshape(-1))


@requires_bnb
def test_to_bnb_round_trip_in_linear4bit():
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    w = make_weight((40, 128), torch.bfloat16, seed=3)
    q = quantize_nf4(w, 64, True, backend="reference")
    p = q.to_bnb()
    assert isinstance(p, bnb.nn.Params4bit) and p.data_ptr() == q.packed.data_ptr()
    assert_bits_equal(F.dequantize_4bit(p.data, p.quant_state), q.dequantize(backend="reference"))
    lin = bnb.nn.Linear4bit(128, 40, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    lin.weight = p
    lin.support_avx512bf16_for_cpu = False
    lin.train()
    x = torch.randn(5, 128, dtype=torch.bfloat16, requires_grad=True)
    y = lin(x)
    assert_bits_equal(y, torch.nn.functional.linear(x, q.dequantize(backend="reference")), "Linear4bit output")
    back = NF4Weight.from_bnb(p)
    assert back.packed.data_ptr() == q.packed.data_ptr() and back.nested


@requires_bnb
def test_from_bnb_refuses_cpu_repacked_weight():
    lin = _linear4bit()
    lin.eval()
    with torch.no_grad():
        lin(torch.randn(3, 128, dtype=torch.bfloat16))
    qs = lin.weight.quant_state
    if not getattr(qs, "packing_format_for_cpu", False):
        # This CPU has no AVX512-BF16, so bitsandbytes did not repack: set the flag as it would.
        qs.packing_format_for_cpu = True
    with pytest.raises(ValueError, match="repacked in place.*support_avx512bf16_for_cpu = False"):
        NF4Weight.from_bnb(lin.weight)


def test_to_device_and_views():
    q = quantize_nf4(make_weight((8, 64), torch.float16), backend="reference")
    same = q.to("cpu")
    assert_bits_equal(same.dequantize(backend="reference"), q.dequantize(backend="reference"))
    with pytest.raises(ValueError, match="meta"):
        q.to("meta")


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------
def test_quantize_rejects_bad_input():
    w = torch.randn(8, 64)
    with pytest.raises(TypeError, match="int32"):
        quantize_nf4(torch.ones(8, 64, dtype=torch.int32))
    with pytest.raises(TypeError, match="bool"):
        quantize_nf4(torch.ones(8, 64, dtype=torch.bool))
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantize_nf4([[1.0, 2.0]])
    bad = w.clone()
    bad[3, 5] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        quantize_nf4(bad)
    bad[3, 5] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        quantize_nf4(bad)
    with pytest.raises(ValueError, match=r"blocksize 48 .*valid: \(32, 64"):
        quantize_nf4(w, blocksize=48)
    with pytest.raises(ValueError, match=r"2-D.*\(512,\)"):
        quantize_nf4(w.reshape(-1))
    with pytest.raises(ValueError, match="meta"):
        quantize_nf4(torch.empty(8, 64, device="meta"))
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.empty(0, 64))


@requires_bnb
def test_from_bnb_rejects_bad_input():
    import bitsandbytes.functional as F

    w = make_weight((16, 64), torch.float32)
    packed, state = F.quantize_4bit(w, quant_type="fp4")
    with pytest.raises(ValueError, match="quant_type is 'fp4'"):
        NF4Weight.from_bnb((packed, state))
    packed, state = F.quantize_4bit(w, quant_type="nf4")
    with pytest.raises(ValueError, match=r"packed data has shape \(512, 1\).*\(16, 128\)"):
        state.shape = torch.Size([16, 128])
        NF4Weight.from_bnb((packed, state))
    with pytest.raises(ValueError, match="no quant_state"):
        NF4Weight.from_bnb(torch.zeros(4, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="pair"):
        NF4Weight.from_bnb((packed, state, 3))


def test_dequantize_rejects_bad_dtype_and_backend():
    q = quantize_nf4(make_weight((8, 64), torch.float32), backend="reference")
    with pytest.raises(TypeError, match="int8"):
        q.dequantize(torch.int8)
    with pytest.raises(ValueError, match="unknown backend"):
        q.dequantize(backend="bogus")
    with pytest.raises(ValueError, match="no cuda backend|needs CUDA"):
        q.dequantize(backend="cuda")


@pytest.mark.parametrize("nested", [False, True])
def test_dequantize_rounding_edges_all_backends_agree(nested):
    # Random bytes and block scales spread over 2^-40 .. 2^20, so the products hit fp16
    # subnormals, fp16 overflow to inf, and bf16/fp16 rounding ties: every backend must
    # produce the reference's (torch's round-to-nearest-even) bits.
    g = torch.Generator().manual_seed(5)
    shape, bs = (37, 130), 32
    n = shape[0] * shape[1]
    nb = -(-n // bs)
    packed = torch.randint(0, 256, ((n + 1) // 2, 1), dtype=torch.uint8, generator=g)
    scales = torch.exp2(torch.randint(-40, 21, (nb,), generator=g).float()) * (1 + torch.rand(nb, generator=g))
    if nested:
        nb2 = -(-nb // 256)
        w = NF4Weight(
            packed, torch.randint(0, 256, (nb,), dtype=torch.uint8, generator=g), shape, torch.float16, bs,
            offset=torch.tensor(0.0123), state2_absmax=scales[:nb2], state2_code=dynamic_code(),
        )
    else:
        w = NF4Weight(packed, scales, shape, torch.float16, bs)
    for out_dtype in DTYPES:
        expected = formula_dequantize(packed, w.absmax_f32(), bs, shape, out_dtype)
        for backend in CPU_BACKENDS:
            assert_bits_equal(w.dequantize(out_dtype, backend=backend), expected, f"{backend.value} {out_dtype}")


# ------------------------------------------------------------------------------------------
# Triton kernels (under the interpreter when no GPU is present: small sizes only)
# ------------------------------------------------------------------------------------------
TRITON_SHAPES = ((1, 7), (9, 65), (33, 65))


@requires_triton
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", (32, 64, 256, 4096))
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_bit_exact_with_reference(dtype, blocksize, double_quant):
    # The CPU reference quantizer is the oracle (bit-exact with bitsandbytes:
    # test_quantize_bit_exact_with_bnb); no bitsandbytes needed here.
    for shape in TRITON_SHAPES if blocksize > 64 else TRITON_SHAPES[:2]:
        w = make_weight(shape, dtype, seed=hash((shape, blocksize)) % 1000)
        ref = quantize_nf4(w, blocksize, double_quant, backend="reference")
        q = quantize_nf4(w.to(TRITON_DEVICE), blocksize, double_quant, backend="triton")
        assert_bits_equal(q.packed.cpu(), ref.packed, f"triton {shape} packed")
        if double_quant and TRITON_DEVICE == "cuda" and not torch.equal(q.offset.cpu(), ref.offset):
            # torch's CUDA mean sums in another order (see test_gpu_quantize_triton_matches_cpu)
            torch.testing.assert_close(q.offset.cpu(), ref.offset, rtol=1e-6, atol=0)
            continue
        assert_bits_equal(q.absmax.cpu(), ref.absmax, f"triton {shape} absmax")
        if double_quant:
            assert_bits_equal(q.offset.cpu(), ref.offset, f"triton {shape} offset")
            assert_bits_equal(q.state2_absmax.cpu(), ref.state2_absmax, f"triton {shape} state2 absmax")
        absmax = ref.absmax_f32()
        for out_dtype in DTYPES:
            expected = formula_dequantize(ref.packed, absmax, blocksize, shape, out_dtype)
            got = q.dequantize(out_dtype, backend="triton").cpu()
            assert_bits_equal(got, expected, f"triton {shape} {out_dtype}")


@requires_bnb
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_bit_exact_with_bnb(dtype):
    for shape in TRITON_SHAPES[:2]:
        w, packed, state = bnb_case(dtype, 64, True, shape)
        q = quantize_nf4(w.to(TRITON_DEVICE), 64, True, backend="triton")
        assert_bits_equal(q.packed.cpu(), packed, f"triton {shape} packed")
        if TRITON_DEVICE == "cpu":
            assert_matches_bnb(q, packed, state, True, f"triton {shape}")


@requires_triton
@pytest.mark.filterwarnings(
    # numpy (the interpreter) warns where the kernel divides by a zero absmax or rounds
    # to fp16 inf on purpose; the results are checked bit for bit below.
    "ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning", "ignore:overflow:RuntimeWarning"
)
def test_triton_zero_constant_and_rounding_edges():
    w = make_weight((4, 96), torch.float16)
    w[1] = 0
    w[2] = -0.25
    w[3, 64:] = 0
    for dq in (False, True):
        ref = quantize_nf4(w, 32, dq, backend="reference")
        q = quantize_nf4(w.to(TRITON_DEVICE), 32, dq, backend="triton")
        assert_bits_equal(q.packed.cpu(), ref.packed, "triton packed")
        if not (dq and TRITON_DEVICE == "cuda"):  # CUDA's mean may differ in the last bit
            assert_bits_equal(q.absmax.cpu(), ref.absmax, "triton absmax")
        assert torch.all(q.dequantize(backend="triton")[1].cpu() == 0)
    # fp16 subnormals / overflow and bf16 ties, nested statistics decoded in the kernel.
    g = torch.Generator().manual_seed(6)
    shape, bs = (5, 130), 32
    n, nb = 5 * 130, -(-5 * 130 // 32)
    packed = torch.randint(0, 256, ((n + 1) // 2, 1), dtype=torch.uint8, generator=g)
    scales = torch.exp2(torch.randint(-40, 21, (nb,), generator=g).float()) * (1 + torch.rand(nb, generator=g))
    nested = NF4Weight(
        packed, torch.randint(0, 256, (nb,), dtype=torch.uint8, generator=g), shape, torch.float16, bs,
        offset=torch.tensor(-0.0371), state2_absmax=scales[:1] * 1e3, state2_code=dynamic_code(),
    )
    for wt in (NF4Weight(packed, scales, shape, torch.float16, bs), nested):
        for out_dtype in DTYPES:
            expected = formula_dequantize(packed, wt.absmax_f32(), bs, shape, out_dtype)
            got = wt.to(TRITON_DEVICE).dequantize(out_dtype, backend="triton").cpu()
            assert_bits_equal(got, expected, f"triton edges {out_dtype}")


# ------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU): every GPU backend against the CPU reference, bit for bit
# ------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("backend", [Backend.CUDA, Backend.TRITON])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", VALID_BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_dequantize_bit_exact(backend, dtype, blocksize, double_quant):
    for shape in SHAPES + ((1024, 4096 + 64),):
        q = nf4_case(dtype, blocksize, double_quant, shape)
        qc = q.to("cuda")
        for out_dtype in DTYPES:
            expected = q.dequantize(out_dtype, backend="reference")
            out = qc.dequantize(out_dtype, backend=backend)
            assert out.is_cuda
            assert_bits_equal(out.cpu(), expected, f"{backend.value} {shape} {out_dtype}")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", [Backend.CUDA, Backend.TRITON])
def test_gpu_dequantize_unaligned_views(backend):
    # Packed bytes that start 1 byte into an allocation, and sizes that are not a multiple
    # of the CUDA kernel's 16-byte vectors: the scalar paths must give the same bits.
    g = torch.Generator().manual_seed(8)
    for n_out, n_in in ((3, 70), (1, 33), (7, 64)):
        n = n_out * n_in
        buf = torch.randint(0, 256, ((n + 1) // 2 + 1, 1), dtype=torch.uint8, generator=g)
        absmax = torch.rand(-(-n // 32), generator=g) + 0.5
        ref = NF4Weight(buf[1:], absmax, (n_out, n_in), torch.bfloat16, 32)
        dev = NF4Weight(buf.cuda()[1:], absmax.cuda(), (n_out, n_in), torch.bfloat16, 32)
        for out_dtype in DTYPES:
            assert_bits_equal(
                dev.dequantize(out_dtype, backend=backend).cpu(), ref.dequantize(out_dtype, backend="reference")
            )


@pytest.mark.cuda
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_quantize_triton_matches_cpu(dtype, double_quant):
    # bitsandbytes' own CUDA nested-statistics quantizer differs from its CPU one; fastlora
    # follows the CPU one on every device, so the CPU reference is the oracle here.
    for shape in SHAPES:
        w = make_weight(shape, dtype)
        ref = quantize_nf4(w, 64, double_quant, backend="reference")
        q = quantize_nf4(w.cuda(), 64, double_quant, backend="triton")
        assert_bits_equal(q.packed.cpu(), ref.packed, f"{shape} packed")
        if not double_quant:
            assert_bits_equal(q.absmax.cpu(), ref.absmax, f"{shape} absmax")
            continue
        # The offset is torch's CUDA mean (as in bitsandbytes on CUDA), whose summation
        # order differs from the CPU's: equal up to rounding, and when it is bit-equal the
        # 8-bit statistics must be too.
        torch.testing.assert_close(q.offset.cpu(), ref.offset, rtol=1e-6, atol=0)
        if torch.equal(q.offset.cpu(), ref.offset):
            assert_bits_equal(q.absmax.cpu(), ref.absmax, f"{shape} nested absmax")
            assert_bits_equal(q.state2_absmax.cpu(), ref.state2_absmax, f"{shape} state2 absmax")


# ------------------------------------------------------------------------------------------
# The torch.library ops: schema, fake kernels and dispatch (what torch.compile relies on)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_custom_ops_opcheck(backend):
    from fastlora import nf4 as m

    w = make_weight((6, 70), torch.bfloat16)
    q = quantize_nf4(w, 32, True, backend=backend)
    args = (q.packed, q.absmax, q.code, q.state2_absmax, q.state2_code, q.offset, 32, [6, 70], torch.float16, backend.value)
    torch.library.opcheck(m._nf4_dequantize_op, args, test_utils=("test_schema", "test_faketensor"))
    assert_bits_equal(m._nf4_dequantize_op(*args), q.dequantize(torch.float16, backend="reference"))
    torch.library.opcheck(m._nf4_quantize_op, (w, 32, backend.value), test_utils=("test_schema", "test_faketensor"))
    x = torch.randn(300)
    torch.library.opcheck(m._quantize_stats8_op, (x, 256, backend.value), test_utils=("test_schema", "test_faketensor"))


def test_dequantize_under_torch_compile():
    q = quantize_nf4(make_weight((8, 64), torch.float32), 64, True, backend="reference")
    expected = q.dequantize(backend="reference") * 2

    def f(packed, absmax, state2_absmax, offset):
        w = NF4Weight(packed, absmax, (8, 64), torch.float32, 64, code=q.code, offset=offset,
                      state2_absmax=state2_absmax, state2_code=q.state2_code)  # fmt: skip
        return w.dequantize(backend="cpp") * 2

    args = (q.packed, q.absmax, q.state2_absmax, q.offset)
    # Whatever ran before, compiling works (at worst with a graph break at the backend choice).
    assert_bits_equal(torch.compile(f, backend="eager")(*args), expected)
    # Once dynamo is loaded and an eager call has marked the choice constant, the whole
    # function, op included, is one graph.
    q.dequantize(backend="cpp")
    assert_bits_equal(torch.compile(f, backend="eager", fullgraph=True)(*args), expected)


@pytest.mark.parametrize("isa", [0, 1, 2], ids=["scalar", "sse4.1", "avx512"])
def test_cpp_dequantize_every_instruction_set(isa):
    # The kernel dispatches to the best instruction set of the CPU at run time; force each
    # one the CPU has, so that all of them are checked against the reference here.
    ext = _ext.load()
    if not ext.nf4_cpu_isa_available(isa):
        pytest.skip(f"instruction set {isa} not available on this CPU/build")
    g = torch.Generator().manual_seed(9)
    for (n_out, n_in), bs, nested in itertools.product(((7, 130), (5, 63), (64, 256)), (32, 64, 256), (False, True)):
        n = n_out * n_in
        nb = -(-n // bs)
        packed = torch.randint(0, 256, ((n + 1) // 2, 1), dtype=torch.uint8, generator=g)
        scales = torch.exp2(torch.randint(-40, 21, (nb,), generator=g).float()) * (1 + torch.rand(nb, generator=g))
        if nested:
            w = NF4Weight(
                packed, torch.randint(0, 256, (nb,), dtype=torch.uint8, generator=g), (n_out, n_in), torch.bfloat16,
                bs, offset=torch.tensor(0.5), state2_absmax=scales[: -(-nb // 256)], state2_code=dynamic_code(),
            )  # fmt: skip
        else:
            w = NF4Weight(packed, scales, (n_out, n_in), torch.bfloat16, bs)
        for code, out_dtype in enumerate(DTYPES):
            out = torch.empty(n_out, n_in, dtype=out_dtype)
            ext.nf4_dequantize_cpu(
                w.packed.data_ptr(), w.absmax.data_ptr(), w.code.data_ptr(),
                w.state2_absmax.data_ptr() if nested else 0, w.state2_code.data_ptr() if nested else 0,
                float(w.offset) if nested else 0.0, nested, n, bs, 256, out.data_ptr(), code, isa,
            )  # fmt: skip
            expected = formula_dequantize(packed, w.absmax_f32(), bs, (n_out, n_in), out_dtype)
            assert_bits_equal(out, expected, f"isa {isa} {(n_out, n_in)} bs {bs} nested {nested} {out_dtype}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dequantize_into_out_buffer(backend):
    q = quantize_nf4(make_weight((9, 96), torch.bfloat16), 32, True, backend="reference")
    for dtype in DTYPES:
        out = torch.full((9, 96), float("nan"), dtype=dtype)
        res = q.dequantize(out=out, backend=backend)
        assert res.data_ptr() == out.data_ptr()
        assert_bits_equal(out, q.dequantize(dtype, backend="reference"), f"out {dtype}")
    with pytest.raises(ValueError, match=r"shape \(9, 96\)"):
        q.dequantize(out=torch.empty(96, 9), backend=backend)
    with pytest.raises(ValueError, match="not contiguous"):
        q.dequantize(out=torch.empty(96, 9).t(), backend=backend)
    with pytest.raises(TypeError, match="does not match"):
        q.dequantize(torch.float16, out=torch.empty(9, 96), backend=backend)


def test_nf4weight_rejects_inconsistent_parts():
    q = quantize_nf4(make_weight((8, 64), torch.float32), 64, True, backend="reference")
    parts = dict(code=q.code, offset=q.offset, state2_absmax=q.state2_absmax, state2_code=q.state2_code)
    with pytest.raises(ValueError, match="code must be 16 float32"):
        NF4Weight(q.packed, q.absmax, q.shape, q.dtype, 64, **{**parts, "code": q.code.double()})
    with pytest.raises(ValueError, match="offset is on meta"):
        NF4Weight(q.packed, q.absmax, q.shape, q.dtype, 64, **{**parts, "offset": q.offset.to("meta")})
    with pytest.raises(TypeError, match="float32 scalar offset"):
        NF4Weight(q.packed, q.absmax, q.shape, q.dtype, 64, **{**parts, "offset": q.offset.double()})
    with pytest.raises(ValueError, match="absmax has 3 entries"):
        NF4Weight(q.packed, torch.ones(3), q.shape, q.dtype, 64)
    with pytest.raises(ValueError, match=r"needs 256"):
        NF4Weight(q.packed[:10], q.absmax, q.shape, q.dtype, 64, **parts)
    # A strided view of the statistics is read through a contiguous copy, not misread.
    big = torch.zeros(2 * q.absmax.numel(), dtype=torch.uint8)
    big[::2] = q.absmax
    strided = NF4Weight(q.packed, big[::2], q.shape, q.dtype, 64, **parts)
    for backend in CPU_BACKENDS:
        assert_bits_equal(strided.dequantize(backend=backend), q.dequantize(backend="reference"), backend.value)
