"""What a run prints, for people at a terminal and for log files alike.

- :class:`Console` prints messages (data stats, warnings, "adapter saved", the summary) whatever
  ``progress`` says: ``--no-progress`` only turns the progress bars off.
- :meth:`Console.progress` is a tqdm bar at a terminal; when the output is not a terminal (a
  file, a pipe, CI), or with ``progress=False``, it prints one plain line per logged step
  instead, so a log holds ``step 5/60 loss ...`` lines rather than carriage-return fragments.
- :func:`quiet_third_party` silences, for the duration of a run, the third-party deprecation
  warnings the user cannot act on, and the model-loading bars when bars are off.
"""
from __future__ import annotations

import contextlib
import logging
import re
import sys
import warnings
from typing import Any, Iterator, TextIO

# (category, message regex, module regex): warnings raised inside the libraries we call, about
# their own internals, that no option of ours changes. Each was seen in a run (2026-12-01):
# PEFT asks transformers 5.x for `is_gradient_checkpointing`, which warns on every run; torch's
# jit warns while transformers imports its scripted helpers.
THIRD_PARTY_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated", r"transformers(\.|$)"),
    (DeprecationWarning, r"`torch\.jit\.script_method` is deprecated", r"torch(\.|$)"),
)
# (logger, message regex): log records of the same kind. bitsandbytes looks for an optional CPU
# kernel package at import and logs its absence; transformers 5.x logs the renaming of
# `past_key_values` when a model output is built with the old name (fastlora/patch/head.py does).
THIRD_PARTY_LOG_MESSAGES: tuple[tuple[str, str], ...] = (
    ("bitsandbytes.backends.cpu.ops", r"Failed to load CPU gemm_4bit_forward from kernels-community"),
    ("transformers.utils.generic", r"`past_key_values`/`cache_params` are deprecated"),
)


def is_terminal(stream: TextIO | None) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):
        return False


class Console:
    """Messages and progress of one run. ``progress``: bars at a terminal (plain lines elsewhere)."""

    def __init__(self, progress: bool = True, *, stream: TextIO | None = None, bar_stream: TextIO | None = None,
                 enabled: bool = True):
        self._stream = stream
        self._bar_stream = bar_stream
        self.enabled = enabled  # False on the non-main ranks of a distributed run: they print nothing
        self.bars = enabled and bool(progress) and is_terminal(self.bar_stream)
        self._bar = None

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stdout

    @property
    def bar_stream(self) -> TextIO:
        return self._bar_stream if self._bar_stream is not None else sys.stderr

    def log(self, msg: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(msg, file=self.stream)
        else:
            print(msg, file=self.stream, flush=True)

    __call__ = log

    def warn(self, msg: str) -> None:
        self.log(f"warning: {msg}")

    def progress(self, total: int, *, initial: int = 0, desc: str = "train", log_every: int = 1) -> "Progress":
        return Progress(self, total, initial=initial, desc=desc, log_every=log_every)


def format_step(step: int, total: int, metrics: dict[str, Any]) -> str:
    parts = [f"step {step}/{total}"]
    for key, label, fmt in (("loss", "loss", "{:.4f}"), ("lr", "lr", "{:.2e}"), ("grad_norm", "grad_norm", "{:.3f}"),
                            ("tokens_per_second", "tok/s", "{:.0f}")):
        v = metrics.get(key)
        if isinstance(v, (int, float)):
            parts.append(f"{label} {fmt.format(v)}")
    for k, v in metrics.items():  # trainer-specific figures (reward, kl, ...) after the common ones
        if k in ("step", "loss", "lr", "grad_norm", "tokens_per_second", "tokens", "trained_tokens", "epoch"):
            continue
        if isinstance(v, float):
            parts.append(f"{k} {v:.4g}")
    return "  ".join(parts)


class Progress:
    """A tqdm bar (terminal) or one printed line per logged step (anything else)."""

    def __init__(self, console: Console, total: int, *, initial: int, desc: str, log_every: int):
        self.console, self.total, self.log_every = console, total, max(1, log_every)
        self.bar = None
        if console.bars:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=console.bar_stream)
            console._bar = self.bar

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        if self.bar is not None:
            post = {}
            if isinstance(metrics.get("loss"), float):
                post["loss"] = f"{metrics['loss']:.4f}"
            if isinstance(metrics.get("lr"), float):
                post["lr"] = f"{metrics['lr']:.2e}"
            if isinstance(metrics.get("tokens_per_second"), float):
                post["tok_s"] = f"{metrics['tokens_per_second']:.0f}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(step - self.bar.n)
        elif step % self.log_every == 0 or step == self.total:
            self.console.log(format_step(step, self.total, metrics))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.console._bar = None
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def quiet_third_party(*, bars: bool = True) -> Iterator[None]:
    """Within the block: ignore :data:`THIRD_PARTY_WARNINGS`; without ``bars``, no progress bars from
    transformers (weight loading) or datasets either. Everything is restored on exit."""
    with warnings.catch_warnings():
        for category, message, module in THIRD_PARTY_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
        restore = []
        for name, pattern in THIRD_PARTY_LOG_MESSAGES:
            logger, drop = logging.getLogger(name), _Drop(pattern)
            logger.addFilter(drop)
            restore.append(lambda logger=logger, drop=drop: logger.removeFilter(drop))
        if not bars:
            restore += _bars_off()
        try:
            yield
        finally:
            for undo in restore:
                undo()


class _Drop(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def _bars_off() -> list:
    undo = []
    if "transformers" in sys.modules or _importable("transformers"):
        from transformers.utils import logging as hf_logging

        if hf_logging.is_progress_bar_enabled():
            hf_logging.disable_progress_bar()
            undo.append(hf_logging.enable_progress_bar)
    if "datasets" in sys.modules:
        import datasets

        if datasets.is_progress_bar_enabled():
            datasets.disable_progress_bars()
            undo.append(datasets.enable_progress_bars)
    return undo


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
