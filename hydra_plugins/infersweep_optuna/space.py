"""The search space of ``hydra/sweeper=optuna``: Hydra sweep overrides as Optuna
distributions (:func:`parse_space`), the grid sampler's space and the seeded samplers."""

# no ``from __future__ import annotations``: Hydra's plugin scan runs this module outside
# sys.modules, where dataclasses cannot resolve string annotations
from dataclasses import dataclass
from typing import Any

from hydra.core.override_parser.types import Override, Transformer

from pipeline.errors import ConfigError

SAMPLERS = ("tpe", "random", "grid", "nsgaii")


@dataclass
class Param:
    """One searched key: its Optuna distribution, the override's key (``+`` kept) and, for
    a categorical, each choice's override text."""

    name: str
    key: str
    distribution: Any
    texts: dict[Any, str] | None = None

    def override(self, value: Any) -> str:
        """The override that sets this key to ``value``."""
        if self.texts is not None:
            return f"{self.key}={self.texts[value]}"
        return f"{self.key}={value}"


def _bad(o: Override, why: str) -> ConfigError:
    return ConfigError(f"{o.input_line} is invalid: {why}")


def to_param(o: Override) -> Param:
    """The :class:`Param` of a sweep override (see the module docstring for the grammar);
    raises :class:`ConfigError` for one Optuna cannot search."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    key = o.get_key_element()
    name = key.lstrip("+~")
    sweep: Any = o.value()
    if o.is_choice_sweep():
        values = list(o.sweep_iterator(transformer=Transformer.encode))
        # Hydra writes True; the yaml spelling reads better in overrides and job tables
        texts = [str(v).lower() if isinstance(v, bool) else t
                 for v, t in zip(values, o.sweep_string_iterator(), strict=True)]
        if not values:
            raise _bad(o, "an empty choice")
        return Param(name, key, CategoricalDistribution(values), dict(zip(values, texts,
                                                                          strict=True)))
    if o.is_range_sweep():
        values = list(o.sweep_iterator())
        if not values:
            raise _bad(o, "an empty range")
        if all(isinstance(v, int) for v in values) and sweep.step > 0:
            return Param(name, key, IntDistribution(values[0], values[-1], step=sweep.step))
        texts = [str(v) for v in values]
        return Param(name, key, CategoricalDistribution(values), dict(zip(values, texts,
                                                                          strict=True)))
    if o.is_interval_sweep():
        lo, hi, use_log = sweep.start, sweep.end, "log" in sweep.tags
        if lo >= hi:
            raise _bad(o, "the interval's start must be below its end")
        if use_log and lo <= 0:
            raise _bad(o, "a log-scale interval must start above 0")
        if isinstance(lo, int) and isinstance(hi, int):
            return Param(name, key, IntDistribution(lo, hi, log=use_log))
        return Param(name, key, FloatDistribution(float(lo), float(hi), log=use_log))
    raise _bad(o, "not a search range; use choice(), range() or interval()")


def parse_space(overrides: list[Override]) -> tuple[dict[str, Param], list[str]]:
    """The searched keys (by name) and the fixed overrides every trial gets; Hydra's own
    ``hydra.*`` settings stay out of the space."""
    space: dict[str, Param] = {}
    fixed: list[str] = []
    for o in overrides:
        if o.is_sweep_override() and not o.is_hydra_override():
            p = to_param(o)
            space[p.name] = p
        elif not o.is_sweep_override():
            fixed.append(o.input_line or f"{o.get_key_element()}="
                         f"{o.get_value_element_as_str()}")
    return space, fixed


def grid_space(space: dict[str, Param]) -> dict[str, list[Any]]:
    """GridSampler's search space: every value of each key; a continuous key is refused."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    grid: dict[str, list[Any]] = {}
    for name, p in space.items():
        d = p.distribution
        if isinstance(d, CategoricalDistribution):
            grid[name] = list(d.choices)
        elif isinstance(d, IntDistribution) and not d.log:
            grid[name] = list(range(d.low, d.high + 1, d.step))
        else:
            raise ConfigError(f"hydra.sweeper.sampler='grid' is invalid: {p.key} is a "
                              f"continuous range; use choice()/range() or sampler=tpe|random")
    return grid


def make_sampler(name: str, seed: int, space: dict[str, Param],
                 n_startup_trials: int | None = None) -> Any:
    """The seeded sampler; tpe and nsgaii read each trial's constraints (user attribute
    ``constraints``), random and grid do not (the best trial is chosen feasible anyway).
    ``n_startup_trials``: tpe's random trials before it models the space (null: Optuna's
    default, 10)."""
    import optuna

    def constraints(trial: Any) -> list[float]:
        return list(trial.user_attrs.get("constraints", []))

    if name == "tpe":
        startup = {} if n_startup_trials is None else {"n_startup_trials": n_startup_trials}
        return optuna.samplers.TPESampler(seed=seed, constraints_func=constraints, **startup)
    if name == "nsgaii":
        return optuna.samplers.NSGAIISampler(seed=seed, constraints_func=constraints)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(grid_space(space), seed=seed)
    raise ConfigError(f"hydra.sweeper.sampler={name!r} is invalid: allowed values are "
                      f"{', '.join(SAMPLERS)}")
