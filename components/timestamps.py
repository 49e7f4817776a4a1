"""What a timestamp of the data contract is: whole seconds since 1970-01-01 UTC, from 1990 to 2100.

`increc prepare` reads every log's timestamp column through `Timestamps`:
the column's unit is taken from its first value, so a log written in
milliseconds, microseconds or nanoseconds is recognised (and divided down to
seconds, with a note), and every later value must be a time in the same
unit. A value in another unit, a negative one, one before 1990 (unless old
timestamps are allowed) or one past 2100 is refused with a message that says
how to fix it. Pure Python, so the CLI can check a flag such as `--start`
before TensorFlow is loaded.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

EARLIEST = 631_152_000  # 1990-01-01 00:00:00 UTC
LATEST = 4_102_444_800  # 2100-01-01 00:00:00 UTC (the first second refused)
UNITS = {1: "seconds", 1_000: "milliseconds", 1_000_000: "microseconds", 1_000_000_000: "nanoseconds"}
OLD_FLAG = "--allow-old-timestamps"


@dataclasses.dataclass(frozen=True)
class Timestamps:
    """The accepted range; with `allow_old`, seconds from 1970 (0) on are accepted too."""

    allow_old: bool = False

    @property
    def earliest(self) -> int:
        return 0 if self.allow_old else EARLIEST

    def range_text(self) -> str:
        start = "1970-01-01" if self.allow_old else "1990-01-01"
        return f"{start} and 2100-01-01"

    def unit_of(self, value: int) -> Optional[int]:
        """The factor (1, 1000, ...) of the unit whose range holds value, or None."""
        for factor in UNITS:
            low = self.earliest if factor == 1 else EARLIEST * factor
            if low <= value < LATEST * factor:
                return factor
        return None

    def problem(self, value: int, factor: int, first_line: Optional[int] = None) -> Optional[str]:
        """Why `value` is not a timestamp in the column's unit (`factor`), or None when it is one.

        `first_line`: where the column's first value, which set the unit, is.
        """
        unit = self.unit_of(value)
        if unit == factor:
            return None
        if value < 0:
            return f"{value} is negative; timestamps are seconds since 1970-01-01 UTC"
        if unit is not None:
            where = f" (line {first_line})" if first_line is not None else ""
            return (f"{value} looks like {UNITS[unit]}, but the column's first value{where} is in "
                    f"{UNITS[factor]}; give every timestamp in the same unit")
        if value < EARLIEST and factor == 1:
            return (f"{value} is before 1990-01-01 ({EARLIEST}); if the log really is that old, "
                    f"pass {OLD_FLAG}")
        return (f"{value} is not a time between {self.range_text()} in seconds (or milliseconds, "
                f"microseconds, nanoseconds) since 1970-01-01 UTC")

    def span_problem(self, flag: str, start: int, end: int) -> Optional[str]:
        """Why a generated log from second `start` to `end` (the value of `flag`) is out of range, or None."""
        unit = self.unit_of(start)
        if unit not in (None, 1):
            return f"{flag} {start} looks like {UNITS[unit]}; give seconds since 1970-01-01 UTC ({start // unit})"
        problem = self.problem(start, 1)
        if problem:
            return f"{flag} {problem}"
        if end > LATEST:
            return f"{flag} {start}: the log would run past 2100-01-01 ({LATEST}); start earlier or make it shorter"
        return None

    def seconds(self, value: int, factor: int) -> int:
        return value // factor

    def note(self, where: str, factor: int) -> str:
        """The note prepare prints when a column is converted."""
        return (f"note: {where}, column timestamp: the values are {UNITS[factor]} since 1970-01-01 UTC; "
                f"divided by {factor:,} to seconds")
