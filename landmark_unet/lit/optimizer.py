"""The optimiser's update compiled by ``torch.compile`` (``model.compile_optimizer``).

An eager ``torch.optim`` step runs each of its operations as a separate pass over all the parameters (RMSprop with
momentum and weight decay: about eight passes over the study network's 31 M parameters and their state). Compiled,
the update becomes a few fused loops (Inductor's C++ on a CPU, Triton on a GPU) that read each parameter, gradient
and state tensor once. On a 2-core AMD EPYC the study's RMSprop update took 51 ms eager and 17 ms compiled (the
same parameters to 1e-8 after three steps; a throw-away script), about 20 s of compiling; on the H200 the eager
update was 0.72 ms of a 9.87 ms compiled training step, the lever this option is for (``benchmarks/README.md``).

Dynamo guards the compiled code on the optimiser object, so every new optimiser in a process compiles again; past
torch's recompile limit (8) the update runs eagerly again (torch warns once). A training run builds one optimiser.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable

import torch


def compile_step(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Make ``optimizer.step`` run its parameter update as code compiled by ``torch.compile``; returns ``optimizer``.

    - Each parameter group's learning rate becomes a 0-dim fp32 tensor on the CPU, so that a scheduler changing it
      (``StepLR``, ``PolynomialLR``: they update a tensor rate in place) does not recompile the update; the
      optimiser's state dict then holds that tensor, which an eager optimiser also accepts.
    - A closure (Lightning passes one that runs the forward and backward) is evaluated eagerly first, with
      gradients enabled, as ``torch.optim`` does; only the update is compiled.
    - The first call compiles (10-20 s for the study network on a 2-core CPU; Inductor keeps the code in its disk
      cache for later runs); later calls reuse it.

    Patches the optimiser instance's ``step`` (a bound method, as an LR scheduler expects when it wraps it again);
    its class and every other method stay ``torch.optim``'s.
    """
    for group in optimizer.param_groups:
        if not torch.is_tensor(group["lr"]):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32)
    update = torch.compile(optimizer.step)  # the eager bound method, always called without a closure

    def step(self: torch.optim.Optimizer, closure: Callable[[], torch.Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        update()
        return loss

    optimizer.step = types.MethodType(step, optimizer)
    return optimizer


def check_optimisation(module) -> None:
    """Builds the optimiser (``model.optimizer``) and LR scheduler (``model.scheduler``) of ``module`` (a
    :class:`~landmark_unet.lit.segmentation.SegmentationModule`) once on its parameters, and drops them: a setting
    torch rejects (a negative learning rate, an argument the class does not take) stops the run before anything is
    trained, with the key named, rather than as a stack trace when Lightning builds them.

    Raises:
        InputError: ``model.optimizer`` or ``model.scheduler``, and torch's message.
    """
    from landmark_unet.errors import InputError, message_line

    _check_numbers("model.optimizer", module.optimizer_factory)
    if module.scheduler_factory is not None:
        _check_numbers("model.scheduler", module.scheduler_factory)
    try:
        optimizer = module.optimizer_factory(params=module.parameters())
    except (ValueError, TypeError) as err:
        raise InputError("model.optimizer", message_line(err)) from None
    if module.scheduler_factory is not None:
        try:
            module.scheduler_factory(optimizer=optimizer)
        except (ValueError, TypeError) as err:
            raise InputError("model.scheduler", message_line(err)) from None


def _check_numbers(key: str, factory) -> None:
    """An argument of a ``functools.partial`` factory that the class takes as a number (its default is one, or its
    annotation says ``int`` or ``float``) but is given as something else: torch stores ``StepLR(gamma="x")`` and
    fails only when the epoch ends.

    Raises:
        InputError: ``<key>.<argument>: must be a number, got 'x'``.
    """
    from landmark_unet.config import is_number
    from landmark_unet.errors import InputError

    func, given = getattr(factory, "func", None), getattr(factory, "keywords", None) or {}
    try:
        parameters = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return
    for name, value in given.items():
        param = parameters.get(name)
        if param is None or is_number(value):
            continue
        if is_number(param.default) or param.annotation in (int, float, "int", "float"):
            raise InputError(f"{key}.{name}", f"must be a number, got {value!r}")
