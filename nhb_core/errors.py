"""One exception hierarchy for every user-facing problem.

Every error names the file (and row where there is one), the problem and the fix.
The CLI prints ``str(err)`` as ``error: <file>[:<row>]: <problem>. <fix>`` on
stderr with exit code 2; the dashboard shows the same line in an error box.
"""

from __future__ import annotations

from dataclasses import dataclass
from os import PathLike


class NHBError(Exception):
    """Base class of every error the user can act on.

    Parameters
    ----------
    file : path-like or str or None
        The file (or folder, or logical source such as ``"--score"``) at fault.
    problem : str
        What is wrong, without a trailing period.
    fix : str
        What the user should do, without a trailing period.
    row : int or None
        Line number in the table file as a spreadsheet shows it (header = 1, first
        data row = 2), when the problem is in one row.
    """

    def __init__(self, file: str | PathLike | None, problem: str, fix: str = "", row: int | None = None):
        self.file = None if file is None else str(file)
        self.problem = str(problem).rstrip(". ")
        self.fix = str(fix).rstrip(". ")
        self.row = row
        super().__init__(self.line())

    def line(self) -> str:
        """The one-line message: ``<file>[:<row>]: <problem>. <fix>.``"""
        where = self.file or "input"
        if self.row is not None:
            where = f"{where}:{self.row}"
        msg = f"{where}: {self.problem}."
        if self.fix:
            msg += f" {self.fix}."
        # never more than one line, whatever the inputs held
        return " ".join(msg.split())

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.line()

    def __reduce__(self):
        # picklable (errors raised in worker processes reach the parent intact)
        return (self.__class__, (self.file, self.problem, self.fix, self.row))


class InputError(NHBError):
    """A file or argument the user gave is missing, unreadable or malformed."""


class ManifestError(InputError):
    """The cohort manifest (CSV) is malformed."""


class ImageError(InputError):
    """A T1 volume or ROI mask cannot be used (corrupt, wrong shape, NaN, ...)."""


class DicomError(ImageError):
    """A DICOM series folder cannot be assembled into one volume."""


class ConfigError(InputError):
    """A configuration file or option is invalid."""


class DatasetError(InputError):
    """A prepared slice dataset or split file is missing or inconsistent."""


class StatsInputError(InputError):
    """Data given to a statistic cannot be analysed (one class, NaN, ...)."""


class RunError(NHBError):
    """A run folder is missing, incomplete or in the wrong state."""


class NetworkUnavailableError(NHBError):
    """Something asked for a remote resource (hub weights) and no network is reachable."""


@dataclass(frozen=True)
class Problem:
    """One problem found while validating a table, for reports that list them all.

    ``row`` is the line number in the file (header = 1, first data row = 2; None for
    whole-file problems), ``column`` the column concerned (or None).
    """

    file: str
    problem: str
    fix: str
    row: int | None = None
    column: str | None = None

    def line(self) -> str:
        return NHBError(self.file, self.problem, self.fix, self.row).line()

    def to_error(self, cls: type[NHBError] = InputError) -> NHBError:
        return cls(self.file, self.problem, self.fix, self.row)
