"""lm-evaluation-harness tasks shipped with the package, loaded by path since the harness's Hub tasks cannot be fetched
offline: pass `TASKS_DIR` as `--include_path` or as `lm_eval.tasks.TaskManager(include_path=...)`."""

from pathlib import Path

TASKS_DIR = Path(__file__).parent
