"""Server-side predict: the LiteRT float32 artifact of the version a client would get.

When a client cannot run a model itself (no WebGL/WASM, too little memory, a file that failed
its integrity check), it asks the server, and the answer must be the number the device would
have computed: the same version (resolved by :class:`server.catalog.Catalog` exactly as the
manifest is, channel and rollout cohort included) and the same file (``tflite-float32``), run
by LiteRT (``ai_edge_litert``; TensorFlow never loads in the server).

Three things make it cheap:

- **Interpreters are kept** per (model, version), loaded once in a worker thread; every run
  happens in a worker thread too, never on the event loop.
- **Micro-batching**: concurrent requests for one (model, version) are gathered for a short
  window (``POLLINATE_PREDICT_WINDOW_MS``, 2 ms, or until ``POLLINATE_PREDICT_MAX_BATCH``
  examples), concatenated into one resized batch and run once; each request gets its own rows
  back. While a run is under way the next batch keeps gathering, so under load batches grow
  by themselves; a request that finds nothing running or waiting runs at once (a lone client
  pays no window). A model whose TFLite file has a fixed
  batch of 1 (recurrent models are exported that way) runs its rows one by one.
- **An LRU cache of answers** keyed by (model, version, sha256 of the input's canonical bytes:
  :func:`registry.inputs.input_digest`): a repeat is answered with the stored bytes. Moving a
  channel needs no invalidation: the version is in the key.

Inputs are MODEL inputs (after the preprocessing the manifest describes, as the LiteRT
artifact takes them); a tabular model also takes named ``rows``, one-hot encoded here from the
spec's vocabularies (:func:`registry.inputs.encode_rows`).

Reading the JSON is most of a request's cost (``json.loads`` then ``np.asarray`` of 2,048
numbers takes ~2 ms, the model ~0.1 ms), so a body that is just ``{"inputs": [...]}`` of plain
JSON numbers in a regular nesting is read by :func:`read_plain_inputs` with numpy's C number
parser (~10x faster); anything else (rows, NaN, a ragged list, an odd number form) takes the
general path, which parses with pydantic and explains every refusal. Both give the same
float64 values (correctly rounded, like Python's ``float``) before the spec's dtype is applied.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import warnings
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import anyio.to_thread
import numpy as np
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from core.errors import InvalidInput, PollinateError
from core.tensorflow import quiet_stderr
from registry.inputs import check_inputs, encode_rows, input_digest, is_tabular, spec_shape
from server.catalog import Catalog
from server.metrics import count_predict, count_predict_refusal, count_predict_run
from server.schemas import PredictIn

FORMAT = "tflite-float32"
# Interpreters kept per process (a small model's interpreter is a few hundred KB).
MAX_INTERPRETERS = 32
# The cache's answers together stay under this many bytes; a bigger single answer is not kept.
CACHE_BYTES = 64 * 1024 * 1024
CACHE_ENTRY_MAX_BYTES = 1024 * 1024


class NoServableArtifact(PollinateError):
    """The version exists but has no tflite-float32 file to run (the route answers 409)."""


# --------------------------------------------------------------------------- reading bodies

# {"inputs": ARRAY} where ARRAY holds only brackets, commas, white space and number characters
_PLAIN_INPUTS = re.compile(rb'\s*\{\s*"inputs"\s*:\s*(\[[0-9\s,\[\]\.eE+\-]*\])\s*\}\s*')
_DOT, _PLUS, _MINUS, _ZERO, _E, _BIG_E = b".+-0eE"


def _json_numbers_only(text: bytes) -> bool:
    """False when a number is in a form JSON forbids but C's strtod reads (.5, 5., +1, 01, -01):
    such a body is left to the general path, which refuses it as JSON does."""
    b = np.frombuffer(text, dtype=np.uint8)  # starts with "[" and ends with "]"
    digit = (b >= ord("0")) & (b <= ord("9"))
    exponent = (b == _E) | (b == _BIG_E)
    dots = np.flatnonzero(b == _DOT)
    if dots.size and not (digit[dots - 1].all() and digit[dots + 1].all()):
        return False
    plus = np.flatnonzero(b == _PLUS)
    if plus.size and not exponent[plus - 1].all():
        return False
    zeros = np.flatnonzero((b[:-1] == _ZERO) & digit[1:])  # a 0 followed by a digit...
    if zeros.size:
        before = zeros - 1
        inside = digit[before] | (b[before] == _DOT) | exponent[before]  # ...within a number: fine
        signed = (b[before] == _MINUS) | (b[before] == _PLUS)
        exponent_sign = signed & exponent[np.maximum(before - 1, 0)]  # 1e-05: fine
        if not (inside | exponent_sign).all():
            return False
    return True


_BRACKETS_TO_SPACES = bytes.maketrans(b"[]", b"  ")
_NUMBER_BYTES = b"0123456789.eE+- \t\r\n"


def _skeleton(shape: list[int]) -> bytes:
    """The brackets and commas of a regular nested list of this shape."""
    out = b""
    for n in reversed(shape):
        out = b"[" + b",".join([out] * n) + b"]"
    return out


def read_plain_inputs(raw: bytes, input_spec: dict) -> np.ndarray | None:
    """``{"inputs": [...]}`` of plain numbers in the spec's shape (one example or a batch) as a
    float64 array; None for anything else (the general path reads it and says what is wrong)."""
    match = _PLAIN_INPUTS.fullmatch(raw)
    if match is None:
        return None
    text = match.group(1)
    if not _json_numbers_only(text):
        return None
    try:
        example = [int(d) for d in spec_shape(input_spec)]
    except (InvalidInput, TypeError):  # no shape, or a free axis: the general path
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "could not be read to its end": a count mismatch below
        values = np.fromstring(text.translate(_BRACKETS_TO_SPACES), sep=",")
    per = math.prod(example)
    if values.size == 0 or per == 0 or values.size % per:
        return None
    skeleton = text.translate(None, _NUMBER_BYTES)
    for shape in (example, [values.size // per, *example]):
        if math.prod(shape) == values.size and skeleton == _skeleton(shape):
            return values.reshape(shape)
    return None


def read_body(raw: bytes) -> PredictIn:
    """The general path: pydantic reads the JSON (NaN and Infinity included, for a clear refusal)."""
    try:
        return PredictIn.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


# --------------------------------------------------------------------------- running


class Runner:
    """One LiteRT interpreter for one .tflite file. Not thread-safe: its batcher runs it in one
    worker thread at a time."""

    def __init__(self, content: bytes):
        from ai_edge_litert.interpreter import Interpreter

        with quiet_stderr():  # LiteRT announces its XNNPACK delegate on stderr
            self.interpreter = Interpreter(model_content=content, num_threads=1)
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.dtype = np.dtype(self.input["dtype"])
        signature = self.input.get("shape_signature")
        self.fixed_batch = signature is not None and len(signature) > 0 and int(signature[0]) == 1
        self.example_shape = tuple(int(d) for d in self.input["shape"][1:])
        self._batch: int | None = None

    def _prepare(self, batch: int) -> None:
        if batch != self._batch:
            self.interpreter.resize_tensor_input(self.input["index"], [batch, *self.example_shape])
            if self._batch is None:  # LiteRT announces its XNNPACK delegate once, on stderr
                with quiet_stderr():  # (fd 2 of the whole process: only this first time)
                    self.interpreter.allocate_tensors()
            else:
                self.interpreter.allocate_tensors()
            self._batch = batch

    def _invoke(self, x: np.ndarray) -> np.ndarray:
        self._prepare(len(x))
        self.interpreter.set_tensor(self.input["index"], x)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output["index"]).copy()

    def run(self, x: np.ndarray) -> np.ndarray:
        """Outputs for a batch (its first axis); rows one by one when the file's batch is fixed."""
        x = np.ascontiguousarray(x, dtype=self.dtype)
        if self.fixed_batch and len(x) > 1:
            return np.concatenate([self._invoke(x[i : i + 1]) for i in range(len(x))])
        return self._invoke(x)


@dataclass
class _Pending:
    x: np.ndarray
    future: asyncio.Future
    arrived: float
    gather: bool  # False: it found the batcher idle and runs at once


class Batcher:
    """Gathers concurrent requests for one interpreter into batches and runs them in a thread.

    A request that finds the batcher idle (nothing running, nothing waiting) runs at once: a
    lone client pays no window. Otherwise it joins the open batch, which runs ``window``
    seconds after its first request arrived, or at once when it holds ``max_batch`` examples,
    and never before the interpreter is free (it keeps gathering while the previous batch
    runs). Requests are never split: one bigger than ``max_batch`` runs alone.
    """

    def __init__(self, model: str, runner: Runner, window_s: float, max_batch: int):
        self.model = model
        self.runner = runner
        self.window_s = window_s
        self.max_batch = max_batch
        self._pending: deque[_Pending] = deque()
        self._rows = 0
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Future | None = None

    async def submit(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """This request's outputs and how many requests shared its interpreter run."""
        loop = asyncio.get_running_loop()
        idle = self._task is None and not self._pending
        item = _Pending(x, loop.create_future(), loop.time(), gather=not idle)
        self._pending.append(item)
        self._rows += len(x)
        if self._task is None:
            self._task = loop.create_task(self._work())
        elif self._rows >= self.max_batch and self._wake is not None and not self._wake.done():
            self._wake.set_result(None)
        return await item.future

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                first = self._pending[0]
                delay = first.arrived + self.window_s - loop.time() if first.gather else 0.0
                if delay > 0 and self._rows < self.max_batch:
                    self._wake = loop.create_future()
                    timer = loop.call_later(delay, _resolve, self._wake)
                    try:
                        await self._wake
                    finally:
                        timer.cancel()
                        self._wake = None
                batch: list[_Pending] = []
                rows = 0
                while self._pending and (not batch or rows + len(self._pending[0].x) <= self.max_batch):
                    item = self._pending.popleft()
                    batch.append(item)
                    rows += len(item.x)
                self._rows -= rows
                batch = [item for item in batch if not item.future.done()]  # a client that left
                if batch:
                    await self._run(batch)
        finally:
            self._task = None

    async def _run(self, batch: list[_Pending]) -> None:
        try:
            x = batch[0].x if len(batch) == 1 else np.concatenate([item.x for item in batch])
            y = await anyio.to_thread.run_sync(self.runner.run, x)
        except Exception as exc:  # noqa: BLE001 - every waiting request gets the failure
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        count_predict_run(self.model, len(batch), len(x))
        start = 0
        for item in batch:
            end = start + len(item.x)
            if not item.future.done():
                item.future.set_result((y[start:end], len(batch)))
            start = end


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


# --------------------------------------------------------------------------- caching


class AnswerCache:
    """Least-recently-used answer bodies, bounded by count and by bytes."""

    def __init__(self, max_entries: int, max_bytes: int = CACHE_BYTES):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, bytes] = OrderedDict()
        self._bytes = 0

    def get(self, key: tuple) -> bytes | None:
        body = self._entries.get(key)
        if body is not None:
            self._entries.move_to_end(key)
        return body

    def put(self, key: tuple, body: bytes) -> None:
        if self.max_entries == 0 or len(body) > min(CACHE_ENTRY_MAX_BYTES, self.max_bytes) or key in self._entries:
            return
        self._entries[key] = body
        self._bytes += len(body)
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= len(dropped)

    def __len__(self) -> int:
        return len(self._entries)


# --------------------------------------------------------------------------- the service


@dataclass
class Answer:
    model: str
    version: int
    body: bytes
    cache: str  # "hit" or "miss"
    batch_requests: int | None = None  # requests that shared the interpreter run (misses)

    @property
    def headers(self) -> dict[str, str]:
        headers = {"X-Pollinate-Cache": self.cache, "X-Pollinate-Version": str(self.version)}
        if self.batch_requests is not None:
            headers["X-Pollinate-Batch"] = str(self.batch_requests)
        return headers


@dataclass
class Predictor:
    """Resolves the version, checks and encodes the input, answers from the cache or a batch."""

    catalog: Catalog
    cache_entries: int
    window_s: float
    max_batch: int
    cache: AnswerCache = field(init=False)
    _batchers: OrderedDict[tuple[str, int], Batcher] = field(init=False, default_factory=OrderedDict)
    _loading: dict[tuple[str, int], asyncio.Future] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.cache = AnswerCache(self.cache_entries)

    async def predict(self, model: str, channel: str, client_id: str | None, raw: bytes) -> Answer:
        resolved = (self.catalog.cached_channel_manifest(model, channel, client_id)
                    or await self.catalog.channel_manifest(model, channel, client_id))
        version = resolved.manifest.version
        record = await self.catalog.record(model, version)
        files = [f for f in record.artifacts.get(FORMAT, ()) if f.name.endswith(".tflite")]
        if not files:
            count_predict_refusal(model, "no_artifact")
            raise NoServableArtifact(
                f"model {model!r} version {version} has no {FORMAT} file to run on the server; "
                f"export it (pollinate export {model} --version {version} --formats {FORMAT}) or move the channel"
            )
        try:
            plain = read_plain_inputs(raw, record.input_spec)
            if plain is not None:
                x = check_inputs(plain, record.input_spec)
            else:
                body = read_body(raw)
                x = self.encode(record.input_spec, body.inputs, body.rows)
        except (InvalidInput, RequestValidationError):
            count_predict_refusal(model, "invalid")
            raise
        key = (model, version, input_digest(x))
        body = self.cache.get(key)
        if body is not None:
            count_predict(model, version, "hit")
            return Answer(model, version, body, "hit")
        try:
            batcher = await self._batcher(model, version, files[0], record.input_spec)
        except NoServableArtifact:
            count_predict_refusal(model, "no_artifact")
            raise
        y, shared = await batcher.submit(x)
        if not np.isfinite(y).all():
            count_predict_refusal(model, "invalid")
            raise InvalidInput("the model's outputs for these inputs are not finite numbers")
        body = json.dumps({"model": model, "version": version, "outputs": y.tolist()},
                          separators=(",", ":"), allow_nan=False).encode()
        self.cache.put(key, body)
        count_predict(model, version, "miss")
        return Answer(model, version, body, "miss", shared)

    @staticmethod
    def encode(input_spec: dict, inputs: object, rows: object) -> np.ndarray:
        if (inputs is None) == (rows is None):
            raise InvalidInput("send either 'inputs' (one example or a batch) or, for a tabular model, 'rows'")
        if rows is not None:
            if not is_tabular(input_spec):
                raise InvalidInput("this model does not take table rows (its input is not tabular); send 'inputs'")
            return encode_rows(rows, input_spec)
        return check_inputs(inputs, input_spec)

    async def _batcher(self, model: str, version: int, artifact, spec: dict) -> Batcher:
        key = (model, version)
        batcher = self._batchers.get(key)
        if batcher is not None:
            self._batchers.move_to_end(key)
            return batcher
        loading = self._loading.get(key)
        if loading is None:
            loading = self._loading[key] = asyncio.get_running_loop().create_future()
            path = self.catalog.blob(artifact).path
            try:
                runner = await anyio.to_thread.run_sync(_load_runner, path, model, version, spec)
            except BaseException as exc:
                if isinstance(exc, Exception):
                    loading.set_exception(exc)
                    loading.exception()  # retrieved: nobody may be waiting
                else:
                    loading.cancel()
                raise
            finally:
                self._loading.pop(key, None)
            batcher = Batcher(model, runner, self.window_s, self.max_batch)
            self._batchers[key] = batcher
            while len(self._batchers) > MAX_INTERPRETERS:
                self._batchers.popitem(last=False)
            loading.set_result(batcher)
            return batcher
        return await asyncio.shield(loading)


def _load_runner(path: Path, model: str, version: int, spec: dict) -> Runner:
    """The version's interpreter; NoServableArtifact (409) when LiteRT cannot run the file or it
    takes another shape than the version's input spec says."""
    try:
        runner = Runner(Path(path).read_bytes())
    except (ValueError, RuntimeError) as exc:
        raise NoServableArtifact(f"model {model!r} version {version}: LiteRT cannot load its {FORMAT} file"
                                 f" ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    try:
        expected = spec_shape(spec)
    except InvalidInput:
        return runner
    fits = len(expected) == len(runner.example_shape) and all(
        want is None or want == got for want, got in zip(expected, runner.example_shape))
    if not fits:
        raise NoServableArtifact(f"model {model!r} version {version}: its {FORMAT} file takes examples of shape"
                                 f" {list(runner.example_shape)}, its input spec says {spec.get('shape')}")
    return runner
