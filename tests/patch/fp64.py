"""Float64 all the way through a transformers model, for exactness tests.

transformers upcasts to float32 where half precision needs it: RMSNorm computes in
``hidden.to(torch.float32)``, eager attention's softmax takes ``dtype=torch.float32``.
In a float64 model those are downcasts, which round every norm and softmax to float32
and hide real differences below 1e-7 (or show rounding as one). Inside
:func:`float64_all_the_way` a float64 tensor is never cast to float32, so two exact
computations agree to float64 rounding.
"""
import contextlib

import torch


@contextlib.contextmanager
def float64_all_the_way():
    to, flt, softmax = torch.Tensor.to, torch.Tensor.float, torch.nn.functional.softmax

    def to64(self, *args, **kwargs):
        out = to(self, *args, **kwargs)
        if self.dtype is torch.float64 and out.dtype is torch.float32:
            return to(out, torch.float64) if out.device != self.device else self
        return out

    def float64(self, *args, **kwargs):
        return self if self.dtype is torch.float64 else flt(self, *args, **kwargs)

    def softmax64(x, dim=None, _stacklevel=3, dtype=None):
        return softmax(x, dim=dim) if x.dtype is torch.float64 else softmax(x, dim=dim, dtype=dtype)

    torch.Tensor.to, torch.Tensor.float, torch.nn.functional.softmax = to64, float64, softmax64
    try:
        yield
    finally:
        torch.Tensor.to, torch.Tensor.float, torch.nn.functional.softmax = to, flt, softmax
