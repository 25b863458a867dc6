"""Starting Ray for a command, in one place (crawl/ and train/ both use it), with quiet worker logs.

`ensure_ray` attaches to `RAY_ADDRESS` when it is set (a cluster: its own resources) or starts a local
Ray of `num_cpus` logical CPUs, passing the project on `PYTHONPATH` and the variables the workers need
(`HF_ENDPOINT`, the S3 endpoint and keys) in the runtime environment — values are passed, never logged.

Every Ray worker process runs `quiet_worker_logs` first (`worker_process_setup_hook`): a user sees the
command's own progress, not Ray's internals. Train V2's placement-group cleaner polls the controller through
the State API, which a Ray without its dashboard lacks, and logs "Failed to query Ray Train Controller actor
state" every few seconds of every fit (STACK.md): that line is dropped. Ray Data logs a line per dataset
execution and a notice that progress bars are off: its console shows warnings only (`ray_data_logging.yaml`,
through Ray Data's own RAY_DATA_LOGGING_CONFIG), its session log file keeps everything. Warnings and errors
of every other kind still reach the driver.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)
PASSED_ENV = ("RAY_DATA_LOGGING_CONFIG", "HF_ENDPOINT", "HF_HUB_DISABLE_TELEMETRY", "HF_HUB_OFFLINE", "HF_TOKEN", "AWS_ENDPOINT_URL",
              "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_DEFAULT_REGION")
DATA_LOGGING = str(Path(__file__).resolve().parent / "ray_data_logging.yaml")
_DROPPED = {
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": ("Failed to query Ray Train Controller",),
}


class _Drop(logging.Filter):
    def __init__(self, texts: tuple[str, ...]) -> None:
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(t in message for t in self.texts)


class DataQuiet(_Drop):
    """Ray Data's console filter in `ray_data_logging.yaml`."""

    def __init__(self) -> None:
        super().__init__(("Progress bars disabled",))


def quiet_worker_logs() -> None:
    """Drop Ray's internal chatter (see the module docstring) from this process's log output."""
    for name, texts in _DROPPED.items():
        logging.getLogger(name).addFilter(_Drop(texts))


def quiet_env() -> None:
    """Ray Data's console at warnings (`ray_data_logging.yaml`) in this process and the workers it starts; a
    user's own RAY_DATA_LOGGING_CONFIG wins. Call before Ray Data is imported."""
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", DATA_LOGGING)


def ensure_ray(num_cpus: int | None = None) -> bool:
    """Start a local Ray (or attach to RAY_ADDRESS) unless one is up; True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    quiet_env()
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [PROJECT_ROOT, os.environ.get("PYTHONPATH")]))}
    env.update({k: os.environ[k] for k in PASSED_ENV if k in os.environ})
    runtime_env = {"env_vars": env, "worker_process_setup_hook": "catalog.rayenv.quiet_worker_logs"}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=runtime_env, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, runtime_env=runtime_env,
                 log_to_driver=True, logging_level=logging.WARNING)
    return True
