"""Everything a caller may choose about running a model, in one frozen object."""

from __future__ import annotations

from dataclasses import dataclass, fields

from runtime.errors import StepstreamError


@dataclass(frozen=True)
class RuntimeOptions:
    n_ctx: int | None = None  # positions the cache may hold; None: the model's context, at most 4096
    n_batch: int = 64  # prefill chunk: tokens evaluated together
    n_threads: int | None = None  # compute threads; None leaves the libraries' defaults
    rollback: int = 16  # positions trim(n) can undo on sliding blocks (their ring keeps W + this)
    experts: str = "ram"  # expert provider: "ram" keeps every routed expert resident

    @classmethod
    def from_kwargs(cls, **kwargs) -> "RuntimeOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise StepstreamError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        opts = cls(**kwargs)
        opts.validate()
        return opts

    def validate(self) -> None:
        if self.n_ctx is not None and self.n_ctx < 1:
            raise StepstreamError(f"n_ctx must be positive, got {self.n_ctx}")
        if self.n_batch < 1:
            raise StepstreamError(f"n_batch must be positive, got {self.n_batch}")
        if self.n_threads is not None and self.n_threads < 1:
            raise StepstreamError(f"n_threads must be positive, got {self.n_threads}")
        if self.rollback < 0:
            raise StepstreamError(f"rollback must be >= 0, got {self.rollback}")
        if self.experts not in ("ram",):
            raise StepstreamError(f"experts={self.experts!r}: this build provides only 'ram'")
