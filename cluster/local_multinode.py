#!/usr/bin/env python
"""A Ray cluster of several nodes on this one machine: a head and N worker nodes, each a real
raylet with its own CPUs (ray.cluster_utils.Cluster), token authentication on.

    python cluster/local_multinode.py [--nodes 2] [--cpus 2] [--head-cpus 0] [--temp-dir DIR]
    python cluster/local_multinode.py --stop [--temp-dir DIR]

It prints the cluster's address and how to run the jobs against it, then holds the cluster
until Ctrl-C or SIGTERM (or `--stop` from another shell), and stops exactly its own processes
(by the pids it started, never by a command that stops every Ray process of the user on the
machine). With the
head's 0 CPUs (the default) all the work lands on the worker nodes, as on a real cluster whose
head only runs the GCS and the drivers.

Every node inherits this shell's environment: export AWS_ENDPOINT_URL / AWS_REGION and the
credentials (or let an instance role provide them) before starting it, as for cluster/local-head.sh.
All nodes are on this machine, so local paths are readable by every node (segray's local-path
check allows them here); on a cluster of several machines use s3://.

``--control`` (tests/multinode.py): human lines go to stderr; stdout carries one JSON object
per line, first ``{"address": ..., "temp_dir": ..., "nodes": [...]}``, then one reply per JSON
command read from stdin: ``{"cmd": "nodes"}``, ``{"cmd": "add", "cpus": 2, "ip": "127.0.0.2",
"resources": {...}}``, ``{"cmd": "remove", "node_id": "..."}`` (the node's processes are killed,
raylet first: a node lost, not drained), ``{"cmd": "stop"}``. The cluster also stops when stdin
closes, so it never outlives the process that controls it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STATE_FILE = "local_multinode.json"  # in --temp-dir: the pid of the process holding the cluster, the address
# Unix socket paths (<temp dir>/ray/session_<date>_<pid>/sockets/plasma_store) must stay under 107 bytes.
MAX_TEMP_DIR = 48
DEFAULT_TEMP_DIR = os.path.join(tempfile.gettempdir(), "segray-multinode")


def fail(message: str) -> None:
    print(f"local_multinode: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def ensure_token_auth() -> str:
    """RAY_AUTH_MODE=token for this process and every node; a token in the usual place. Returns
    where the token is (never the token). Must run before ray is imported."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode and mode != "token":
        fail(f"RAY_AUTH_MODE={mode}; this cluster runs with token authentication only (unset it)")
    os.environ["RAY_AUTH_MODE"] = "token"
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "the RAY_AUTH_TOKEN variable of this shell"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"{os.environ['RAY_AUTH_TOKEN_PATH']} (RAY_AUTH_TOKEN_PATH)"
    default = Path.home() / ".ray" / "auth_token"
    if not (default.is_file() and default.stat().st_size):
        # The nodes started here (unlike ray.init) do not create a token: Ray's CLI writes one.
        ray_cli = shutil.which("ray")
        cmd = [ray_cli] if ray_cli else [sys.executable, "-m", "ray.scripts.scripts"]
        subprocess.run([*cmd, "get-auth-token", "--generate"], stdout=subprocess.DEVNULL, check=True)
        default.chmod(0o600)
    return str(default)


class Holder:
    """The cluster and its nodes, by node id."""

    def __init__(self, temp_dir: str, head_cpus: float, object_store_mb: int) -> None:
        import logging

        from ray.cluster_utils import Cluster

        logging.getLogger("ray").setLevel(logging.WARNING)  # not Ray's INFO lines about each node

        self.object_store = object_store_mb * 1024 * 1024
        self.cluster = Cluster(
            initialize_head=True,
            shutdown_at_exit=True,
            head_node_args={"num_cpus": head_cpus, "include_dashboard": False, "temp_dir": temp_dir,
                            "object_store_memory": self.object_store},
        )
        self.nodes = {self.cluster.head_node.node_id: self._describe(self.cluster.head_node, head_cpus, {}, True)}

    @staticmethod
    def _describe(node, cpus: float, resources: dict, head: bool = False) -> dict:
        return {"node_id": node.node_id, "ip": node.node_ip_address, "cpus": cpus, "resources": resources,
                "head": head, "pid": _raylet_pid(node)}

    def add(self, count: int = 1, cpus: float = 2, ip: str | None = None, resources: dict | None = None) -> list[dict]:
        """``count`` worker nodes, started together; returns them once all are alive."""
        args = {"num_cpus": cpus, "object_store_memory": self.object_store, "resources": resources or {}}
        if ip:
            args["node_ip_address"] = ip
        added = [self.cluster.add_node(wait=False, **args) for _ in range(count)]
        self.cluster.wait_for_nodes(timeout=300)
        out = []
        for node in added:
            self.nodes[node.node_id] = self._describe(node, cpus, resources or {})
            out.append(self.nodes[node.node_id])
        return out

    def remove(self, node_id: str) -> float:
        """Kill a worker node's processes (no graceful shutdown); returns the seconds it took."""
        node = next((n for n in self.cluster.worker_nodes if n.node_id == node_id), None)
        if node is None:
            raise ValueError(f"no worker node {node_id} (the head cannot be removed)")
        start = time.monotonic()
        self.cluster.remove_node(node, allow_graceful=False)
        self.nodes.pop(node_id, None)
        return time.monotonic() - start

    def shutdown(self) -> None:
        self.cluster.shutdown()


def _raylet_pid(node) -> int | None:
    try:
        return node.all_processes["raylet"][0].process.pid
    except (KeyError, IndexError, AttributeError):
        return None


def serve(holder: Holder, out) -> None:
    """--control: one JSON command a line on stdin, one JSON reply a line on ``out``."""
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            cmd = json.loads(line)
            name = cmd.get("cmd")
            if name == "nodes":
                reply = {"nodes": list(holder.nodes.values())}
            elif name == "add":
                reply = {"nodes": holder.add(int(cmd.get("count", 1)), cmd.get("cpus", 2), cmd.get("ip"),
                                             cmd.get("resources"))}
            elif name == "remove":
                reply = {"removed": cmd["node_id"], "seconds": holder.remove(cmd["node_id"])}
            elif name == "stop":
                return
            else:
                reply = {"error": f"unknown command {name!r}"}
        except Exception as e:  # noqa: BLE001 - the controller reads the error
            reply = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply), file=out, flush=True)


def stop(temp_dir: str, grace: float) -> int:
    """Stop the cluster that holds ``temp_dir``: SIGTERM to its holding process, which shuts the nodes down."""
    state_file = Path(temp_dir) / STATE_FILE
    if not state_file.is_file():
        print(f"local_multinode: no cluster uses {temp_dir}; nothing to stop")
        return 0
    state = json.loads(state_file.read_text())
    pid = int(state["pid"])
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        cmdline = ""
    if "local_multinode" not in cmdline:  # gone, or the pid now belongs to another program
        state_file.unlink(missing_ok=True)
        print(f"local_multinode: the cluster of {temp_dir} (pid {pid}) is not running any more")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.2)
    if Path(f"/proc/{pid}").exists():
        print(f"local_multinode: pid {pid} still runs after {grace:g} s; kill it with: kill -KILL {pid}")
        return 1
    print(f"local_multinode: stopped the cluster at {state.get('address')} ({temp_dir})")
    return 0


def usage_text(address: str, nodes: list[dict], temp_dir: str, token: str) -> str:
    workers = [n for n in nodes if not n["head"]]
    n = max(1, len(workers))
    head = next(n for n in nodes if n["head"])
    aws = " ".join(sorted(k for k in os.environ if k.startswith("AWS_"))) or "none"
    node_lines = "\n".join(
        f"    {'head  ' if d['head'] else 'worker'} {d['node_id'][:12]}  {d['ip']}  {d['cpus']:g} CPUs" for d in nodes)
    return f"""
segray: Ray cluster on this machine: a head ({head['cpus']:g} CPUs) and {len(workers)} worker nodes, token auth on
  address:   {address}
  nodes:
{node_lines}
  token:     {token}
  AWS_* set: {aws} (inherited by every node)
  temp dir:  {temp_dir} (logs: {temp_dir}/ray/session_latest/logs)

Run the jobs from the repository root, in another shell on this machine:

  export RAY_AUTH_MODE=token RAY_ADDRESS={address}
  python jobs/prepare.py --source s3://BUCKET/camvid --dest s3://BUCKET/prepared --size 176x240
  python jobs/train.py --data s3://BUCKET/prepared --storage s3://BUCKET/runs --name r --num-workers {n}
  python jobs/infer.py --model s3://BUCKET/runs/r --images s3://BUCKET/camvid/test --output s3://BUCKET/pred --num-replicas {n}

Stop it with Ctrl-C here, or: python cluster/local_multinode.py --stop --temp-dir {temp_dir}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2, help="worker nodes (default %(default)s)")
    parser.add_argument("--cpus", type=float, default=2, help="CPUs of each worker node (default %(default)s)")
    parser.add_argument("--head-cpus", type=float, default=0,
                        help="CPUs of the head (default %(default)s: the work runs on the worker nodes)")
    parser.add_argument("--object-store-mb", type=int, default=256,
                        help="object store of each node, MiB (default %(default)s)")
    parser.add_argument("--temp-dir", default=DEFAULT_TEMP_DIR,
                        help=f"this cluster's own folder: sessions, logs, its state file (default %(default)s; at most "
                        f"{MAX_TEMP_DIR} characters)")
    parser.add_argument("--stop", action="store_true", help="stop the cluster that uses --temp-dir, and exit")
    parser.add_argument("--grace", type=float, default=60, help="--stop: seconds to wait (default %(default)s)")
    parser.add_argument("--control", action="store_true",
                        help="for tests: JSON on stdout, commands on stdin; the cluster stops when stdin closes")
    args = parser.parse_args(argv)
    temp_dir = os.path.abspath(args.temp_dir)
    if args.stop:
        return stop(temp_dir, args.grace)
    if args.nodes < 0 or args.cpus <= 0 or args.head_cpus < 0:
        fail("--nodes must be at least 0, --cpus positive, --head-cpus at least 0")
    if len(temp_dir) > MAX_TEMP_DIR:
        fail(f"--temp-dir {temp_dir} is {len(temp_dir)} characters; Ray's socket paths below it need one of at most "
             f"{MAX_TEMP_DIR}")
    state_file = Path(temp_dir) / STATE_FILE
    if state_file.is_file():
        fail(f"{state_file} exists: a cluster may already use {temp_dir}; stop it with --stop --temp-dir {temp_dir}")

    token = ensure_token_auth()
    # Ray's default temp dir (its ray_current_cluster file, which `ray.init(address="auto")` reads)
    # is RAY_TMPDIR/ray: inside our folder, so another Ray on this machine is not redirected to us.
    os.makedirs(os.path.join(temp_dir, "ray"), exist_ok=True)
    os.environ["RAY_TMPDIR"] = temp_dir
    human = sys.stderr if args.control else sys.stdout
    out = sys.stdout

    def on_term(signum, frame):  # SIGTERM (--stop) ends the cluster like Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    holder = None
    try:
        start = time.monotonic()
        holder = Holder(os.path.join(temp_dir, "ray"), args.head_cpus, args.object_store_mb)
        if args.nodes:
            holder.add(args.nodes, args.cpus)
        address = holder.cluster.address
        nodes = list(holder.nodes.values())
        state_file.write_text(json.dumps({"pid": os.getpid(), "address": address, "nodes": nodes}, indent=2) + "\n")
        print(f"local_multinode: {len(nodes)} nodes up in {time.monotonic() - start:.1f} s", file=human, flush=True)
        if args.control:
            print(json.dumps({"address": address, "temp_dir": temp_dir, "nodes": nodes}), file=out, flush=True)
            serve(holder, out)
        else:
            print(usage_text(address, nodes, temp_dir, token), file=human, flush=True)
            signal.pause() if hasattr(signal, "pause") else time.sleep(1 << 30)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish the shutdown below once it has begun
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if holder is not None:
            holder.shutdown()
        state_file.unlink(missing_ok=True)
        print("local_multinode: stopped", file=human, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
