"""The code location loads the way the Dagster tools load it."""

import subprocess
import sys
from pathlib import Path

from ..conftest import PROJECT_ROOT, python_env


def test_dagster_definitions_validate_passes_for_the_workspace(tmp_path):
    dagster = Path(sys.executable).parent / "dagster"
    result = subprocess.run([str(dagster), "definitions", "validate", "-w", "workspace.yaml"], cwd=PROJECT_ROOT,
                            env={**python_env(), "DAGSTER_HOME": str(tmp_path)}, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "All code locations passed validation" in result.stdout + result.stderr
