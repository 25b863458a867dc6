"""Starting Ray for a command, in one place (crawl/ and train/ both use it), with quiet worker logs.

`ensure_ray` attaches to `RAY_ADDRESS` when it is set (a cluster: its own resources) or starts a local
Ray of `num_cpus` logical CPUs, passing the project on `PYTHONPATH` and the variables the workers need
(`HF_ENDPOINT`, the S3 endpoint and keys) in the runtime environment — values are passed, never logged.

Every Ray worker process runs `quiet_worker_logs` first (`worker_process_setup_hook`): a user sees the
command's own progress, not Ray's internals. Train V2's placement-group cleaner polls the controller through
the State API, which a Ray without its dashboard lacks, and logs "Failed to query Ray Train Controller actor
state" every few seconds of every fit (STACK.md): that line is dropped. Two more reach the driver from Ray's
own machinery and say nothing a user can act on: the notice that a locally started Ray enabled token
authentication (it stays enabled; only the notice is silenced), and Train V2's C++ error line that its
`PreemptionWatcher` actor "has constructor arguments in the object store and max_restarts > 0" (and the
same line of the driver's own C++ core worker for every Ray Data actor pool: Ray issue 53727, harmless
here): the driver's printer of worker output drops exactly those lines (`_DRIVER_DROPPED`), and so does
a filter on the driver's file descriptor 2 (C++ writes there directly), installed by `ensure_ray` after
Ray's own processes have started and removed at exit; everything else passes (one pattern for the
notice, whatever the actor). The raylet's warning that many worker processes started (a sweep's trials hold
token CPU slots: train/tune.py) comes as an "error message" through the worker module's own printer, which is
wrapped alike; the output of Train V2's placement-group cleaner actor (`_QUIET_ACTORS`) is dropped whole. Ray Data logs a line per dataset
execution and a notice that progress bars are off: its console shows warnings only (`ray_data_logging.yaml`,
through Ray Data's own RAY_DATA_LOGGING_CONFIG), its session log file keeps everything. Warnings and errors
of every other kind still reach the driver.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)
PASSED_ENV = ("RAY_DATA_LOGGING_CONFIG", "HF_ENDPOINT", "HF_HUB_DISABLE_TELEMETRY", "HF_HUB_OFFLINE", "HF_TOKEN", "AWS_ENDPOINT_URL",
              "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_DEFAULT_REGION")
DATA_LOGGING = str(Path(__file__).resolve().parent / "ray_data_logging.yaml")
_DROPPED = {
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": ("Failed to query Ray Train Controller",),
}
# lines of worker output the driver prints: (every one of these substrings) -> dropped
# (Ray's C++ notice for any actor whose constructor arguments sit in the object store: Ray issue 53727)
_DRIVER_DROPPED = (("core_worker.cc", "has constructor arguments in the object store and max_restarts > 0"),
                   # a sweep's trial drivers hold a token CPU slot (train/tune.py): the raylet counts them as
                   # "fractional CPU requests" starting many worker processes, which is what a sweep does
                   ("PYTHON worker processes have been started on node", "maximum expected startup concurrency"))
# actors whose whole output is Ray's internals: Train V2's placement-group cleaner polls the State API, which on
# a machine running two Rays (a notebook's and a command's) cannot tell which to ask, and its thread dies with a
# traceback ("Found multiple active Ray instances"); training, checkpoints and clean-up go on without it
_QUIET_ACTORS = ("PlacementGroupCleaner",)
_STDERR_FILTER: list = []
_AUTH_NOTICE = "ray._private.authentication.authentication_token_setup"


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
    """Every Ray worker's setup: drop Ray's internal chatter (see the module docstring) from its log output, and
    let Train V2's placement-group cleaner see dead controllers without the State API (`_gcs_actor_alive`)."""
    for name, texts in _DROPPED.items():
        logging.getLogger(name).addFilter(_Drop(texts))
    try:
        from ray.train.v2._internal.execution.controller import placement_group_cleaner
    except ImportError:
        return
    placement_group_cleaner.is_actor_alive = _gcs_actor_alive


def _gcs_actor_alive(actor_id: str, timeout: float | None = None) -> bool:
    """Whether an actor is alive, asked of the GCS directly (as Ray's own `is_actor_alive`: an actor not found is
    not alive). Train V2's placement-group cleaner — a detached actor that frees a fit's worker placement group
    when its controller dies without cleaning up, as every trial that Tune's ASHA stops does — asks through the
    State API, which a Ray without its dashboard lacks (and which cannot tell which Ray to ask where a machine runs
    two): it logged "Failed to query" forever, the CPUs of each stopped trial's workers were never freed, and a
    sweep on 2 cores hung once two trials had been stopped ("Cluster resources are not enough")."""
    import ray._private.state as state

    info = state.state.actor_table(actor_id)
    return bool(info) and info.get("State") != "DEAD"


def quiet_env() -> None:
    """Ray Data's console at warnings (`ray_data_logging.yaml`) in this process and the workers it starts; a
    user's own RAY_DATA_LOGGING_CONFIG wins. Call before Ray Data is imported."""
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", DATA_LOGGING)


def keep_line(line: str) -> bool:
    """False for a worker-output line the driver drops (`_DRIVER_DROPPED`)."""
    return not any(all(part in line for part in parts) for parts in _DRIVER_DROPPED)


def filter_driver_logs() -> bool:
    """Wrap the driver's printer of worker output so `keep_line` decides each line; True if it was found.

    Ray prints workers' output through handlers of its stdstream dispatcher (private API: if it moves, the
    lines simply show again)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False

    def wrap(printer):  # the dispatcher's handlers take (data), the module's printer (data, ignore_prefix=…)
        def kept(data, *args, **kwargs):
            if data.get("actor_name") in _QUIET_ACTORS:
                return
            lines = [line for line in data.get("lines", ()) if keep_line(line)]
            if lines or not data.get("lines"):
                printer({**data, "lines": lines}, *args, **kwargs)
        kept.wrapped = True
        kept.__wrapped_printer__ = printer
        return kept

    with dispatcher._lock:
        found = [(name, h) for name, h in dispatcher.handlers if name == "ray_print_logs"]
        dispatcher.handlers = [(name, h if name != "ray_print_logs" or getattr(h, "wrapped", False) else wrap(h))
                               for name, h in dispatcher.handlers]
    # the raylet's warnings reach the driver as "error messages", printed by calling the module's function
    import ray._private.worker as worker_module

    printer = getattr(worker_module, "print_to_stdstream", None)
    if printer is not None and not getattr(printer, "wrapped", False):
        worker_module.print_to_stdstream = wrap(printer)
    return bool(found)


def filter_stderr() -> bool:
    """Pass this process's file descriptor 2 through `keep_line` (a pipe and a thread), once; undone at exit.

    Only this process's own writes go through it: Ray's processes started before the call keep their own
    stderr, and the workers a raylet starts inherit the raylet's. A line is held until its newline only
    when it may be one to drop; whatever is pending at exit is written out."""
    import atexit
    import sys
    import threading

    if _STDERR_FILTER:
        return False
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
    except OSError:
        return False

    def pump() -> None:
        pending = b""
        try:
            while chunk := os.read(read_end, 1 << 16):
                *lines, pending = (pending + chunk).split(b"\n")
                out = b"".join(line + b"\n" for line in lines if keep_line(line.decode(errors="replace")))
                if pending and b".cc:" not in pending:  # a partial line (a progress bar) that cannot be dropped
                    out, pending = out + pending, b""
                if out:
                    os.write(saved, out)
            if pending and keep_line(pending.decode(errors="replace")):
                os.write(saved, pending)
        except OSError:  # the reader of our stderr went away
            pass
        finally:
            os.close(read_end)

    thread = threading.Thread(target=pump, name="wildzoo-stderr", daemon=True)
    thread.start()

    def restore() -> None:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved, 2)  # closes the pipe's write end: the pump drains and ends
        thread.join(timeout=5)

    atexit.register(restore)
    _STDERR_FILTER.append(restore)
    return True


def _job_runtime_env() -> dict:
    """The runtime env of the Ray job this driver runs as (`ray job submit`), or {}."""
    import json

    try:
        return json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return {}


@contextlib.contextmanager
def ray_session(min_cpus: int = 0) -> Iterator[bool]:
    """Ray for one command (crawl, fit, embed): the Ray already up, the cluster at RAY_ADDRESS, or a local Ray of
    one logical CPU per core and at least `min_cpus`, shut down at the end only if this call started it (never a
    Ray someone else started). Yields whether it started one."""
    started = ensure_ray(max(os.cpu_count() or 1, min_cpus))
    try:
        yield started
    finally:
        if started:
            import ray

            ray.shutdown()


def ensure_ray(num_cpus: int | None = None) -> bool:
    """Start a local Ray (or attach to RAY_ADDRESS) unless one is up; True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    quiet_env()
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [PROJECT_ROOT, os.environ.get("PYTHONPATH")]))}
    env.update({k: os.environ[k] for k in PASSED_ENV if k in os.environ})
    # a `ray job submit` driver: the job's runtime env (working dir, the variables given with --runtime-env-json)
    # already reaches every worker, and Ray refuses a second value for a key it sets: pass only the others
    job_env = _job_runtime_env()
    env = {k: v for k, v in env.items() if k not in job_env.get("env_vars", {})}
    if "working_dir" in job_env:
        env.pop("PYTHONPATH", None)  # the job's working dir is the project, on every worker's path
    runtime_env = {"env_vars": env, "worker_process_setup_hook": "catalog.rayenv.quiet_worker_logs"}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=runtime_env, log_to_driver=True)
    else:
        notice = logging.getLogger(_AUTH_NOTICE)
        level = notice.level
        notice.setLevel(logging.ERROR)
        try:
            ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, runtime_env=runtime_env,
                     log_to_driver=True, logging_level=logging.WARNING)
        finally:
            notice.setLevel(level)
    filter_driver_logs()
    filter_stderr()
    return True
