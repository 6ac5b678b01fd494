"""PatchReport: what :func:`fastlora.patch` did, and why it left anything alone.

A report is built while patching and never afterwards. ``str(report)`` is a short
table; ``report.fallbacks`` lists every module that kept its original forward and the
reason; ``report.ok`` is True when something was accelerated and nothing the patcher
was asked to accelerate fell back (a patch that accelerates nothing is not ok). It is also logged once, on the ``fastlora`` logger, so a fallback is never silent.
"""
from __future__ import annotations

import dataclasses
import logging
from collections import Counter

logger = logging.getLogger("fastlora")


@dataclasses.dataclass(frozen=True)
class Fallback:
    """One module that keeps its original forward."""

    name: str  # dotted module name inside the patched model ("" for the root)
    kind: str  # handler kind ("lora", "head", ...)
    reason: str

    def __str__(self) -> str:
        return f"{self.name or '<model>'} [{self.kind}]: {self.reason}"


@dataclasses.dataclass
class PatchReport:
    """Outcome of one :func:`fastlora.patch` call.

    ``patched``: kind -> number of modules whose forward now runs fastlora ops.
    ``fallbacks``: modules the patcher could have accelerated but left unchanged, with
    the reason. ``kept``: kind -> (count, reason) for modules deliberately left as they
    are (not an error: e.g. bitsandbytes layers without LoRA). ``protected``: bnb
    ``Linear4bit`` layers guarded against bitsandbytes' in-place CPU repacking.
    ``already_patched``: True when the model was patched before and this call was a
    no-op. ``notes``: what the user should know (e.g. no LoRA layer yet).
    ``nothing_accelerated``: no module runs a fastlora op (``ok`` is then False).
    """

    patched: Counter = dataclasses.field(default_factory=Counter)
    fallbacks: list[Fallback] = dataclasses.field(default_factory=list)
    kept: dict[str, tuple[int, str]] = dataclasses.field(default_factory=dict)
    protected: int = 0
    already_patched: bool = False
    backend: str = "auto"
    backend_info: dict[str, str] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    options: dict = dataclasses.field(default_factory=lambda: {"lora": True, "loss": True})

    @property
    def share_prefix(self) -> bool:
        """True when shared-prefix training is on for at least one decoder of the model."""
        return self.patched.get("shared prefix", 0) > 0

    @property
    def nothing_accelerated(self) -> bool:
        return not any(self.patched.values())

    @property
    def ok(self) -> bool:
        return not self.fallbacks and not self.nothing_accelerated

    def add_patched(self, kind: str) -> None:
        self.patched[kind] += 1

    def add_fallback(self, name: str, kind: str, reason: str) -> None:
        self.fallbacks.append(Fallback(name, kind, reason))

    def add_kept(self, kind: str, reason: str) -> None:
        n, _ = self.kept.get(kind, (0, reason))
        self.kept[kind] = (n + 1, reason)

    def __str__(self) -> str:
        rows = [("patched", kind, str(n), "") for kind, n in sorted(self.patched.items())]
        by_reason = Counter((f.kind, f.reason) for f in self.fallbacks)
        rows += [("FALLBACK", kind, str(n), why) for (kind, why), n in sorted(by_reason.items())]
        rows += [("kept", kind, str(n), why) for kind, (n, why) in sorted(self.kept.items())]
        rows.append(("protected", "bnb Linear4bit", str(self.protected), "CPU in-place repack disabled"))
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        w2 = max(len(r[2]) for r in rows)
        state = (
            "NOTHING TO ACCELERATE" if self.nothing_accelerated
            else ("ok" if self.ok else f"{len(self.fallbacks)} fallback(s)")
        )
        head = "fastlora.patch: " + state + (" (already patched: refreshed)" if self.already_patched else "")
        lines = [head]
        lines += [f"  {a:<{w0}}  {b:<{w1}}  {c:>{w2}}  {d}".rstrip() for a, b, c, d in rows]
        if self.fallbacks:
            lines.append("  fallbacks:")
            lines += [f"    {f}" for f in self.fallbacks[:20]]
            if len(self.fallbacks) > 20:
                lines.append(f"    ... and {len(self.fallbacks) - 20} more (see report.fallbacks)")
        lines += [f"  note: {n}" for n in self.notes]
        if self.options.get("share_prefix", False):
            lines.append("  shared prefix: " + ("on" if self.share_prefix else "off (see above)"))
        else:
            lines.append("  shared prefix: off (share_prefix=False)")
        kernels = ", ".join(f"{k}={v}" for k, v in self.backend_info.items())
        lines.append(f"  backend: {self.backend}" + (f" ({kernels})" if kernels else ""))
        return "\n".join(lines)

    def log(self) -> None:
        level = logging.INFO if self.ok else logging.WARNING
        logger.log(level, "%s", self)
