"""`pollinate predict`: a stored version's shipped LiteRT artifact over a whole file, in batches.

The "precompute and store" path: a CSV of table rows (the model's columns) or an array file
(.npy, or .npz with `x`) of MODEL inputs (after the preprocessing the manifest describes, like
the server's predict route) goes through exactly the `tflite-float32` file that clients of
that version download, resized to a batch of `--batch-size` rows, and the outputs come out in
the input's row order as a CSV (one column per output) or a .npy array.

Measured on 2 cores (see the report of `python -m export.batch_predict --bench ROWS`):
- the model is small next to the cost of reading and writing text: one interpreter over
  batches of 4096 rows, with the CSV read and encoded on a second thread while LiteRT runs
  (LiteRT releases the GIL in `invoke`), beats several interpreters over chunks;
- a CSV chunk is parsed by numpy's C reader (`loadtxt`, categories by vocabulary lookup) and
  only a chunk that reader cannot take as it is (quotes, blank or ragged lines, text in a
  number column, unknown categories) goes through `registry.inputs.encode_rows`, the checks
  the server uses, which names the bad row and column. Nothing is written unless every row
  passed: the output is a temporary file beside `--out`, renamed at the end.

TensorFlow is never imported: LiteRT (`ai_edge_litert`) runs the file.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
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
        why = f"version {record.version} (as asked)"
    else:
        which = channel or "stable"
        if channel is not None and store.get_channel(name, channel) is None:
            store.get_version(name)  # an unknown model says so first
            raise NotFound(f"model {name!r} has no channel {channel!r}")
        number, reason = store.resolve(name, which)
        record = store.get_version(name, number)
        why = (f"channel {which} → version {number}" if reason != "latest"
               else f"version {number} (the newest; channel stable is not set)")
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
        self.columns = tabular_columns(input_spec)
        self.features = list((input_spec.get("preprocessing") or {}).get("features") or [])
        rule = (input_spec.get("preprocessing") or {}).get("unknown_category")
        self.unknown_zero = isinstance(rule, str) and "zero" in rule.lower()
        self.handle = open_text(self.path)
        header_line = self.handle.readline()
        try:
            header = next(csv.reader([header_line]), [])
        except csv.Error as exc:
            raise InvalidInput(f"{self.path.name} line 1 (header): not a readable CSV header: {exc}") from None
        self.header = [name.strip() for name in header]
        if not any(self.header):
            raise InvalidInput(f"{self.path.name} is empty: expected a header line with the model's columns")
        duplicates = sorted({n for n in self.header if self.header.count(n) > 1})
        if duplicates:
            raise InvalidInput(f"{self.path.name} line 1 (header): duplicate column {duplicates[0]!r}")
        names = [str(c["name"]) for c in self.columns]
        missing = [n for n in names if n not in self.header]
        if missing:
            raise InvalidInput(f"{self.path.name} line 1 (header): missing column {missing[0]!r}; "
                               f"the model's columns are: {', '.join(names)}")
        self.ignored = [n for n in self.header if n not in names]
        self.positions = {n: self.header.index(n) for n in names}
        self.line = 1  # physical lines consumed so far
        self.rows = 0  # data rows produced so far
        index = {f: i for i, f in enumerate(self.features)}
        self.plan = []  # (name, column in the file, feature index | {category: feature index})
        for column in self.columns:
            name = str(column["name"])
            if column.get("type") == "categorical":
                vocabulary = [str(v) for v in column.get("vocabulary") or []]
                self.plan.append((name, self.positions[name], [index[f"{name}={v}"] for v in vocabulary],
                                  {v: float(i) for i, v in enumerate(vocabulary)}))
            else:
                self.plan.append((name, self.positions[name], index[name], None))
        self.usecols = [p for _, p, _, _ in self.plan]
        self.converters = {p: category_code(vocab) for _, p, _, vocab in self.plan if vocab is not None}

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

    def __iter__(self) -> Iterator[Chunk]:
        try:
            while True:
                lines = list(itertools.islice(self.handle, self.batch))
                if not lines:
                    break
                while sum(line.count('"') for line in lines) % 2:  # a quoted field spans lines
                    more = self.handle.readline()
                    if not more:
                        break
                    lines.append(more)
                first_line = self.line + 1
                self.line += len(lines)
                x = self.fast(lines)
                if x is None:
                    x = self.checked(lines, first_line)
                if len(x):
                    yield Chunk(x, self.rows)
                    self.rows += len(x)
            if self.rows == 0:
                raise InvalidInput(f"{self.path.name} has a header but no data rows")
        finally:
            self.handle.close()

    def fast(self, lines: list[str]) -> np.ndarray | None:
        """numpy's C reader on a chunk of plain lines; None when the chunk needs the checks."""
        text = "".join(lines)
        if text.count(",") != len(lines) * (len(self.header) - 1) or '"' in text:
            return None  # ragged, blank or quoted lines: encode_rows decides
        try:
            table = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.float64, usecols=self.usecols, converters=self.converters,
                               comments=None, quotechar=None, ndmin=2, encoding=None)
        except (ValueError, TypeError):
            return None
        if table.shape != (len(lines), len(self.usecols)):
            return None
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
        """The chunk through `encode_rows` (the server's checks); its refusals are rewritten to
        name the file's line and the data row."""
        rows, where = [], []
        reader = csv.reader(lines)
        names = [name for name, _, _, _ in self.plan]
        start = 0
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                raise InvalidInput(f"{self.path.name} line {first_line + reader.line_num - 1}: not readable CSV: {exc}") from None
            line = first_line + start
            start = reader.line_num
            if not any(cell.strip() for cell in fields):
                continue  # a blank line is no row
            if len(fields) > len(self.header):
                raise InvalidInput(f"{self.path.name} line {line} (data row {self.rows + len(rows) + 1}): "
                                   f"{len(fields)} fields, but the header has {len(self.header)}")
            rows.append({n: fields[self.positions[n]] for n in names if self.positions[n] < len(fields)})
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
            rest = message[found.end():]
            sep = ", " if found.group(2) == ", " else ": "
            raise InvalidInput(f"{self.path.name} line {where[r]} (data row {self.rows + r + 1}){sep}{rest}") from None

    def shaped(self, out: np.ndarray) -> np.ndarray:
        shape = spec_shape(self.spec)
        if len(shape) == 1:
            return out
        return np.ascontiguousarray(out.reshape((len(out), *[len(self.features) if d is None else d for d in shape])))


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

    def __iter__(self) -> Iterator[Chunk]:
        for start in range(0, len(self.array), self.batch):
            part = np.asarray(self.array[start:start + self.batch])
            try:
                x = check_inputs(part, self.spec)
            except InvalidInput as exc:
                message = str(exc)
                found = re.search(r"at \[(\d+)((?:, \d+)*)\]", message)
                if found:  # the chunk's index → the file's row (0-based, like numpy)
                    index = f"[{start + int(found.group(1))}{found.group(2)}]"
                    message = message[:found.start()] + f"at {index}" + message[found.end():]
                raise InvalidInput(f"{self.path.name}: {message}") from None
            yield Chunk(x, start)


def open_input(path: Path, input_spec: dict, batch: int):
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        return CsvTable(path, input_spec, batch)
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
        self.prepare(1 if self.fixed else batch)

    def prepare(self, size: int) -> None:
        if size != self.size:
            self.interpreter.resize_tensor_input(self.input["index"], [size, *self.input["shape"][1:]])
            with quiet_stderr():
                self.interpreter.allocate_tensors()
            self.size = size

    def width(self) -> int:
        return int(np.prod(self.output["shape"][1:]))

    def run(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.fixed:
            return np.concatenate([self.run_one(x[i:i + 1]) for i in range(len(x))])
        self.prepare(len(x))
        self.interpreter.set_tensor(self.input["index"], x)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output["index"]).reshape(len(x), -1).copy()

    def run_one(self, x: np.ndarray) -> np.ndarray:
        self.interpreter.set_tensor(self.input["index"], x)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output["index"]).reshape(1, -1).copy()


def prefetch(chunks, depth: int = 2) -> Iterator:
    """Read and encode the next chunks on a thread while the caller runs this one."""
    box: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work():
        try:
            for item in chunks:
                while not stop.is_set():
                    try:
                        box.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            box.put(done)
        except BaseException as exc:  # handed to the caller, raised there
            box.put(exc)

    thread = threading.Thread(target=work, name="predict-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = box.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


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
        if self.is_csv:
            self.handle.write(",".join(csv_cell(c) for c in columns) + "\n")

    @property
    def is_csv(self) -> bool:
        return self.path.suffix.lower() == ".csv"

    def write(self, y: np.ndarray) -> None:
        if not self.is_csv:
            self.parts.append(y)
            return
        cells = [column.astype(str).tolist() for column in y.T]  # float32's shortest exact text
        if self.labels is not None:
            cells.append(self.labels[np.argmax(y, axis=1)].tolist())
        lines = cells[0] if len(cells) == 1 else map(",".join, zip(*cells))
        self.handle.write("\n".join(lines))
        self.handle.write("\n")

    def commit(self) -> None:
        if not self.is_csv:
            array = np.concatenate(self.parts) if self.parts else np.zeros((0, len(self.columns)), np.float32)
            np.save(self.handle, array, allow_pickle=False)
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self.handle.close()
        finally:
            self.tmp.unlink(missing_ok=True)


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
                 batch_size: int = DEFAULT_BATCH, threads: int | None = None,
                 progress: Callable[[int, int | None], None] | None = None) -> dict:
    """Run the chosen version over `source` into `out`; returns the summary (`--json`)."""
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
    reader = open_input(source, record.input_spec or {}, batch_size)
    runner = BatchRunner(chosen.model_path, threads, batch_size)
    columns = output_columns(store, record, runner.width())
    total = reader.estimated_rows()
    writer = Output(out, columns, record.labels)
    done = 0
    try:
        for chunk in prefetch(iter(reader)):
            y = runner.run(chunk.x)
            writer.write(y)
            done += len(y)
            if progress is not None:
                progress(done, total)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
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
    }
    if isinstance(reader, CsvTable) and reader.ignored:
        summary["ignored_columns"] = reader.ignored
    return summary


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


def bench(home: Path, rows: int = 1_000_000, *, name: str = "delivery-eta", version: int | None = None,
          batch_size: int = DEFAULT_BATCH, threads: int | None = None, repeats: int = 3, folder: Path | None = None,
          say: Callable[[str], None] = lambda text: None) -> dict:
    """`pollinate predict` (the real command, in a subprocess; its own `seconds`) on `rows`
    delivery rows as a CSV and as the encoded .npy, against the bare LiteRT invoke loop on the
    same array in this process. Best of `repeats` each (a shared machine's noise is one-sided)."""
    import subprocess

    from registry import open_store

    store = open_store(home)
    chosen = choose_version(store, name, version, None)
    threads = threads or default_threads()
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        scratch = Path(scratch)
        say(f"writing {rows:,} rows")
        csv_path = scratch / "rows.csv"
        write_csv(csv_path, delivery_rows(rows))
        x = np.concatenate([c.x for c in CsvTable(csv_path, chosen.record.input_spec, 65536)])
        np.save(scratch / "rows.npy", x)
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        results: dict[str, list] = {"bare": [], "npy": [], "csv": [], "npy_wall": [], "csv_wall": []}
        for _ in range(repeats):
            results["bare"].append(bare_loop(chosen.model_path, x, batch_size=batch_size, threads=threads))
            for kind, source, target in (("npy", "rows.npy", "out.npy"), ("csv", "rows.csv", "out.csv")):
                command = [sys.executable, "-m", "pollinate", "predict", name, "--version", str(chosen.record.version),
                           "--input", str(scratch / source), "--out", str(scratch / target), "--home", str(home),
                           "--batch-size", str(batch_size), "--threads", str(threads), "--json"]
                began = time.perf_counter()
                done = subprocess.run(command, capture_output=True, text=True, env=env)
                wall = time.perf_counter() - began
                if done.returncode != 0:
                    raise RuntimeError(f"pollinate predict failed ({done.returncode}): {done.stderr.strip()}")
                results[kind].append(json.loads(done.stdout)["seconds"])
                results[f"{kind}_wall"].append(wall)
            say(f"bare {rows / results['bare'][-1]:,.0f} rows/s, npy {rows / results['npy'][-1]:,.0f}, "
                f"csv {rows / results['csv'][-1]:,.0f}")
        best = {kind: min(values) for kind, values in results.items()}
        same = np.load(scratch / "out.npy")
        y_bare = BatchRunner(chosen.model_path, threads, batch_size)
        check = np.abs(same[: min(len(same), 10_000)] - y_bare.run(x[:10_000])).max()
    rate = {kind: rows / seconds for kind, seconds in best.items()}
    return {
        "model": name, "version": chosen.record.version, "rows": rows, "batch_size": batch_size, "threads": threads,
        "repeats": repeats, "seconds": {k: round(v, 4) for k, v in best.items()},
        "rows_per_second": {k: round(v, 1) for k, v in rate.items()},
        "npy_vs_bare": round(rate["npy"] / rate["bare"], 3),
        "csv_vs_bare": round(rate["csv"] / rate["bare"], 3),
        "max_abs_diff_vs_litert": float(check),
        "cpus": default_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


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
    args = parser.parse_args(argv)
    result = bench(args.home, args.bench, name=args.model, version=args.version, batch_size=args.batch_size,
                   threads=args.threads, repeats=args.repeats, say=lambda text: print(text, file=sys.stderr))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
