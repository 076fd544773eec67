"""Pydantic models for every request and response body: the OpenAPI contract at /docs.

Hot routes return pre-rendered bytes (see ``server/manifest.py``) instead of these
models, for speed; the models still document them, and the tests check the bytes
against the schema.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictFloat, StrictInt, model_validator

# Largest version number a path or body may carry (SQLite integers are 64-bit).
MAX_VERSION = 2**53


def _integral(value: object) -> object:
    """JSON Schema's "integer" is any number with no fraction (``3.0`` too): take it as the
    int it is. Strings and booleans stay refused (StrictInt)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


WholeNumber = Annotated[StrictInt, BeforeValidator(_integral)]


# A time a client may name (``?since=`` of the monitor view): an ISO date or time in years
# 2000-2999 that exists (leap days included), or a span back from now (90m, 24h, 7d, 2w). The
# route refuses anything else itself, so what the schema allows is exactly what is accepted;
# [0-9], not \\d, which would allow other scripts' digits.
_YEAR = "2[0-9]{3}"
_LEAP_YEAR = "2[0-9](0[48]|[2468][048]|[13579][26])|2[048]00"
_DATE = (f"({_YEAR}-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])|{_YEAR}-(0[13-9]|1[0-2])-(29|30)"
         f"|{_YEAR}-(0[13578]|1[02])-31|({_LEAP_YEAR})-02-29)")
_TIME = ("(T([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\\.[0-9]{3}|\\.[0-9]{6})?)?"
         "(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])?)?")
_SPAN = "[0-9]{1,4}(\\.[0-9]{1,3})?[mhdw]"
SINCE_PATTERN = f"^({_DATE}{_TIME}|{_SPAN})$"


class ErrorOut(BaseModel):
    """Every refusal: one human-readable sentence."""

    detail: str


class ValidationItemOut(BaseModel):
    """One problem with a request: where (``["query", "version"]``, ``["body", "rows", 0]``) and what."""

    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorOut(ErrorOut):
    """A request that does not match the operation's parameters or body: every problem in one
    sentence (``detail``) and as a list (``errors``, at most 20)."""

    errors: list[ValidationItemOut] = []


class HealthOut(BaseModel):
    status: Literal["ok"] = "ok"


class RootOut(BaseModel):
    """What ``/`` says until ``web_client/index.html`` exists (then it redirects there)."""

    name: str = "pollinate"
    docs: str = "/docs"
    models: str = "/v1/models"


class ChannelStateOut(BaseModel):
    """Where a channel points; ``version`` is null after a rollback unset the channel."""

    model: str
    channel: str
    version: int | None
    candidate_version: int | None = Field(None, description="Staged for rollout_percent of clients.")
    rollout_percent: float | None = None
    updated_at: str


class ModelOut(BaseModel):
    name: str
    latest_version: int
    versions: int
    channels: dict[str, ChannelStateOut]


class ModelListOut(BaseModel):
    models: list[ModelOut]


class VersionOut(BaseModel):
    version: int
    created_at: str
    source: str
    formats: list[str]
    manifest_url: str


class VersionListOut(BaseModel):
    model: str
    versions: list[VersionOut]


class HistoryEntryOut(BaseModel):
    action: Literal["promote", "rollout", "rollback"]
    channel: str
    version: int | None
    candidate_version: int | None
    rollout_percent: float | None
    at: str


class ChannelsOut(BaseModel):
    model: str
    channels: dict[str, ChannelStateOut]
    history: list[HistoryEntryOut] = Field(description="Every move, oldest first.")


class ChannelMoveIn(BaseModel):
    """Promote ``version`` to everyone (no percent, or 100), or stage it for a percent."""

    model_config = ConfigDict(extra="forbid")

    version: WholeNumber = Field(ge=1, le=MAX_VERSION)
    rollout_percent: StrictFloat | None = Field(None, gt=0, le=100, allow_inf_nan=False)


class LineageOut(BaseModel):
    source: str
    parent_version: int | None = None
    round: int | None = None
    dataset_fingerprint: str | None = None
    hyperparameters: dict[str, Any] = {}
    extra: dict[str, Any] = {}


class ManifestFileOut(BaseModel):
    name: str
    url: str = Field(description="Absolute path from the server root.")
    sha256: str
    bytes: int
    integrity: str = Field(description="Subresource Integrity: sha256- + base64 digest.")


class ManifestFormatOut(BaseModel):
    url: str = Field(description="The entry file: model.json for TF.js, the .tflite or .keras file, the report.")
    files: list[ManifestFileOut]
    kind: Literal["layers", "graph"] | None = Field(
        None, description="TF.js formats only: a LayersModel (loads with tf.loadLayersModel, trains) or a"
        " graph model (tf.loadGraphModel, inference only).")
    unsupported_backends: dict[str, str] | None = Field(
        None, description="TF.js formats only: backends this model failed verification on (another passed),"
        " with the reason; a client picks a backend not named here.")


class RefusalOut(BaseModel):
    stage: str = Field(description="Where the format failed: convert, verify, calibrate, ...")
    reason: str = Field(description="Why, naming the layer or op or the measured difference.")


class ExportOut(BaseModel):
    delivered: list[str] = Field(description="The formats this version has, each verified.")
    refused: dict[str, RefusalOut] | None = Field(
        description="Formats an export tried and refused, with the reason (null when unknown).")


class ManifestOut(BaseModel):
    """The contract with every client: what to run and how to check it."""

    name: str
    version: int
    created_at: str
    channel: str | None = Field(description="The channel asked for (null for a fixed version).")
    cohort: Literal["channel", "candidate", "latest"] | None = Field(
        description="Why this version: the channel's, the rollout candidate for this client,"
        " or the newest because the channel is `stable` and unset (null for a fixed version)."
    )
    manifest_url: str = Field(description="This version's own (fixed) manifest.")
    lineage: LineageOut
    input: dict[str, Any] = Field(description="Input spec: shape, dtype, preprocessing.")
    labels: list[Any] | None
    metrics: dict[str, Any]
    artifacts: dict[str, ManifestFormatOut] = Field(description="Keyed by format, e.g. tfjs-layers, tflite-int8.")
    export: ExportOut
    monitoring: dict[str, Any] | None = Field(
        None, description="The telemetry grid (features with their bins, prediction bins, latency bins) and the"
        " telemetry and feedback URLs, when the version has a reference profile (docs/monitoring.md).")
    shadow: dict[str, Any] | None = Field(
        None, description="The channel's shadow version: {version, manifest}; clients run it silently and report"
        " agreement in telemetry, never show its outputs.")


# --------------------------------------------------------------------------- device protocol
# /v1/federations/{model}/...: how browsers and phones join a federation (docs/device-protocol.md).

class EdgeErrorOut(BaseModel):
    """A device protocol refusal: the sentence, and the reason it is counted under in /metrics."""

    detail: str
    reason: str = Field(description="unauthorized, unknown_model, unknown_task, stale, duplicate, too_large,"
                        " wrong_length, non_finite, norm, bad_examples, bad_dtype, bad_enrolment or rate_limited"
                        " (the protocol's, counted in /metrics and /status); json_bounds or busy (the server's"
                        " own limits on any request).")


class EnrolIn(BaseModel):
    """Optional body of an enrolment. An unknown ``kind`` is recorded as ``device``."""

    kind: str | None = Field(None, description="browser, phone, device or simulated (default device).",
                             examples=["phone"])


class EnrolOut(BaseModel):
    """A new device. Keep the token: it is shown once and stored only as its sha256."""

    device_id: str
    token: str = Field(description="Send as Authorization: Bearer <token> on every other device call.")


class TaskConfigOut(BaseModel):
    """How to train locally (the gateway may add keys; ignore the ones you do not know)."""

    model_config = ConfigDict(extra="allow")

    epochs: int
    batch_size: int
    learning_rate: float


class WeightSpecOut(BaseModel):
    """One tensor of the base, in Keras ``model.get_weights()`` order."""

    name: str
    shape: list[int]
    dtype: str = Field(description="The tensor's dtype in the model; on the wire it is always float32 (or float16).")


class TaskOut(BaseModel):
    """The round a device should work on."""

    task_id: str
    round: int
    base_version: int | None = Field(description="The model version whose files to load (then set the task's weights).")
    deadline: str = Field(description="ISO 8601 UTC; an update arriving later is refused (409 stale).")
    config: TaskConfigOut
    weights: list[WeightSpecOut] = Field(description="Tensors in the order the weights and the update concatenate them.")
    size: int = Field(description="Values in the flat vector: the sum of the products of the shapes.")
    norm_bound: float | None = Field(description="Largest L2 norm of an update (null: none). Over it: 422, or"
                                     " clipped when the task clips.")


class UpdateAcceptedOut(BaseModel):
    """An update recorded durably: it is counted exactly once, whatever happens to the server next."""

    task_id: str
    round: int
    accepted: int = Field(description="Updates this task holds so far, this one included.")
    norm: float = Field(description="L2 norm of the update as sent (before any clipping).")
    clipped: bool = Field(description="True when the task clips and the update was scaled down to norm_bound.")


class FederationTaskStatusOut(BaseModel):
    task_id: str
    gateway: str
    open: bool
    accepted: int
    min_updates: int
    deadline: str


class FederationStatusOut(BaseModel):
    """Where the model's edge federation stands (no token needed: nothing here is secret)."""

    round: int | None = Field(description="The round of the task opened last (null: none yet).")
    federation: str | None = None
    open: bool = Field(description="A task of this round is open and before its deadline.")
    accepted: int = Field(description="Updates accepted in this round, over all gateways.")
    refused: dict[str, int] = Field(description="Refusals of this federation's current round, by reason.")
    refused_total: dict[str, int] = Field(default_factory=dict, description="Every refusal of this federation, by"
                                          " reason (never another federation's, even of the same model).")
    refused_unattributed: dict[str, int] = Field(
        default_factory=dict, description="The model's refusals that could name no task, so no federation (a wrong"
        " token, an unknown task, a bad or rate-limited enrolment), by reason, over the model's life.")
    tasks: list[FederationTaskStatusOut] = []


# --------------------------------------------------------------------------- server-side predict


def _nested_numbers(depth: int) -> dict:
    """JSON Schema for numbers in lists nested at most ``depth`` deep (one level: a batch)."""
    schema: dict = {"type": "number"}
    for _ in range(depth):
        schema = {"anyOf": [{"type": "number"}, {"type": "array", "items": schema, "minItems": 1}]}
    return schema


# an example of up to rank 5, or a batch of them
PREDICT_INPUTS_SCHEMA = {"type": "array", "minItems": 1, "items": _nested_numbers(5)}
PREDICT_ROWS_SCHEMA = {"type": "array", "minItems": 1, "items": {
    "type": "object", "additionalProperties": {"anyOf": [{"type": "number"}, {"type": "string"}]}}}


def _predict_schema(schema: dict) -> None:
    """Exactly one of ``inputs`` and ``rows``, each in the shape the server reads."""
    schema["properties"]["inputs"] = {**PREDICT_INPUTS_SCHEMA, "description": schema["properties"]["inputs"]["description"]}
    schema["properties"]["rows"] = {**PREDICT_ROWS_SCHEMA, "description": schema["properties"]["rows"]["description"]}
    schema["oneOf"] = [{"required": ["inputs"]}, {"required": ["rows"]}]
    schema["examples"] = [
        {"inputs": [[[0.0]] * 8] * 8},
        {"rows": [{"distance_km": 2.4, "hour": 19, "weekday": 4, "city": "london",
                   "prep_time_min": 12.0, "courier_load": 1.1}]},
    ]


class PredictIn(BaseModel):
    """One example or a batch as MODEL inputs, or table rows for a tabular model: exactly one of them."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_predict_schema)

    inputs: Any = Field(None, description=(
        "Nested lists of numbers in the manifest's input shape (one example) or with a leading batch"
        " axis (a batch), in the input dtype, AFTER the preprocessing the manifest describes (what the"
        " LiteRT artifact takes: digits' pixels times `scale` plus `offset`)."))
    rows: list[dict[str, Any]] | None = Field(None, description=(
        "Tabular models only: one object per example, {column: value} for every column of the input"
        " spec's preprocessing (numbers for numeric columns, a vocabulary entry for categorical ones;"
        " the server one-hot encodes them)."))

    @model_validator(mode="before")
    @classmethod
    def _exactly_one(cls, data: Any) -> Any:
        """``{"inputs": null, "rows": [...]}`` is neither shape the schema allows: refuse it here,
        as the schema says, rather than read it as rows."""
        if isinstance(data, dict):
            for key in ("inputs", "rows"):
                if key in data and data[key] is None:
                    raise ValueError(f"{key!r} must not be null: send either 'inputs' or 'rows'")
        return data


class PredictOut(BaseModel):
    """The answer: which version computed it, and one output row per example."""

    model: str
    version: int = Field(description="The version this client resolves to (channel and rollout cohort).")
    outputs: list[Any] = Field(description=(
        "The LiteRT float32 artifact's outputs, one entry per example (a single example gets a batch"
        " of one): class probabilities in label order, or the regression value."))


# --------------------------------------------------------------------------- field monitoring
# The bodies of POST /v1/models/{name}/telemetry and /feedback (docs/monitoring.md, sections 2 and
# 3), as the OpenAPI document states them. The monitor reads them itself (registry/monitoring.py):
# what it checks against the version they name (its grid, labels and value range) no schema can
# say, so these state the shape and what is checked whatever the version: no stricter than the
# monitor, so that nothing the schema refuses is ever accepted.

_COUNTS = {"type": "array", "items": {"type": "integer", "minimum": 0}}
_VALUE = {"anyOf": [{"type": "string"}, {"type": "number"}]}
_CLIENT_ID = {"type": "string", "minLength": 1, "maxLength": 64,
              "description": "Optional; it decides nothing on the server."}
_BATCH_ID = {"type": "string", "pattern": "^[A-Za-z0-9_-]{16,64}$",
             "description": "Made once per batch and sent unchanged with each retry: a batch is counted once."}
TELEMETRY_BODY = {
    "type": "object",
    "additionalProperties": False,
    "required": ["version"],
    "description": "One version's aggregate since the client's last flush: histograms on the manifest's"
                   " `monitoring` grid, never an input.",
    "properties": {
        "version": {"type": "integer", "minimum": 1, "maximum": MAX_VERSION},
        "batch_id": _BATCH_ID,
        "client_id": _CLIENT_ID,
        "predictions": {"type": "integer", "minimum": 0, "maximum": 10000},
        "errors": {"type": "integer", "minimum": 0},
        "latency_ms": _COUNTS,
        "features": {"type": "object", "additionalProperties": _COUNTS},
        "prediction": {"type": "object"},
        "shadow": {"type": "object"},
        "recent": {"type": "array", "maxItems": 100, "items": {"type": "object"}},
    },
    "examples": [{"version": 1, "batch_id": "9f1c2a5b7d3e4f60a1b2c3d4e5f60718", "predictions": 10, "errors": 0,
                  "latency_ms": [0, 8, 2, 0, 0, 0, 0, 0, 0, 0, 0]}],
}
FEEDBACK_BODY = {
    "type": "object",
    "additionalProperties": False,
    "required": ["label"],
    "description": "`{version, prediction, label}`, or `{prediction_id, label}` for a prediction listed in an"
                   " earlier telemetry batch's `recent`. Labels are the manifest's `labels` (numbers for"
                   " regression).",
    "properties": {
        "version": {"type": "integer", "minimum": 1, "maximum": MAX_VERSION},
        "prediction": _VALUE,
        "label": _VALUE,
        "prediction_id": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,64}$"},
        "batch_id": _BATCH_ID,
        "client_id": _CLIENT_ID,
    },
    "examples": [{"version": 1, "prediction": "7", "label": "1", "batch_id": "5be0c1d2e3f4a5b6c7d8e9f0a1b2c3d4"}],
}


def json_body(schema: dict) -> dict:
    """``openapi_extra`` for a route that reads its JSON body itself: required, with this schema."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
