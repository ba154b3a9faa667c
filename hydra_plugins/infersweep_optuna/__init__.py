"""infersweep's Optuna sweeper for Hydra (``hydra/sweeper=optuna``); see
:mod:`.optuna_sweeper`."""
