"""Connecting to Ray: one place that decides what every worker process inherits.

Ray workers do not inherit the driver's environment (they are forked by the raylet), so the
S3 settings of the standard AWS environment (endpoint, region; never credentials, see
CREDENTIAL_ENV) are forwarded to them through the job's runtime environment. Inside
`ray job submit`, variables the submitter already put in the job's runtime_env win and are
not repeated (Ray refuses duplicate keys).

Also where work runs: ``node_id`` (what the stages record beside their work) and the rule that
refuses local paths on a cluster of several machines (``check_shared_storage``).
"""

from __future__ import annotations

import json
import logging
import os

from segray.errors import SegrayError
from segray.storage import is_s3

FORWARDED_ENV: tuple[str, ...] = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "SEGRAY_S3_MAX_ATTEMPTS",
)
# Never forwarded: Ray writes a job's runtime_env, env_vars included, in plain text to
# runtime_env_agent.log on every node. Workers take credentials from their own environment:
# an instance role, IRSA, or the shell that started the cluster (cluster/README.md); a local
# cluster started by ray.init() inherits the driver's.
CREDENTIAL_ENV: tuple[str, ...] = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")

# glibc returns freed arenas to the OS and page-faults them back on every PyTorch step, which
# made a small CPU VM several times slower. High thresholds keep the memory mapped. They only
# reach the main arena, though: a thread's arena (Ray Train runs the training loop in a thread,
# Ray Data calls a model replica from one) grows in heaps of at most 64 MiB and serves every
# bigger tensor with its own mmap/munmap, whatever the threshold. One arena puts every thread
# on the main heap. docs/benchmarks.md ("CPU tuning") has the measurements. Not set for GPU
# workers, whose big buffers live on the device.
CPU_MALLOC_ENV: dict[str, str] = {
    "MALLOC_MMAP_THRESHOLD_": "2000000000",
    "MALLOC_TRIM_THRESHOLD_": "2000000000",
    "MALLOC_ARENA_MAX": "1",
}

_JOB_CONFIG_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for submitted drivers


def worker_env(gpu: bool = False) -> dict[str, str]:
    """Environment variables every worker of this job should get; ``gpu``: a GPU job, whose workers
    keep the allocator settings of their image (CPU_MALLOC_ENV is for CPU workers only)."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    if not gpu:
        for k, v in CPU_MALLOC_ENV.items():
            env.setdefault(k, os.environ.get(k, v))
    job_config = os.environ.get(_JOB_CONFIG_VAR)
    if job_config:
        try:
            job_env = json.loads(job_config).get("runtime_env", {}).get("env_vars", {}) or {}
        except (ValueError, AttributeError):
            job_env = {}
        env = {k: v for k, v in env.items() if k not in job_env}
    return env


def init_ray(address: str | None = None, quiet: bool = False, gpu: bool = False) -> None:
    """Connect to the cluster (RAY_ADDRESS, a running local one, or start one) once; ``gpu``: the
    job's heavy workers are GPU workers (worker_env). Unless --verbose (console.verbose), Ray
    logs from WARNING up and Ray Data draws no progress bars of its own (segray shows one per stage)."""
    import ray

    from segray import console

    if ray.is_initialized():
        return
    env = worker_env(gpu)
    ray.init(
        address=address,
        runtime_env={"env_vars": env} if env else None,
        logging_level=logging.WARNING if quiet or not console.verbose() else logging.INFO,
        log_to_driver=True,
    )
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = console.verbose()


# ----------------------------------------------------------------------------- where work runs


def node_id() -> str | None:
    """The Ray node id (hex) of the calling process: a task's, an actor's or the driver's node;
    None outside Ray. Stages record it next to the work they did (docs/design.md, "Nodes")."""
    import ray

    if not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_node_id()


class SharedStorageError(SegrayError, ValueError):
    """A local path given to a job whose cluster spans several machines."""


def local_path_problem(uris: dict[str, str | None], nodes: list[dict], driver_node: str | None,
                       driver_ip: str | None = None) -> str | None:
    """Why the ``uris`` (flag -> URI) cannot be used on a cluster of ``nodes`` (``ray.nodes()``
    entries), or None. A local path names a file on one machine: only a cluster whose alive nodes
    all have the address of the driver's node (``driver_node``'s, else ``driver_ip``) shares it,
    e.g. several nodes started on one machine. Anything else needs object storage."""
    local = [(flag, uri) for flag, uri in uris.items() if uri and not is_s3(uri)]
    if not local:
        return None
    alive = [n for n in nodes if n.get("Alive", n.get("alive", True))]
    ips = {n.get("NodeManagerAddress") for n in alive}
    here = next((n.get("NodeManagerAddress") for n in alive if n.get("NodeID") == driver_node), None) or driver_ip
    if ips <= {here}:
        return None
    flag, uri = local[0]
    others = f" (also for {', '.join(f for f, _ in local[1:])})" if len(local) > 1 else ""
    return (f"{flag} {uri}: a local path is not shared between nodes (the cluster has {len(alive)} nodes on "
            f"{len(ips | {here})} machines); use s3://bucket/prefix, which every node reads{others}")


def check_shared_storage(uris: dict[str, str | None]) -> None:
    """Refuse local paths (``uris``: flag -> URI) on a cluster whose nodes are not all on the driver's
    machine (local_path_problem); called by each stage right after it connects to Ray. Checks the
    nodes alive now: on an autoscaling cluster nodes that join later are not seen."""
    import ray

    if not ray.is_initialized() or all(not uri or is_s3(uri) for uri in uris.values()):
        return
    problem = local_path_problem(uris, ray.nodes(), node_id(), ray.util.get_node_ip_address())
    if problem:
        raise SharedStorageError(problem)
