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
(:class:`~landmark_unet.data.slices.SkipTrained`); random crops and augmentation are drawn afresh.
"""

from __future__ import annotations

import logging
import signal

import pytorch_lightning as pl
import torch

log = logging.getLogger(__name__)


class PreemptionCheckpoint(pl.Callback):
    """Runs Lightning's pre-emption handler (checkpoint and requeue) only at points the run continues from correctly:

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
    at validation start and at training end block (once per epoch). Validation batches differ in number between
    ranks, so under DDP a signal during validation waits for the next of those points.

    Nothing happens without SLURM's auto-requeue (no handler to move); the test stage keeps Lightning's behaviour.
    """

    LOOP_KEY = "epoch_loop.val_loop.batch_progress"

    def __init__(self):
        self._handler = None  # Lightning's handler of the requeue signal, while this callback holds it
        self._signum: int | None = None
        self._pending = False  # this rank received the signal and has not acted on it
        self._agreed = False  # DDP: the ranks found that one of them has it, and act at the next point
        self._validating = False
        self._group = None  # gloo process group of the ranks' agreement (DDP only)
        self._inflight = None  # (work, flag) of the agreement started at the last training batch end

    # -- install and restore ----------------------------------------------------------------------------------
    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._install(trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        self._install(trainer)

    def _install(self, trainer) -> None:
        """Takes over Lightning's requeue-signal handler, which it registers just before the fit stage runs."""
        if self._handler is not None:
            return
        from lightning_fabric.plugins.environments import SLURMEnvironment

        environment = getattr(trainer._accelerator_connector, "cluster_environment", None)
        if not (isinstance(environment, SLURMEnvironment) and environment.auto_requeue):
            return
        signum = environment.requeue_signal or signal.SIGUSR1
        handler = signal.getsignal(signum)
        if not callable(handler):
            return
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            self._group = torch.distributed.new_group(backend="gloo")  # every rank calls this hook
        self._handler, self._signum, self._pending, self._agreed = handler, signum, False, False
        signal.signal(signum, self._on_signal)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or self._handler is None:
            return
        self._inflight = None  # on_train_end read it; after a failure, waiting could hang
        if signal.getsignal(self._signum) == self._on_signal:
            signal.signal(self._signum, self._handler)
        self._handler = None

    def _on_signal(self, signum, frame) -> None:
        if self._group is None and self._validating:
            self._handler(signum, frame)  # on_save_checkpoint marks the validation to be run again
        else:
            log.info("pre-emption signal %d received: checkpoint at the next safe point", signum)
            self._pending = True

    # -- the points where the checkpoint is written ------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # not after an epoch's last batch: Lightning continues such a checkpoint without that epoch's validation
        self._act_if_signalled(blocking=False, here=batch_idx + 1 < trainer.num_training_batches)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._validating = not trainer.sanity_checking
        if self._validating:
            self._act_if_signalled(blocking=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._validating = False

    def on_train_end(self, trainer, pl_module) -> None:
        self._act_if_signalled(blocking=True)

    def _act_if_signalled(self, blocking: bool, here: bool = True) -> None:
        """Runs Lightning's handler if this rank (one process) or any rank (DDP) has the signal and ``here`` is a
        point to write the checkpoint at; otherwise keeps the signal for the next point."""
        if self._handler is None:
            return
        if self._group is not None:
            self._agreed = self._agree(blocking)
        if here and (self._agreed if self._group is not None else self._pending):
            self._pending = self._agreed = False
            self._handler(self._signum, None)

    def _agree(self, blocking: bool) -> bool:
        """Whether any rank has the signal: the same answer on every rank, since every rank makes the same calls.
        Non-blocking: what the agreement started at the previous call found (or an earlier one not yet acted on),
        and a new agreement started. Blocking: that, or else an agreement made now."""
        agreed = self._agreed
        if self._inflight is not None:
            work, flag = self._inflight
            work.wait()
            agreed = agreed or bool(flag.item())  # a host tensor: no device synchronisation
            self._inflight = None
        if not blocking:
            flag = torch.tensor([0 if agreed else int(self._pending)])
            self._inflight = (torch.distributed.all_reduce(flag, group=self._group, async_op=True), flag)
        elif not agreed:
            flag = torch.tensor([int(self._pending)])
            torch.distributed.all_reduce(flag, group=self._group)
            agreed = bool(flag.item())
        return agreed

    # -- a checkpoint written during validation runs that validation again --------------------------------------
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        progress = checkpoint.get("loops", {}).get("fit_loop", {}).get(self.LOOP_KEY)
        if self._validating and progress is not None:
            for counts in (progress["total"], progress["current"]):
                counts.update(ready=1, started=1, processed=0, completed=0)
            progress["is_last_batch"] = False
