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

Without ``rows`` it is exactly Hydra's basic sweeper. Jobs run row by row, the grid varying fastest.
Selected with ``hydra/sweeper=grid`` (conf/hydra/sweeper/grid.yaml), as the table experiments do.
"""

from __future__ import annotations

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.errors import HydraException


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
