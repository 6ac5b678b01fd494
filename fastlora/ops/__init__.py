"""One file per op: pure-torch reference, dispatch to kernels, autograd.Function, functional."""
