"""One kernel registry per runtime op: the kernels that implement the op, when each may run, and what runs instead.

An op (`qat.runtime.ops`: the W*A16 linear, the W*A8 linear, weight dequantization, per-token int8 activation
codes) owns one `KernelRegistry`. Each kernel has a name (what `impl=` and the dispatch table say), an
`available` predicate on the call (shape, dtype, and through `qat.device.device_path` where it runs) and a
`fallback` naming the kernel tried when it is not available. `resolve` starts from the name asked for, or the
registry's own default for the call, and follows fallbacks until a kernel is available; a name the registry does
not hold comes back unchanged, for the op to refuse with its own message.

A kernel without `run` is a name the op takes but never runs itself (another op's kernel, which the dispatcher
has always accepted and routed to one of this op's): it is never available, only its fallback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Optional, TypeVar

__all__ = ["Kernel", "KernelRegistry", "always"]

C = TypeVar("C")  # what a registry's predicates read about one call


def always(call: Any) -> bool:
    """The predicate of a kernel that runs every call it is given (the references, dequantize-then-GEMM)."""
    return True


def _never(call: Any) -> bool:
    return False


@dataclass(frozen=True)
class Kernel(Generic[C]):
    name: str
    run: Optional[Callable[..., Any]]
    available: Callable[[C], bool]
    fallback: Optional[Callable[[C], str]]


class KernelRegistry(Generic[C]):
    """{kernel name: Kernel} of one op, and how the op picks one for a call."""

    def __init__(self, op: str, default: Callable[[C], str]) -> None:
        self.op = op
        self.default = default
        self.kernels: dict[str, Kernel[C]] = {}

    def add(self, name: str, run: Optional[Callable[..., Any]], available: Callable[[C], bool] = always,
            fallback: Optional[Callable[[C], str]] = None) -> None:
        """Register a kernel; without `run` it is a name routed to `fallback` (never available itself)."""
        if name in self.kernels:
            raise ValueError(f"{self.op}: kernel {name!r} is registered twice")
        if (available is not always or run is None) and fallback is None:
            raise ValueError(f"{self.op}: kernel {name!r} may be unavailable, so it needs a fallback")
        self.kernels[name] = Kernel(name, run, _never if run is None else available, fallback)

    def names(self) -> tuple[str, ...]:
        """The kernels that run (not the names only routed elsewhere), in registration order."""
        return tuple(n for n, k in self.kernels.items() if k.run is not None)

    def resolve(self, impl: Optional[str], call: C) -> str:
        """The kernel that runs `call`: `impl` (None: the registry's default for the call), or where it is not
        available its fallback, and so on. A name not registered is returned as it is."""
        impl = self.default(call) if impl is None else impl
        seen = []
        while impl in self.kernels and not self.kernels[impl].available(call):
            seen.append(impl)
            impl = self.kernels[impl].fallback(call)
            if impl in seen:
                raise RuntimeError(f"{self.op}: the fallbacks of {seen} run in a circle")
        return impl

    def run(self, impl: str, *args: Any, **kwargs: Any) -> Any:
        """Call kernel `impl` (a name `resolve` returned)."""
        return self.kernels[impl].run(*args, **kwargs)
