"""A Hydra sweeper that searches instead of walking a grid: ``hydra/sweeper=optuna``.

Optuna (``pip install -e '.[search]'``) proposes each trial; this plugin only turns a trial
into a job (overrides launched through the configured Hydra launcher, so trials are jobs of
the sweep: one MLflow parent, the sweep table, the report) and the job's metrics back into
the trial's values (:mod:`pipeline.analysis.search`); a verdict constraint gates each
finished trial against ``scoring.reference_run`` here, in the parent process, and
``search.rerun_best`` reruns the best trial with repeats as one more job after the last
trial (not a trial of the study). The search space (:mod:`.space`) is
``hydra.sweeper.params`` plus the sweep overrides of the command line, in Hydra's override
grammar: ``a,b`` / ``choice(a,b)`` categorical, ``range(1,9)`` integers (step kept),
``interval(0.1,1.0)`` floats, ``int(interval(1,64))`` integers, ``tag(log, interval(...))``
on a log scale. What is optimized is the config's ``search`` section (docs/search.md).
"""

# no ``from __future__ import annotations``: Hydra's plugin scan runs this module outside
# sys.modules, where dataclasses cannot resolve string annotations
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobStatus
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from hydra_plugins.infersweep_optuna.space import (
    SAMPLERS,
    Param,
    make_sampler,
    parse_space,
)
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class OptunaSweeperConf:
    """``hydra.sweeper.*`` of ``hydra/sweeper=optuna``."""

    _target_: str = "hydra_plugins.infersweep_optuna.optuna_sweeper.OptunaSweeper"
    sampler: str = "tpe"
    """tpe (default) | random | grid (a discrete space only) | nsgaii; seeded with the run's
    ``seed``."""
    n_trials: int = 10
    """Trials in all (a resumed search counts the ones it already has)."""
    n_jobs: int = 1
    """Trials proposed and launched together (a parallel launcher runs them at once)."""
    n_startup_trials: int | None = None
    """tpe: random trials before it models the space; null = Optuna's default (10)."""
    storage: str | None = None
    """Optuna's storage URL; null = ``sqlite:///<sweep dir>/optuna.db``."""
    study_name: str | None = None
    """null = ``search-<sweep folder name>``."""
    params: dict[str, str] = field(default_factory=dict)
    """The search space: ``key: "choice(a,b)"`` / ``"interval(0.1,1.0)"`` / ``"range(1,9)"``."""


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf,
                             provider="infersweep")


class OptunaSweeper(Sweeper):
    """Optuna proposes, the launcher runs, the jobs' metrics answer (ask and tell)."""

    def __init__(self, sampler: str = "tpe", n_trials: int = 10, n_jobs: int = 1,
                 n_startup_trials: int | None = None, storage: str | None = None,
                 study_name: str | None = None, params: dict[str, str] | None = None) -> None:
        super().__init__()
        self.sampler_name, self.n_trials, self.n_jobs = sampler, n_trials, n_jobs
        self.n_startup_trials = n_startup_trials
        self.storage, self.study_name, self.params = storage, study_name, params or {}
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher: Launcher | None = None
        self.storage_url: str | None = None  # the storage in use (null in a dry run)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        """Keep the context and instantiate the configured launcher."""
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        """Run the search; a refused search setting exits 2 before the first job."""
        assert self.config is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        try:
            study, space, fixed, search = self._prepare(arguments, sweep_dir)
        except ConfigError as e:
            from pipeline.analysis.search import abandon_parent

            abandon_parent(self.config, sweep_dir)
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from e
        return self._run(study, space, fixed, search, sweep_dir)

    # ------------------------------------------------------------------ set-up

    def _prepare(self, arguments: list[str], sweep_dir: Path) -> tuple[Any, dict[str, Param],
                                                                       list[str], Any]:
        """Check the settings and the search section, parse the space, open the study."""
        assert self.config is not None and self.hydra_context is not None
        try:
            import optuna
        except ImportError as e:
            raise ConfigError("hydra/sweeper=optuna is invalid: Optuna is not installed; "
                              "pip install -e '.[search]'") from e
        from pipeline.config.validation import check_range, validate_search

        check_range("hydra.sweeper.n_trials", self.n_trials, 1)
        check_range("hydra.sweeper.n_jobs", self.n_jobs, 1)
        check_range("hydra.sweeper.n_startup_trials", self.n_startup_trials, 0, optional=True)
        search = OmegaConf.to_object(self.config.search)
        validate_search(search, OmegaConf.select(self.config, "scoring.reference_run"))
        if self.sampler_name not in SAMPLERS:
            raise ConfigError(f"hydra.sweeper.sampler={self.sampler_name!r} is invalid: "
                              f"allowed values are {', '.join(SAMPLERS)}")
        if len(search.objectives) > 1 and self.sampler_name == "tpe":
            log.info("several objectives: TPE searches for the Pareto front")
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        lines = [f"{k}={v}" for k, v in self.params.items()] + list(arguments)
        space, fixed = parse_space(parser.parse_overrides(lines))
        if not space:
            raise ConfigError("hydra.sweeper.params={} is invalid: nothing to search; give "
                              "ranges such as backend.max_num_seqs=choice(4,16,64)")
        self._check_composes(space, fixed)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        seed = int(self.config.seed)
        sampler = make_sampler(self.sampler_name, seed, space, self.n_startup_trials)
        name = self.study_name or f"search-{sweep_dir.name}"
        dry, resume = bool(self.config.dry_run), bool(self.config.resume)
        storage = None if dry else (self.storage or f"sqlite:///{sweep_dir.resolve()}/optuna.db")
        self.storage_url = storage
        directions = [o.direction for o in search.objectives]
        try:
            study = optuna.create_study(storage=storage, study_name=name, sampler=sampler,
                                        directions=directions, load_if_exists=resume)
        except optuna.exceptions.DuplicatedStudyError as e:
            raise ConfigError(f"hydra.sweeper.study_name={name!r} is invalid: that study "
                              f"already exists in {storage}; add resume=true to continue "
                              f"it, or name another study") from e
        if list(study.directions) != [optuna.study.StudyDirection[d.upper()]
                                      for d in directions]:
            raise ConfigError(f"search.objectives is invalid: study {name!r} was made with "
                              f"other directions; name another study")
        return study, space, fixed, search

    def _check_composes(self, space: dict[str, Param], fixed: list[str]) -> None:
        """A trial at the low end of every range composes (an unknown key or a wrong type
        is refused here, in one line, before any job); each batch is checked again."""
        from optuna.distributions import CategoricalDistribution

        corner = [p.override(p.distribution.choices[0]
                             if isinstance(p.distribution, CategoricalDistribution)
                             else p.distribution.low) for p in space.values()]
        try:
            self.validate_batch_is_legal([fixed + corner])
        except Exception as e:  # Hydra's composition errors: several types, one meaning
            cause = e.__cause__ or e
            raise ConfigError(f"the search space does not compose ({' '.join(corner)}): "
                              f"{str(cause).splitlines()[0]}") from e

    # ------------------------------------------------------------------ the loop

    def _run(self, study: Any, space: dict[str, Param], fixed: list[str], search: Any,
             sweep_dir: Path) -> list[Any]:
        from optuna.trial import TrialState

        from pipeline.analysis.search import MEASURED, job_outcome, needs_gate

        assert self.config is not None and self.launcher is not None
        dry, gated = bool(self.config.dry_run), needs_gate(search)
        dists = {n: p.distribution for n, p in space.items()}
        self._requeue_interrupted(study)
        done = [t for t in study.get_trials(deepcopy=False)
                if t.state.is_finished() and not t.user_attrs.get("interrupted")]
        next_job = _next_job(study)
        left = self.n_trials - len(done)
        if done:
            print(f"resume: study {study.study_name} has {len(done)} finished trial(s); "
                  f"{max(left, 0)} to go")
        returns: list[Any] = []
        while left > 0 and not _grid_done(study):
            trials = [study.ask(dists) for _ in range(min(self.n_jobs, left))]
            jobs = []
            for t in trials:
                job = t.user_attrs.get("job")
                if job is None:
                    job, next_job = next_job, next_job + 1
                    t.set_user_attr("job", job)
                jobs.append(int(job))
            batch = [fixed + [space[n].override(v) for n, v in t.params.items()]
                     for t in trials]
            self.validate_batch_is_legal(batch)
            results = self._launch(batch, jobs)
            returns.append(results)
            for t, r in zip(trials, results, strict=True):
                ret = _return_value(r)
                if dry:
                    _tell(study, t, state=TrialState.PRUNED)
                    continue
                gate = None
                if gated and ret is not None and str(ret.get("status")) in MEASURED:
                    gate = self._gate(r, sweep_dir, int(t.user_attrs["job"]))
                out = job_outcome(ret, search, gate)
                t.set_user_attr("constraints", out.constraints)
                t.set_user_attr("feasible", out.feasible)
                if out.gate is not None:
                    t.set_user_attr("gate", out.gate)
                if out.state == "fail":
                    t.set_user_attr("error", out.reason)
                    _tell(study, t, state=TrialState.FAIL)
                    print(f"trial {t.number} (job {t.user_attrs['job']}) FAILED: "
                          f"{out.reason}")
                else:
                    _tell(study, t, values=out.values)
                    verdict = (f"; gate {out.gate['verdict']} ({out.gate['reason']})"
                               if out.gate else "")
                    print(f"trial {t.number} (job {t.user_attrs['job']}): values "
                          f"{out.values}" + ("" if out.feasible else " (infeasible)")
                          + verdict)
            left -= len(trials)
        if not dry:
            returns += self._finish(study, space, fixed, search, sweep_dir)
        else:
            print(f"dry run: {self.n_trials} trial configuration(s) validated; nothing "
                  f"stored")
        return returns

    def _launch(self, batch: list[list[str]], jobs: list[int]) -> list[Any]:
        """Launch the batch; trials whose job numbers run on go in one call, each other
        trial (a resumed one keeps its job number) in its own."""
        assert self.launcher is not None
        out: list[Any] = []
        i = 0
        while i < len(batch):
            j = i + 1
            while j < len(batch) and jobs[j] == jobs[j - 1] + 1:
                j += 1
            out += list(self.launcher.launch(batch[i:j], initial_job_idx=jobs[i]))
            i = j
        return out

    def _gate(self, r: Any, sweep_dir: Path, job: int) -> dict[str, Any]:
        """The finished trial's job gated against ``scoring.reference_run``
        (:func:`pipeline.analysis.gate.gate_one`); a gate that raises leaves it unjudged."""
        from pipeline.analysis.gate import gate_one

        # the job's output folder (``working_dir`` is the launch folder under chdir=false)
        cfg = getattr(r, "hydra_cfg", None)
        out = OmegaConf.select(cfg, "hydra.runtime.output_dir") if cfg is not None else None
        job_dir = Path(out or sweep_dir / str(job))
        try:
            return gate_one(self.config, sweep_dir, job_dir)
        except Exception as e:  # the search goes on: the trial counts as not judged
            log.warning("gate: could not judge job %s: %s", job, e)
            return {"verdict": None, "reason": f"the gate failed: {e}"}

    def _rerun(self, study: Any, best: dict[str, Any], fixed: list[str], search: Any
               ) -> tuple[dict[str, Any], list[Any]]:
        """The best trial's overrides once more with ``workload.repeats``, as the sweep's
        next job (kept in the study's ``rerun_jobs`` so a resumed search skips its number;
        Optuna is not told: it is no trial)."""
        from pipeline.analysis.search import rerun_overrides, rerun_result

        job = _next_job(study)
        study.set_user_attr("rerun_jobs", [*study.user_attrs.get("rerun_jobs", []), job])
        overrides = rerun_overrides(fixed, best["overrides"], search.rerun_best)
        print(f"rerun: best trial {best['number']} (job {best['job']}) as job {job} with "
              f"workload.repeats={search.rerun_best}")
        try:
            self.validate_batch_is_legal([overrides])
            results = self._launch([overrides], [job])
        except Exception as e:  # the trials' result (search.json) must not be lost to it
            log.error("rerun: could not launch job %s: %s", job, e)
            return {**rerun_result(job, overrides, None, search), "error": str(e)}, []
        return rerun_result(job, overrides, _return_value(results[0]), search), results

    @staticmethod
    def _requeue_interrupted(study: Any) -> None:
        """A resumed study's trials left RUNNING by the killed search fail (marked
        ``interrupted``) and their params are asked again first, under the same job
        number (its folder is reused; ``resume=true`` skips a job that had finished)."""
        from optuna.trial import TrialState

        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            study.enqueue_trial(t.params, user_attrs={"job": t.user_attrs.get("job")})

    def _finish(self, study: Any, space: dict[str, Param], fixed: list[str], search: Any,
                sweep_dir: Path) -> list[Any]:
        """The rerun of the best trial (``search.rerun_best``), search.json, the printed best
        trial(s), the best trial on the MLflow parent; returns the rerun's job results."""
        from pipeline.analysis.search import (
            log_search_to_parent,
            print_search,
            search_summary,
            write_search_json,
        )

        assert self.config is not None
        trials = []
        for t in study.get_trials(deepcopy=False):
            if t.user_attrs.get("interrupted"):
                continue
            state = {"COMPLETE": "complete", "FAIL": "fail"}.get(t.state.name,
                                                                  t.state.name.lower())
            trials.append({"number": t.number, "job": t.user_attrs.get("job"),
                           "params": dict(t.params),
                           "overrides": [space[n].override(v) for n, v in t.params.items()
                                         if n in space],
                           "values": t.values, "state": state,
                           "feasible": bool(t.user_attrs.get("feasible", False)),
                           "constraints": t.user_attrs.get("constraints", []),
                           "gate": t.user_attrs.get("gate"),
                           "error": t.user_attrs.get("error")})
        info = {"study_name": study.study_name, "storage": self.storage_url,
                "sampler": self.sampler_name, "seed": int(self.config.seed),
                "n_trials": self.n_trials,
                "space": {n: repr(p.distribution) for n, p in space.items()}}
        summary = search_summary(trials, search, info)
        rerun: list[Any] = []
        if search.rerun_best and len(summary["best"]) == 1:
            summary["rerun"], rerun = self._rerun(study, summary["best"][0], fixed, search)
        elif search.rerun_best:
            print("rerun: no feasible trial to rerun")
        write_search_json(sweep_dir, summary)
        print_search(summary)
        log_search_to_parent(self.config, sweep_dir, summary)
        return [rerun] if rerun else []


def _tell(study: Any, trial: Any, **kw: Any) -> None:
    """``study.tell``; the grid sampler's "every point tried" signal (``study.stop()``,
    which raises outside ``study.optimize``) is left to :func:`_grid_done`: the trial's
    state is stored before that signal."""
    try:
        study.tell(trial, **kw)
    except RuntimeError as e:
        if "Study.stop" not in str(e):
            raise


def _next_job(study: Any) -> int:
    """The next free job number: after every trial's and every rerun's."""
    jobs = [int(t.user_attrs.get("job", -1)) for t in study.get_trials(deepcopy=False)]
    return 1 + max([*jobs, *study.user_attrs.get("rerun_jobs", [])], default=-1)


def _grid_done(study: Any) -> bool:
    """A grid search with every point tried (more trials would repeat points)."""
    import optuna

    sampler = study.sampler
    if not isinstance(sampler, optuna.samplers.GridSampler):
        return False
    # Optuna's own check (what its after_trial stops the study on)
    if sampler._get_unvisited_grid_ids(study):
        return False
    print("grid: every point has been tried; the search ends here")
    return True


def _return_value(r: Any) -> dict[str, Any] | None:
    """A job's return (``run.py``'s ``main``), None when the task raised."""
    if r.status != JobStatus.COMPLETED:
        log.error("job raised: %s", r._return_value)
        return None
    value = r.return_value
    return value if isinstance(value, dict) else None
