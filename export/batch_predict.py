"""`pollinate predict`: a stored version's shipped LiteRT artifact over a whole file, in batches.

The "precompute and store" path: a CSV of table rows (the model's columns) or an array file
(.npy, or .npz with `x`) of MODEL inputs (after the preprocessing the manifest describes, like
the server's predict route) goes through exactly the `tflite-float32` file that clients of
that version download, resized to a batch of `--batch-size` rows, and the outputs come out in
the input's row order as a CSV (one column per output) or a .npy array.

- A CSV is streamed: `--chunk-lines` lines at a time go through numpy's C reader (categories
  by vocabulary lookup); only a chunk that reader cannot take as it is (quoted cells, blank
  or ragged lines, text in a number column, non-finite numbers, a refused unknown category)
  goes through `registry.inputs.encode_rows`, the checks the server's predict route uses,
  whose refusal names the row and column; the message then names the file's line too.
- Nothing is written unless every row passed: the output is a temporary file beside `--out`,
  renamed at the end, removed on any error.
- All cores by default, as one interpreter with `num_threads` = the cores, and the reader on a
  second thread while LiteRT runs (`invoke` releases the GIL). Measured on the 2 (shared) cores
  this was built on: several interpreters over chunks (threads) were no faster for the
  delivery MLP or the digits CNN; worker processes for a CSV (`--processes`) lost ~1.5 s to
  starting (spawn) on 1M rows, so they are opt-in, for many idle cores and big files.
- `python -m export.batch_predict --bench ROWS --home H` times it on generated delivery rows
  against the bare LiteRT invoke loop doing the same job: over the same array in this process,
  as a one-off script in a fresh process (np.load, loop, np.save) for the command, and over the
  same CSV (numpy's reader, text out) for a CSV. 1M rows, 2 shared cores, best of 2
  (benchmarks/results/predict.md): .npy 1.02x the loop in process; the command 1.45x the
  fresh-process script (0.79x the warm loop; with Python's start, 0.68x the script's wall: the
  `pollinate` CLI imports ~0.3 s more than numpy + LiteRT); CSV 1.16x the loop over the same
  CSV, 0.13x the loop over a preloaded array: text parsing and formatting bind it. The command's
  fixed costs, in a fresh process: building the interpreter 7-10 ms (beside the reader's first
  chunk), output columns ~1 ms, the outputs appended chunk by chunk by a writer thread, the
  fsync before the rename 2-17 ms (the disk's journal; kept). pandas is imported only for CSV
  input.

TensorFlow is never imported: LiteRT (`ai_edge_litert`) runs the file.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import operator
import os
import queue
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.errors import InvalidInput, NotFound
from core.tensorflow import quiet_stderr
from registry.inputs import check_inputs, encode_rows, is_tabular, spec_dtype, spec_shape, tabular_columns

FORMAT = "tflite-float32"
INPUT_SUFFIXES = (".csv", ".npy", ".npz")
OUTPUT_SUFFIXES = (".csv", ".npy")
DEFAULT_BATCH = 4096
CSV_LINES = 32768  # lines per CSV chunk (measured: 4096-line chunks took ~20% longer on 1M rows)
COUNT_COMMAS = operator.methodcaller("count", ",")
COUNT_QUOTES = operator.methodcaller("count", '"')
ARRAY_BATCHES = 16  # a .npy/.npz chunk (checked on the reader thread) is this many invoke batches
FLOAT = "%.9g"  # 9 significant digits: any float32 reads back exactly
ROW_PREFIX = re.compile(r"^row (\d+)(, |: )")


# --------------------------------------------------------------------------- which version


@dataclass
class Chosen:
    """The version a batch runs, why (the channel it follows, or as asked) and its file."""

    record: object  # registry VersionRecord
    why: str
    model_path: Path


def choose_version(store, name: str, version: int | None, channel: str | None) -> Chosen:
    """`--version N` exactly; `--channel C` the version that channel serves (its main version,
    not a staged candidate: a batch has no client id); neither: what `stable` serves (the newest
    version while `stable` is unset)."""
    if version is not None and channel is not None:
        raise InvalidInput("give --version or --channel, not both")
    if version is not None:
        record = store.get_version(name, version)
        why = "as asked"
    else:
        which = channel or "stable"
        if channel is not None and store.get_channel(name, channel) is None:
            store.get_version(name)  # an unknown model says so first
            raise NotFound(f"model {name!r} has no channel {channel!r}")
        number, reason = store.resolve(name, which)
        record = store.get_version(name, number)
        why = f"channel {which}" if reason != "latest" else "the newest: channel stable is not set"
    files = record.artifacts.get(FORMAT) or []
    if not files:
        shipped = ", ".join(sorted(record.artifacts)) or "none"
        raise InvalidInput(f"{name} v{record.version} has no {FORMAT} artifact (it has: {shipped}); "
                           f"run `pollinate export {name} --version {record.version} --formats {FORMAT}`")
    return Chosen(record, why, store.artifact_path(name, record.version, FORMAT, files[0].name))


def target_name(store, record) -> str:
    """The regression target's name: the spec's, the CSV recipe's, or the training report's."""
    spec = record.input_spec or {}
    if spec.get("target"):
        return str(spec["target"])
    data = (record.lineage.extra or {}).get("data") or {}
    if isinstance(data, dict) and data.get("target"):
        return str(data["target"])
    for item in record.artifacts.get("report") or []:
        if item.name == "report.json":
            try:
                report = json.loads(store.artifact_path(record.model, record.version, "report", item.name).read_text())
                found = (report.get("dataset") or {}).get("target")
            except (OSError, ValueError, AttributeError):
                found = None
            if found:
                return str(found)
    return "prediction"


def output_columns(store, record, width: int) -> list[str]:
    """One CSV column per output: `p_<label>` per class plus `prediction` (the top label),
    the target's name for one regression output, else `output_<i>`."""
    labels = record.labels
    if labels and len(labels) == width:
        return [f"p_{label}" for label in labels] + ["prediction"]
    if width == 1:
        return [target_name(store, record)]
    return [f"output_{i}" for i in range(width)]


# --------------------------------------------------------------------------- readers


@dataclass
class Chunk:
    """Encoded model inputs for a run of rows, in file order."""

    x: np.ndarray
    first_row: int  # 0-based index of its first row among all rows


class BadRow(Exception):
    """A refused row of a chunk: its line in the file, its place in the chunk (None: not a
    row, e.g. unreadable CSV), and what is wrong. The reader adds the file and the data row."""

    def __init__(self, line: int, index: int | None, detail: str):
        super().__init__(line, index, detail)
        self.line, self.index, self.detail = line, index, detail


class RowEncoder:
    """Lines of a CSV (under a known header) as the model's feature batch. Picklable (worker
    processes build their own): numpy's C reader first, `encode_rows` for what it cannot take."""

    def __init__(self, input_spec: dict, header: list[str]):
        self.spec = input_spec
        self.header = header
        self.columns = tabular_columns(input_spec)
        self.features = list((input_spec.get("preprocessing") or {}).get("features") or [])
        rule = (input_spec.get("preprocessing") or {}).get("unknown_category")
        self.unknown_zero = isinstance(rule, str) and "zero" in rule.lower()
        self.names = [str(c["name"]) for c in self.columns]
        self.positions = {n: header.index(n) for n in self.names}
        index = {f: i for i, f in enumerate(self.features)}
        self.plan = []  # (name, column in the file, feature index | [feature index per category], vocabulary)
        for column in self.columns:
            name = str(column["name"])
            if column.get("type") == "categorical":
                vocabulary = [str(v) for v in column.get("vocabulary") or []]
                self.plan.append((name, self.positions[name], [index[f"{name}={v}"] for v in vocabulary],
                                  {v: float(i) for i, v in enumerate(vocabulary)}))
            else:
                self.plan.append((name, self.positions[name], index[name], None))
        self.usecols = [p for _, p, _, _ in self.plan]

    def encode(self, lines: list[str], first_line: int) -> np.ndarray:
        x = self.fast(lines)
        return self.checked(lines, first_line) if x is None else x

    def fast(self, lines: list[str]) -> np.ndarray | None:
        """numpy's C reader on a chunk of plain lines; None when the chunk needs the checks."""
        if set(map(COUNT_COMMAS, lines)) != {len(self.header) - 1}:
            return None  # ragged or blank lines: the checks decide
        text = "".join(lines)
        if '"' in text:
            return None  # quoted cells: the csv module reads them
        if pandas() is not None:
            table = self.pandas_table(text, len(lines))
            return None if table is None else self.features_of(table)
        converters = {p: category_code(vocab) for _, p, _, vocab in self.plan if vocab is not None}
        try:
            table = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.float64, usecols=self.usecols,
                               converters=converters, comments=None, quotechar=None, ndmin=2, encoding=None)
        except (ValueError, TypeError):
            return None
        if table.shape != (len(lines), len(self.usecols)):
            return None
        return self.features_of(table)

    def pandas_table(self, text: str, rows: int) -> np.ndarray | None:
        """pandas' C reader (measured ~3x numpy's on delivery rows) when pandas is there: the
        columns as float64, a category as its vocabulary index (-1 unknown); None when pandas
        is absent or the chunk needs the checks."""
        pd = pandas()
        if pd is None:
            return None
        dtypes = {p: ("category" if vocab is not None else np.float64) for _, p, _, vocab in self.plan}
        try:
            frame = pd.read_csv(io.StringIO(text), header=None, names=range(len(self.header)), usecols=self.usecols,
                                dtype=dtypes, engine="c", quoting=csv.QUOTE_NONE, skip_blank_lines=False,
                                keep_default_na=False, na_filter=False, comment=None)
        except (ValueError, TypeError, pd.errors.ParserError):
            return None
        if len(frame) != rows:
            return None
        table = np.empty((rows, len(self.plan)), dtype=np.float64)
        for j, (_, position, _, vocab) in enumerate(self.plan):
            column = frame[position]
            if vocab is None:
                table[:, j] = column.to_numpy(dtype=np.float64)
            else:
                lookup = np.asarray([vocab.get(str(c), -1.0) for c in column.cat.categories], dtype=np.float64)
                codes = column.cat.codes.to_numpy()
                if (codes < 0).any():
                    return None
                table[:, j] = lookup[codes]
        return table

    def features_of(self, table: np.ndarray) -> np.ndarray | None:
        """Columns in the plan's order (categories as vocabulary indexes) as the model's
        features; None when a value needs the checks (non-finite, beyond float32, unknown)."""
        lines = table
        out = np.zeros((len(lines), len(self.features)), dtype=np.float32)
        for j, (_, _, where, vocab) in enumerate(self.plan):
            values = table[:, j]
            if vocab is None:
                if not np.isfinite(values).all() or (np.abs(values) > np.finfo(np.float32).max).any():
                    return None
                out[:, where] = values
            else:
                codes = values.astype(np.int64)
                unknown = codes < 0
                if unknown.any() and not self.unknown_zero:
                    return None
                rows = np.flatnonzero(~unknown)
                out[rows, np.asarray(where, dtype=np.int64)[codes[rows]]] = 1.0
        return self.shaped(out)

    def checked(self, lines: list[str], first_line: int) -> np.ndarray:
        """The chunk through `encode_rows` (the server's checks); a refusal becomes a BadRow
        naming the file's line."""
        rows, where = [], []
        reader = csv.reader(lines)
        start = 0
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                raise BadRow(first_line + reader.line_num - 1, None, f"not readable CSV: {exc}") from None
            line = first_line + start
            start = reader.line_num
            if not any(cell.strip() for cell in fields):
                continue  # a blank line is no row
            if len(fields) > len(self.header):
                raise BadRow(line, len(rows), f"{len(fields)} fields, but the header has {len(self.header)}")
            rows.append({n: fields[self.positions[n]] for n in self.names if self.positions[n] < len(fields)})
            where.append(line)
        if not rows:
            return np.zeros((0, *[d or len(self.features) for d in spec_shape(self.spec)]), dtype=np.float32)
        try:
            return encode_rows(rows, self.spec)
        except InvalidInput as exc:
            message = str(exc)
            found = ROW_PREFIX.match(message)
            if not found:
                raise
            r = int(found.group(1))
            raise BadRow(where[r], r, message[found.end():]) from None

    def shaped(self, out: np.ndarray) -> np.ndarray:
        shape = spec_shape(self.spec)
        if len(shape) == 1:
            return out
        return np.ascontiguousarray(out.reshape((len(out), *[len(self.features) if d is None else d for d in shape])))


class CsvTable:
    """A CSV of table rows read in chunks of `batch` lines, each encoded as the model's features.

    Line numbers in messages are the file's (1-based, the header is line 1), with the data
    row (1-based, blank lines not counted) beside them."""

    def __init__(self, path: Path, input_spec: dict, batch: int):
        self.path = Path(path)
        self.spec = input_spec
        self.batch = batch
        if not is_tabular(input_spec):
            raise InvalidInput(f"{self.path.name}: this model takes arrays of shape {spec_shape(input_spec)}, "
                               "not table rows; give a .npy or .npz file")
        names = [str(c["name"]) for c in tabular_columns(input_spec)]
        self.handle = open_text(self.path)
        try:
            header = next(csv.reader([self.handle.readline()]), [])
        except csv.Error as exc:
            self.handle.close()
            raise InvalidInput(f"{self.path.name} line 1 (header): not a readable CSV header: {exc}") from None
        except UnicodeDecodeError:
            self.handle.close()
            raise InvalidInput(f"{self.path.name} is not UTF-8 text; save the CSV as UTF-8") from None
        self.header = [name.strip() for name in header]
        problem = None
        if not any(self.header):
            problem = f"{self.path.name} is empty: expected a header line with the model's columns"
        duplicates = sorted({n for n in self.header if self.header.count(n) > 1})
        missing = [n for n in names if n not in self.header]
        if duplicates:
            problem = f"{self.path.name} line 1 (header): duplicate column {duplicates[0]!r}"
        elif missing and not problem:
            problem = (f"{self.path.name} line 1 (header): missing column {missing[0]!r}; "
                       f"the model's columns are: {', '.join(names)}")
        if problem:
            self.handle.close()
            raise InvalidInput(problem)
        self.ignored = [n for n in self.header if n not in names]
        self.encoder = RowEncoder(input_spec, self.header)
        self.line = 1  # physical lines consumed so far
        self.rows = 0  # data rows produced so far

    def estimated_rows(self) -> int | None:
        """Lines in the file minus the header (exact unless blank lines or quoted newlines)."""
        try:
            with self.path.open("rb") as handle:
                lines = sum(block.count(b"\n") for block in iter(lambda: handle.read(1 << 20), b""))
                handle.seek(max(self.path.stat().st_size - 1, 0))
                if handle.read(1) not in (b"\n", b""):
                    lines += 1
        except OSError:
            return None
        return max(lines - 1, 0)

    def raw(self) -> Iterator[tuple[list[str], int]]:
        """(lines, first line number) of `batch` lines at a time; a quoted cell never split."""
        try:
            while True:
                try:
                    lines = list(itertools.islice(self.handle, self.batch))
                    while sum(map(COUNT_QUOTES, lines)) % 2:  # a quoted cell spans lines
                        more = self.handle.readline()
                        if not more:
                            break
                        lines.append(more)
                except UnicodeDecodeError:
                    raise InvalidInput(f"{self.path.name} after line {self.line}: not UTF-8 text; save the CSV as UTF-8") from None
                if not lines:
                    return
                first_line = self.line + 1
                self.line += len(lines)
                yield lines, first_line
        finally:
            self.handle.close()

    def refusal(self, bad: BadRow, rows_before: int) -> InvalidInput:
        """A BadRow as the one line the user reads: file, line, data row, column, what."""
        if bad.index is None:
            return InvalidInput(f"{self.path.name} line {bad.line}: {bad.detail}")
        return InvalidInput(f"{self.path.name} line {bad.line} (data row {rows_before + bad.index + 1}): {bad.detail}")

    def __iter__(self) -> Iterator[Chunk]:
        for lines, first_line in self.raw():
            try:
                x = self.encoder.encode(lines, first_line)
            except BadRow as bad:
                raise self.refusal(bad, self.rows) from None
            if len(x):
                yield Chunk(x, self.rows)
                self.rows += len(x)
        if self.rows == 0:
            raise InvalidInput(f"{self.path.name} has a header but no data rows")


_pandas: list = []


def pandas():
    """pandas, imported on first use (pinned in constraints.txt, not a declared dependency):
    None when it is not installed, and numpy's reader does the work."""
    if not _pandas:
        try:
            import pandas as module
        except ImportError:
            module = None
        _pandas.append(module)
    return _pandas[0]


def category_code(vocabulary: dict[str, float]) -> Callable[[str], float]:
    """A categorical cell as its vocabulary index (-1 when unknown), for numpy's reader."""
    get = vocabulary.get
    return lambda text: get(text, -1.0)


def open_text(path: Path):
    if not path.exists():
        raise InvalidInput(f"input file not found: {path}")
    if path.is_dir():
        raise InvalidInput(f"expected a file, got a directory: {path}")
    return path.open("r", encoding="utf-8-sig", newline=None, errors="strict")


class ArrayFile:
    """A .npy (memory-mapped: read a chunk at a time) or a .npz's `x` of model inputs."""

    def __init__(self, path: Path, input_spec: dict, batch: int):
        self.path = Path(path)
        self.spec = input_spec
        self.batch = batch
        if not self.path.exists():
            raise InvalidInput(f"input file not found: {self.path}")
        try:
            if self.path.suffix == ".npz":
                with np.load(self.path, allow_pickle=False) as archive:
                    if "x" not in archive.files:
                        raise InvalidInput(f"{self.path.name} has no array named 'x' (it has: {', '.join(archive.files) or 'none'})")
                    self.array = archive["x"]
            else:
                self.array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except InvalidInput:
            raise
        except (OSError, ValueError, EOFError) as exc:
            raise InvalidInput(f"{self.path.name} is not a readable {self.path.suffix} file: {exc}") from None
        shape = spec_shape(input_spec)
        if self.array.ndim == len(shape):  # one example: a batch of one
            self.array = self.array[np.newaxis]
        if self.array.ndim != len(shape) + 1:
            raise InvalidInput(f"{self.path.name} holds shape {list(self.array.shape)}; expected "
                               f"[N, {', '.join('N' if d is None else str(d) for d in shape)}] "
                               f"of {spec_dtype(input_spec).name}")
        if len(self.array) == 0:
            raise InvalidInput(f"{self.path.name} holds no rows")

    def estimated_rows(self) -> int:
        return len(self.array)

    def plain(self) -> bool:
        """float32 rows of the spec's shape: a chunk is the file's own memory (no copy) once
        np.isfinite passes; anything else goes through `check_inputs`."""
        if self.array.dtype != np.float32 or spec_dtype(self.spec) != np.float32 or not self.array.flags.c_contiguous:
            return False
        shape = spec_shape(self.spec)
        return all(want is None or want == got for want, got in zip(shape, self.array.shape[1:]))

    def __iter__(self) -> Iterator[Chunk]:
        plain = self.plain()
        step = self.batch * ARRAY_BATCHES
        for start in range(0, len(self.array), step):
            part = self.array[start:start + step]
            if plain and np.isfinite(part).all():
                yield Chunk(part, start)
                continue
            try:
                x = check_inputs(np.asarray(part), self.spec)
            except InvalidInput as exc:
                message = str(exc)
                found = re.search(r"at \[(\d+)((?:, \d+)*)\]", message)
                if found:  # the chunk's index → the file's row (0-based, like numpy)
                    index = f"[{start + int(found.group(1))}{found.group(2)}]"
                    message = message[:found.start()] + f"at {index}" + message[found.end():]
                raise InvalidInput(f"{self.path.name}: {message}") from None
            yield Chunk(x, start)


def open_input(path: Path, input_spec: dict, batch: int, chunk_lines: int = CSV_LINES):
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":  # text is read in bigger chunks than the invoke batch: numpy's reader pays per call
        return CsvTable(path, input_spec, chunk_lines)
    if suffix in (".npy", ".npz"):
        return ArrayFile(path, input_spec, batch)
    raise InvalidInput(f"--input must be a .csv, .npy or .npz file, got {Path(path).name!r}")


# --------------------------------------------------------------------------- the runner


class BatchRunner:
    """One LiteRT interpreter resized to the batch, on `threads` CPU threads."""

    def __init__(self, model_path: Path, threads: int, batch: int):
        from ai_edge_litert.interpreter import Interpreter

        with quiet_stderr():
            self.interpreter = Interpreter(model_content=Path(model_path).read_bytes(), num_threads=threads)
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        if self.input["dtype"] != np.float32 or self.output["dtype"] != np.float32:
            raise InvalidInput(f"the {FORMAT} artifact takes {self.input['dtype'].__name__}, not float32")
        self.fixed = int(self.input["shape_signature"][0]) == 1  # recurrent models: a batch of 1
        self.size = None
        self.batch = batch
        self.prepare(1 if self.fixed else batch)

    def prepare(self, size: int) -> None:
        if size != self.size:
            self.interpreter.resize_tensor_input(self.input["index"], [size, *self.input["shape"][1:]])
            with quiet_stderr():
                self.interpreter.allocate_tensors()
            self.size = size

    def width(self) -> int:
        return int(np.prod(self.output["shape"][1:]))

    def run(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Outputs for `x` (any number of rows, `batch` per invoke), written into `out` when
        given (rows × width float32, e.g. a slice of the whole result: no concatenation)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if out is None:
            out = np.empty((len(x), self.width()), dtype=np.float32)
        if self.fixed:
            for i in range(len(x)):
                out[i] = self.run_one(x[i:i + 1])[0]
            return out
        for start in range(0, len(x), self.batch):
            part = x[start:start + self.batch]
            self.prepare(len(part))
            self.interpreter.set_tensor(self.input["index"], part)
            self.interpreter.invoke()
            out[start:start + len(part)] = self.interpreter.get_tensor(self.output["index"]).reshape(len(part), -1)
        return out

    def run_one(self, x: np.ndarray) -> np.ndarray:
        self.interpreter.set_tensor(self.input["index"], x)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output["index"]).reshape(1, -1).copy()


class prefetch:
    """Read and encode the next chunks on a thread while the caller runs this one. The thread
    starts at once (not at the first `next`), so the first chunk is read and checked while the
    caller still builds the interpreter; `close` (or the end of a `with`) stops it."""

    def __init__(self, chunks, depth: int = 2):
        self.box: queue.Queue = queue.Queue(maxsize=depth)
        self.done = object()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.work, args=(chunks,), name="predict-reader", daemon=True)
        self.thread.start()

    def work(self, chunks) -> None:
        try:
            for item in chunks:
                while not self.stop.is_set():
                    try:
                        self.box.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    return
            self.box.put(self.done)
        except BaseException as exc:  # handed to the caller, raised there
            self.box.put(exc)

    def __iter__(self) -> Iterator:
        while True:
            item = self.box.get()
            if item is self.done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self.stop.set()
        while True:  # a reader blocked on a full box sees `stop` within 0.1 s; empty it so it need not wait
            try:
                self.box.get_nowait()
            except queue.Empty:
                break
        self.thread.join(timeout=5)

    def __enter__(self) -> prefetch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- writers


class Output:
    """Writes to a temporary file beside `--out`; `commit` renames it, `abort` removes it."""

    def __init__(self, path: Path, columns: list[str], labels: list | None):
        self.path = Path(path)
        self.columns = columns
        self.labels = np.asarray([str(v) for v in labels], dtype=object) if labels and columns[-1:] == ["prediction"] and len(columns) == len(labels) + 1 else None
        if self.path.suffix.lower() not in OUTPUT_SUFFIXES:
            raise InvalidInput(f"--out must end in .csv or .npy, got {self.path.name!r}")
        if self.path.is_dir():
            raise InvalidInput(f"--out is a directory: {self.path}")
        if not self.path.parent.is_dir():
            raise InvalidInput(f"--out's folder does not exist: {self.path.parent}")
        fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".part", dir=self.path.parent)
        self.tmp = Path(name)
        self.handle = os.fdopen(fd, "w", encoding="utf-8", newline="") if self.is_csv else os.fdopen(fd, "wb")
        self.parts: list[np.ndarray] = []
        self.array: np.ndarray | None = None  # .npy out with a known row count: filled in place
        self.filled = 0
        self.streamed = 0  # rows of `array` handed to `streamer`
        self.streamer: Streamer | None = None  # .npy out with a known row count: appends and syncs on a thread
        if self.is_csv:
            self.handle.write(",".join(csv_cell(c) for c in columns) + "\n")

    @property
    def is_csv(self) -> bool:
        return self.path.suffix.lower() == ".csv"

    def reserve(self, rows: int) -> None:
        """A .npy out of exactly `rows` rows: the runner writes into one preallocated array, the
        .npy header goes to the file now, and each finished chunk is appended by a `Streamer`
        thread while LiteRT runs the next one (no np.save of the whole array at the end)."""
        if not self.is_csv:
            self.array = np.empty((rows, len(self.columns)), dtype=np.float32)
            header = {"descr": np.lib.format.dtype_to_descr(self.array.dtype), "fortran_order": False,
                      "shape": self.array.shape}
            np.lib.format.write_array_header_1_0(self.handle, header)
            self.handle.flush()
            self.streamer = Streamer(self.handle.fileno())

    def slot(self, rows: int) -> np.ndarray | None:
        """Where the next `rows` outputs go (None: hand them to `write`)."""
        if self.array is None or self.filled + rows > len(self.array):
            return None
        view = self.array[self.filled:self.filled + rows]
        self.filled += rows
        return view

    def written(self) -> None:
        """The slots handed out so far are filled: hand them to the streamer."""
        if self.streamer is not None and self.filled > self.streamed:
            self.streamer.put(memoryview(self.array[self.streamed:self.filled]).cast("B"))
            self.streamed = self.filled

    def write(self, y: np.ndarray) -> None:
        if self.is_csv:
            self.handle.write(csv_lines(y, self.labels))
        else:
            self.parts.append(y)

    def write_text(self, text: str) -> None:
        """Lines already formatted by `csv_lines` (in a worker process)."""
        self.handle.write(text)

    def commit(self) -> None:
        if self.streamer is not None:
            self.written()
            self.streamer.finish()  # raises what a write or sync on its thread raised
            self.streamer = None
            if self.filled != len(self.array):  # fewer rows than reserved: the header is wrong, write it all again
                self.handle.seek(0)
                self.handle.truncate()
                np.save(self.handle, self.array[:self.filled], allow_pickle=False)
        elif not self.is_csv:
            array = np.concatenate(self.parts) if self.parts else np.zeros((0, len(self.columns)), np.float32)
            np.save(self.handle, array, allow_pickle=False)
        self.handle.flush()
        os.fsync(self.handle.fileno())  # durable before the rename makes it visible (measured: 2-10 ms here, the disk's journal)
        self.handle.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            if self.streamer is not None:
                self.streamer.finish(check=False)
            self.handle.close()
        finally:
            self.tmp.unlink(missing_ok=True)


class Streamer:
    """Appends byte blocks to a file descriptor on its own thread (`os.write` releases the
    GIL), so the output reaches the page cache while LiteRT still runs and `commit` has only
    the fsync and the rename left. No `fdatasync` per block: measured on this ext4 under other
    jobs' I/O, syncing each 256 KB block in the background cut the final fsync from ~4.4 to
    ~1.7 ms (median) but the command waited on an in-flight sync as often, for no net gain."""

    def __init__(self, fd: int):
        self.fd = fd
        self.blocks: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self.work, name="predict-writer", daemon=True)
        self.thread.start()

    def put(self, block: memoryview) -> None:
        self.blocks.put(block)

    def work(self) -> None:
        while (block := self.blocks.get()) is not None:
            if self.error is not None:
                continue  # drain to the end marker; `finish` raises the error
            try:
                while block:  # os.write may write less than asked
                    block = block[os.write(self.fd, block):]
            except BaseException as exc:
                self.error = exc

    def finish(self, check: bool = True) -> None:
        self.blocks.put(None)
        self.thread.join()
        if check and self.error is not None:
            raise self.error


def csv_lines(y: np.ndarray, labels: np.ndarray | None) -> str:
    """Output rows as CSV lines: each float32 with 9 significant digits (always reads back to
    the same float32), and the top label last for a classifier."""
    if not len(y):
        return ""
    width = y.shape[1] if y.ndim == 2 else 1
    if labels is None:  # one %-format over the chunk: ~4x numpy's astype(str) on 1M rows
        return (",".join([FLOAT] * width) + "\n") * len(y) % tuple(y.ravel().tolist())
    top = [csv_cell(text) for text in labels[np.argmax(y, axis=1)].tolist()]
    row = ",".join([FLOAT] * width) + ",%s\n"
    return "".join(row % (*values, label) for values, label in zip(y.tolist(), top))


def csv_cell(text: str) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow([text])
    return buffer.getvalue()


# --------------------------------------------------------------------------- the command


@dataclass
class Progress:
    """What the CLI shows: called with (rows done, rows expected or None)."""

    update: Callable[[int, int | None], None] = field(default=lambda done, total: None)


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def predict_file(store, name: str, source: Path, out: Path, *, version: int | None = None, channel: str | None = None,
                 batch_size: int = DEFAULT_BATCH, threads: int | None = None, processes: int | None = None,
                 chunk_lines: int = CSV_LINES, progress: Callable[[int, int | None], None] | None = None) -> dict:
    """Run the chosen version over `source` into `out`; returns the summary (`--json`).

    `processes`: worker processes for a CSV (each parses, runs a one-thread interpreter and
    formats its chunks; the order is kept); 0 or None: this process, one interpreter on
    `threads` threads with the reader on a second thread."""
    if batch_size < 1:
        raise InvalidInput(f"--batch-size must be at least 1, got {batch_size}")
    threads = threads or default_threads()
    if threads < 1:
        raise InvalidInput(f"--threads must be at least 1, got {threads}")
    source, out = Path(source), Path(out)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise InvalidInput(f"--out must end in .csv or .npy, got {out.name!r}")
    if out.exists() and source.exists() and out.resolve() == source.resolve():
        raise InvalidInput("--out must not be the --input file")
    chosen = choose_version(store, name, version, channel)
    record = chosen.record
    started = time.perf_counter()
    if chunk_lines < 1:
        raise InvalidInput(f"--chunk-lines must be at least 1, got {chunk_lines}")
    reader = open_input(source, record.input_spec or {}, batch_size, chunk_lines)
    if processes is not None and processes < 0:
        raise InvalidInput(f"--processes must be 0 or more, got {processes}")
    if not isinstance(reader, CsvTable) or processes is None:
        processes = 0  # measured: on 2 busy cores one process wins up to 1M rows (see the module's notes)
    # In this process the reader thread starts on the first chunk now, while the interpreter is built.
    chunks = None if processes else prefetch(iter(reader))
    done = 0
    writer = None
    try:
        runner = BatchRunner(chosen.model_path, 1 if processes else threads, batch_size)
        columns = output_columns(store, record, runner.width())
        total = reader.estimated_rows()
        writer = Output(out, columns, record.labels)
        if processes:
            done = run_in_processes(reader, writer, chosen.model_path, batch_size, processes, total, progress)
        else:
            if isinstance(reader, ArrayFile) and len(columns) == runner.width():
                writer.reserve(reader.estimated_rows())
            for chunk in chunks:  # the next chunk is read and checked while LiteRT runs this one
                target = writer.slot(len(chunk.x))
                y = runner.run(chunk.x, target)
                if target is None:
                    writer.write(y)
                else:
                    writer.written()
                done += len(y)
                if progress is not None:
                    progress(done, total)
        writer.commit()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        if chunks is not None:
            chunks.close()
    seconds = time.perf_counter() - started
    summary = {
        "model": name,
        "version": record.version,
        "chosen": chosen.why,
        "format": FORMAT,
        "input": str(source),
        "out": str(out),
        "rows": done,
        "columns": columns,
        "seconds": round(seconds, 4),
        "rows_per_second": round(done / seconds, 1) if seconds > 0 else None,
        "batch_size": batch_size,
        "threads": threads,
        "processes": processes,
    }
    if isinstance(reader, CsvTable):
        summary["chunk_lines"] = chunk_lines
    if isinstance(reader, CsvTable) and reader.ignored:
        summary["ignored_columns"] = reader.ignored
    return summary


_worker: dict = {}


def _worker_start(input_spec: dict, header: list[str], model_path: str, batch: int, labels, to_csv: bool) -> None:
    _worker.update(encoder=RowEncoder(input_spec, header), runner=BatchRunner(Path(model_path), 1, batch),
                   labels=labels, to_csv=to_csv)


def _worker_chunk(lines: list[str], first_line: int):
    """One chunk in a worker: (rows, outputs or None, CSV text or None); BadRow goes back."""
    x = _worker["encoder"].encode(lines, first_line)
    if not len(x):
        return 0, None, ""
    y = _worker["runner"].run(x)
    if _worker["to_csv"]:
        return len(x), None, csv_lines(y, _worker["labels"])
    return len(x), y, None


def run_in_processes(reader: CsvTable, writer: Output, model_path: Path, batch: int, processes: int,
                     total: int | None, progress) -> int:
    """Chunks over `processes` spawned workers, at most two each in flight (the file is never
    all in memory), results taken in submission order; the first bad row stops them all."""
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    done = 0
    context = multiprocessing.get_context("spawn")  # no fork of a threaded process
    pool = ProcessPoolExecutor(processes, mp_context=context, initializer=_worker_start,
                               initargs=(reader.spec, reader.header, str(model_path), batch, writer.labels, writer.is_csv))
    pending: deque = deque()

    def take() -> None:
        nonlocal done
        try:
            rows, y, text = pending.popleft().result()
        except BadRow as bad:
            raise reader.refusal(bad, done) from None
        if text is not None:
            writer.write_text(text)
        elif y is not None:
            writer.write(y)
        done += rows
        if progress is not None:
            progress(done, total)

    try:
        for lines, first_line in reader.raw():
            pending.append(pool.submit(_worker_chunk, lines, first_line))
            if len(pending) >= 2 * processes:
                take()
        while pending:
            take()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if done == 0:
        raise InvalidInput(f"{reader.path.name} has a header but no data rows")
    return done


# --------------------------------------------------------------------------- benchmark


def bare_loop(model_path: Path, x: np.ndarray, *, batch_size: int = DEFAULT_BATCH, threads: int | None = None) -> float:
    """Seconds for the bare LiteRT invoke loop over `x` (resize once, set, invoke, get): the limit."""
    from ai_edge_litert.interpreter import Interpreter

    with quiet_stderr():
        interpreter = Interpreter(model_content=Path(model_path).read_bytes(), num_threads=threads or default_threads())
    index = interpreter.get_input_details()[0]["index"]
    output = interpreter.get_output_details()[0]["index"]
    x = np.ascontiguousarray(x, dtype=np.float32)
    size = None
    started = time.perf_counter()
    for start in range(0, len(x), batch_size):
        part = x[start:start + batch_size]
        if len(part) != size:
            interpreter.resize_tensor_input(index, [len(part), *x.shape[1:]])
            with quiet_stderr():
                interpreter.allocate_tensors()
            size = len(part)
        interpreter.set_tensor(index, part)
        interpreter.invoke()
        interpreter.get_tensor(output)
    return time.perf_counter() - started


def delivery_rows(rows: int, seed: int = 7) -> dict[str, np.ndarray]:
    """`rows` generated delivery orders (the model's columns, no target)."""
    from training.datasets.delivery_eta import generate_orders

    table = generate_orders(rows, seed=seed)
    table.pop("eta_min", None)
    return table


def write_csv(path: Path, table: dict[str, np.ndarray]) -> None:
    names = list(table)
    with path.open("w", encoding="utf-8", newline="") as handle:
        handle.write(",".join(names) + "\n")
        cells = [np.asarray(table[n]).astype(str).tolist() for n in names]
        step = 100_000
        for start in range(0, len(cells[0]), step):
            handle.write("\n".join(map(",".join, zip(*(c[start:start + step] for c in cells)))) + "\n")


def in_memory_script(csv_path: Path, input_spec: dict, model_path: Path, out: Path, *, batch_size: int,
                     threads: int) -> float:
    """Seconds for what a one-off script does: the whole CSV in memory through numpy's reader
    (no streaming, no checks), the bare invoke loop, the outputs written as text at once."""
    started = time.perf_counter()
    with open_text(Path(csv_path)) as handle:
        header = [name.strip() for name in next(csv.reader([handle.readline()]))]
        lines = handle.readlines()
    x = RowEncoder(input_spec, header).fast(lines)
    if x is None:
        raise InvalidInput(f"{csv_path} is not a plain CSV")
    runner = BatchRunner(model_path, threads, batch_size)
    y = np.concatenate([runner.run(x[start:start + batch_size]) for start in range(0, len(x), batch_size)])
    out.write_text(csv_lines(y, None))
    return time.perf_counter() - started


BARE_SCRIPT = """
import json, sys, time
started = time.perf_counter()
import numpy as np
from ai_edge_litert.interpreter import Interpreter
model, source, target, batch, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
imported = time.perf_counter()
x = np.load(source)
interpreter = Interpreter(model_path=model, num_threads=threads)
index, output = interpreter.get_input_details()[0]["index"], interpreter.get_output_details()[0]["index"]
y, size = None, None
for start in range(0, len(x), batch):
    part = x[start:start + batch]
    if len(part) != size:
        interpreter.resize_tensor_input(index, [len(part), *x.shape[1:]])
        interpreter.allocate_tensors()
        size = len(part)
    interpreter.set_tensor(index, part)
    interpreter.invoke()
    out = interpreter.get_tensor(output)
    if y is None:
        y = np.empty((len(x), *out.shape[1:]), dtype=out.dtype)
    y[start:start + len(part)] = out
np.save(target, y)
print(json.dumps({"seconds": time.perf_counter() - imported, "imports": imported - started}))
"""


def bare_script(model_path: Path, source: Path, target: Path, *, batch_size: int, threads: int, env: dict) -> tuple[float, float]:
    """(its own seconds, wall seconds) of the bare loop as a user's one-off script in a fresh
    process: np.load the .npy, build the interpreter, the invoke loop, np.save the outputs (no
    checks, no store, not durable). The like-for-like reference for the `pollinate` command,
    which also pays a fresh process's first pass through LiteRT."""
    import subprocess

    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", BARE_SCRIPT, str(model_path), str(source), str(target),
                           str(batch_size), str(threads)], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"the bare script failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"], wall


def bench(home: Path, rows: int = 1_000_000, *, name: str = "delivery-eta", version: int | None = None,
          batch_size: int = DEFAULT_BATCH, threads: int | None = None, repeats: int = 3, folder: Path | None = None,
          cli: bool = True, say: Callable[[str], None] = lambda text: None) -> dict:
    """`pollinate predict` on `rows` generated delivery rows, as the encoded .npy (the same
    array as the bare loop) and as a CSV, against the bare LiteRT invoke loop on that array
    (the limit) and, for the CSV, an in-memory numpy script. In this process (`predict_file`)
    and, with `cli`, as the real command in a subprocess (its own `seconds`, and the wall time
    with Python's start). Best of `repeats` each, interleaved (a shared machine's noise only
    ever adds time)."""
    import subprocess

    from registry import open_store

    store = open_store(home)
    chosen = choose_version(store, name, version, None)
    spec = chosen.record.input_spec
    threads = threads or default_threads()
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        scratch = Path(scratch)
        say(f"writing {rows:,} delivery rows")
        csv_path = scratch / "rows.csv"
        write_csv(csv_path, delivery_rows(rows))
        x = np.concatenate([c.x for c in CsvTable(csv_path, spec, 65536)])
        np.save(scratch / "rows.npy", x)
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        results: dict[str, list] = {}

        def note(kind: str, seconds: float) -> None:
            results.setdefault(kind, []).append(seconds)

        for _ in range(repeats):
            note("bare", bare_loop(chosen.model_path, x, batch_size=batch_size, threads=threads))
            if cli:
                own, wall = bare_script(chosen.model_path, scratch / "rows.npy", scratch / "bare-out.npy",
                                        batch_size=batch_size, threads=threads, env=env)
                note("bare_script", own)
                note("bare_script_wall", wall)
            note("script_csv", in_memory_script(csv_path, spec, chosen.model_path, scratch / "script.csv",
                                                batch_size=batch_size, threads=threads))
            for kind, source, target in (("npy", "rows.npy", "out.npy"), ("csv", "rows.csv", "out.csv")):
                summary = predict_file(store, name, scratch / source, scratch / target, version=chosen.record.version,
                                       batch_size=batch_size, threads=threads)
                note(kind, summary["seconds"])
                if not cli:
                    continue
                command = [sys.executable, "-m", "pollinate", "predict", name, "--version", str(chosen.record.version),
                           "--input", str(scratch / source), "--out", str(scratch / f"cli-{target}"), "--home", str(home),
                           "--batch-size", str(batch_size), "--threads", str(threads), "--json"]
                began = time.perf_counter()
                done = subprocess.run(command, capture_output=True, text=True, env=env)
                wall = time.perf_counter() - began
                if done.returncode != 0:
                    raise RuntimeError(f"pollinate predict failed ({done.returncode}): {done.stderr.strip()}")
                note(f"cli_{kind}", json.loads(done.stdout)["seconds"])
                note(f"cli_{kind}_wall", wall)
            say(", ".join(f"{kind} {rows / values[-1]:,.0f}" for kind, values in results.items()) + " rows/s")
        best = {kind: min(values) for kind, values in results.items()}
        y = np.load(scratch / "out.npy")
        reference = BatchRunner(chosen.model_path, 1, 1)  # one row per invoke: what a device does
        sample = np.linspace(0, rows - 1, num=min(rows, 2000)).astype(int)
        check = max(float(np.abs(reference.run(x[i:i + 1]) - y[i]).max()) for i in sample)
    rate = {kind: rows / seconds for kind, seconds in best.items()}
    result = {
        "model": name, "version": chosen.record.version, "rows": rows, "batch_size": batch_size, "threads": threads,
        "repeats": repeats, "seconds": {k: round(v, 4) for k, v in best.items()},
        "rows_per_second": {k: round(v, 1) for k, v in rate.items()},
        "npy_vs_bare": round(rate["npy"] / rate["bare"], 3),
        "csv_vs_bare": round(rate["csv"] / rate["bare"], 3),
        "csv_vs_script": round(rate["csv"] / rate["script_csv"], 3),
        "max_abs_diff_vs_per_row_litert": check,
        "cpus": default_threads(),
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    if cli:
        result["cli_npy_vs_bare"] = round(rate["cli_npy"] / rate["bare"], 3)
        result["cli_npy_vs_bare_script"] = round(rate["cli_npy"] / rate["bare_script"], 3)
        result["cli_npy_wall_vs_bare_script_wall"] = round(rate["cli_npy_wall"] / rate["bare_script_wall"], 3)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.batch_predict",
                                     description="Time `pollinate predict` on generated delivery rows against a bare LiteRT loop.")
    parser.add_argument("--bench", type=int, metavar="ROWS", required=True)
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("POLLINATE_HOME", ".pollinate")))
    parser.add_argument("--model", default="delivery-eta")
    parser.add_argument("--version", type=int)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-cli", action="store_true", help="Only in this process (no `pollinate` subprocess).")
    args = parser.parse_args(argv)
    result = bench(args.home, args.bench, name=args.model, version=args.version, batch_size=args.batch_size,
                   threads=args.threads, repeats=args.repeats, cli=not args.no_cli,
                   say=lambda text: print(text, file=sys.stderr))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
