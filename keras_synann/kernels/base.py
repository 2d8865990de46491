"""What an implementation of `log_inhibition` is, and why one does not apply.

An implementation's module gives one `rules.Kernel`: three operations on
plain tensors of its backend, all in one argument order,

    forward(x, W, chunk) -> s                          (batch, n_out)
    adjoint(x, W, u, chunk) -> (dx, dW)                the vjp of sum(u * s)
    contract(slot, power, a, b, c, x, W, chunk) -> t   T_p's gradient in `slot`

from which `kernels.rules` derives the tangent and every higher derivative.
Its row in the registry (`kernels.REGISTRY`, an `Implementation`) declares,
as data, the backend, dtypes, devices and tracing contexts it supports;
`Implementation.not_supported_reasons` derives the reasons from that data,
and the kernel adds only its own (a build of the C loops, an interpreter).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping

import keras

from keras_synann.kernels import cpu_build, devices, reference
from keras_synann.kernels.rules import Kernel

#: A tracing-context key of `Implementation.refuses` that stands for every tracer.
EVERY_TRACER = "*"


#: Kernel modules that failed to import -> why (a failed import is not retried).
_MISSING: dict[str, str] = {}


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One row of the registry: an implementation on one backend, as data.

    Attributes:
        name: what `implementation=` names it.
        backend: the Keras backend it runs on.
        module: its module under `keras_synann.kernels`, holding its `KERNEL`;
            None for the keras.ops reference (`kernels.reference.KERNEL`).
        subject: how reasons name it ("the C loops").
        dtypes: the dtypes it computes in (None: every float dtype).
        devices: the kinds of device it runs on (`devices.Context.device`;
            None: every one).
        refuses: tracing context (`devices.Context.tracer`, or EVERY_TRACER)
            -> why it cannot run there, "{context}" standing for the context.
        auto_avoids: the same for contexts where only "auto" passes it over.
        plain: tracing context -> a function f(x, W, chunk) traced there
            instead of the kernel, for a tracer that records plain
            operations only (no autodiff rules of its own).
    """

    name: str
    backend: str
    module: str | None = None
    subject: str = "it"
    dtypes: tuple[str, ...] | None = None
    devices: tuple[str, ...] | None = None
    refuses: Mapping[str, str] = dataclasses.field(default_factory=dict)
    auto_avoids: Mapping[str, str] = dataclasses.field(default_factory=dict)
    plain: Mapping[str, Callable] = dataclasses.field(default_factory=dict)

    def load(self) -> tuple[Kernel | None, str | None]:
        """(its kernel, None), or (None, why its module cannot be imported)."""
        if self.module is None:
            return reference.KERNEL, None
        path = f"keras_synann.kernels.{self.module}"
        if path in _MISSING:
            return None, _MISSING[path]
        try:
            return importlib.import_module(path).KERNEL, None
        except ImportError as e:
            _MISSING[path] = f"{e.name or 'a package it needs'} is not installed"
            return None, _MISSING[path]

    def kernel(self) -> Kernel:
        """Its kernel (call `not_supported_reasons` first)."""
        kernel, error = self.load()
        if kernel is None:
            raise ImportError(error)
        return kernel

    def not_supported_reasons(
        self, x, kernel, context: devices.Context, auto: bool = False
    ) -> list[str]:
        """Why it does not apply to these tensors in `context`, in words (empty:
        it does). Its module is imported only where the data allow it, so a
        tracer never records an import or a build."""
        reasons = []
        received = {keras.backend.standardize_dtype(t.dtype) for t in (x, kernel)}
        if self.dtypes is not None and not received <= set(self.dtypes):
            reasons.append(
                f"{self.subject} compute in {' or '.join(self.dtypes)} "
                f"(received {devices.dtypes(x, kernel)})"
            )
        if self.devices is not None and context.device not in self.devices:
            needs = " or ".join(devices.NEEDS[self.backend, d] for d in self.devices)
            reasons.append(f"{self.subject} need {needs} ({context.where})")
        if context.tracer is not None:
            why = self.refuses.get(context.tracer, self.refuses.get(EVERY_TRACER))
            if why is None and auto:
                why = self.auto_avoids.get(context.tracer)
            if why is not None:
                reasons.append(why.format(context=context.tracer))
        if reasons:
            return reasons
        own, error = self.load()
        if own is None:
            return [error]
        if own.build is not None:
            unavailable = cpu_build.unavailable(own.build)
            if unavailable is not None:
                return [unavailable]
        return [] if own.reasons is None else own.reasons(x, kernel, auto)
