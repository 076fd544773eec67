"""Pydantic models for every request and response body: the OpenAPI contract at /docs.

Hot routes return pre-rendered bytes (see ``server/manifest.py``) instead of these
models, for speed; the models still document them, and the tests check the bytes
against the schema.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

# Largest version number a path or body may carry (SQLite integers are 64-bit).
MAX_VERSION = 2**53


class ErrorOut(BaseModel):
    """Every refusal: one human-readable sentence."""

    detail: str


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

    version: StrictInt = Field(ge=1, le=MAX_VERSION)
    rollout_percent: float | None = Field(None, gt=0, le=100, allow_inf_nan=False)


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
        " or the newest because the channel is unset (null for a fixed version)."
    )
    manifest_url: str = Field(description="This version's own (fixed) manifest.")
    lineage: LineageOut
    input: dict[str, Any] = Field(description="Input spec: shape, dtype, preprocessing.")
    labels: list[Any] | None
    metrics: dict[str, Any]
    artifacts: dict[str, ManifestFormatOut] = Field(description="Keyed by format, e.g. tfjs-layers, tflite-int8.")
    export: ExportOut
