"""Sweep reports: tables equal MLflow's numbers, rebuild identically without the job
folders, and the HTML renders (plots visible) in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest

from pipeline.report import build, plots, render, tables
from pipeline.report.collect import JobRun, collect
from tests.conftest import CACHE_DIR, job_run, run_cli, sweep_data

# ----------------------------------------------------------------- synthetic (fast)


def test_pareto_front() -> None:
    # (latency, throughput): lower latency and higher throughput win
    pts = [(100.0, 10.0), (50.0, 20.0), (80.0, 25.0), (120.0, 25.0), (50.0, 20.0)]
    assert tables.pareto_front(pts) == [False, True, True, False, True]
    assert tables.pareto_front([]) == []


def test_select_job_and_errors() -> None:
    jobs = [job_run(0, "greedy", "1.0", 10, 1000), job_run(1, "topp", "1.0", 12, 900),
            job_run(2, "temperature", "0.7", 11, 950)]
    assert tables.select_job(jobs, None).run_id == "run0"
    assert tables.select_job(jobs, "decoding=topp").run_id == "run1"
    assert tables.select_job(jobs, "decoding.temperature=0.7").run_id == "run2"
    assert tables.select_job(jobs, "job=2").run_id == "run2"
    assert tables.select_job(jobs, "1-hf-topp-quick").run_id == "run1"
    with pytest.raises(ValueError, match="no job matches"):
        tables.select_job(jobs, "decoding=beam")
    with pytest.raises(ValueError, match="2 jobs match"):
        tables.select_job(jobs, "decoding.temperature=1.0")


def test_tables_from_synthetic_sweep() -> None:
    jobs = [job_run(0, "greedy", "1.0", 10.0, 1000.0),
            job_run(1, "temperature", "0.7", 20.0, 800.0,
                    output_tokens_per_s_repeat_mean=19.5, output_tokens_per_s_ci95=1.25),
            job_run(2, "topp", "1.0", 15.0, 600.0)]
    data = sweep_data(jobs)
    t = tables.build_tables(data, baseline="decoding=greedy")
    j = t["jobs"].frame.set_index("job")
    assert list(j.index) == [0, 1, 2]
    # swept axes only: seed and paths are the same / bookkeeping
    assert "decoding.name" in j.columns and "decoding.temperature" in j.columns
    assert "seed" not in j.columns and "paths.output_dir" not in j.columns
    assert j.loc[1, "output_tokens_per_s_ci95"] == 1.25
    vb = t["vs_baseline"].frame.set_index("job")
    assert vb.loc[1, "throughput_x"] == pytest.approx(2.0)
    assert vb.loc[2, "e2el_speedup_x"] == pytest.approx(1000 / 600)
    assert vb.loc[1, "peak_rss_saving_pct"] == pytest.approx(-10.0)
    par = t["pareto"].frame.set_index("job")
    # job 1 fastest, job 2 lowest latency: both on the front; job 0 dominated by both
    assert list(par["front_e2el_ms_mean"]) == [False, True, True]
    lat = t["latency"].frame.set_index("job")
    assert lat.loc[0, "requests"] == 3
    assert lat.loc[0, "e2el_ms_min"] == pytest.approx(1000.0)
    reading = t["tradeoffs"].frame.set_index("job").loc[1, "reading"]
    assert "fastest" in reading and "2.00× the baseline's tok/s" in reading
    assert "most diverse" in t["tradeoffs"].frame.set_index("job").loc[2, "reading"]

    sections = render.build_sections(data, t)
    md = render.render_markdown(data, sections)
    assert "19.5 ± 1.2" in md  # mean over repeats ± 95% CI
    assert "python run.py -m decoding=greedy,topp workload.num_prompts=3" in md
    assert "--host 127.0.0.1 --workers 1" in md
    assert '#/compare-runs?runs=["run0","run1","run2"]&experiments=["1"]' in unquote(md)
    images = plots.plot_images(data, t)
    assert all(png.startswith(b"\x89PNG") for png in images.values())
    page = render.render_html(data, sections, images)
    assert page.count("data:image/png;base64,") == 3 and "<table>" in page


def test_top_level_swept_param_is_a_column() -> None:
    jobs = [job_run(0, "greedy", "1.0", 10.0, 1000.0), job_run(1, "greedy", "1.0", 11.0, 900.0)]
    jobs[1].params["seed"] = "1"
    jobs[1].tags["hydra_overrides"] = "decoding=greedy workload.num_prompts=3 seed=1"
    shown = tables.build_tables(sweep_data(jobs))["jobs"].display()
    assert list(shown["seed"]) == ["0", "1"]
    assert "temperature" not in shown.columns  # the same in both jobs


def test_failed_job_shows_dashes() -> None:
    ok = job_run(0, "greedy", "1.0", 10.0, 1000.0)
    bad = JobRun(run_id="run1", name="1-hf-beam-quick", job=1, status="FAILED", start_time=2,
                 tags={"decoding": "beam", "hydra_overrides": "decoding=beam"},
                 params={"decoding.name": "beam"}, metrics={"time_load_s": 1.0})
    data = sweep_data([ok, bad])
    t = tables.build_tables(data)
    md = render.render_markdown(data, render.build_sections(data, t))
    row = next(line for line in md.splitlines() if line.startswith("| 1 | FAILED"))
    assert "| - |" in row
    assert "job failed" in t["tradeoffs"].frame.set_index("job").loc[1, "reading"]


# ----------------------------------------------------------------- a real sweep (slow)

DECODINGS = ("greedy", "topp")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, model_dir: str) -> Path:
    out = tmp_path_factory.mktemp("report_sweep")
    p = run_cli("-m", f"decoding={','.join(DECODINGS)}", f"paths.output_dir={out}",
                f"paths.cache_dir={CACHE_DIR}", "workload.max_new_tokens=12",
                "workload.num_prompts=4", "workload.repeats=2", "workload.warmup=0")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out


def _sweep_dir(out: Path) -> Path:
    (d,) = sorted((out / "multirun").iterdir())
    return d


def _uri(out: Path) -> str:
    return f"sqlite:///{out / 'mlflow' / 'mlflow.db'}"


def _table_lines(md: str) -> list[str]:
    return [line for line in md.splitlines() if line.startswith("|")]


@pytest.fixture(scope="module")
def built(sweep: Path) -> Path:
    """The report of the sweep, built by the CLI entry from its sweep folder."""
    dest = sweep / "report1"
    assert build.main(["--sweep-dir", str(_sweep_dir(sweep)), "--output-dir", str(dest)]) == 0
    return dest


@pytest.mark.slow
def test_report_tables_equal_mlflow_metrics(sweep: Path, built: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=_uri(sweep))
    pid = (_sweep_dir(sweep) / "mlflow_parent_run_id").read_text().strip()
    data = collect(client, pid, _uri(sweep))
    t = tables.build_tables(data)
    jobs = t["jobs"].frame
    assert sorted(jobs["decoding.name"]) == sorted(DECODINGS)
    for _, row in jobs.iterrows():
        m = client.get_run(row["run_id"]).data.metrics
        for key in ("output_tokens_per_s", "ttft_ms_mean", "e2el_ms_mean", "e2el_ms_p90",
                    "peak_rss_bytes", "perplexity", "self_bleu", "distinct_2", "rep_2",
                    "output_tokens_per_s_repeat_mean", "output_tokens_per_s_ci95"):
            assert row[key] == m[key], key
    base = jobs.iloc[0]
    for (_, row), (_, vb) in zip(jobs.iterrows(), t["vs_baseline"].frame.iterrows(),
                                      strict=True):
        assert vb["throughput_x"] == pytest.approx(
            row["output_tokens_per_s"] / base["output_tokens_per_s"])
        assert vb["peak_rss_saving_pct"] == pytest.approx(
            (1 - row["peak_rss_bytes"] / base["peak_rss_bytes"]) * 100)
    # per-request latencies come from results.json downloaded from the artifact store
    assert list(t["latency"].frame["requests"]) == [4] * len(DECODINGS)
    # with repeats every metric of the jobs and the parent is defined in the metric catalog
    from pipeline.metrics.catalog import logged_metric_keys, uncovered

    assert uncovered(logged_metric_keys(client, list(jobs["run_id"]))) == []

    md = (built / "report.md").read_text()
    for _, row in jobs.iterrows():
        cell = (f"{row['output_tokens_per_s_repeat_mean']:.1f} ± "
                f"{row['output_tokens_per_s_ci95']:.1f}")
        assert cell in md  # repeats=2: mean ± 95% CI
        assert f"| {row['perplexity']:.3f} |" in md
    assert "python run.py -m decoding=greedy,topp" in md
    assert "mlflow ui --backend-store-uri sqlite:///" in md and "#/compare-runs?runs=" in md
    for name in ("report.md", "report.html", "quality_vs_diversity.png",
                 "throughput_vs_latency.png", "latency_distributions.png"):
        assert (built / name).stat().st_size > 0, name
    # the parent run carries the report and links to it
    parent = client.get_run(pid)
    assert parent.data.tags["report"].endswith("report/report.html")
    arts = {a.path for a in client.list_artifacts(pid, "report")}
    assert {"report/report.md", "report/report.html"} <= arts


@pytest.mark.slow
def test_rebuild_without_job_folders_is_identical(sweep: Path, built: Path) -> None:
    sweep_dir = _sweep_dir(sweep)
    job_dirs = [d for d in sweep_dir.iterdir() if d.is_dir() and d.name.isdigit()]
    assert len(job_dirs) == len(DECODINGS)
    for d in job_dirs:
        shutil.rmtree(d)
    pid = (sweep_dir / "mlflow_parent_run_id").read_text().strip()
    dest = sweep / "report2"
    assert build.main(["--run-id", pid, "--tracking-uri", _uri(sweep),
                        "--output-dir", str(dest), "--no-log"]) == 0
    before = _table_lines((built / "report.md").read_text())
    after = _table_lines((dest / "report.md").read_text())
    assert len(before) > 20
    assert after == before


def _dark_frame_rows(img: np.ndarray) -> list[int]:
    """Rows holding a long run of near-black pixels: matplotlib axes spines (tables here
    have light grey borders and text makes only short runs)."""
    dark = img.max(axis=-1) < 0.35
    rows = []
    for y in np.where(dark.sum(axis=1) >= 250)[0]:
        d = np.diff(np.concatenate(([0], dark[y].astype(np.int8), [0])))
        starts, ends = np.where(d == 1)[0], np.where(d == -1)[0]
        if (ends - starts).max() >= 250:
            rows.append(int(y))
    return rows


def _screenshot(page: Path, png: Path, tmp: Path) -> np.ndarray:
    import matplotlib.image as mpimg

    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={tmp / 'chromium-profile'}",
           f"--screenshot={png}", "--window-size=1200,3000", page.resolve().as_uri()]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert png.is_file(), p.stderr[-2000:]
    return mpimg.imread(png)[..., :3]


@pytest.mark.slow
def test_html_renders_plots_in_headless_chromium(sweep: Path, built: Path,
                                                 tmp_path: Path) -> None:
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium; .ci/run "
                    "installs it): cannot screenshot the HTML report")
    # the static page (--static-html): the PNGs themselves are visible
    static = tmp_path / "static"
    assert build.main(["--sweep-dir", str(_sweep_dir(sweep)), "--output-dir", str(static),
                       "--static-html", "--no-log"]) == 0
    img = _screenshot(static / "report.html", tmp_path / "report.png", tmp_path)
    frames = _dark_frame_rows(img)
    # three figures (four axes) sit in the first 3000 px: at least two frames' top+bottom
    assert len(frames) >= 4, frames
    region = img[frames[0]:frames[-1]]
    coloured = (region.max(axis=-1) - region.min(axis=-1)) > 0.25  # the job markers
    assert coloured.sum() > 300, int(coloured.sum())
    assert (region.min(axis=-1) < 0.9).mean() > 0.01  # not a blank band

    # control: the same page without its images shows no plot frames
    html = (static / "report.html").read_text()
    stripped = tmp_path / "noimg.html"
    stripped.write_text(re.sub(r'src="data:image/png;base64,[^"]*"', 'src=""', html))
    assert _dark_frame_rows(_screenshot(stripped, tmp_path / "noimg.png", tmp_path)) == []

    # the default page: plotly (inlined) draws each interactive figure as SVG, offline
    if "Plotly.newPlot" in (built / "report.html").read_text():
        dom = subprocess.run(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--user-data-dir={tmp_path / 'chromium-dom'}", "--virtual-time-budget=10000",
             "--dump-dom", (built / "report.html").resolve().as_uri()],
            capture_output=True, text=True, timeout=120).stdout
        drawn = set(re.findall(r'id="(plot-[a-z_]+)"[^>]*class="[^"]*js-plotly-plot', dom))
        drawn |= set(re.findall(r'class="[^"]*js-plotly-plot[^"]*"[^>]*id="(plot-[a-z_]+)"',
                                dom))
        assert {"plot-quality_vs_diversity", "plot-throughput_vs_latency",
                "plot-latency_distributions"} <= drawn, sorted(drawn)
        assert dom.count('class="main-svg"') >= 3


def test_markdown_table_escapes_pipes() -> None:
    import pandas as pd

    md = render.markdown_table(pd.DataFrame([{"a": "x|y", "b": "1"}]))
    assert md.splitlines()[2] == "| x\\|y | 1 |"
