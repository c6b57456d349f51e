"""How this training process was launched: DDP rank launch checks, GPU pinning and CPU threads of parallel local
jobs, and what a failure does (a single run exits, a multirun job records it and lets the sweep go on)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

from omegaconf import DictConfig

from landmark_unet.data.nifti import atomic_write_bytes
from landmark_unet.errors import InputError, exit_on_input_error

FAILURE_FILE = "failure.json"

log = logging.getLogger(__name__)


def _hydra_job() -> tuple[bool, int]:
    """(inside a Hydra multirun, this job's number); (False, 0) outside Hydra."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return False, 0
    hc = HydraConfig.get()
    return hc.mode == RunMode.MULTIRUN, int(hc.job.get("num", 0) or 0)


def in_multirun() -> bool:
    """Whether this process runs a job of a Hydra multirun."""
    return _hydra_job()[0]


def _devices(cfg: DictConfig):
    return cfg.trainer.get("devices", 1)


def check_ddp_launch(cfg: DictConfig) -> None:
    """Lightning's DDP relaunches the command once per rank: right for a single run, wrong inside a Hydra multirun
    on one machine (each rank would start the whole sweep again). There, the ranks must come from the cluster
    (SLURM tasks through hydra/launcher=submitit_slurm, or torchrun)."""
    strategy = str(cfg.trainer.get("strategy", "auto"))
    devices = _devices(cfg)
    if not strategy.startswith("ddp") or strategy == "ddp_spawn" or devices in (1, "1"):
        return
    multirun, _ = _hydra_job()
    launched = int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "TORCHELASTIC_RUN_ID" in os.environ
    if multirun and not launched:
        raise InputError("trainer.strategy", f"{strategy} on {devices} devices inside a multirun without a cluster "
                         "launcher: use hydra/launcher=submitit_slurm with hydra.launcher.tasks_per_node equal to "
                         "trainer.devices, or run the setting as a single run")


def pin_local_job_gpu(cfg: DictConfig) -> int | None:
    """Under hydra/launcher=submitit_local, jobs run side by side and every job sees the same GPUs; a one-device job
    number k is pinned to visible GPU k mod N (CUDA_VISIBLE_DEVICES) so parallel jobs do not share a card.
    Returns the physical GPU chosen, or None when nothing was changed (no local submitit job, < 2 GPUs)."""
    if "SUBMITIT_LOCAL_JOB_ID" not in os.environ or _devices(cfg) not in (1, "1"):
        return None
    visible = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    if len(visible) < 2:
        return None
    _, job = _hydra_job()
    chosen = visible[job % len(visible)]
    os.environ["CUDA_VISIBLE_DEVICES"] = chosen
    log.info("submitit_local job %d pinned to GPU %s of %s", job, chosen, ",".join(visible))
    return int(chosen) if chosen.isdigit() else None


def _launcher_cpus_per_task() -> int | None:
    """``hydra.launcher.cpus_per_task`` of this job's submitit launcher (local or SLURM), or None."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    launcher = HydraConfig.get().get("launcher") or {}
    if "submitit" not in str(launcher.get("_target_", "")):
        return None
    cpus = launcher.get("cpus_per_task")
    return int(cpus) if isinstance(cpus, int) and not isinstance(cpus, bool) and cpus >= 1 else None


def set_cpu_threads(cfg: DictConfig, key: str = "cpu_threads") -> int:
    """Set the threads torch's CPU operations use (``torch.set_num_threads``) from the entry point's ``cpu_threads``
    and return the number in use.

    ``cpu_threads``: a whole number >= 1, or null for the job's CPUs: ``hydra.launcher.cpus_per_task`` when a
    submitit launcher started the job, else torch's default (one per core this process may run on). It matters for
    ``hydra/launcher=submitit_local``, which starts every job of a sweep at once on the same cores: without it each
    job runs as many threads as there are cores, and on 2 cores two such jobs each ran 7x slower than one alone
    (benchmarks/README.md). Under submitit_local without ``cpus_per_task`` a warning says so. The data loader's
    workers run one thread each whatever this says (PyTorch sets that).

    Raises:
        InputError: the value is not null or a whole number >= 1 (names the key).
    """
    import torch

    value = cfg.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InputError(key, f"must be null or a whole number >= 1, got {value!r}")
    threads = value if value is not None else _launcher_cpus_per_task()
    if threads is None and "SUBMITIT_LOCAL_JOB_ID" in os.environ and _first_process():
        log.warning("submitit_local runs this sweep's jobs side by side, each with %d CPU threads: set "
                    "hydra.launcher.cpus_per_task (or %s) to share the cores", torch.get_num_threads(), key)
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def _first_process() -> bool:
    """Whether this is the first process of its job: global rank 0 as submitit and torch.distributed's launchers
    number them (a job's warnings are said once, not once per rank)."""
    return all(os.environ.get(name, "0") == "0" for name in ("SUBMITIT_LOCAL_GLOBALID", "RANK", "LOCAL_RANK"))


EXIT_TERMINATED = 128 + 15  # what a shell reports for a process ended by SIGTERM


@contextlib.contextmanager
def job_guard(run_dir: str | Path) -> Iterator[None]:
    """How a run fails. A single run: bad input exits with one line and code 2 (:func:`exit_on_input_error`).
    A job of a multirun: any error is written to ``<run_dir>/failure.json`` (one-line ``error``, ``type`` and
    ``traceback``) and to the job's log, then re-raised for Hydra to mark the job failed, so that the sweep goes
    on with its other jobs (the ``grid`` sweeper lists the failures at the end, the report lists the run). A
    failure.json left by an earlier attempt of the job is removed when it starts again. Either way, a run stopped
    by SIGTERM (Lightning ends it after the current step) says how to continue it and exits with code 143, not 0."""
    try:
        if not in_multirun():
            with exit_on_input_error():
                yield
        else:
            with _failure_recorded(Path(run_dir) / FAILURE_FILE):
                yield
    except BaseException as err:
        if not _stopped_by_sigterm(err):
            raise
        print("stopped by SIGTERM: continue this run with the same command plus resume=auto", file=sys.stderr,
              flush=True)
        sys.exit(EXIT_TERMINATED)


def _stopped_by_sigterm(err: BaseException) -> bool:
    """Whether ``err`` is Lightning's SIGTERMException (a SystemExit). Looked up among the loaded modules, so that a
    run that fails before it imports Lightning (a bad config) does not wait seconds for that import."""
    exceptions = sys.modules.get("pytorch_lightning.utilities.exceptions")
    return exceptions is not None and isinstance(err, exceptions.SIGTERMException)


@contextlib.contextmanager
def _failure_recorded(failure: Path) -> Iterator[None]:
    failure.unlink(missing_ok=True)
    try:
        yield
    except Exception as err:
        line = f"{err}" if isinstance(err, InputError) else f"{err.__class__.__name__}: {err}"
        log.error("job failed: %s", line, exc_info=not isinstance(err, InputError))
        record = {"error": line.splitlines()[0] if line.strip() else err.__class__.__name__,
                  "type": err.__class__.__name__, "traceback": traceback.format_exc()}
        atomic_write_bytes(failure, json.dumps(record, indent=2).encode())
        raise


def read_failure(run_dir: str | Path) -> str | None:
    """The one-line error of a failed multirun job (its failure.json), or None."""
    try:
        return str(json.loads((Path(run_dir) / FAILURE_FILE).read_text())["error"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
