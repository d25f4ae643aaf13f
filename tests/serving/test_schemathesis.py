"""The server holds to its own published OpenAPI schema under property-based fuzzing.

A real `python -m serving` (schema pages on, one API key, `--default-max-tokens 4` so generated
requests decode quickly) is fuzzed by schemathesis's `st run` against its own `/openapi.json`,
with valid and invalid inputs, bounded to a few dozen examples per operation. The checks run:

- `not_a_server_error`: no answer is a 5xx;
- `status_code_conformance`: every status is one the schema declares for that operation;
- `content_type_conformance`: every Content-Type is one the schema declares;
- `response_schema_conformance`: every JSON body matches the declared schema.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.serving.conftest import ServerProcess, make_checkpoint

pytestmark = pytest.mark.slow

FUZZ_KEY = "sk-fuzz"
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance")
EXAMPLES_PER_OPERATION = 20
RUN_BUDGET_S = 60


@pytest.fixture(scope="module")
def documented_server(tmp_path_factory) -> ServerProcess:
    root = tmp_path_factory.mktemp("fuzzed")
    checkpoint = make_checkpoint(root / "model_00003.pt", seed=3, step=3)
    server = ServerProcess(args=["--checkpoint", str(checkpoint), "--threads", "1", "--enable-docs",
                                 "--default-max-tokens", "4"],
                           env={"NANOGPT_API_KEYS": FUZZ_KEY}, log_path=root / "server.log").start()
    yield server
    server.stop()


def test_fuzzed_requests_get_no_server_error_and_only_declared_answers(documented_server, tmp_path: Path):
    st = Path(sys.executable).with_name("st")
    run = subprocess.run(
        [str(st), "run", documented_server.url + "/openapi.json",
         "--header", f"Authorization: Bearer {FUZZ_KEY}",
         "--checks", ",".join(CHECKS),
         "--phases", "examples,coverage,fuzzing",
         "--max-examples", str(EXAMPLES_PER_OPERATION),
         "--max-time", str(RUN_BUDGET_S),
         "--workers", "1", "--seed", "9", "--request-timeout", "30",
         "--report", "junit", "--report-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=RUN_BUDGET_S + 120,
        cwd=tmp_path)  # its example cache (.schemathesis/) stays out of the checkout
    output = run.stdout[-12000:] + run.stderr[-3000:]
    server_log = documented_server.log()[-2000:]
    assert run.returncode == 0, f"schemathesis found failures:\n{output}\n--- server log ---\n{server_log}"
    assert "No issues found" in output or "passed" in output.lower(), output
    print(run.stdout[-3000:])  # the per-operation summary, shown with `pytest -rP`
