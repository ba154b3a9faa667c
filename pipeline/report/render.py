"""The report's structure (:func:`build_sections`) and its two renderings: ``report.md``
and a self-contained ``report.html``. Both renderers walk the same sections, so markdown
and HTML always agree."""

from __future__ import annotations

import base64
import html
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from pipeline.metrics.catalog import SPECS, format_metric
from pipeline.report import gate_table, noise, serving
from pipeline.report.collect import SweepData
from pipeline.report.expectations import BY_NAME
from pipeline.report.interactive import figure_html
from pipeline.report.lengths import LENGTH_WORDS, scaling_images
from pipeline.report.plots import CAPTIONS
from pipeline.report.tables import Table, display_tables
from pipeline.tracking.links import compare_url, run_url, runs_url, ui_command

# The headline picks: metric and the words for its best job.
HEADLINE_PICKS = (("output_tokens_per_s", "highest output tok/s"),
                  ("e2el_ms_mean", "lowest mean E2EL"),
                  ("ttft_ms_mean", "lowest mean TTFT"),
                  ("peak_rss_bytes", "lowest peak RSS"),
                  ("perplexity", "lowest perplexity"),
                  ("self_bleu", "lowest self-BLEU (most diverse)"),
                  ("rep_2", "lowest rep-2 (least repetition)"))


# --------------------------------------------------------------------------- text bits


def reproduce_command(data: SweepData) -> str:
    """The command that reruns the sweep (or the plain job), from the parent's
    ``hydra_overrides`` tag."""
    over = data.parent_tags.get("hydra_overrides")
    if over is None:  # older parents: the recorded command line, minus the script name
        cmd = data.parent_tags.get("command", "run.py -m").split()
        over = " ".join(t for t in cmd[1:] if t not in ("-m", "--multirun"))
    toks = [shlex.quote(t) for t in over.split()]
    return " ".join(["python run.py" if data.plain_job else "python run.py -m", *toks])


def _run_kind(data: SweepData) -> str:
    return "job run" if data.plain_job else "parent run"


def ui_links(data: SweepData) -> dict[str, str]:
    """The MLflow UI command for the store and this sweep's pages in it (the URLs are the
    tracking package's, the same ones a sweep prints when it ends)."""
    uri, exp = data.tracking_uri, data.experiment_id
    if data.plain_job:  # one job: its own run is all there is
        return {"command": ui_command(uri), "experiment runs": runs_url(uri, exp),
                "job run": run_url(uri, exp, data.parent_id)}
    return {
        "command": ui_command(uri),
        # /runs: MLflow 3 opens an experiment on its GenAI overview, not the runs table
        "experiment runs": runs_url(uri, exp),
        "sweep runs": runs_url(uri, exp, data.parent_id),
        "parent run": run_url(uri, exp, data.parent_id),
        # the jobs: the parent holds only a summary
        "compare runs": compare_url(uri, exp, [j.run_id for j in data.jobs]),
    }


def headline_lines(tables: Mapping[str, Table], data: SweepData) -> list[str]:
    """The report's summary: job counts, gaps in the sweep, which job leads on what."""
    jobs = tables["jobs"].frame
    vb = tables["vs_baseline"].frame
    base = vb.loc[vb["is_baseline"].astype(bool), "job"].iloc[0]
    lines = [f"{len(jobs)} job(s), {int((jobs['status'] == 'FINISHED').sum())} finished; "
             f"baseline: job {base}."]
    if data.parent_status == "RUNNING":
        lines.append("the sweep is still running: jobs not logged yet are missing; rebuild the "
                     "report when it ends.")
    total = data.parent_metrics.get("jobs_total")
    skipped = data.parent_metrics.get("jobs_skipped") or 0
    if skipped:
        lines.append(f"{skipped:.0f} job(s) were skipped by resume=true: their numbers live in "
                     "their earlier runs, not in this sweep, so they are not in this report.")
    elif total is not None and total != len(jobs):
        lines.append(f"the sweep counted {total:.0f} job(s) but {len(jobs)} are logged as its "
                     "child runs: the others are missing from this report.")
    by_id = {j.run_id: j for j in data.jobs}
    done = jobs[jobs["status"] == "FINISHED"]
    for key, words in HEADLINE_PICKS:
        if key not in done.columns or done[key].isna().all():
            continue
        figs = {rid: noise.figure(by_id[rid].metrics, key) for rid in done["run_id"]}
        best, _ = noise.extremes(key, figs, SPECS[key].higher_is_better)
        if not best:  # the spread is within noise: no leader to name
            continue
        spec = SPECS[key]
        unit = f" {spec.unit}" if spec.unit else ""
        lead = [r for _, r in done.iterrows() if r["run_id"] in best]
        lines.append(("tied within noise, " if len(lead) > 1 else "") + f"{words}: " + ", ".join(
            f"job {r['job']} ({r['overrides']}) at {format_metric(key, r[key])}{unit}"
            for r in lead))
    return lines


# --------------------------------------------------------------------------- sections


@dataclass
class Block:
    """A piece of a section: ``text`` (a paragraph), ``list``, ``table``, ``code``, ``image``."""

    kind: str
    value: Any
    caption: str = ""


@dataclass
class Section:
    """A titled part of the report."""

    title: str
    blocks: list[Block]


def _image(name: str) -> Block:
    return Block("image", name, CAPTIONS[name])


def length_sections(tables: Mapping[str, Table], d: Mapping[str, pd.DataFrame]
                    ) -> list[Section]:
    """"Scaling with length" (when a length varies) and "Prefix caching" (when requests
    carry prefix groups); none of either otherwise."""
    out = []
    scaling = tables["scaling"].frame if "scaling" in tables else pd.DataFrame()
    if not scaling.empty:
        words = LENGTH_WORDS[scaling["length_param"].iloc[0]]
        blocks = [Block("text", (
            f"The sweep varies `{scaling['length_param'].iloc[0]}` ({words}); each line is "
            "one configuration (the other swept params). Prefill time is `prefill_s_mean` "
            "(mean TTFT where a job has none: see the table's `prefill from`); decode tok/s "
            "is `decode_tokens_per_s`; memory is `peak_rss_above_load_bytes`, the peak RSS "
            "of the measured phase above the RSS right after load."))]
        blocks += [_image(m.image) for m in scaling_images(scaling)]
        blocks.append(Block("table", d["scaling"]))
        if not d["length_ratios"].empty:
            blocks += [Block("text", (
                "At each length, each configuration against its reference (the one without "
                "the optimization: eager attention, `use_cache=false`; else the baseline "
                "job's): prefill × = reference / this prefill time and decode × = this / "
                "reference decode tok/s (above 1: faster); memory = this / reference peak "
                "above load, saving % = 1 − that. The expected figure is the course's claim, "
                "shown where it speaks about that length.")),
                Block("table", d["length_ratios"])]
        out.append(Section("Scaling with length", blocks))
    if "prefix_ttft" in d and not d["prefix_ttft"].empty:
        out.append(Section("Prefix caching", [
            Block("text", "Mean TTFT of each prefix group's first request "
                          "(`extra.group_position == 0`) against the group's later requests, "
                          "per job (failed requests left out). Expected with "
                          f"{BY_NAME['prefix caching'].text}."),
            Block("table", d["prefix_ttft"])]))
    return out


def expected_blocks(d: Mapping[str, pd.DataFrame]) -> list[Block]:
    """The course's claims beside the measured ratios, when the sweep varies what one
    of them is about (none otherwise)."""
    if "expected" not in d or d["expected"].empty:
        return []
    return [Block("text", (
        "What the LLM-inference course claims for each optimization (the course's claim "
        "column), beside what this sweep measured: each job with an optimization on "
        "against the job without it that matches it on every other param. "
        "The verdict says \"within noise\" when the two throughputs differ by less than the "
        "noise rule allows (see the Summary), else where the ratio falls against the course's "
        "range.")), Block("table", d["expected"])]


def applied_blocks(d: Mapping[str, pd.DataFrame]) -> list[Block]:
    """The applied settings that differ across jobs, and one line listing the common ones."""
    common = d.get("applied_common", pd.DataFrame())
    same = ", ".join(f"{k}={v}" for k, v in common.itertuples(index=False))
    blocks = [Block("text", "Read back from the loaded model by each job (results.json); "
                            "only the settings that differ across jobs are columns.")]
    if len(d["applied"].columns) > 1:
        blocks.append(Block("table", d["applied"]))
    if same:
        blocks.append(Block("text", f"Same in every job: {same}."))
    return blocks


def build_sections(data: SweepData, tables: Mapping[str, Table]) -> list[Section]:
    """The report's structure; both renderers walk it, so markdown and HTML agree."""
    d = display_tables(tables)
    repeats = any(c.endswith("_ci95") for c in tables["jobs"].frame.columns)
    rule = noise.rule_text(repeats)
    links = ui_links(data)
    jobs_note = ("Swept axes are the params that differ across jobs, named by their last "
                 "part where that is unambiguous (`decoding` is the preset, `decoding.name`); "
                 "metrics are the runs' MLflow metrics.")
    if repeats:
        jobs_note += (" Where the workload repeated the measured phase, tok/s shows the mean "
                      "over repeats ± its 95% CI; the other tables use the pooled figure "
                      "(all tokens / all measured time).")
    sections = [
        Section("Summary", [Block("list", headline_lines(tables, data)), Block("text", rule)]),
        Section("Jobs", [Block("text", jobs_note), Block("table", d["jobs"])]),
        Section("Against the baseline", [
            Block("text", "Measured ratios against the baseline job: throughput × = job / "
                          "baseline tok/s; latency speed-up × = baseline / job latency (above 1 "
                          "is faster); memory saving % = 1 − job / baseline peak (positive "
                          "saves memory). Choose the baseline with `--baseline`."),
            Block("table", d["vs_baseline"]), *expected_blocks(d)]),
        *length_sections(tables, d),
        Section("Quality vs diversity", [_image("quality_vs_diversity")]),
        Section("Throughput vs latency", [_image("throughput_vs_latency"),
                                          Block("table", d["pareto"])]),
        Section("Per-request latency", [_image("latency_distributions"),
                                        Block("table", d["latency"])]),
        *[Section(t, [Block(*b) for b in bs]) for t, bs in serving.sections(data)],
        *[Section(t, [Block(*b) for b in bs]) for t, bs in gate_table.sections(data)],
        Section("Decoding trade-offs", [
            Block("text", "Per job: quality (perplexity under the scorer, lower = more "
                          "likely), diversity (self-BLEU, lower = more diverse; distinct-2, "
                          "higher = more diverse), repetition (rep-2) and speed. The reading "
                          "only ranks these measured numbers within this sweep, and only "
                          "where a gap exceeds the noise. " + rule),
            Block("table", d["tradeoffs"])]),
    ]
    if not d["applied"].empty:
        sections.append(Section("Applied settings", applied_blocks(d)))
    commit = data.parent_tags.get("git_commit", "")
    repro = [Block("code", reproduce_command(data))]
    if commit and commit != "unknown":
        note = f"At git commit `{commit.removesuffix('-dirty')}`"
        if commit.endswith("-dirty"):
            note += " (the tree had uncommitted changes when the sweep ran)"
        repro.insert(0, Block("text", note + "; from the repository root:"))
    sections += [
        Section("Provenance", [Block("table", d["provenance"])]),
        Section("Reproduce", repro),
        Section("Open in the MLflow UI", [
            Block("code", links["command"]),
            Block("list", [f"{k}: {v}" for k, v in links.items() if k != "command"]),
            Block("table", d["runs"]),
        ]),
    ]
    return sections


# --------------------------------------------------------------------------- markdown


def _md_escape(s: Any) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table of the (string) frame."""
    if df.empty:
        return "_(none)_"
    head = "| " + " | ".join(_md_escape(c) for c in df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(_md_escape(v) for v in row) + " |"
            for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def _title(data: SweepData) -> str:
    return f"Sweep report: {data.sweep_name}"


def render_markdown(data: SweepData, sections: list[Section], built: str = "") -> str:
    """report.md: the sections as markdown, images referenced as sibling PNG files."""
    out = [f"# {_title(data)}", ""]
    if built:
        out += [f"_Built {built} from MLflow ({data.tracking_uri}), {_run_kind(data)} "
                f"`{data.parent_id}`._", ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        for b in s.blocks:
            if b.kind == "text":
                out += [b.value, ""]
            elif b.kind == "list":
                out += [f"- {x}" for x in b.value] + [""]
            elif b.kind == "table":
                out += [markdown_table(b.value), ""]
            elif b.kind == "code":
                out += ["```bash", b.value, "```", ""]
            elif b.kind == "image":
                out += [f"![{b.caption}]({b.value}.png)", "", f"_{b.caption}_", ""]
    return "\n".join(out).rstrip() + "\n"


# --------------------------------------------------------------------------- HTML


def _inline_md(s: str) -> str:
    """Escape, then render `code` spans (the only inline markdown the sections use)."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(s))


def _linkify(s: str) -> str:
    """Escape a list item and turn its http(s) URLs into links."""
    parts = re.split(r"(https?://\S+)", s)
    return "".join(
        f"<a href=\"{html.escape(p)}\">{html.escape(p)}</a>" if p.startswith("http")
        else _inline_md(p) for p in parts)


def _html_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "<p><em>(none)</em></p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
                   for row in df.itertuples(index=False))
    # wide tables scroll inside their box instead of widening the page
    return (f"<div class=\"scroll\"><table><thead><tr>{head}</tr></thead><tbody>{body}"
            "</tbody></table></div>")


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;
max-width:1150px;padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f3f3f3}figure{margin:1em 0}img{max-width:100%;height:auto}
figcaption{color:#555;font-size:.9em}li{overflow-wrap:anywhere}
pre{background:#f6f6f6;padding:.7em;white-space:pre-wrap;overflow-wrap:anywhere}
.scroll{overflow-x:auto}
code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.9em}
"""


def _html_block(b: Block, images: Mapping[str, bytes], plots: dict[str, str]) -> str:
    if b.kind == "text":
        return f"<p>{_inline_md(b.value)}</p>"
    if b.kind == "list":
        return "<ul>" + "".join(f"<li>{_linkify(x)}</li>" for x in b.value) + "</ul>"
    if b.kind == "table":
        return _html_table(b.value)
    if b.kind == "code":
        return f"<pre><code>{html.escape(b.value)}</code></pre>"
    if b.value in plots:  # interactive: the plotly fragment, with the caption below
        return (f"<figure class=\"interactive\">{plots[b.value]}"
                f"<figcaption>{html.escape(b.caption)} Hover for values; click a legend "
                "entry to hide or show it.</figcaption></figure>")
    b64 = base64.b64encode(images[b.value]).decode("ascii")
    return (f"<figure><img alt=\"{html.escape(b.caption)}\" "
            f"src=\"data:image/png;base64,{b64}\">"
            f"<figcaption>{html.escape(b.caption)}</figcaption></figure>")


def render_html(data: SweepData, sections: list[Section], images: Mapping[str, bytes],
                built: str = "", figures: Mapping[str, Any] | None = None) -> str:
    """report.html: self-contained (inline CSS; plots as base64 PNG data URIs, or for the
    images in ``figures`` the interactive plotly figure, plotly.js inlined once)."""
    plots: dict[str, str] = {}
    for s in sections:  # in page order, so the first figure carries plotly.js
        for b in s.blocks:
            if b.kind == "image" and figures and b.value in figures and b.value not in plots:
                plots[b.value] = figure_html(figures[b.value], b.value, first=not plots)
    title = html.escape(_title(data))
    out = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
           f"<title>{title}</title><style>{CSS}</style></head><body>", f"<h1>{title}</h1>"]
    if built:
        out.append(f"<p><em>Built {html.escape(built)} from MLflow "
                   f"({html.escape(data.tracking_uri)}), {_run_kind(data)} "
                   f"<code>{html.escape(data.parent_id)}</code>.</em></p>")
    for s in sections:
        out.append(f"<h2>{html.escape(s.title)}</h2>")
        out += [_html_block(b, images, plots) for b in s.blocks]
    out.append("</body></html>")
    return "\n".join(out) + "\n"
