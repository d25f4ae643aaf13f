"""How a run's steps execute: each in a process of its own, forked from one that has already
imported the pipeline.

Dagster's default starts every step with `spawn`, a fresh interpreter that imports Dagster,
torch and the pipeline again: about 4 s a step on 2 cores, 40 s of a micro run's 65. With
`forkserver` that import happens once per run, in the server the steps are forked from (52 s
and 43 s for the same run, in two runs beside the 65 s one). Steps keep their own processes,
so they still run in parallel and one step's crash still cannot take the run worker with it.

A run can still ask for everything in one process (`execution: config: in_process: {}`), as
`./dev demo` does, or for another start method; only an unset start method becomes forkserver.
"""

from __future__ import annotations

import dagster as dg

# The default executor's own schema for its two modes: this executor accepts the same run config.
from dagster._core.definitions.executor_definition import IN_PROC_CONFIG, MULTI_PROC_CONFIG

PRELOADED_MODULES = ["pipeline.definitions"]  # imports Dagster, torch and every asset


def _forkserver_unless_asked_otherwise(config: dict) -> dict:
    if "multiprocess" not in config:
        return config
    multiprocess = dict(config["multiprocess"] or {})
    multiprocess.setdefault("start_method", {"forkserver": {"preload_modules": PRELOADED_MODULES}})
    return {"multiprocess": multiprocess}


step_executor = dg.multi_or_in_process_executor.configured(
    _forkserver_unless_asked_otherwise,
    name="forked_steps_executor",
    config_schema=dg.Field(dg.Selector({"multiprocess": MULTI_PROC_CONFIG, "in_process": IN_PROC_CONFIG}),
                           default_value={"multiprocess": {}}),
)
