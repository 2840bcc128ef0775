"""What `tools/preprocess_data.py --input` reads: JSON lines, or Parquet files.

    --input docs.jsonl | docs.jsonl.gz     one JSON object per line (gzip detected by magic bytes)
    --input part-0.parquet                  one Parquet file; --json-keys name string columns
    --input data/                           every *.parquet file under the folder, in sorted
                                            path order (an HF dataset repository's data/ folder)

Both kinds yield `Chunk`s of numbered documents for the tokenising workers. Parquet is streamed:
only the --json-keys columns are read, one record batch of a row group at a time, so memory is
bounded by a row group, not by the file. Every Parquet file's footer and schema are checked when
the input is opened, before the tool creates any output: a file that is not Parquet (or whose
footer is damaged), a missing column, or a column that does not hold strings is a `BadInput`
naming the file. Damage found later, inside a data page, is a `BadInput` raised while reading;
the tool then discards its temporary outputs.
"""
from __future__ import annotations

import gzip
import os
from typing import Iterator

from megatron_rlp.data.preprocess import Chunk


class BadInput(ValueError):
    """An input file the tool cannot read as documents; the message names the file."""


def open_input(path: str, keys: list[str]):
    """A `JsonlInput` or `ParquetInput` for `--input path` (checked now, see the module doc)."""
    if os.path.isdir(path):
        files = sorted(os.path.join(folder, name)
                       for folder, _, names in os.walk(path) for name in names
                       if name.endswith(".parquet"))
        if not files:
            raise BadInput(f"--input {path!r} is a folder without .parquet files; pass a "
                           "JSONL file, a .parquet file, or a folder of .parquet files")
        return ParquetInput(files, keys)
    if not os.path.isfile(path):
        raise BadInput(f"--input {path!r}: no such file or folder")
    if path.endswith(".parquet"):
        return ParquetInput([path], keys)
    return JsonlInput(path)


class JsonlInput:
    """Numbered raw lines of a plain or gzip file; progress in bytes of the file."""

    unit = "B"

    def __init__(self, path: str):
        self.path = path
        self.total = os.path.getsize(path)
        self.raw = open(path, "rb")
        gz = self.raw.read(2) == b"\x1f\x8b"
        self.raw.seek(0)
        self.stream = gzip.GzipFile(fileobj=self.raw, mode="rb") if gz else self.raw

    def chunks(self, size: int) -> Iterator[Chunk]:
        items = []
        for lineno, line in enumerate(self.stream, start=1):
            items.append((lineno, line))
            if len(items) == size:
                yield Chunk(self.path, items)
                items = []
        if items:
            yield Chunk(self.path, items)

    def position(self) -> int:
        return self.raw.tell()  # compressed bytes for .gz: matches the file size total

    def close(self) -> None:
        self.stream.close()
        self.raw.close()


def _import_parquet():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise BadInput("reading Parquet needs pyarrow: pip install 'megatron-rlp[parquet]' "
                       "(or pip install pyarrow)") from None
    # What pyarrow raises for a damaged or foreign file: ArrowInvalid for a bad footer,
    # OSError for a failed page CRC or corrupt compressed data.
    return pq, (pa.ArrowException, OSError)


def _holds_text(arrow_type) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(arrow_type):  # e.g. written from a pandas categorical
        arrow_type = arrow_type.value_type
    return (pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)
            or pa.types.is_string_view(arrow_type))


class ParquetInput:
    """Rows of the --json-keys columns of one or more Parquet files; progress in rows."""

    unit = "rows"

    def __init__(self, paths: list[str], keys: list[str]):
        self.pq, self.read_errors = _import_parquet()
        self.paths, self.keys = paths, keys
        self.total = sum(self._check(path) for path in paths)
        self._done = 0

    def _open(self, path: str):
        try:
            # Verifies page CRCs where the writer stored them (pyarrow does not by default).
            return self.pq.ParquetFile(path, page_checksum_verification=True)
        except self.read_errors as error:
            raise BadInput(f"{path}: not a readable Parquet file ({error})") from None

    def _check(self, path: str) -> int:
        """The number of rows of `path`, after checking its footer and the --json-keys columns."""
        with self._open(path) as parquet:
            schema = parquet.schema_arrow
            rows = parquet.metadata.num_rows
        for key in self.keys:
            if key not in schema.names:
                raise BadInput(f"{path}: no column {key!r} (columns: {', '.join(schema.names)}); "
                               "name the text column(s) with --json-keys")
            if not _holds_text(schema.field(key).type):
                raise BadInput(f"{path}: column {key!r} holds {schema.field(key).type}, not "
                               "strings; name a text column with --json-keys")
        return rows

    def chunks(self, size: int) -> Iterator[Chunk]:
        for path in self.paths:
            yield from self._file_chunks(path, size)

    def _file_chunks(self, path: str, size: int) -> Iterator[Chunk]:
        row = 0
        with self._open(path) as parquet:
            batches = parquet.iter_batches(batch_size=size, columns=self.keys,
                                           use_threads=False)
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                except self.read_errors as error:  # a damaged page: compression, CRC, encoding
                    raise BadInput(f"{path}: damaged Parquet data after row index {row} "
                                   f"({error})") from None
                # Columns in --json-keys order (a repeated key is refused by the tool).
                columns = [batch.column(key).to_pylist() for key in self.keys]
                yield Chunk(path, list(zip(range(row, row + batch.num_rows), zip(*columns))),
                            rows=True)
                row += batch.num_rows
                self._done += batch.num_rows

    def position(self) -> int:
        return self._done

    def close(self) -> None:
        pass
