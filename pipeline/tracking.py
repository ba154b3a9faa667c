"""MLflow: a parent run per sweep, a child run per job, the store under ``outputs/``.

The client API (not the fluent one) is used throughout: runs are addressed by id, so a
job in another process (joblib, ray, slurm) attaches to its sweep's parent by reading the
parent id from a file in the sweep folder, with no in-process state.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

PARENT_ID_FILE = "mlflow_parent_run_id"
RUN_ID_FILE = "mlflow_run_id"
# Key metrics for terminal tables and the sweep parent's summary (name, header, format).
KEY_METRICS = (
    ("output_tokens_per_s", "out tok/s", "{:.1f}"),
    ("ttft_ms_mean", "TTFT ms", "{:.0f}"),
    ("tpot_ms_mean", "TPOT ms", "{:.1f}"),
    ("e2el_ms_p90", "E2EL p90 ms", "{:.0f}"),
    ("peak_rss_bytes", "peak RSS MiB", None),
    ("perplexity", "PPL", "{:.2f}"),
    ("self_bleu", "self-BLEU", "{:.3f}"),
    ("distinct_2", "distinct-2", "{:.3f}"),
)


def store_paths(output_dir: str | Path) -> tuple[str, str]:
    """Default store URI (SQLite, absolute) and artifact root under ``output_dir``."""
    base = Path(output_dir).expanduser().resolve() / "mlflow"
    base.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{base / 'mlflow.db'}", (base / "artifacts").as_uri()


def tracking_uri(cfg: Any) -> str:
    """``tracking.uri`` if set, else the default SQLite store."""
    return cfg.tracking.uri or store_paths(cfg.paths.output_dir)[0]


def ui_command(uri: str) -> str:
    """A light, local MLflow UI command for this store (one worker, loopback only)."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --workers 1"


class TrackingUnavailable(RuntimeError):
    """The tracking server does not answer."""


def probe(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast when a remote tracking server is down: MLflow's own client retries with
    back-off for minutes before giving up."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s):
            pass
    except (urllib.error.URLError, OSError) as e:
        raise TrackingUnavailable(f"MLflow server {uri} is unreachable ({e})") from e


def client_for(cfg: Any) -> tuple[Any, str]:
    """An MlflowClient on the configured store and the experiment id (created if missing,
    with its artifacts beside the default store rather than in ./mlruns)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    probe(uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        return client, exp.experiment_id
    artifacts = None if cfg.tracking.uri else store_paths(cfg.paths.output_dir)[1]
    try:
        exp_id = client.create_experiment(cfg.tracking.experiment, artifact_location=artifacts)
    except Exception:  # another job created it first
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            raise
        exp_id = exp.experiment_id
    return client, exp_id


def _log_batches(client: Any, run_id: str, metrics: Mapping[str, float] | None = None,
                 params: Mapping[str, Any] | None = None,
                 tags: Mapping[str, Any] | None = None) -> None:
    """log_batch in chunks under MLflow's per-request limits (100 params, 1000 metrics)."""
    import time

    from mlflow.entities import Metric, Param, RunTag

    ts = int(time.time() * 1000)
    m = [Metric(k, float(v), ts, 0) for k, v in (metrics or {}).items()
         if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)]
    p = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
    t = [RunTag(k, str(v)[:5000]) for k, v in (tags or {}).items()]
    for i in range(0, len(m), 1000):
        client.log_batch(run_id, metrics=m[i : i + 1000])
    for i in range(0, len(p), 100):
        client.log_batch(run_id, params=p[i : i + 100])
    for i in range(0, len(t), 100):
        client.log_batch(run_id, tags=t[i : i + 100])


def run_tags(results: Mapping[str, Any]) -> dict[str, str]:
    """Tags for a job run: the axes, the overrides, versions, hardware, commit."""
    cfg, prov = results["config"], results["provenance"]
    tags = {
        "backend": cfg["backend"]["name"],
        "model": cfg["model"]["name"],
        "decoding": cfg["decoding"]["name"],
        "workload": cfg["workload"]["name"],
        "hydra_overrides": " ".join(prov["overrides"]),
        "command": prov["command"],
        "git_commit": prov["git_commit"],
        "hardware.cpu": prov["hardware"].get("cpu", ""),
        "hardware.gpu": prov["hardware"].get("gpu", "none"),
        "config_hash": results.get("config_hash", ""),
        "status": results["status"],
    }
    tags.update({f"version.{k}": v for k, v in prov["versions"].items()})
    return tags


def log_job(cfg: Any, results: Mapping[str, Any], job_dir: Path,
            parent_run_id: str | None, params: Mapping[str, Any]) -> str:
    """Log one job as an MLflow run (a child when ``parent_run_id`` is given)."""
    client, exp_id = client_for(cfg)
    tags = run_tags(results)
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    name = f"{tags['backend']}-{tags['decoding']}-{tags['workload']}"
    if results.get("job_num") is not None:
        name = f"{results['job_num']}-{name}"
    run = client.create_run(exp_id, run_name=name, tags=tags)
    run_id = run.info.run_id
    try:
        _log_batches(client, run_id, metrics=results.get("metrics", {}), params=params)
        for f in ("results.json", "config.yaml", "error.txt", "server.log"):
            if (job_dir / f).is_file():
                client.log_artifact(run_id, str(job_dir / f))
        hydra_dir = job_dir / ".hydra"
        if hydra_dir.is_dir():
            client.log_artifacts(run_id, str(hydra_dir), artifact_path="hydra")
        gens = results.get("requests") or []
        if cfg.tracking.log_generations and gens:
            client.log_table(run_id, data={
                "index": [r["index"] for r in gens],
                "prompt": [r["prompt"] for r in gens],
                "generation": [r["text"] for r in gens],
                "output_tokens": [r["output_tokens"] for r in gens],
                "error": [r.get("error") or "" for r in gens],
            }, artifact_file="generations.json")
        if results.get("error"):
            client.set_tag(run_id, "error", str(results["error"])[:5000])
        client.set_terminated(run_id, "FINISHED" if results["status"] == "FINISHED" else "FAILED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    # marks the job as logged, so `python -m pipeline.sync` does not log it twice
    (job_dir / RUN_ID_FILE).write_text(run_id)
    return run_id


def find_finished(cfg: Any, chash: str) -> dict | None:
    """The most recent FINISHED run whose ``config_hash`` tag is ``chash``, with its metrics."""
    client, exp_id = client_for(cfg)
    runs = client.search_runs(
        [exp_id], filter_string=f"tags.config_hash = '{chash}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    if not runs:
        return None
    return {"run_id": runs[0].info.run_id, "metrics": dict(runs[0].data.metrics)}


def read_parent_id(sweep_dir: Path) -> str | None:
    """The sweep's parent run id, written by :class:`SweepCallback` at sweep start."""
    f = sweep_dir / PARENT_ID_FILE
    return f.read_text().strip() if f.is_file() else None


def format_table(rows: list[Mapping[str, Any]], first_cols: list[str]) -> str:
    """A plain-text table of the key metrics, one row per job."""
    headers = [*first_cols, *(h for _, h, _ in KEY_METRICS)]
    body = []
    for r in rows:
        cells = [str(r.get(c, "")) for c in first_cols]
        m = r.get("metrics", {})
        for key, _, fmt in KEY_METRICS:
            v = m.get(key)
            if v is None:
                cells.append("-")
            elif fmt is None:
                cells.append(f"{v / 2**20:.0f}")
            else:
                cells.append(fmt.format(v))
        body.append(cells)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
              for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(out)


class SweepCallback(Callback):
    """Hydra callback: opens the sweep's parent run before the first job, and at the end
    puts summary metrics on it, prints the sweep table and closes it."""

    def __init__(self) -> None:
        self.t_start = time.perf_counter()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.t_start = time.perf_counter()
        if not config.tracking.enabled or config.dry_run:
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        try:
            client, exp_id = client_for(config)
            from pipeline import provenance

            overrides = list(config.hydra.overrides.task)
            run = client.create_run(exp_id, run_name=f"sweep-{sweep_dir.name}", tags={
                "sweep_dir": str(sweep_dir.resolve()),
                "hydra_overrides": " ".join(overrides),
                "command": provenance.command_line(),
                "git_commit": provenance.git_commit(),
                "kind": "sweep",
            })
            (sweep_dir / PARENT_ID_FILE).write_text(run.info.run_id)
        except Exception as e:  # tracking must never cost the measurements
            log.warning("could not open the sweep's MLflow parent run: %s", e)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        rows = []
        for f in sorted(sweep_dir.glob("*/results.json"), key=lambda p: _job_sort_key(p)):
            r = json.loads(f.read_text())
            rows.append({
                "job": r.get("job_num", f.parent.name),
                "status": r["status"],
                "overrides": " ".join(r.get("overrides", [])) or "(defaults)",
                "metrics": r.get("metrics", {}),
                "error": r.get("error"),
            })
        common = set.intersection(*(set(r["overrides"].split()) for r in rows)) if rows else set()
        for r in rows:  # the table shows what varies; the common part is printed once
            r["overrides"] = " ".join(o for o in r["overrides"].split() if o not in common)
        failed = [r for r in rows if r["status"] == "FAILED"]
        print(f"\nSweep {sweep_dir} — {len(rows)} job(s), {len(failed)} failed"
              + (f"; common overrides: {' '.join(sorted(common))}" if common else ""))
        print(format_table(rows, ["job", "status", "overrides"]))
        for r in failed:
            print(f"FAILED job {r['job']} ({r['overrides']}): {r['error']}")
        wall = time.perf_counter() - self.t_start
        gen = sum(r["metrics"].get("time_generate_s", 0.0) for r in rows
                  if r["status"] == "FINISHED")
        print(f"Sweep wall time {wall:.1f} s; measured generation {gen:.1f} s "
              f"({100 * gen / wall:.0f}% of the sweep)")
        efficiency = {"sweep_wall_s": wall, "sweep_generate_share": gen / wall}
        reuse = [r["metrics"]["engine_reused"] for r in rows if "engine_reused" in r["metrics"]]
        if reuse:  # vLLM jobs: an engine start costs tens of seconds, so say how many
            starts = sum(1 for v in reuse if not v)
            print(f"vLLM engine starts: {starts} for {len(reuse)} vLLM job(s)")
            efficiency["sweep_engine_starts"] = starts
        from pipeline.parity import report_sweep_parity

        report_sweep_parity(config, sweep_dir)  # jobs differing only in backend, if any
        self._finish_parent(config, sweep_dir, rows, efficiency)
        if "pipeline.backends.vllm" in sys.modules:  # stop cached engines; never import vLLM
            sys.modules["pipeline.backends.vllm"].shutdown_engines()
        if "pipeline.backends.vllm_server" in sys.modules:  # stop the sweep's vLLM servers
            sys.modules["pipeline.backends.vllm_server"].stop_servers()
        if failed:
            # Hydra has no exit-code hook; leaving from the last callback is the clean way
            raise SystemExit(1)

    def _finish_parent(self, config: DictConfig, sweep_dir: Path, rows: list[dict],
                       extra: dict[str, float]) -> None:
        parent = read_parent_id(sweep_dir)
        if parent and config.tracking.enabled and not config.dry_run:
            try:
                client, _ = client_for(config)
                summary: dict[str, float] = {
                    "jobs_total": len(rows),
                    "jobs_failed": sum(r["status"] == "FAILED" for r in rows),
                    "jobs_skipped": sum(r["status"] == "SKIPPED" for r in rows),
                    **extra,
                }
                for r in rows:
                    for key, _, _ in KEY_METRICS:
                        if key in r["metrics"]:
                            summary[f"job{r['job']}.{key}"] = r["metrics"][key]
                _log_batches(client, parent, metrics=summary)
                status = "FINISHED" if summary["jobs_failed"] == 0 else "FAILED"
                client.set_terminated(parent, status)
                print(f"MLflow parent run {parent} ({status}); view with:\n  "
                      f"{ui_command(tracking_uri(config))}")
            except Exception as e:
                log.warning("could not finish the sweep's MLflow parent run: %s", e)


def _job_sort_key(p: Path) -> tuple[int, str]:
    name = p.parent.name
    return (int(name) if name.isdigit() else 1 << 30, name)
