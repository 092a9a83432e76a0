"""`evaluate` metric modules shipped with the package and loaded by path, since none can be fetched offline."""

from pathlib import Path

import evaluate

METRICS_DIR = Path(__file__).parent


def load_metric(name: str, **kwargs) -> evaluate.EvaluationModule:
    """One of the shipped modules (a folder of this package holding `<name>.py`), through `evaluate.load`."""
    path = METRICS_DIR / name
    if not (path / f"{name}.py").is_file():
        shipped = sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())
        raise ValueError(f"No shipped metric {name!r}; the package ships {shipped}.")
    return evaluate.load(str(path), **kwargs)
