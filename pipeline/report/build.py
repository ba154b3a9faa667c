"""Build a sweep's report end to end: locate the sweep, collect it from MLflow, write
report.md / report.html / the PNGs, and log them back to the sweep's parent run.

The command line (``python -m pipeline.report``) is :func:`main`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.report import conversation
from pipeline.report.collect import ReportError, SweepData, collect_sweep
from pipeline.report.decision import section as decision_section
from pipeline.report.interactive import figures as interactive_figures
from pipeline.report.plots import plot_images
from pipeline.report.render import build_sections, render_html, render_markdown, ui_links
from pipeline.report.tables import Table, build_tables

DEFAULT_OUTPUT_DIR = Path("outputs")
NOTE_MARKER = "<!-- infersweep-report -->"


@dataclass
class Report:
    """What :func:`write_report` produced."""

    output_dir: Path
    markdown: Path
    html: Path
    images: dict[str, Path]
    tables: dict[str, Table]
    markdown_text: str


def write_report(data: SweepData, output_dir: Path, baseline: str | None = None,
                 interactive: bool = True) -> Report:
    """Write report.md, report.html and the PNGs under ``output_dir``; ``interactive``:
    report.html draws its plots with plotly (hover, legend toggles) where it is installed,
    else (or when False) it embeds the PNGs."""
    t = build_tables(data, baseline)
    sections = build_sections(data, t)
    images = plot_images(data, t)
    conv = conversation.section(data)
    if conv is not None:  # multi-turn workloads: beside the other latency sections
        conversation.insert(sections, conv[0])
        images.update(conv[1])
    decided = decision_section(data)
    if decided is not None:  # right after the Summary: what to pick, then the evidence
        sections.insert(1, decided[0])
        images.update(decided[1])
    figures = interactive_figures(data, t) if interactive else {}
    built = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, png in images.items():
        paths[name] = output_dir / f"{name}.png"
        paths[name].write_bytes(png)
    md = render_markdown(data, sections, built)
    (output_dir / "report.md").write_text(md)
    (output_dir / "report.html").write_text(render_html(data, sections, images, built,
                                                             figures))
    return Report(output_dir, output_dir / "report.md", output_dir / "report.html", paths, t, md)


def log_report(client: Any, data: SweepData, report: Report) -> str:
    """Log the report to the parent run (artifacts under ``report/``), tag the parent with
    its artifact URI and put a pointer in the run's description; returns that URI."""
    pid = data.parent_id
    for f in (report.markdown, report.html, *report.images.values()):
        client.log_artifact(pid, str(f), artifact_path="report")
    uri = f"{client.get_run(pid).info.artifact_uri.rstrip('/')}/report/report.html"
    client.set_tag(pid, "report", uri)
    client.set_tag(pid, "report.local_path", str(report.html.resolve()))
    note = client.get_run(pid).data.tags.get("mlflow.note.content", "")
    if not note or note.startswith(NOTE_MARKER):  # never overwrite a user's own description
        client.set_tag(pid, "mlflow.note.content", (
            f"{NOTE_MARKER}\n**Sweep report**: [report/report.html]"
            f"(#/experiments/{data.experiment_id}/runs/{pid}/artifacts/report/report.html) "
            f"in this run's Artifacts tab (plots and tables), or `{report.html.resolve()}` "
            f"on disk.\n\n"
            f"Rebuild: `python -m pipeline.report --run-id {pid} "
            f"--tracking-uri {data.tracking_uri}`"))
    return uri


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pipeline.report", description=(
        "Build a sweep report (markdown + self-contained HTML + PNG plots) from MLflow; a "
        "plain run.py job is reported as a sweep of one."))
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--sweep-dir", type=Path, help="a multirun folder (outputs/multirun/<time>)")
    which.add_argument("--run-id", help="the sweep's parent run id (or a plain job's run id)")
    which.add_argument("--experiment", help="the latest sweep (or plain run.py job) of this "
                                            "MLflow experiment")
    ap.add_argument("--tracking-uri", help="MLflow store (default: the sweep folder's store, "
                                           "else outputs/mlflow/mlflow.db)")
    ap.add_argument("--output-dir", type=Path,
                    help="where to write (default: outputs/reports/<sweep name>/)")
    ap.add_argument("--baseline", help="baseline job: 'decoding=greedy', 'job=0', a run name "
                                       "or id (default: the first finished job)")
    ap.add_argument("--static-html", action="store_true",
                    help="report.html with the PNG plots only (no plotly.js, a smaller file)")
    ap.add_argument("--no-log", action="store_true",
                    help="do not log the report to the parent run")
    return ap


def main(argv: list[str] | None = None) -> int:
    """CLI entry: locate the sweep, collect it from MLflow, write and log the report."""
    args = _parser().parse_args(argv)

    from mlflow.exceptions import MlflowException

    try:
        client, data = collect_sweep(args.tracking_uri, sweep_dir=args.sweep_dir,
                                     run_id=args.run_id, experiment=args.experiment,
                                     output_dir=DEFAULT_OUTPUT_DIR)
    except (ReportError, MlflowException) as e:  # one line, not a traceback
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    out = args.output_dir or DEFAULT_OUTPUT_DIR / "reports" / data.sweep_name
    try:
        report = write_report(data, out, args.baseline, interactive=not args.static_html)
    except ValueError as e:  # a baseline selector that names no job, or several
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {report.markdown}\n        {report.html}")
    if not args.no_log:
        art = log_report(client, data, report)
        kind = "job run" if data.plain_job else "parent run"
        print(f"logged to MLflow {kind} {data.parent_id}: {art}")
    links = ui_links(data)
    page = links["job run"] if data.plain_job else links["compare runs"]
    print(f"view in MLflow:\n  {links['command']}\n  then {page}")
    return 0
