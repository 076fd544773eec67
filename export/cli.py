"""`pollinate export`: a stored version, or your own .keras file, to TF.js and TFLite, verified."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from core.console import HomeOption, JsonOption, human_console, print_json
from registry import open_store

FORMATS_HELP = "Comma-separated: tfjs-layers, tflite-float32, tflite-dynamic, tflite-float16, tflite-int8, tflite-train (default: all)."


def parse_formats(values: list[str] | None) -> tuple[str, ...] | None:
    if not values:
        return None
    return tuple(dict.fromkeys(f.strip() for v in values for f in v.split(",") if f.strip()))


def export(
    target: Annotated[str, typer.Argument(help="A model name in the store, or a path to a .keras file.")],
    version: Annotated[Optional[int], typer.Option("--version", "-v", help="Stored version (default: latest).")] = None,
    formats: Annotated[Optional[list[str]], typer.Option("--formats", "-f", help=FORMATS_HELP)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder (for a .keras file).")] = None,
    samples: Annotated[Optional[Path], typer.Option("--samples", help=".npy inputs to verify and calibrate on (a .keras file; default: random inputs).")] = None,
    labels: Annotated[Optional[Path], typer.Option("--labels", help=".npy labels/targets for --samples, to report real accuracy.")] = None,
    tfjs_quantize: Annotated[Optional[str], typer.Option("--tfjs-quantize", help="Quantize TF.js weights: float16 or uint8.")] = None,
    int8_io: Annotated[bool, typer.Option("--int8-io", help="int8 TFLite takes and returns int8 (default: float32 in/out).")] = False,
    home: HomeOption = Path(".pollinate"),
    as_json: JsonOption = False,
) -> None:
    """Export to TF.js and TFLite (all variants), verify every file against Keras, store or write them."""
    from export.pipeline import ExportOptions, export_file, export_version

    console = human_console(as_json)
    options = ExportOptions(int8_io=int8_io, tfjs_quantize=tfjs_quantize)
    chosen = parse_formats(formats)
    if chosen:
        options.formats = chosen
    options.check()
    is_file = target.endswith((".keras", ".h5")) or "/" in target or Path(target).is_file()
    with console.status("exporting…") as status:
        progress = lambda message: status.update(f"{message}…")  # noqa: E731
        if is_file:
            if out is None:
                raise typer.BadParameter("exporting a file needs --out DIR")
            report = export_file(Path(target), out, samples=samples, labels=labels, options=options, progress=progress)
            where = f"{out}/tfjs/model.json, {out}/tflite/*.tflite, {out}/export-report.json"
            title = target
        else:
            if out is not None or samples is not None or labels is not None:
                raise typer.BadParameter("--out/--samples/--labels apply to a .keras file, not a stored model")
            record, report = export_version(open_store(home), target, version, options=options, progress=progress)
            where = f"{record.model} v{record.version} now has: {', '.join(sorted(record.artifacts))}"
            title = f"{record.model} v{record.version}"
    if as_json:
        print_json(report)
        return
    print_report(console, report, title)
    console.print(where)


def print_report(console, report: dict, title: str) -> None:
    from rich.table import Table

    metric = "accuracy" if report["task"] == "classification" else "mae"
    table = Table(title=f"export of {title}: {report['samples']} held-out inputs")
    for column in ("format", "runtime", "bytes", "max |diff|", metric, "ms", "ok"):
        table.add_column(column, justify="right" if column not in ("format", "runtime", "ok") else "left",
                         no_wrap=column in ("format", "ok"))
    keras = report["keras"]
    value = keras["metric"].get(metric)
    table.add_row("keras", keras["runtime"], "", "0", "" if value is None else f"{value:.4f}",
                  f"{keras['latency_ms']['median']:.3f}", "reference")
    for row in report["formats"]:
        value = row["metric"].get(metric)
        table.add_row(row["format"], row["runtime"], f"{row['bytes']:,}", f"{row['max_abs_diff']:.1e}",
                      "" if value is None else f"{value:.4f}", f"{row['latency_ms']['median']:.3f}",
                      "✔" if row["passed"] else "✘")
    console.print(table)
    console.print("ms = median single-sample latency. Gates: " + "; ".join(
        f"{row['format']} ({row['runtime']}): {row['gate']}" for row in report["formats"] if not row["passed"]
    ) if report["failures"] else "ms = median single-sample latency. Every gate passed: float formats within "
        f"{report['thresholds']['float_max_abs_diff']:g} of Keras, quantized classifiers within "
        f"{100 * report['thresholds']['quantized_max_accuracy_drop']:g} accuracy points.")
