"""A Ray cluster of several real nodes on this machine, for tests: cluster/local_multinode.py run
as a child process that this module drives through JSON lines (add a node, remove one, list them).

The test process itself stays connected to the session's single-node cluster (conftest.py's
``ray_cluster``; one process holds one Ray connection): the multi-node cluster lives in its own
process and the jobs under test reach it as subprocesses through RAY_ADDRESS, as a user's do.
Started after conftest's ``s3_server`` set the AWS_* variables, every node (and every worker it
forks) inherits them: the credentials never travel in a job's runtime_env. The child stops its
nodes when its stdin closes, so the cluster never outlives the test session, even a killed one.

    with start_cluster(nodes=2, cpus=2) as cluster:        # head (0 CPUs) + 2 worker nodes; after s3_server
        proc = cluster.run_job("infer", "--model", ..., "--num-replicas", "2")
        cluster.remove_node(node_id)                         # raylet and workers killed, not drained
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "cluster" / "local_multinode.py"


class MultiNodeCluster:
    """A running cluster/local_multinode.py --control child: its address, its nodes, and commands."""

    def __init__(self, nodes: int = 2, cpus: float = 2, head_cpus: float = 0, object_store_mb: int = 150,
                 timeout: float = 300) -> None:
        # Short on purpose: Ray's socket paths below it must fit in 107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="segray-mn-", dir="/tmp")
        env = {**os.environ, "RAY_AUTH_MODE": "token", "PYTHONUNBUFFERED": "1"}
        env.pop("RAY_ADDRESS", None)
        self._log = open(os.path.join(self.temp_dir, "holder.log"), "w")  # noqa: SIM115 - closed in shutdown
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--control", "--nodes", str(nodes), "--cpus", str(cpus),
             "--head-cpus", str(head_cpus), "--object-store-mb", str(object_store_mb), "--temp-dir", self.temp_dir],
            cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
        )
        self._replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            first = self._reply(timeout)
        except BaseException:
            self.shutdown()
            raise
        self.address: str = first["address"]
        self.nodes: list[dict] = first["nodes"]

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self._replies.put(json.loads(line))
            except ValueError:  # a line that is not the holder's (something printed on its stdout)
                continue
        self._replies.put(None)

    def _reply(self, timeout: float) -> dict:
        try:
            reply = self._replies.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"local_multinode.py did not answer in {timeout:g} s:\n{self.log()}") from None
        if reply is None:
            raise AssertionError(f"local_multinode.py exited ({self.proc.poll()}):\n{self.log()}")
        if "error" in reply:
            raise AssertionError(f"local_multinode.py: {reply['error']}")
        return reply

    def _command(self, timeout: float = 300, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._reply(timeout)

    def log(self) -> str:
        return Path(self.temp_dir, "holder.log").read_text()[-4000:]

    # -- nodes
    @property
    def workers(self) -> list[dict]:
        return [n for n in self.nodes if not n["head"]]

    def add_node(self, cpus: float = 2, ip: str | None = None, resources: dict | None = None) -> dict:
        """A new worker node (``ip``: the address its raylet binds and announces, e.g. 127.0.0.2)."""
        (node,) = self._command(cmd="add", cpus=cpus, ip=ip, resources=resources or {})["nodes"]
        self.nodes.append(node)
        return node

    def remove_node(self, node_id: str) -> float:
        """Kill a worker node (its raylet and workers, no graceful shutdown); returns the seconds it took."""
        seconds = self._command(cmd="remove", node_id=node_id)["seconds"]
        self.nodes = [n for n in self.nodes if n["node_id"] != node_id]
        return seconds

    # -- jobs
    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a job run against this cluster (token auth on, RAY_ADDRESS set)."""
        return {**os.environ, "RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token", "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": str(REPO), **extra}

    def job_command(self, name: str, *args: str) -> list[str]:
        return [sys.executable, str(REPO / "jobs" / f"{name}.py"), *args]

    def run_job(self, name: str, *args: str, timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.job_command(name, *args), cwd=REPO, env=self.env(), capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"jobs/{name}.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        return proc

    def start_job(self, name: str, *args: str, stdout=None) -> subprocess.Popen:
        """A job running in the background (e.g. to remove a node under it); stdout and stderr to ``stdout``."""
        return subprocess.Popen(self.job_command(name, *args), cwd=REPO, env=self.env(), text=True,
                                stdout=stdout or subprocess.PIPE, stderr=subprocess.STDOUT)

    # -- the end
    def shutdown(self, timeout: float = 120) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # the holder stops its nodes when stdin closes
            except OSError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # its reaper processes end the nodes it started
                self.proc.wait(timeout=30)
        self._log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> MultiNodeCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def start_cluster(nodes: int = 2, cpus: float = 2, head_cpus: float = 0, **kwargs) -> MultiNodeCluster:
    """A head with ``head_cpus`` CPUs and ``nodes`` worker nodes of ``cpus`` CPUs each, all on this machine."""
    return MultiNodeCluster(nodes=nodes, cpus=cpus, head_cpus=head_cpus, **kwargs)


def node_ids(column) -> set[str]:
    """The distinct non-null node ids of a column (a pyarrow array or a list)."""
    values = column.to_pylist() if hasattr(column, "to_pylist") else list(column)
    return {v for v in values if v}
