"""What the command line shows people: consoles, progress bars, sizes."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

console = Console()
# Progress bars and problems go to stderr, so that stdout stays parseable.
errors = Console(stderr=True)


def progress_bar() -> Progress:
    """A progress bar with counts and the time left, on stderr."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=errors,
    )


def transfer_bar(*columns: ProgressColumn) -> Progress:
    """A progress bar of bytes (in the units of :func:`size`), the rate and
    the time left, on stderr; ``columns`` go after the description."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        *columns,
        DownloadColumn(binary_units=False),
        _RateColumn(),
        TimeRemainingColumn(),
        console=errors,
    )


class _RateColumn(ProgressColumn):
    """Bytes per second in the units of :func:`size`, with its thousands
    separators."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("?" if speed is None else f"{size(int(speed))}/s")


def size(count: int) -> str:
    """A byte count for people: 1,234 B, 12.3 MB. In powers of 1000, as
    the configuration, the bandwidth timetables and the capacities printed
    on disks and cartridges count them: a volume labelled 400G is listed as
    400.0 GB."""
    value = float(count)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:,.1f} {unit}" if unit != "B" else f"{count:,} B"
        value /= 1000
    return f"{count} B"


def duration(seconds: float) -> str:
    """A time span for people: 45 s, 12 min, 3 h 05 min, 2 d 4 h."""
    whole = int(seconds)
    if whole < 60:
        return f"{whole} s"
    minutes = whole // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"
