"""The labelled set a ``--data`` value names: an offline ``proxy:NAME`` set or a user's files."""

from __future__ import annotations

from pathlib import Path

from pacofr.eval.labelled import LabelledSet
from pacofr.eval.proxy import is_proxy, open_proxy
from pacofr.eval.readers import DataOptions, read_labelled


def open_data(source: str | Path, scratch: Path, options: DataOptions | None = None) -> LabelledSet:
    """The labelled set of a ``--data`` value: ``proxy:NAME`` (written under ``scratch``) or a
    folder, CSV or npz (:func:`pacofr.eval.readers.read_labelled`)."""
    if is_proxy(str(source)):
        if options is not None and options != DataOptions():
            raise ValueError("a proxy set takes no --label / --regression / --split-column / --group-column / --images")
        return open_proxy(str(source), scratch)
    return read_labelled(source, options)
