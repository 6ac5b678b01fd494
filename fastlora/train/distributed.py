"""torch.distributed for every fastlora trainer: who this process is, its share of the
data, global sums, rank-0 writes, sharded evaluation, and failures that end the job.

A run is launched by ``torchrun`` or ``accelerate launch`` (one process per device); the
launcher sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` and the
``fastlora`` command calls :func:`setup` when ``WORLD_SIZE > 1``. A Python script under
``torchrun`` calls ``setup(local_rank=int(os.environ["LOCAL_RANK"]))`` itself before the
trainer. Without a process group every helper here is the single-process identity
(rank 0 of 1), so a trainer has ONE code path.

Conventions every trainer follows (SFT does; the reward-model and PPO trainers adopt the
same calls):

* ``batch_size`` is per rank. A step's global batch is ``batch_order(n, batch_size *
  world)`` split by :func:`shard_indices`, so N ranks x batch b see exactly the batches one
  process with batch N*b sees (the data order depends on (seed, epoch) alone, see
  ``data.batch_order``), and resuming needs nothing per rank.
* The loss is normalized by the GLOBAL count of trained tokens of the step (all ranks, all
  accumulated micro-batches), obtained with :func:`all_sum` before the first forward, so
  the update equals the single-process one, never a mean of per-rank means.
* Only the main rank (:func:`is_main`) writes files; every rank reads them back on resume.
* Evaluation is sharded (:func:`shard`) and the per-item results gathered back in their
  original order (:func:`gather_in_order`), or summed (:func:`all_sum`).
* A step that may fail on some ranks only (reading data, resuming) runs inside
  :func:`agree`: every rank learns of the failure and raises, with the failing rank's
  error, instead of waiting forever in the next collective. An environment error (full
  disk, permissions) reaches the other ranks as an :class:`OSError` with its errno
  (:class:`RankEnvironmentError`), so every rank takes the same decision about it.
* The trainers on the shared base (reward model, PPO) do not wrap their model in DDP: a
  role runs through several methods of :class:`fastlora.rl.SharedBase` (hidden states,
  scores, shared-prompt scoring) and PPO runs the policy and the critic before one
  backward, none of which goes through a DDP module's ``forward`` that arms its gradient
  hooks. They average the trainable gradients themselves, once per optimizer step
  (:func:`average_gradients`: one all-reduce of one flat buffer, DDP's arithmetic without
  its overlap with backward; LoRA gradients are megabytes).
"""
from __future__ import annotations

import contextlib
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence, TypeVar

T = TypeVar("T")


class RankError(RuntimeError):
    """Raised on every healthy rank when another rank failed (its error is in the message)."""


class RankEnvironmentError(OSError):
    """Raised on every healthy rank when another rank hit an environment error (full disk,
    read-only or permission-denied path): an OSError with that errno and path, so that
    ``checkpoint.environment_error`` (and the CLI's exit status) treat it like the original."""


def _dist():
    import torch.distributed as dist

    return dist


def is_distributed() -> bool:
    """True inside an initialized process group of more than one process."""
    import sys

    if "torch" not in sys.modules:  # cheap: no torch imported means no process group
        return False
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return _dist().get_rank() if is_distributed() else 0


def world_size() -> int:
    return _dist().get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def setup(*, local_rank: int = 0, backend: str | None = None, init_method: str | None = None,
          rank: int | None = None, world_size: int | None = None, timeout_s: float = 1800.0):
    """Initialize the default process group (unless one exists) and return this rank's device.

    ``backend`` defaults to NCCL when CUDA is available, else gloo. ``init_method`` defaults to
    ``env://`` (what torchrun and accelerate launch provide); tests pass ``file://...`` with
    ``rank`` and ``world_size``. On CUDA the device is ``cuda:local_rank``."""
    import torch

    dist = _dist()
    use_cuda = torch.cuda.is_available() and backend in (None, "nccl")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend or ("nccl" if use_cuda else "gloo"),
                                  "timeout": timedelta(seconds=timeout_s)}
        if init_method is not None:
            kwargs["init_method"] = init_method
        if rank is not None:
            kwargs["rank"] = rank
        if world_size is not None:
            kwargs["world_size"] = world_size
        if use_cuda:
            kwargs["device_id"] = torch.device("cuda", local_rank)
        dist.init_process_group(**kwargs)
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def teardown() -> None:
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        _dist().barrier()


# --------------------------------------------------------------------------- data
def shard_indices(global_batch: Sequence[int], per_rank: int, *, rank_: int | None = None) -> list[int]:
    """This rank's part of one global batch: the contiguous slice ``[r*b, (r+1)*b)``.

    The last global batch of an epoch may be short, so a rank's part may be smaller than
    ``per_rank`` or empty; the trainer still runs a (zero-weight) step there, because DDP
    needs every rank in every gradient all-reduce."""
    r = rank() if rank_ is None else rank_
    return list(global_batch[r * per_rank:(r + 1) * per_rank])


def shard(items: Sequence[T]) -> list[T]:
    """This rank's items of an evaluation set: every world_size-th, starting at its rank
    (balanced to within one item)."""
    return list(items[rank()::world_size()])


def gather_in_order(local: list[T], n: int) -> list[T]:
    """Undo :func:`shard`: the per-item results of every rank, back in the original order of
    the ``n`` items, on every rank."""
    if not is_distributed():
        return list(local)
    parts: list[list[T] | None] = [None] * world_size()
    _dist().all_gather_object(parts, list(local))
    out: list[T] = [None] * n  # type: ignore[list-item]
    for r, part in enumerate(parts):
        for j, v in enumerate(part or []):
            out[r + j * world_size()] = v
    return out


# -------------------------------------------------------------------- reductions
def all_sum(values: Sequence[float], device=None) -> list[float]:
    """Element-wise sum over ranks (float64, so token counts stay exact far past 2**24)."""
    if not is_distributed():
        return [float(v) for v in values]
    import torch

    if device is None:  # NCCL reduces only CUDA tensors
        device = torch.device("cuda", torch.cuda.current_device()) if _dist().get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    _dist().all_reduce(t)
    return t.tolist()


def all_gather_object(obj: Any) -> list[Any]:
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    _dist().all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """The main rank's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=src)
    return box[0]


# ----------------------------------------------------------------------- failures
def agree(fn: Callable[[], T], what: str) -> T:
    """Run ``fn`` on every rank; if it raises on any, raise on all.

    The failing rank re-raises its own exception; the others raise :class:`RankError`
    naming that rank and its error, so the job ends with the real cause on every rank
    instead of hanging in the next collective until a timeout."""
    if not is_distributed():
        return fn()
    err: BaseException | None = None
    result = None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below, on this rank and all others
        err = e
    report = None
    if err is not None:
        errno = err.errno if isinstance(err, OSError) else None
        filename = err.filename if isinstance(err, OSError) else None
        report = (f"{type(err).__name__}: {err}", errno, None if filename is None else str(filename))
    reports = all_gather_object(report)
    if err is not None:
        raise err
    for r, rep in enumerate(reports):
        if rep is not None:
            text, errno, filename = rep
            if errno is not None:
                raise RankEnvironmentError(errno, f"rank {r} failed while {what}: {text}", filename)
            raise RankError(f"rank {r} failed while {what}: {text}")
    return result  # type: ignore[return-value]


def on_main(fn: Callable[[], T], what: str) -> T:
    """``fn()`` on the main rank only (a write); every rank returns its result, or raises its
    error (through :func:`agree`). Called on every rank."""
    return broadcast_object(agree(lambda: fn() if is_main() else None, what))


@contextlib.contextmanager
def main_writes() -> Iterator[bool]:
    """``with main_writes() as writer: if writer: ...write...`` - the main rank writes, every
    rank waits until it is done (so no rank reads a half-written file), and an error while
    writing ends every rank (through :func:`agree`)."""
    err: BaseException | None = None
    try:
        yield is_main()
    except Exception as e:  # noqa: BLE001
        err = e
    if is_distributed():
        def check() -> None:
            if err is not None:
                raise err

        agree(check, "writing the run's files")
    elif err is not None:
        raise err


# -------------------------------------------------------------------------- models
def local_device(device):
    """This rank's device: ``cuda`` without an index becomes the device :func:`setup` selected."""
    import torch

    if is_distributed() and device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def wrap_ddp(model, device):
    """``model`` in DistributedDataParallel; the model itself in a single process.

    Every rank holds the whole frozen 4-bit base; only the trainable (LoRA) parameters get
    DDP's gradient buckets, since DDP registers its hooks on parameters that require grad.
    fastlora's patched forwards are plain autograd Functions over those parameters, so the
    hooks fire as they do on the unpatched model. ``forward_sync_buffers=False``: the
    buffers (rotary tables) are computed identically on every rank, nothing to resend each
    step (DDP still copies rank 0's parameters and buffers once, at construction)."""
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)


def check_resume_world_size(run_file, config: dict | None = None,
                            per_rank: Sequence[str] = ("batch_size",)) -> frozenset[str]:
    """Refuse to resume on another number of ranks unless the global batch stays the same.

    The data order and the updates depend on the global batch (each option of ``per_rank``,
    e.g. ``batch_size``, times the number of processes). A run on 2 processes x batch 4 may
    resume on 1 process x batch 8 or 4 x 2: the checkpoint holds whole tensors (DDP) or
    shards that torch.distributed.checkpoint reshards (FSDP). Returns the options allowed to
    differ from run.json because of that (checked by ``checkpoint.check_resume_config``);
    ``config`` None allows no change of the number of processes."""
    import json
    from pathlib import Path

    p = Path(run_file)
    if not p.is_file():
        return frozenset()
    try:
        info = json.loads(p.read_text())
    except json.JSONDecodeError:
        return frozenset()
    before, now = info.get("world_size", 1), world_size()
    if before == now:
        return frozenset()
    old = info.get("config", {})
    if config is not None and all(isinstance(old.get(k), int) and isinstance(config.get(k), int)
                                  and old[k] * before == config[k] * now for k in per_rank):
        return frozenset(per_rank)
    shown = ", ".join(f"--{k.replace('_', '-')} {old.get(k)} x {before} = {_times(old.get(k), before)}"
                      for k in per_rank)
    raise ValueError(f"--resume: the run in {str(p.parent)!r} was trained on {before} process(es), this "
                     f"launch has {now}; resume with --nproc_per_node x nodes = {before}, or keep the global "
                     f"batch ({shown}) with options x {now} processes giving the same numbers")


def _times(a, b):
    return a * b if isinstance(a, int) else "?"


@contextlib.contextmanager
def grad_sync(model, enabled: bool) -> Iterator[None]:
    """Gradient all-reduce on (the last micro-batch of a step) or off (the others):
    DDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync``; nothing in one process."""
    if enabled or not is_distributed():
        yield
        return
    if hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    yield


def decoder_layers(model) -> list:
    """The repeated blocks of a transformers model (the classes it names in
    ``_no_split_modules``, the unit transformers itself never splits across devices)."""
    import torch

    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names and isinstance(m, torch.nn.Module)]


def wrap_fsdp(model, root=None):
    """Shard ``model`` in place with FSDP2 (``torch.distributed.fsdp.fully_shard``): one unit per
    decoder layer, one for an untied output head, the root (embeddings, norms) last.

    The frozen 4-bit base must have been loaded with a float ``quant_storage`` (the packed
    NF4 bytes stored as e.g. bfloat16 elements), so that each unit's parameters share a
    dtype FSDP can flatten and all-gather; fastlora's patched layers read the gathered bytes
    with the QuantState bitsandbytes keeps on the module. ``generate`` is registered as a
    forward method so the root's parameters are gathered for generation too.

    ``root``: the module every forward enters, when that is not ``model`` (the shared base
    runs its roles through the decoder, ``lm.get_decoder()``, and reads no logits); it is
    sharded last and an output head outside it is left whole."""
    if not is_distributed():
        return model
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for layer in decoder_layers(model):
        fully_shard(layer)
    if root is not None:
        fully_shard(root)
        return model
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    if head is not None and getattr(head, "weight", None) is not getattr(emb, "weight", None):
        fully_shard(head)  # its loss is computed inside its forward hooks (fastlora.patch.head)
    fully_shard(model)
    register_fsdp_forward_method(model, "generate")
    return model


def is_fully_sharded(model) -> bool:
    """Whether ``model`` was wrapped by FSDP2's ``fully_shard`` (its class is then an
    ``FSDP<Class>`` subclass of ``FSDPModule``). Cheap without FSDP: nothing is imported."""
    import sys

    fsdp = sys.modules.get("torch.distributed.fsdp")
    module_cls = getattr(fsdp, "FSDPModule", None) if fsdp is not None else None
    return module_cls is not None and isinstance(model, module_cls)


def is_shard(t) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 shard). Cheap: nothing is imported."""
    import sys

    mod = sys.modules.get("torch.distributed.tensor")
    cls = getattr(mod, "DTensor", None) if mod is not None else None
    return cls is not None and isinstance(t, cls)


@contextlib.contextmanager
def gathered(module) -> Iterator[None]:
    """Inside the block the trainable parameters of an FSDP2-sharded ``module`` are whole
    tensors, so that every saver written for a plain model (PEFT's ``save_pretrained``, the
    shared base's exports) works unchanged; the shards are put back on exit.

    Gathering is a collective: every rank enters the block (and only the main rank writes in
    it). Only the trainable parameters are gathered (the adapters: megabytes), never the
    frozen base. Nothing happens to a module without shards."""
    import torch

    swapped = []
    for _, mod in module.named_modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if p.requires_grad and is_shard(p):
                swapped.append((mod, name, p))
    try:
        for mod, name, p in swapped:  # named_modules' order: the same on every rank
            setattr(mod, name, torch.nn.Parameter(p.detach().full_tensor(), requires_grad=True))
        yield
    finally:
        for mod, name, p in swapped:
            setattr(mod, name, p)


def average_gradients(params) -> None:
    """Average the ``.grad`` of ``params`` over the ranks (what DDP does), in one all-reduce.

    FSDP2 shards (DTensors) are skipped: FSDP reduce-scatters those itself. A parameter with
    no gradient on this rank contributes zeros; one with no gradient on ANY rank keeps
    ``grad=None``, as in one process (the optimizer then skips it)."""
    if not is_distributed():
        return
    import torch

    plain = [p for p in params if not is_shard(p)]
    if not plain:
        return
    ref = plain[0]
    dtype = torch.float32
    for p in plain:  # at least float32 (bf16 gradients are summed in fp32), float64 stays float64
        dtype = torch.promote_types(dtype, p.dtype)
    parts = [(p.grad.detach() if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype) for p in plain]
    has = torch.tensor([p.grad is not None for p in plain], dtype=dtype, device=ref.device)
    flat = torch.cat(parts + [has])  # the flags ride along: which parameters have a gradient somewhere
    if _dist().get_backend() == "nccl" and flat.device.type != "cuda":
        flat = flat.cuda()
    _dist().all_reduce(flat)
    flat = flat.to(ref.device)
    flags = flat[-len(plain):]
    offset = 0
    for p, present in zip(plain, flags.tolist()):
        n = p.numel()
        if present:
            g = (flat[offset:offset + n] / world_size()).view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = g
            else:
                p.grad.copy_(g)
        offset += n


def global_mean_var(x, mask=None) -> tuple[float, float]:
    """Mean and population variance of ``x``'s valid elements over ALL ranks (float64,
    two passes: the mean first, then the squared deviations, no E[x²]-E[x]² cancellation).

    For PPO's advantage whitening over the global batch: each rank holds its own rollouts;
    ``(x - mean) / sqrt(var + eps)`` with these moments is what one process holding every
    rank's rollouts would compute. ``mask``: 0/1 or bool, same shape as ``x`` (None = all)."""
    v = x.detach().double()
    if mask is not None:
        if mask.shape != x.shape:
            raise ValueError(f"global_mean_var: mask shape {tuple(mask.shape)} != x shape {tuple(x.shape)}")
        v = v[mask.bool()]
    total, n = all_sum([float(v.sum()), v.numel()])
    if n == 0:
        raise ValueError("global_mean_var: no valid element on any rank")
    mean = total / n
    (sq,) = all_sum([float(((v - mean) ** 2).sum())])
    return mean, sq / n


def global_mean(x, mask=None) -> float:
    """Mean of ``x``'s valid elements over ALL ranks (float64): the metric one process holding
    every rank's rows would log. ``mask``: 0/1 or bool, same shape as ``x`` (None = all)."""
    v = x.detach().double()
    if mask is not None:
        v = v[mask.bool()]
    total, n = all_sum([float(v.sum()), v.numel()])
    return total / n if n else float("nan")


def global_whiten(x, mask, eps: float = 1e-8):
    """``fastlora.rl.whiten`` with the moments of the GLOBAL batch (:func:`global_mean_var`):
    ``(x - mean) / sqrt(var + eps)`` on the valid elements, 0 elsewhere, dtype of ``x``."""
    import torch

    mean, var = global_mean_var(x, mask)
    out = (x.double() - mean) / (var + eps) ** 0.5
    return torch.where(mask.bool(), out, torch.zeros((), dtype=out.dtype, device=out.device)).to(x.dtype)
