"""`pollinate export`: a stored version, or your own .keras file, to TF.js and TFLite, verified.

Every format is made and verified on its own; the table says per format ok or refused (why).
Exit codes say what was delivered: 0 every requested format, 3 some (the refused ones are in
the report), 4 none (nothing stored or written but the report); 2 is bad input, as for
every command. `--strict` keeps all-or-nothing: one refused format refuses the export (4)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from core.console import HomeOption, JsonOption, human_console, print_json
from registry import open_store

FORMATS_HELP = ("Comma-separated: tfjs-layers, tflite-float32, tflite-dynamic, tflite-float16, tflite-int8, tflite-train "
                "(the default: all of these); tfjs-graph, tfjs-float16, tfjs-uint8 where the TF.js exporter has them.")


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
    code: Annotated[Optional[Path], typer.Option("--code", help="A .keras file's Python: the file defining its custom layers or subclassed model (registered with @keras.saving.register_keras_serializable), imported before loading.")] = None,
    tfjs_quantize: Annotated[Optional[str], typer.Option("--tfjs-quantize", help="Quantize TF.js weights: float16 or uint8.")] = None,
    int8_io: Annotated[bool, typer.Option("--int8-io", help="int8 TFLite takes and returns int8 (default: float32 in/out).")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="All or nothing: one refused format refuses the export (exit 4).")] = False,
    home: HomeOption = Path(".pollinate"),
    as_json: JsonOption = False,
) -> None:
    """Export to TF.js and TFLite (all variants), verify every file against Keras, store or write
    the ones that pass. Exit code: 0 all formats delivered, 3 some, 4 none, 2 bad input."""
    from export.pipeline import ExportOptions, ExportRejected, exit_code, export_file, export_version

    console = human_console(as_json)
    chosen = parse_formats(formats)
    # the default formats mean "every format its runtimes can run": tfjs-graph stands in for a
    # refused tfjs-layers; formats chosen with --formats are made exactly as asked
    options = ExportOptions(int8_io=int8_io, tfjs_quantize=tfjs_quantize, strict=strict, tfjs_graph_fallback=not chosen)
    if chosen:
        options.formats = chosen
    options.check()
    is_file = target.endswith((".keras", ".h5")) or "/" in target or Path(target).is_file()
    if is_file and out is None:
        raise typer.BadParameter("exporting a file needs --out DIR")
    if not is_file and (out is not None or samples is not None or labels is not None or code is not None):
        raise typer.BadParameter("--out/--samples/--labels/--code apply to a .keras file, not a stored model")
    title = target
    with console.status("exporting…") as status:
        progress = lambda message: status.update(f"{message}…")  # noqa: E731
        try:
            if is_file:
                report = export_file(Path(target), out, samples=samples, labels=labels, options=options, progress=progress,
                                     code=code)
                where = f"written to {out}/ (export-report.json lists every file)"
            else:
                record, report = export_version(open_store(home), target, version, options=options, progress=progress)
                where = f"{record.model} v{record.version} now has: {', '.join(sorted(record.artifacts))}"
                title = f"{record.model} v{record.version}"
        except ExportRejected as rejected:
            if rejected.report is None:
                raise
            report = rejected.report
            where = (f"nothing delivered; the report is in {out}/export-report.json" if is_file
                     else "nothing attached to the stored version")
    if as_json:
        print_json(report)
    else:
        print_report(console, report, title)
        console.print(where)
    code = exit_code(report["outcome"])
    if code:
        raise typer.Exit(code)


def print_report(console, report: dict, title: str) -> None:
    """Per format and runtime: size, difference, metric, latency, then ok or refused (why)."""
    from rich.table import Table

    from export.verify import gates_sentence

    metric = "accuracy" if report["task"] == "classification" else "mae"
    outcome = report["outcome"]
    table = Table(title=f"export of {title}: {report['samples']} held-out inputs")
    for column in ("format", "runtime", "bytes", "max |diff|", "top-1", metric, "ms", "outcome"):
        table.add_column(column, justify="left" if column in ("format", "runtime", "outcome") else "right",
                         no_wrap=column == "format")
    keras = report["keras"]
    value = keras["metric"].get(metric)
    table.add_row("keras", keras["runtime"], "", "0", "", "" if value is None else f"{value:.4f}",
                  f"{keras['latency_ms']['median']:.3f}", "reference")
    shown = set()
    for row in report["formats"]:
        shown.add(row["format"])
        value = row["metric"].get(metric)
        verdict = "ok" if row["passed"] else f"refused: {row['gate']}"
        if row["passed"] and row["format"] in outcome["refused"]:
            verdict = "refused (another runtime failed)"
        elif not row["passed"] and row["format"] in (outcome.get("backend_gaps") or {}):
            verdict = f"not on this backend (clients use another): {row['gate']}"
        latency = (row["latency_ms"] or {}).get("median")
        table.add_row(row["format"], row["runtime"], f"{row['bytes']:,}",
                      "" if row["max_abs_diff"] is None else f"{row['max_abs_diff']:.1e}",
                      "" if row.get("agreement") is None else f"{100 * row['agreement']:.1f}%",
                      "" if value is None else f"{value:.4f}", "" if latency is None else f"{latency:.3f}", verdict)
    for fmt, why in outcome["refused"].items():
        if fmt not in shown:  # refused before verification: it could not be made
            table.add_row(fmt, "", "", "", "", "", "", f"refused ({why['stage']}): {why['reason']}")
    console.print(table)
    console.print(f"ms = median single-sample latency. Gates: {gates_sentence(report['thresholds'])}.")
    strict = " (--strict: one refusal refuses all)" if outcome.get("strict") and outcome["refused"] else ""
    console.print(f"delivered {len(outcome['delivered'])} of {len(outcome['requested'])} formats: "
                  f"{outcome['status']}{strict}")


def predict(
    name: Annotated[str, typer.Argument(help="A model name in the store.")],
    input: Annotated[Path, typer.Option("--input", "-i", help=".csv with the model's columns (a header line), or .npy / .npz (array `x`) of model inputs after preprocessing.")],
    out: Annotated[Path, typer.Option("--out", "-o", help=".csv (one column per output, the input's row order) or .npy.")],
    version: Annotated[Optional[int], typer.Option("--version", "-v", help="Stored version.")] = None,
    channel: Annotated[Optional[str], typer.Option("--channel", "-c", help="The version this channel serves (default: stable, else the newest).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Rows per LiteRT invoke.")] = 4096,
    threads: Annotated[Optional[int], typer.Option("--threads", help="LiteRT CPU threads (default: every core this process may use).")] = None,
    chunk_lines: Annotated[int, typer.Option("--chunk-lines", help="CSV only: lines read and checked at a time (memory vs speed).")] = 32768,
    processes: Annotated[int, typer.Option("--processes", help="CSV only: worker processes that each parse, predict and format chunks (0: this process). Pays on many idle cores and big files.")] = 0,
    home: HomeOption = Path(".pollinate"),
    as_json: JsonOption = False,
) -> None:
    """Batch predictions with the version's shipped TFLite float32 file: every row of --input
    into --out, nothing written unless every row is valid (exit 2 names the line and column)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from export.batch_predict import predict_file

    console = human_console(as_json)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]} rows/s"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as bar:
        task = bar.add_task(f"{name}: predicting", total=None, rate="…")
        started = time.perf_counter()

        def progress(done: int, total: int | None) -> None:
            elapsed = time.perf_counter() - started
            bar.update(task, completed=done, total=max(total or 0, done) or None,
                       rate=f"{done / elapsed:,.0f}" if elapsed > 0 else "…")

        summary = predict_file(open_store(home), name, input, out, version=version, channel=channel,
                               batch_size=batch_size, threads=threads, processes=processes, chunk_lines=chunk_lines, progress=progress)
        bar.update(task, completed=summary["rows"], total=summary["rows"], rate=f"{summary['rows_per_second']:,.0f}")
    if as_json:
        print_json(summary)
        return
    console.print(f"{summary['rows']:,} rows → {summary['out']} ({', '.join(summary['columns'])}) "
                  f"with {name} v{summary['version']} ({summary['chosen']}) in {summary['seconds']:.2f} s "
                  f"({summary['rows_per_second']:,.0f} rows/s)")
    if summary.get("ignored_columns"):
        console.print(f"columns the model does not take were ignored: {', '.join(summary['ignored_columns'])}")
