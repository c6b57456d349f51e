"""When the SLURM pre-emption checkpoint is written, so that the requeued job continues the run correctly.

Under SLURM (``hydra/launcher=slurm``) the job receives SIGUSR1 before its time limit; Lightning's handler writes
``<run>/hpc_ckpt_<n>.ckpt`` and requeues the job. Lightning runs that handler wherever the signal finds the run, and
from some of those places the checkpoint does not continue correctly:
  - inside an optimizer step: the weights (and Adam's moments) are updated but the step is not counted yet, so the
    continued run applies that batch a second time (part of the parameters a second time, mid-update);
  - after an epoch's last training batch and before its validation has started (the validation loader starting its
    workers), or between two validation batches: the continued run skips that epoch's validation, so its Dice never
    reaches the curves or the choice of the best checkpoint.
A checkpoint written mid-epoch continues that epoch with the draws it had not reached
(:class:`~landmark_unet.data.slices.RankShare`), with the same crops and augmentation.

SIGTERM (SLURM's, after the requeue or at the time limit; ``scancel``) stops a run after its current training step.
Under DDP Lightning 2.6 finds out whether a rank has it by broadcasting a device tensor from rank 0 before every
training batch and reading it back (``.item()``): a host-device synchronisation in every step, which keeps the host
from queueing the next step ahead of the GPU. Its handler also broadcasts from inside the signal handler, so a
SIGTERM that reaches one rank other than rank 0 pairs that broadcast with the wrong collective and the ranks stop at
different batches. The same agreement as the requeue signal's replaces both.
"""

from __future__ import annotations

import logging
import signal

import pytorch_lightning as pl
import torch

log = logging.getLogger(__name__)

REQUEUE, STOP = 0, 1  # the signals' places in the agreement: SLURM's requeue signal, SIGTERM


def _no_broadcast() -> None:
    """Stands in for Lightning's per-step SIGTERM broadcast under DDP (the ranks agree in the callback instead)."""


class PreemptionCheckpoint(pl.Callback):
    """Acts on the pre-emption signals at points of the run that are safe for them.

    The requeue signal (SLURM, SIGUSR1): Lightning's handler (checkpoint and requeue) runs only at points the run
    continues from correctly:

    - the end of a training batch, except an epoch's last (Lightning counts the batch as done and goes on with the
      next one; after the last one it would skip the epoch's validation);
    - inside an epoch's validation: the checkpoint's validation progress is set to "inside its first batch", the
      state from which Lightning runs that validation again from its start (the metric states are not saved);
    - the start of an epoch's validation (the same: it runs again);
    - the end of training.

    A signal that arrives elsewhere waits for the next of these points: at most one training batch, or an epoch's
    last batch and the start of its validation loader. Validation counts as running from this callback's
    ``on_validation_start`` until its ``on_validation_end``: place it after
    :class:`~landmark_unet.lit.callbacks.MetricHistory` (the checkpoint callbacks, which Lightning always calls last,
    save after both).

    Under DDP all ranks must write the checkpoint at the same point (saving ends with a barrier), but the signal may
    reach them at different moments, or reach one rank only. The ranks therefore agree first: at each training
    batch end every rank starts a non-blocking all-reduce (gloo, on the host: no device synchronisation) of whether
    it has the signal, and reads the result at the next batch end, where all of them act together. The agreements
    at validation start and end and at training end block (once per epoch). Validation batches differ in number
    between ranks, so under DDP a signal during validation waits for the next of those points.

    SIGTERM under DDP: the ranks agree on it in the same all-reduce and all stop after the same training batch
    (Lightning's ``received_sigterm`` set at the agreement, its per-step broadcast of it turned off). One during
    validation stops the run when the validation ends; SLURM's grace time after SIGTERM (``KillWait``, 30 s by
    default) must cover the longest validation, as it must a training step. A single process keeps Lightning's
    SIGTERM handling (it broadcasts nothing there).

    Nothing happens in a single process without SLURM's auto-requeue; the test stage keeps Lightning's behaviour.
    """

    LOOP_KEY = "epoch_loop.val_loop.batch_progress"

    def __init__(self):
        self._installed = False
        self._handler = None  # Lightning's handler of the requeue signal, while this callback holds it
        self._signum: int | None = None
        self._sigterm = None  # Lightning's SIGTERM handler, while this callback holds it (DDP only)
        self._sigterm_others: list = []  # the handlers it runs besides Lightning's notifier
        self._trainer = None
        # this rank received the signal and has not acted on it: [requeue signal, SIGTERM]
        self._pending = [False, False]
        self._agreed = [False, False]  # DDP: the ranks found that one of them has it, and act at the next point
        self._validating = False
        self._group = None  # gloo process group of the ranks' agreement (DDP only)
        self._inflight = None  # (work, flags) of the agreement started at the last training batch end

    # -- install and restore ----------------------------------------------------------------------------------
    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._install(trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        self._install(trainer)

    def _install(self, trainer) -> None:
        """Takes over Lightning's requeue-signal handler (SLURM) and, under DDP, its SIGTERM handling; Lightning
        registers both just before the fit stage runs."""
        if self._installed:
            return
        self._installed, self._trainer = True, trainer
        self._pending, self._agreed, self._inflight = [False, False], [False, False], None
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            self._group = torch.distributed.new_group(backend="gloo")  # every rank calls this hook
            self._take_over_sigterm(trainer)
        from lightning_fabric.plugins.environments import SLURMEnvironment

        environment = getattr(trainer._accelerator_connector, "cluster_environment", None)
        if not (isinstance(environment, SLURMEnvironment) and environment.auto_requeue):
            return
        signum = environment.requeue_signal or signal.SIGUSR1
        handler = signal.getsignal(signum)
        if not callable(handler):
            return
        self._handler, self._signum = handler, signum
        signal.signal(signum, self._on_signal)

    def _take_over_sigterm(self, trainer) -> None:
        """Replaces Lightning's SIGTERM notifier (it broadcasts inside the handler) by :meth:`_on_sigterm`, and its
        per-step broadcast by nothing. Left as it is if Lightning's handler is not where 2.6 puts it."""
        from pytorch_lightning.trainer.connectors.signal_connector import _HandlersCompose

        handler = signal.getsignal(signal.SIGTERM)
        notifier = trainer._signal_connector._sigterm_notifier_fn
        epoch_loop = trainer.fit_loop.epoch_loop
        if not (isinstance(handler, _HandlersCompose) and notifier in handler.signal_handlers
                and hasattr(epoch_loop, "_broadcast_sigterm_tensor")):
            log.warning("Lightning's SIGTERM handling is not the one this callback knows: left as it is")
            return
        self._sigterm = handler
        self._sigterm_others = [h for h in handler.signal_handlers if h != notifier]
        epoch_loop._broadcast_sigterm_tensor = _no_broadcast  # shadows the method on this instance only
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or not self._installed:
            return
        self._installed, self._trainer = False, None
        self._inflight = None  # on_train_end read it; after a failure, waiting could hang
        if self._handler is not None and signal.getsignal(self._signum) == self._on_signal:
            signal.signal(self._signum, self._handler)
        if self._sigterm is not None:
            if signal.getsignal(signal.SIGTERM) == self._on_sigterm:
                signal.signal(signal.SIGTERM, self._sigterm)
            trainer.fit_loop.epoch_loop.__dict__.pop("_broadcast_sigterm_tensor", None)
        self._handler = self._sigterm = self._group = None

    def _on_signal(self, signum, frame) -> None:
        if self._group is None and self._validating:
            self._handler(signum, frame)  # on_save_checkpoint marks the validation to be run again
        else:
            log.info("pre-emption signal %d received: checkpoint at the next safe point", signum)
            self._pending[REQUEUE] = True

    def _on_sigterm(self, signum, frame) -> None:
        """What Lightning's notifier does, less its broadcast, and with ``received_sigterm`` set once the ranks
        agree: a launcher's child processes get the signal at once, and the other handlers run."""
        log.info("SIGTERM received: the ranks stop after the same training batch")
        if not self._pending[STOP]:
            launcher = self._trainer.strategy.launcher if self._trainer is not None else None
            if launcher is not None:
                launcher.kill(signum)
        self._pending[STOP] = True
        for handler in self._sigterm_others:
            handler(signum, frame)

    # -- the points where the checkpoint is written ------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # not after an epoch's last batch: Lightning continues such a checkpoint without that epoch's validation
        self._act_if_signalled(blocking=False, here=batch_idx + 1 < trainer.num_training_batches)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._validating = not trainer.sanity_checking
        if self._validating:
            self._act_if_signalled(blocking=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._validating and self._group is not None:
            self._act_if_signalled(blocking=True, here=False)  # a SIGTERM during validation stops the run here
        self._validating = False

    def on_train_end(self, trainer, pl_module) -> None:
        self._act_if_signalled(blocking=True)

    def _act_if_signalled(self, blocking: bool, here: bool = True) -> None:
        """Runs Lightning's requeue handler if this rank (one process) or any rank (DDP) has its signal and ``here``
        is a point to write the checkpoint at; otherwise keeps the signal for the next point. Under DDP, then stops
        the run if any rank has SIGTERM (Lightning raises at the end of this batch, or after the first validation
        batch)."""
        if not self._installed:
            return
        if self._group is not None:
            self._agreed = self._agree(blocking)
        signalled = self._agreed if self._group is not None else self._pending
        if self._handler is not None and here and signalled[REQUEUE]:
            self._pending[REQUEUE] = self._agreed[REQUEUE] = False
            self._handler(self._signum, None)
        if self._sigterm is not None and self._agreed[STOP]:
            self._trainer._signal_connector.received_sigterm = True

    def _agree(self, blocking: bool) -> list[bool]:
        """Which signals any rank has, ``[requeue, SIGTERM]``: the same answer on every rank, since every rank makes
        the same calls. Non-blocking: what the agreement started at the previous call found (or an earlier one not
        yet acted on), and a new agreement started. Blocking: that, or else an agreement made now."""
        agreed = list(self._agreed)
        if self._inflight is not None:
            work, flags = self._inflight
            work.wait()
            agreed = [a or bool(f) for a, f in zip(agreed, flags.tolist())]  # a host tensor: no device sync
            self._inflight = None
        if not blocking:
            flags = torch.tensor([int(p and not a) for p, a in zip(self._pending, agreed)])
            self._inflight = (torch.distributed.all_reduce(flags, group=self._group, async_op=True), flags)
        elif not all(agreed):
            flags = torch.tensor([int(p) for p in self._pending])
            torch.distributed.all_reduce(flags, group=self._group)
            agreed = [a or bool(f) for a, f in zip(agreed, flags.tolist())]
        return agreed

    # -- a checkpoint written during validation runs that validation again --------------------------------------
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        progress = checkpoint.get("loops", {}).get("fit_loop", {}).get(self.LOOP_KEY)
        if self._validating and progress is not None:
            for counts in (progress["total"], progress["current"]):
                counts.update(ready=1, started=1, processed=0, completed=0)
            progress["is_last_batch"] = False
