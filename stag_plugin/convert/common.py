"""What every `stag convert` command shares: its error type and atomic output folders.

An output folder is written as a hidden sibling `.<name>.partial/` and renamed to `<name>` only
once it is complete; an existing `<name>` (with --overwrite) is replaced only by that rename. A
conversion that fails or is interrupted therefore leaves no `<name>` behind and an existing one
untouched; a stale `.partial` folder from a killed run is removed by the next run.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from pathlib import Path
from typing import Iterable, Iterator

from stag_plugin.errors import StagError


class ConvertError(StagError):
    """A conversion that cannot proceed."""


def say(message: str) -> None:
    """Progress line on stderr (stdout stays for results)."""
    print(f"[stag convert] {message}", file=sys.stderr, flush=True)


def partial_path(out: Path) -> Path:
    """The hidden sibling a conversion writes before renaming it to `out`."""
    out = Path(out)
    return out.with_name(f".{out.name}.partial")


def check_out(out: Path, overwrite: bool, sources: Iterable[Path] = ()) -> None:
    """--out must be new (or --overwrite given) and must not overlap a source folder."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConvertError(f"--out {out} already exists",
                           "pass another --out folder, or --overwrite to replace it (it is "
                           "replaced only once the new one is complete)")
    if out.exists() and not out.is_dir():
        raise ConvertError(f"--out {out} is a file", "pass a folder path")
    target = out.resolve()
    for source in sources:
        source = Path(source).resolve()
        if target == source or source in target.parents or target in source.parents:
            raise ConvertError(f"--out {out} overlaps the source checkpoint {source}",
                               "write the conversion to a folder outside the source")


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Yield an empty `.partial` folder; rename it to `out` when the block completes, remove it
    when the block raises (or is interrupted)."""
    from stag_plugin.training import checkpointing

    partial = partial_path(out)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
        checkpointing.replace_dir(partial, Path(out))  # an existing `out` goes only now
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
