"""What a stored version's exports delivered and refused, read from its artifacts and export
reports (stdlib only: the server's catalog and `pollinate models show` both use it)."""

from __future__ import annotations

import json

from registry import Store, VersionRecord

NOT_EXPORTS = ("keras", "report")
TFJS_KINDS = {"layers-model": "layers", "graph-model": "graph"}


def is_report(fmt: str) -> bool:
    return fmt == "export-report" or fmt.startswith("export-report-")


def export_outcome(store: Store, record: VersionRecord) -> dict:
    """What a stored version has, from its artifacts and its export reports (stdlib only):
    `delivered` (the exported formats attached, all verified), `refused` ({format: {stage,
    reason}} from the reports, for formats no later export delivered) and `tfjs_kinds`
    ({format: "layers" | "graph"} from each TF.js model.json's `format` field) and
    `backend_gaps` ({format: {backend: why}}: TF.js backends a delivered format failed on
    while another passed)."""
    delivered = sorted(f for f in record.artifacts if f not in NOT_EXPORTS and not is_report(f))
    refused: dict[str, dict] = {}
    gaps: dict[str, dict] = {}
    reports = sorted((f for f in record.artifacts if is_report(f)),
                     key=lambda f: 1 if f == "export-report" else int(f.rsplit("-", 1)[1]))
    for fmt in reports:
        if not any(f.name == "export-report.json" for f in record.artifacts[fmt]):
            continue
        try:
            report = json.loads(store.artifact_path(record.model, record.version, fmt, "export-report.json").read_text())
        except (OSError, ValueError):
            continue
        for name, why in ((report.get("outcome") or {}).get("refused") or {}).items():
            if name not in delivered:
                refused[name] = why
        for name, backends in ((report.get("outcome") or {}).get("backend_gaps") or {}).items():
            if name in delivered:
                gaps[name] = backends
    kinds = {}
    for fmt in delivered:
        if fmt.startswith("tfjs") and any(f.name == "model.json" for f in record.artifacts[fmt]):
            try:
                kind = json.loads(store.artifact_path(record.model, record.version, fmt, "model.json").read_text()).get("format")
            except (OSError, ValueError, AttributeError):
                kind = None
            if kind in TFJS_KINDS:
                kinds[fmt] = TFJS_KINDS[kind]
    return {"delivered": delivered, "refused": refused, "tfjs_kinds": kinds, "backend_gaps": gaps}
