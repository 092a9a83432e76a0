"""The quickstart script runs end to end: train, save, reload as remote code, generate."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "quickstart.py"


def test_quickstart_trains_saves_reloads_and_generates(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--output_dir", str(tmp_path), "--max_steps", "5", "--num_sequences", "64"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "continuation matches the motif at" in result.stdout
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "modeling_pmg.py").exists()
    saved = (tmp_path / "model.safetensors").read_bytes()
    again = subprocess.run([sys.executable, str(SCRIPT), "--output_dir", str(tmp_path)], capture_output=True, text=True)
    assert again.returncode == 2 and "pass --overwrite_output_dir True" in again.stderr, again.stderr[-3000:]
    assert (tmp_path / "model.safetensors").read_bytes() == saved
