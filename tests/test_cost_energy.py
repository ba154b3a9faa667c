"""Cost per token and energy per token: hand-worked prices, the RAPL and NVML readings, and a
priced plain job end to end (its MLflow run, terminal table and report)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config.schemas import CostConfig, TargetConfig
from pipeline.measure import energy
from pipeline.metrics import cost
from tests.conftest import CACHE_DIR, TINY, assert_refused_early, run_cli


def test_cost_per_million_tokens_hand_worked() -> None:
    # $1.20/h at 100 tok/s: 1.20 / 360,000 tokens = $3.333 per million
    assert cost.usd_per_million_tokens(1.20, 100.0) == pytest.approx(3.3333, abs=1e-4)
    # $2.50/h at 1,000 tok/s: 2.50 / 3.6 M tokens = $0.6944 per million
    assert cost.usd_per_million_tokens(2.50, 1000.0) == pytest.approx(0.69444, abs=1e-5)
    for rate in (0.0, -1.0, None, float("nan")):
        assert cost.usd_per_million_tokens(1.2, rate) is None


def test_users_price_wins_over_the_targets_list_price() -> None:
    l4 = TargetConfig(name="l4", usd_per_hour_list=0.8)
    mine = cost.resolve_price(CostConfig(usd_per_hour=1.2, price_source="Colab Pro"), l4)
    assert mine == cost.Price(1.2, "Colab Pro")
    listed = cost.resolve_price(CostConfig(), l4)
    assert listed is not None and listed.usd_per_hour == 0.8 and "list price" in listed.source
    assert cost.resolve_price(CostConfig(), TargetConfig(name="t4")) is None
    assert cost.resolve_price(CostConfig(), None) is None
    assert cost.price_params(mine) == {"cost.usd_per_hour_used": "1.2",
                                       "cost.price_source_used": "Colab Pro"}


def test_cost_at_slo_uses_the_point_behind_max_rate_under_slo() -> None:
    from pipeline.job_measure import job_cost
    from pipeline.serving.points import capacity_under_slo, slo_point

    def point(i: int, rate: float | None, achieved: float, tps: float, ok: bool) -> dict:
        return {"index": i, "offered_rate": rate, "achieved_rate": achieved,
                "output_tokens_per_s": tps, "slo_met": ok, "saturated": False,
                "valid": True}

    pts = [point(0, None, 1.0, 400.0, True),     # closed loop: never the capacity
           point(1, 2.0, 2.0, 100.0, True),
           point(2, 4.0, 3.9, 200.0, True),      # the highest passing: 200 tok/s
           point(3, 8.0, 5.0, 300.0, False)]     # faster, but misses the SLOs
    assert slo_point(pts) is pts[2] and capacity_under_slo(pts) == 3.9

    class Spec:
        cost = CostConfig(usd_per_hour=1.2)
        target = None

    got = job_cost(Spec(), {"output_tokens_per_s": 300.0}, pts)  # type: ignore[arg-type]
    assert got == pytest.approx({"usd_per_million_output_tokens": 1.2 / 3600 / 300 * 1e6,
                                 "usd_per_million_output_tokens_at_slo": 1.2 / 0.72})
    assert job_cost(Spec(), {"output_tokens_per_s": 300.0}, pts[3:]) == pytest.approx(  # type: ignore[arg-type]
        {"usd_per_million_output_tokens": 1.2 / 3600 / 300 * 1e6})


def _domain(root: Path, name: str, label: str, uj: int, max_uj: int = 10**9) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "name").write_text(f"{label}\n")
    (d / "energy_uj").write_text(f"{uj}\n")
    (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return d / "energy_uj"


def test_rapl_reader_on_a_fake_powercap_tree(tmp_path: Path) -> None:
    """A stub: this VM has no /sys/class/powercap, so the tree the kernel would show is
    written under tmp_path (package domains, a core sub-domain and psys, which are left
    out), and the counters move inside the meter's block, one of them wrapping."""
    pkg0 = _domain(tmp_path, "intel-rapl:0", "package-0", 999_000_000)  # wraps at 1e9
    pkg1 = _domain(tmp_path, "intel-rapl:1", "package-1", 5_000_000)
    core = _domain(tmp_path, "intel-rapl:0:0", "core", 0)
    psys = _domain(tmp_path, "intel-rapl:2", "psys", 0)
    assert [d.name for d in energy.rapl_domains(tmp_path)] == ["package-0", "package-1"]
    with energy.EnergyMeter("cpu", root=tmp_path) as meter:
        pkg0.write_text("1000000\n")    # 999.0 J -> wrapped -> 1.0 J: +2.0 J
        pkg1.write_text("8000000\n")    # +3.0 J
        core.write_text("50000000\n")   # part of package-0: not counted again
        psys.write_text("90000000\n")   # the whole platform: overlaps the packages
    assert meter.source == "rapl" and meter.energy_j == pytest.approx(5.0)
    m = meter.metrics(output_tokens=10)
    assert m["joules_per_output_token"] == pytest.approx(0.5)
    assert m["avg_power_w"] == pytest.approx(5.0 / meter.seconds)
    assert energy.counter_delta(10, 30, 100) == 20 and energy.counter_delta(90, 5, 100) == 15


def test_unreadable_counters_measure_nothing(tmp_path: Path) -> None:
    # no tree at all, as on this VM; and a root-only counter (unreadable) is the same
    with energy.EnergyMeter("cpu", root=tmp_path / "absent") as meter:
        pass
    assert meter.source is None and meter.metrics(10) == {}
    counter = _domain(tmp_path, "intel-rapl:0", "package-0", 1)
    counter.unlink()
    counter.mkdir()  # reading it fails like a permission error does
    assert energy.rapl_domains(tmp_path) == []


def test_nvml_energy_from_counter_readings() -> None:
    # two GPUs' total-energy counters in mJ: +2.5 J and +4.0 J
    assert energy.nvml_energy_j([1000, 5000], [3500, 9000]) == pytest.approx(6.5)
    assert energy.nvml_energy_j([5000], [4000]) is None  # the driver reloaded: no figure
    assert energy.source_for_device("cuda") == "nvml"
    assert energy.source_for_device("cpu") == "rapl"


def test_bad_cost_settings_are_refused_before_loading() -> None:
    assert_refused_early([
        (["cost.usd_per_hour=-1"], "cost.usd_per_hour=-1"),
        (["cost.usd_per_hour=0"], "must be > 0"),
        (["cost.price_source=Colab"], "cost.price_source='Colab'"),
        (["+target=l4", "dry_run=true", "target.usd_per_hour_list=0"],
         "target.usd_per_hour_list=0"),
    ])


def test_table_shows_cost_columns_only_when_present() -> None:
    from pipeline.tracking.table import format_table

    plain = format_table([{"status": "FINISHED", "metrics": {"output_tokens_per_s": 5.0}}],
                         ["status"])
    assert "$/Mtok" not in plain and "J/out tok" not in plain
    priced = format_table([{"status": "FINISHED", "metrics": {
        "output_tokens_per_s": 100.0, "usd_per_million_output_tokens": 3.3333}}], ["status"])
    assert "$/Mtok out" in priced and "3.333" in priced and "J/out tok" not in priced


# ----------------------------------------------------------------- a priced job, end to end


@pytest.fixture(scope="module")
def priced_job(tmp_path_factory: pytest.TempPathFactory, model_dir: str
               ) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("priced_job") / "outputs"
    p = run_cli(f"paths.output_dir={out}", f"paths.cache_dir={CACHE_DIR}", *TINY,
                "cost.usd_per_hour=1.2", "cost.price_source=Colab Pro L4 list price")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out, p.stdout


@pytest.mark.slow
def test_priced_plain_job_logs_cost_and_no_made_up_energy(priced_job: tuple[Path, str]
                                                         ) -> None:
    from mlflow.tracking import MlflowClient

    from pipeline.report import decision
    from pipeline.report.collect import collect_sweep
    from pipeline.tracking.store import default_store_uri

    out, stdout = priced_job
    (res_file,) = list(out.glob("runs/*/results.json"))
    res = json.loads(res_file.read_text())
    m = res["metrics"]
    # the price the figures used is part of what the job applied (results.json)
    assert res["applied"]["cost.usd_per_hour_used"] == "1.2"
    want = 1.2 / (3600 * m["output_tokens_per_s"]) * 1e6
    assert m["usd_per_million_output_tokens"] == pytest.approx(want)
    assert "$/Mtok out" in stdout and "cost.price_source_used=Colab Pro L4 list price" in stdout
    run_id = (res_file.parent / "mlflow_run_id").read_text().strip()
    run = MlflowClient(tracking_uri=default_store_uri(out)).get_run(run_id)
    assert run.data.metrics["usd_per_million_output_tokens"] == pytest.approx(want)
    assert run.data.params["cost.usd_per_hour_used"] == "1.2"
    assert run.data.params["cost.price_source_used"] == "Colab Pro L4 list price"
    # the job ran on the CPU: energy is RAPL's where this machine lets it be read, else
    # nothing at all (this VM has no /sys/class/powercap)
    logged = {k for k in run.data.metrics if k in energy.ENERGY_KEYS}
    _, data = collect_sweep(default_store_uri(out), run_id=run_id)
    built = decision.section(data)  # the whole report is built in tests/test_decision.py
    assert built is not None
    part = "\n".join(str(b.value) for b in built[0].blocks)
    assert "cost: priced at $1.2/h (Colab Pro L4 list price)" in part
    if energy.rapl_domains():
        assert logged == set(energy.ENERGY_KEYS)
        assert run.data.params["energy_source"] == "rapl"
    else:
        assert not logged and "energy_source" not in run.data.params
        assert energy.NOT_MEASURED in part
    # logged again after the fact (pipeline.tracking.sync), the price travels with it
    import shutil

    from pipeline.tracking.sync import sync

    copy = shutil.copytree(res_file.parent, out / "synced_copy")  # the module's job untouched
    other = f"sqlite:///{out / 'synced.db'}"
    (synced,) = sync(copy, tracking_uri=other, force=True)
    params = MlflowClient(tracking_uri=other).get_run(synced).data.params
    assert params["cost.usd_per_hour_used"] == "1.2"
    assert params["cost.price_source_used"] == "Colab Pro L4 list price"
