"""The manifest: the JSON contract between the server and every client.

A manifest says which version a client runs and, per format, where each file is, how big
it is and what it hashes to (hex sha256 and an SRI ``integrity`` string a browser can
check with ``fetch(url, {integrity})``). URLs are absolute paths from the server root, so
``tf.loadLayersModel(origin + artifacts["tfjs-layers"].url)`` works and TF.js finds the
weight shards next to ``model.json``.

Manifests are rendered once into canonical bytes (sorted keys, no spaces) and their strong
ETag is the sha256 of those bytes: the ETag changes exactly when what a client would
receive changes, in every worker process, without any shared state.

Every version also says what its export delivered: ``export.delivered`` (the formats attached,
each verified against Keras before it was stored), ``export.refused`` ({format: {stage,
reason}} from the export reports; ``null`` when the caller did not read them) and, per TF.js
artifact, its ``kind`` (``layers`` → ``tf.loadLayersModel``, ``graph`` → ``tf.loadGraphModel``).

A version with a ``profile`` artifact (docs/monitoring.md) carries its grid as ``monitoring``:
the bins a client aggregates its telemetry on, and where it sends telemetry and feedback
(:func:`monitoring_block`). When the channel that served it names a shadow version,
``shadow`` says which and where its manifest is. A version without a profile has no
``monitoring`` key (its clients send no telemetry); ``shadow`` is absent when none is named.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
from dataclasses import dataclass, field
from urllib.parse import quote

from core.errors import PollinateError
from registry import VersionRecord
from server.conditional import accepts_gzip, none_match

# The file a client opens first for a format, in order of preference (see entry_file).
ENTRY_FILES = ("model.json", "model.tflite", "model.keras", "report.json", "export-report.json")
# Below this size gzip costs more than the bytes it saves.
GZIP_MIN_BYTES = 1024
# Manifests may change (a channel moves, a format is attached): always revalidate (cheap: 304).
NO_CACHE = "no-cache"


def entry_file(names: list[str]) -> str:
    """The file a format is opened by: TF.js's model.json, the one model file, or the report."""
    for candidate in ENTRY_FILES:
        if candidate in names:
            return candidate
    return sorted(names)[0]


def integrity(sha256_hex: str) -> str:
    """Subresource Integrity string: ``sha256-`` + base64 of the raw digest."""
    return "sha256-" + base64.b64encode(bytes.fromhex(sha256_hex)).decode("ascii")


def version_prefix(model: str, version: int) -> str:
    return f"/v1/models/{model}/versions/{version}"


def file_url(model: str, version: int, fmt: str, name: str) -> str:
    """Model and format names are URL-safe by construction; file names are quoted."""
    return f"{version_prefix(model, version)}/files/{fmt}/{quote(name, safe='')}"


NOT_EXPORTS = ("keras", "report", "profile")
PROFILE_FORMAT = "profile"  # registry/profile.py: the training data's profile (docs/monitoring.md)
PROFILE_FILE = "profile.json"
MAX_CACHED_GRIDS = 4096
_grids: dict[str, dict] = {}  # profile sha256 -> its grid
TFJS_KIND_BY_FORMAT = {"tfjs-layers": "layers", "tfjs-graph": "graph"}


def _is_export(fmt: str) -> bool:
    return fmt not in NOT_EXPORTS and fmt != "export-report" and not fmt.startswith("export-report-")


def telemetry_url(model: str) -> str:
    return f"/v1/models/{model}/telemetry"


def feedback_url(model: str) -> str:
    return f"/v1/models/{model}/feedback"


def monitoring_block(model: str, grid: dict | None) -> dict | None:
    """The manifest's ``monitoring``: the profile's grid (``registry.profile.grid``) and the two URLs."""
    if grid is None:
        return None
    return {**grid, "telemetry_url": telemetry_url(model), "feedback_url": feedback_url(model)}


def shadow_block(model: str, version: int | None) -> dict | None:
    if version is None:
        return None
    return {"version": version, "manifest": f"{version_prefix(model, version)}/manifest"}


def build_manifest(record: VersionRecord, channel: str | None = None, cohort: str | None = None,
                   *, export_outcome: dict | None = None, monitoring: dict | None = None,
                   shadow_version: int | None = None) -> dict:
    """The manifest of one version; ``channel``/``cohort`` say why a channel served it.

    ``export_outcome`` (``registry.cli.export_outcome(store, record)``) adds the refused
    formats with their reasons, the TF.js kinds read from each model.json and the TF.js
    backends a format failed verification on (``unsupported_backends``); without it the
    delivered formats come from the artifacts and a TF.js kind from the format's name.
    ``monitoring`` is the version's profile grid (None: no profile), ``shadow_version`` the
    channel's shadow (None: none)."""
    kinds = dict((export_outcome or {}).get("tfjs_kinds") or {})
    gaps = dict((export_outcome or {}).get("backend_gaps") or {})
    artifacts = {}
    for fmt, files in sorted(record.artifacts.items()):
        entries = [
            {
                "name": f.name,
                "url": file_url(record.model, record.version, fmt, f.name),
                "sha256": f.sha256,
                "bytes": f.size,
                "integrity": integrity(f.sha256),
            }
            for f in files
        ]
        entry = entry_file([f.name for f in files])
        artifacts[fmt] = {"url": file_url(record.model, record.version, fmt, entry), "files": entries}
        kind = kinds.get(fmt) or TFJS_KIND_BY_FORMAT.get(fmt)
        if fmt.startswith("tfjs") and kind:
            artifacts[fmt]["kind"] = kind
        if fmt.startswith("tfjs") and gaps.get(fmt):
            artifacts[fmt]["unsupported_backends"] = dict(gaps[fmt])
    manifest = {
        "name": record.model,
        "version": record.version,
        "created_at": record.created_at,
        "channel": channel,
        "cohort": cohort,
        "manifest_url": f"{version_prefix(record.model, record.version)}/manifest",
        "lineage": record.lineage.to_dict(),
        "input": record.input_spec,
        "labels": record.labels,
        "metrics": record.metrics,
        "artifacts": artifacts,
        "export": {
            "delivered": sorted(f for f in record.artifacts if _is_export(f)),
            "refused": None if export_outcome is None else dict(export_outcome.get("refused") or {}),
        },
    }
    block = monitoring_block(record.model, monitoring)
    if block is not None:
        manifest["monitoring"] = block
    shadow = shadow_block(record.model, shadow_version)
    if shadow is not None:
        manifest["shadow"] = shadow
    return manifest


def read_grid(store, record: VersionRecord) -> dict | None:
    """The grid of a version's ``profile`` artifact, or None when it has none (or it cannot be
    read: a manifest without monitoring is better than no manifest)."""
    files = record.artifacts.get(PROFILE_FORMAT)
    if not files:
        return None
    from registry.profile import grid  # numpy: only for versions that have a profile

    entry = next((f for f in files if f.name == PROFILE_FILE), files[0])
    if entry.sha256 in _grids:  # stored files never change: one read per profile and process
        return _grids[entry.sha256]
    try:
        with open(store.blob_path(entry.sha256), "rb") as handle:
            found = grid(json.load(handle))
    except (OSError, ValueError, KeyError, TypeError, PollinateError):
        return None
    if len(_grids) >= MAX_CACHED_GRIDS:
        _grids.clear()
    _grids[entry.sha256] = found
    return found


@dataclass(frozen=True)
class RenderedManifest:
    """A manifest as bytes on the wire, with its ETag and (when worth it) a gzipped copy."""

    model: str
    version: int
    body: bytes
    etag: str  # quoted, strong
    gzipped: bytes | None = field(default=None, repr=False)

    @classmethod
    def of(cls, manifest: dict) -> RenderedManifest:
        body = json.dumps(manifest, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
        etag = '"' + hashlib.sha256(body).hexdigest() + '"'
        packed = gzip.compress(body, compresslevel=6, mtime=0) if len(body) >= GZIP_MIN_BYTES else None
        return cls(manifest["name"], manifest["version"], body, etag, packed)

    @property
    def gzip_etag(self) -> str:
        """The gzipped bytes are another representation, so they get their own strong ETag."""
        return self.etag[:-1] + '-gzip"'


Headers = list[tuple[bytes, bytes]]


def manifest_answer(
    rendered: RenderedManifest, accept_encoding: str | None, if_none_match: str | None, cache_control: str
) -> tuple[int, Headers, bytes]:
    """Status, headers and body for one manifest request: 304 when the client's copy is
    current, else the bytes (gzipped when the client takes it and it is worth it)."""
    use_gzip = rendered.gzipped is not None and accepts_gzip(accept_encoding)
    etag = rendered.gzip_etag if use_gzip else rendered.etag
    headers = [
        (b"etag", etag.encode()),
        (b"cache-control", cache_control.encode()),
        (b"vary", b"Accept-Encoding"),
    ]
    if none_match(if_none_match, etag):
        return 304, headers, b""
    body = rendered.gzipped if use_gzip else rendered.body
    if use_gzip:
        headers.append((b"content-encoding", b"gzip"))
    headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return 200, headers, body
