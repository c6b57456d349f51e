"""The ``grid`` sweeper: Hydra's basic (cartesian) sweeper plus explicit rows.

A study table is not always a full grid. Table 1 compares one multi-task network (``organ=all``) with one
single-task network per organ; Table 4 lists 8 of the 12 crop x augmentation combinations. ``rows`` lists such
settings, each a list of overrides, and every row is crossed with the cartesian grid of ``params`` (the rounds,
say)::

    hydra:
      sweeper:
        params:
          data.split.round: 0,1,2,3,4
        rows:
          - [model=unet2d_multitask, organ=all]
          - [organ=liver]
          - [organ=kidneys]

Jobs run row by row, the grid varying fastest. Unlike Hydra's basic sweeper, a failed job does not stop the sweep:
every job runs, and at the end the failed ones are listed (their errors are in each job's failure.json, see
:func:`landmark_unet.launch.job_guard`) and the command exits with code 1. A sweep re-launched into its folder
(``hydra.sweep.dir=...``) with ``skip_done=true`` skips the jobs that finished. The default sweeper of
``landmark_unet.train`` (conf/train.yaml).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobStatus
from hydra.errors import HydraException
from omegaconf import OmegaConf

log = logging.getLogger(__name__)
EXIT_JOBS_FAILED = 1


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("~+")


def cross(jobs: list[list[str]], rows: list[list[str]]) -> list[list[str]]:
    """Every row crossed with every grid job (row-major), refusing a key that is both in a row and in the grid."""
    if not rows:
        return jobs
    grid_keys = {_key(o) for o in (jobs[0] if jobs else [])}
    for row in rows:
        clash = grid_keys & {_key(o) for o in row}
        if clash:
            raise HydraException(f"hydra.sweeper.rows: {sorted(clash)} is both in a row and in the grid")
    return [list(row) + job for row in rows for job in jobs]


def expand(overrides: list[str], rows: list[list[str]] | None = None) -> list[list[str]]:
    """The jobs of a sweep, each a list of overrides, from override strings (``k=a,b``) and rows: what
    :class:`GridSweeper` launches (the report uses it to list the jobs a multirun planned)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    return cross(jobs, [[str(o) for o in row] for row in rows or []])


class GridSweeper(BasicSweeper):
    """Cartesian sweep of ``params`` and command-line sweeps, crossed with explicit ``rows`` of overrides."""

    def __init__(self, max_batch_size: int | None, params: dict[str, str] | None = None, rows: list | None = None):
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.rows = [[str(o) for o in row] for row in (rows or [])]

    def split_arguments(self, overrides, max_batch_size):  # noqa: D102 - BasicSweeper.sweep calls it through self
        jobs = cross([job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch], self.rows)
        if not max_batch_size or max_batch_size < 0:
            return [jobs]
        return [jobs[i:i + max_batch_size] for i in range(0, len(jobs), max_batch_size)]

    def sweep(self, arguments: list[str]):  # noqa: D102 - BasicSweeper.sweep, going on past failed jobs
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        params = self._parse_config() + list(arguments)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        self.overrides = self.split_arguments(parser.parse_overrides(params), self.max_batch_size)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        log.info("sweep folder %s (to finish it after a crash: the same command with hydra.sweep.dir=%s "
                 "skip_done=true resume=auto)", sweep_dir, sweep_dir)
        returns, failed, first = [], [], 0
        while not self.is_done():
            batch = self.get_job_batch()
            tic = time.perf_counter()
            self.validate_batch_is_legal(batch)
            log.debug("validated %d jobs in %.2f s", len(batch), time.perf_counter() - tic)
            results = self.launcher.launch(batch, initial_job_idx=first)
            failed += [(first + i, job, r) for i, (job, r) in enumerate(zip(batch, results))
                       if r.status == JobStatus.FAILED]
            first += len(batch)
            returns.append(results)
        if failed:
            lines = [f"{len(failed)} of {first} jobs failed:"]
            lines += [f"  job {n} ({_folder(r, job)}): {_one_line(r._return_value)}" for n, job, r in failed]
            print("\n".join(lines), file=sys.stderr, flush=True)
            sys.exit(EXIT_JOBS_FAILED)
        return returns


def _folder(ret, job: list[str]) -> str:
    """The job's run folder (its path below the sweep folder names the swept settings), else its overrides."""
    try:
        return str(Path(ret.hydra_cfg.hydra.runtime.output_dir).relative_to(ret.hydra_cfg.hydra.sweep.dir))
    except Exception:  # noqa: BLE001 - no Hydra config in the return (another launcher)
        return " ".join(job)


def _one_line(err: object) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else err.__class__.__name__)[:300]
