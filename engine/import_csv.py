"""Reading CSV rows for the importer: one bad row (bytes that are not UTF-8, a field over
the csv module's size limit, a wrong number of fields) is rejected alone, never the rows
after it."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

Row = tuple[int | str, str, dict[str, str], str | None]  # label, kind, values, error


def open_csv(path: Path) -> TextIO:
    """Bytes that are not UTF-8 become lone surrogates, so that only their rows fail."""
    return path.open(encoding="utf-8-sig", errors="surrogateescape", newline="")


def csv_rows(path: Path, header: list[str], kind: str) -> Iterator[Row]:
    """(line, kind, values by column, error) for each non-blank row after the header."""
    with open_csv(path) as handle:
        reader = csv.reader(handle)
        next(reader)
        line = reader.line_num + 1
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield line, kind, {}, f"cannot read the row: {exc}"
            else:
                if any(f.strip() for f in fields):
                    values = dict(zip(header, fields, strict=False))
                    yield line, kind, values, shape_error(header, fields)
            line = reader.line_num + 1


def shape_error(header: list[str], fields: list[str]) -> str | None:
    """What is wrong with a row's fields as such, before their values are read."""
    if len(fields) != len(header):
        return f"expected {len(header)} fields, found {len(fields)}"
    bad = next((n for n, f in zip(header, fields, strict=True) if undecodable(f)), None)
    return f"{bad} is not valid UTF-8 (save the file as UTF-8)" if bad else None


def undecodable(text: str) -> bool:
    """Whether the text holds bytes that were not UTF-8 (read with surrogateescape)."""
    return any("\udc80" <= c <= "\udcff" for c in text)
