"""Static checks of cluster/: the configs parse, carry the fields their tools need, keep token
authentication on, hold no credential, and every `python jobs/NAME.py ...` they name is a real
script called with flags it accepts. No Ray cluster, no network; a few seconds in all.

The checking helpers (``job_command_problems``, ``auth_problems``, ``credential_problems``) return
lists of problems, so that the tests at the bottom can show that each one does catch a bad config.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="pyyaml is a test extra: pip install -e '.[test]'")

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
JOBS = REPO / "jobs"

YAML_FILES = sorted(CLUSTER.rglob("*.yaml"))
TEXT_FILES = sorted(p for p in CLUSTER.rglob("*") if p.is_file() and p.suffix in {".yaml", ".md", ".sh"})
SHELL_FILES = sorted(CLUSTER.glob("*.sh"))
KUBERAY = CLUSTER / "kuberay"

# Field names of the ray.io/v1 CRDs (KubeRay v1.5+ api/ray/v1 types), to catch misspelt fields:
# the API server would drop an unknown field of a CR without a word.
RAYCLUSTER_SPEC_FIELDS = {
    "upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations",
    "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "historyServerOptions", "networkPolicy", "tlsOptions",
    "headGroupSpec", "rayVersion", "workerGroupSpecs",
}
HEAD_GROUP_FIELDS = {
    "template", "headService", "enableIngress", "ingressOptions", "resources", "labels", "rayStartParams",
    "serviceType",
}
WORKER_GROUP_FIELDS = {
    "suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds", "priority", "resources",
    "labels", "rayStartParams", "template", "scaleStrategy", "numOfHosts",
}
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata", "clusterSelector",
    "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode",
    "entrypointResources", "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes", "suspend", "schedule",
}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
AUTOSCALER_OPTION_FIELDS = {
    "resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds", "upscalingMode", "version",
    "env", "envFrom", "volumeMounts", "command", "args",
}

GPU_INSTANCE = re.compile(r"^(g\d+[a-z]*|p\d+[a-z]*)\.")  # g4dn, g5, g6, g6e, p4d, p5 ...
CREDENTIAL_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN"}


# --------------------------------------------------------------------------------------------
# Reading the configs


def load_documents(path: Path) -> list[dict]:
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    assert docs, f"{path.relative_to(REPO)} is empty"
    return docs


def walk_strings(node) -> list[str]:
    """Every string value (not key) in a parsed YAML tree, nested YAML strings included."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in walk_strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in walk_strings(v)]
    return []


def pyproject_dependencies() -> list[str]:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["dependencies"]


def ray_series() -> str:
    """The Ray minor series pyproject.toml pins, e.g. '2.60'."""
    ray_dep = next(d for d in pyproject_dependencies() if re.match(r"ray\b", d))
    m = re.search(r">=\s*(\d+\.\d+)", ray_dep)
    assert m, f"cannot read the pinned Ray version from {ray_dep!r}"
    return m.group(1)


def _project_name(requirement: str) -> str:
    return re.split(r"[\[<>=!~;\s]", requirement, maxsplit=1)[0].lower()


# --------------------------------------------------------------------------------------------
# Job commands: `python jobs/NAME.py --flag ...`

# Lower-case script names only: `jobs/NAME.py` in prose is a placeholder, not a command.
_COMMAND = re.compile(r"python3?\s+jobs/([a-z][a-z0-9_]*)\.py\b([^\n;&|`'\")]*)")


def find_job_commands(text: str) -> list[str]:
    """`python jobs/NAME.py ...` commands in a text; shell line continuations are joined."""
    joined = re.sub(r"\\+[ \t]*\n[ \t]*", " ", text)
    return [" ".join(m.group(0).split()) for m in _COMMAND.finditer(joined)]


def commands_in_file(path: Path) -> list[str]:
    text = path.read_text()
    if path.suffix != ".yaml":
        return list(dict.fromkeys(find_job_commands(text)))
    # In YAML, the comments as written, and the values once parsed: a folded scalar
    # (entrypoint: >- ...) is one command spread over several lines.
    comments = "\n".join(line.strip()[1:] for line in text.splitlines() if line.strip().startswith("#"))
    found = find_job_commands(comments)
    for doc in load_documents(path):
        for s in walk_strings(doc):
            found += find_job_commands(s)
    return list(dict.fromkeys(found))


@functools.lru_cache(maxsize=None)
def job_help(script: str) -> str:
    """`python jobs/<script>.py --help`, on one wide line per option."""
    proc = subprocess.run(
        [sys.executable, str(JOBS / f"{script}.py"), "--help"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "COLUMNS": "1000"},  # no wrapping inside option names or the usage line
    )
    assert proc.returncode == 0, f"jobs/{script}.py --help exited {proc.returncode}: {proc.stderr[-2000:]}"
    return proc.stdout


def accepted_flags(help_text: str) -> set[str]:
    """Long options from the option lines of an argparse help ('  --name NAME   text')."""
    flags: set[str] = set()
    for line in help_text.splitlines():
        m = re.match(r"^\s{1,8}(-[^\s].*?)(?:\s{2,}|$)", line)
        if m:
            flags.update(re.findall(r"--[A-Za-z0-9][\w-]*", m.group(1)))
    return flags


def required_flags(help_text: str) -> list[set[str]]:
    """Required options from the usage line: each set holds alternatives, one of which must appear."""
    usage = help_text.split("\n\n", 1)[0].replace("\n", " ")
    while re.search(r"\[[^\[\]]*\]", usage):
        usage = re.sub(r"\[[^\[\]]*\]", " ", usage)  # optional groups, innermost first
    groups = [set(re.findall(r"--[\w-]+", g)) for g in re.findall(r"\(([^()]*)\)", usage)]
    usage = re.sub(r"\([^()]*\)", " ", usage)
    return groups + [{flag} for flag in re.findall(r"--[\w-]+", usage)]


def job_command_problems(command: str) -> list[str]:
    """What is wrong with a `python jobs/NAME.py ...` command: missing script, unknown or missing flags."""
    m = re.match(r"python3?\s+jobs/([A-Za-z0-9_]+)\.py\b(.*)$", command.strip(), re.S)
    if not m:
        return [f"not a `python jobs/NAME.py` command: {command!r}"]
    script, rest = m.group(1), m.group(2)
    if not (JOBS / f"{script}.py").is_file():
        return [f"jobs/{script}.py does not exist"]
    try:
        tokens = shlex.split(rest)
    except ValueError as e:
        return [f"cannot split {command!r}: {e}"]
    passed = {t.split("=", 1)[0] for t in tokens if t.startswith("--")}
    help_text = job_help(script)
    accepted = accepted_flags(help_text)
    problems = [f"jobs/{script}.py does not accept {flag} (it accepts {sorted(accepted)})"
                for flag in sorted(passed - accepted)]
    if "--help" not in passed and "..." not in tokens:  # an elided example names only some flags
        problems += [f"jobs/{script}.py requires {' or '.join(sorted(group))}"
                     for group in required_flags(help_text) if not group & passed]
    return problems


# --------------------------------------------------------------------------------------------
# Authentication and credentials

_AUTH_OFF = re.compile(r"RAY_AUTH_MODE\W{0,3}\s*[=:]\s*[\"']?disabled", re.I)


def auth_problems(text: str, docs: list | None = None) -> list[str]:
    """Anything that would switch Ray token authentication off."""
    problems = [f"disables token auth: {m.group(0)!r}" for m in _AUTH_OFF.finditer(text)]
    for doc in docs or []:
        for node in _walk_dicts(doc):
            if node.get("name") == "RAY_AUTH_MODE" and str(node.get("value", "token")).lower() != "token":
                problems.append(f"container env RAY_AUTH_MODE={node.get('value')!r}")
            auth = node.get("authOptions")
            if isinstance(auth, dict) and auth.get("mode", "token") != "token":
                problems.append(f"authOptions.mode is {auth.get('mode')!r}, not 'token'")
    return problems


def credential_problems(text: str, is_config: bool, docs: list | None = None) -> list[str]:
    """Credentials, or places where credentials would go, in a file meant for a repository."""
    problems = []
    if m := re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text):
        problems.append(f"an AWS access key id: {m.group(0)[:8]}...")
    if re.search(r"\b[0-9a-f]{64}\b", text):
        problems.append("a 64-hex-digit string (the shape of a Ray auth token)")
    if re.search(r"(AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN|RAY_AUTH_TOKEN)\s*[=:]\s*[\"']?[A-Za-z0-9/+]{8,}", text):
        problems.append("a credential variable set to a literal value")
    if is_config:
        for word in ("aws_access_key", "secret"):
            if word in text.lower():
                problems.append(f"the word {word!r} (configs hold no credentials, not even by reference)")
    for doc in docs or []:
        for node in _walk_dicts(doc):
            if node.get("name") in CREDENTIAL_ENV and "value" in node:
                problems.append(f"container env {node['name']} with a literal value")
            env_vars = node.get("env_vars")
            if isinstance(env_vars, dict) and CREDENTIAL_ENV & set(env_vars):
                problems.append(f"runtime_env env_vars carry {sorted(CREDENTIAL_ENV & set(env_vars))}")
    return problems


def _walk_dicts(node):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk_dicts(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk_dicts(v)


def _parsed_with_nested(path: Path) -> list:
    """A file's YAML documents plus the runtime environments nested in them as YAML strings."""
    if path.suffix != ".yaml":
        return []
    docs = load_documents(path)
    nested = [yaml.safe_load(d["spec"]["runtimeEnvYAML"]) for d in docs
              if isinstance(d.get("spec"), dict) and "runtimeEnvYAML" in d["spec"]]
    return docs + nested


# --------------------------------------------------------------------------------------------
# Every file


def test_cluster_folder_has_the_documented_files():
    expected = {"README.md", "local-head.sh", "stop.sh", "aws.yaml", "kuberay/raycluster.yaml",
                "kuberay/rayjob-train.yaml", "kuberay/rayjob-infer.yaml"}
    present = {str(p.relative_to(CLUSTER)) for p in CLUSTER.rglob("*") if p.is_file()}
    assert expected <= present, f"missing in cluster/: {sorted(expected - present)}"


def test_readme_explains_every_file():
    readme = (CLUSTER / "README.md").read_text()
    files = [p.relative_to(CLUSTER) for p in CLUSTER.rglob("*") if p.is_file() and p.name != "README.md"]
    unexplained = [str(f) for f in files if f"`{f}`" not in readme]
    assert not unexplained, f"cluster/README.md does not mention {unexplained}"


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_yaml_parses(path):
    for doc in load_documents(path):
        assert isinstance(doc, dict), f"{path.name}: a document is a {type(doc).__name__}, not a mapping"


@pytest.mark.parametrize("path", TEXT_FILES, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_token_auth_stays_on(path):
    problems = auth_problems(path.read_text(), _parsed_with_nested(path))
    assert not problems, f"{path.relative_to(REPO)}: {problems}"


@pytest.mark.parametrize("path", TEXT_FILES, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_no_credentials(path):
    problems = credential_problems(path.read_text(), path.suffix == ".yaml", _parsed_with_nested(path))
    assert not problems, f"{path.relative_to(REPO)}: {problems}"


# --------------------------------------------------------------------------------------------
# Job commands named anywhere in cluster/

JOB_COMMANDS = [(path, cmd) for path in TEXT_FILES for cmd in commands_in_file(path)]


def test_configs_name_every_stage():
    scripts = {re.match(r"python3?\s+jobs/(\w+)\.py", c).group(1) for _, c in JOB_COMMANDS}
    assert {"prepare", "train", "infer"} <= scripts, f"cluster/ names only {sorted(scripts)}"
    entrypoints = {p.name for p, c in JOB_COMMANDS if p.parent == KUBERAY}
    assert {"rayjob-train.yaml", "rayjob-infer.yaml"} <= entrypoints


@pytest.mark.parametrize(
    "path,command", JOB_COMMANDS,
    ids=[f"{p.relative_to(CLUSTER)}:{c.split()[1]}#{i}" for i, (p, c) in enumerate(JOB_COMMANDS)],
)
def test_job_command_is_accepted_by_its_script(path, command):
    problems = job_command_problems(command)
    assert not problems, f"{path.relative_to(REPO)}: {command!r}: {problems}"


def test_runtime_env_json_in_docs_is_valid():
    from ray.runtime_env import RuntimeEnv

    found = 0
    for path in TEXT_FILES:
        text = re.sub(r"\\+[ \t]*\n[ \t]*", " ", path.read_text())
        for raw in re.findall(r"--runtime-env-json\s+'([^']*)'", text):
            if "..." in raw:
                continue  # an elided example, not a command to run
            found += 1
            env = json.loads(raw)
            RuntimeEnv(**env)
            assert not CREDENTIAL_ENV & set(env.get("env_vars", {})), f"{path.name}: credentials in {raw}"
    assert found, "no --runtime-env-json example in cluster/"


# --------------------------------------------------------------------------------------------
# Local head scripts


@pytest.mark.parametrize("path", SHELL_FILES, ids=lambda p: p.name)
def test_shell_scripts_are_valid_and_executable(path):
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert os.access(path, os.X_OK), f"{path.relative_to(REPO)} is not executable (chmod +x)"
    assert path.read_text().startswith("#!/usr/bin/env bash"), f"{path.name}: no bash shebang"
    help_proc = subprocess.run(["bash", str(path), "--help"], capture_output=True, text=True, timeout=30)
    assert help_proc.returncode == 0 and help_proc.stdout.strip(), f"{path.name} --help: {help_proc.stderr}"


def test_local_head_keeps_token_auth_on():
    script = (CLUSTER / "local-head.sh").read_text()
    assert "export RAY_AUTH_MODE=token" in script
    assert "ray get-auth-token --generate" in script  # `ray start` does not create a token
    assert re.search(r"--dashboard-host 127\.0\.0\.1", script)
    assert "--node-ip-address 127.0.0.1" in script


def test_local_head_refuses_auth_off(tmp_path):
    # Refused before Ray is touched: nothing starts.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run(["bash", str(CLUSTER / "local-head.sh"), "--temp-dir", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode != 0 and "token" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_stop_touches_nothing_without_its_head(tmp_path):
    proc = subprocess.run(["bash", str(CLUSTER / "stop.sh"), "--temp-dir", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "nothing to stop" in proc.stdout
    assert "ray stop" not in re.sub(r"#.*", "", (CLUSTER / "stop.sh").read_text())


# --------------------------------------------------------------------------------------------
# AWS cluster launcher


@pytest.fixture(scope="module")
def aws():
    (config,) = load_documents(CLUSTER / "aws.yaml")
    return config


def test_aws_passes_the_launcher_schema(aws):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(aws))  # Ray's own ray-schema.json, with its AWS defaults merged


def test_aws_node_types(aws):
    assert aws["cluster_name"]
    assert aws["provider"]["type"] == "aws" and aws["provider"]["region"]
    types = aws["available_node_types"]
    assert aws["head_node_type"] in types, f"head_node_type {aws['head_node_type']!r} not in {sorted(types)}"
    head = types[aws["head_node_type"]]
    assert not GPU_INSTANCE.match(head["node_config"]["InstanceType"]), "the head should be a CPU instance"

    workers = {name: t for name, t in types.items() if name != aws["head_node_type"]}
    gpu = {n: t for n, t in workers.items() if GPU_INSTANCE.match(t["node_config"]["InstanceType"])}
    assert gpu, f"no GPU instance type among the workers: {[t['node_config']['InstanceType'] for t in workers.values()]}"
    for name, t in gpu.items():
        assert t.get("max_workers", 0) > 0, f"{name}: max_workers must be > 0"
        assert t.get("min_workers", 0) <= t["max_workers"]
        assert t.get("resources", {}).get("GPU", 1) >= 1, f"{name}: advertises no GPU"
    assert aws["max_workers"] >= max(t["max_workers"] for t in gpu.values())
    for name, t in types.items():
        profile = t["node_config"].get("IamInstanceProfile")
        assert profile and (profile.get("Name") or profile.get("Arn")), f"{name}: no IamInstanceProfile (S3 access)"


def test_aws_token_auth_and_image(aws):
    run_options = " ".join(aws["docker"].get("run_options", []))
    assert "RAY_AUTH_MODE=token" in run_options
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in aws[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), f"{key}: ray start without token auth"
    mounts = aws["file_mounts"]
    assert any(remote.endswith("/.ray/auth_token") for remote in mounts), "the token is not mounted on the nodes"
    assert all(not local.startswith(str(REPO)) for local in mounts.values())
    image = aws["docker"]["image"]
    assert re.match(rf"rayproject/ray(-ml)?:{re.escape(ray_series())}\.\d+", image), f"{image} is not Ray {ray_series()}"


def test_aws_setup_keeps_the_image_torch(aws):
    commands = aws.get("setup_commands", []) + aws.get("worker_setup_commands", []) + aws.get("head_setup_commands", [])
    for cmd in commands:
        if "pip install" not in cmd:
            continue
        assert not re.search(r"(\s-U\b|--upgrade|--force-reinstall)", cmd), f"reinstalls packages: {cmd}"
        if "torch" in cmd.split("pip install", 1)[1]:
            assert re.search(r"import torch.*\|\|\s*pip install", cmd), f"installs torch over the image's: {cmd}"
    assert any(re.search(r"pip install .*(-e )?/home/ray/segray", c) for c in commands), "the project is not installed"


# --------------------------------------------------------------------------------------------
# KubeRay


def _cluster_specs(doc: dict) -> dict:
    if doc["kind"] == "RayCluster":
        return doc["spec"]
    return doc["spec"]["rayClusterSpec"]


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _gpus(group: dict) -> int:
    return sum(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) for c in _containers(group))


KUBERAY_FILES = {"raycluster.yaml": "RayCluster", "rayjob-train.yaml": "RayJob", "rayjob-infer.yaml": "RayJob"}


@pytest.mark.parametrize("name,kind", KUBERAY_FILES.items())
def test_kuberay_manifest(name, kind):
    (doc,) = load_documents(KUBERAY / name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    assert doc["metadata"].get("name") or doc["metadata"].get("generateName")
    spec = _cluster_specs(doc)
    assert set(spec) <= RAYCLUSTER_SPEC_FIELDS, f"unknown RayCluster fields {set(spec) - RAYCLUSTER_SPEC_FIELDS}"
    assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER_OPTION_FIELDS
    assert set(spec["headGroupSpec"]) <= HEAD_GROUP_FIELDS
    assert spec["rayVersion"].startswith(ray_series() + "."), f"rayVersion {spec['rayVersion']} is not {ray_series()}"
    assert spec.get("authOptions", {}).get("mode") == "token", "token auth must be on (authOptions.mode: token)"

    groups = spec["workerGroupSpecs"]
    for g in groups:
        assert set(g) <= WORKER_GROUP_FIELDS, f"{g.get('groupName')}: unknown fields {set(g) - WORKER_GROUP_FIELDS}"
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
    gpu_groups = [g for g in groups if _gpus(g) > 0]
    assert gpu_groups, "no worker group with an nvidia.com/gpu limit"
    assert all(g["maxReplicas"] > 0 for g in gpu_groups)

    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in groups]
    for t in templates:
        for c in t["spec"]["containers"]:
            assert re.match(rf"rayproject/ray(-ml)?:{re.escape(ray_series())}\.\d+", c["image"]), c["image"]
        assert t["spec"].get("serviceAccountName") == _service_account_name(), "pods must use the IRSA service account"


@functools.lru_cache(maxsize=None)
def _service_account_name() -> str:
    (sa,) = load_documents(KUBERAY / "serviceaccount.yaml")
    assert sa["kind"] == "ServiceAccount"
    assert "eks.amazonaws.com/role-arn" in sa["metadata"].get("annotations", {}), "no IRSA role on the service account"
    return sa["metadata"]["name"]


@pytest.mark.parametrize("name,script", [("rayjob-train.yaml", "train"), ("rayjob-infer.yaml", "infer")])
def test_rayjob(name, script):
    from ray.runtime_env import RuntimeEnv

    (doc,) = load_documents(KUBERAY / name)
    spec = doc["spec"]
    assert set(spec) <= RAYJOB_SPEC_FIELDS, f"unknown RayJob fields {set(spec) - RAYJOB_SPEC_FIELDS}"
    assert spec["entrypoint"].startswith(f"python jobs/{script}.py ")
    assert "s3://" in spec["entrypoint"]
    assert spec.get("submissionMode", "K8sJobMode") in SUBMISSION_MODES
    assert spec["shutdownAfterJobFinishes"] is True  # a batch job must not leave a GPU cluster behind
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    RuntimeEnv(**env)
    assert env.get("working_dir"), "the job's code must reach the cluster (runtime_env working_dir)"

    tokens = shlex.split(spec["entrypoint"])
    if script == "train" and "--use-gpu" in tokens and "--num-workers" in tokens:
        workers = int(tokens[tokens.index("--num-workers") + 1])
        gpus = sum(g["maxReplicas"] * _gpus(g) for g in spec["rayClusterSpec"]["workerGroupSpecs"])
        assert workers <= gpus, f"--num-workers {workers} with --use-gpu needs {workers} GPUs; the cluster has {gpus}"


def test_pip_lists_match_pyproject():
    """runtime-env.yaml and the RayJobs install pyproject's dependencies, minus Ray (the image's)."""
    expected = sorted(d.replace(" ", "") for d in pyproject_dependencies() if _project_name(d) != "ray")
    envs = {"runtime-env.yaml": load_documents(CLUSTER / "runtime-env.yaml")[0]}
    for name in ("rayjob-train.yaml", "rayjob-infer.yaml"):
        envs[name] = yaml.safe_load(load_documents(KUBERAY / name)[0]["spec"]["runtimeEnvYAML"])
    for name, env in envs.items():
        pip = env["pip"]["packages"] if isinstance(env["pip"], dict) else env["pip"]
        assert sorted(p.replace(" ", "") for p in pip) == expected, f"{name}: pip {pip} != pyproject {expected}"


# --------------------------------------------------------------------------------------------
# The checkers themselves catch what they are for


def test_checker_reports_an_unknown_flag():
    problems = job_command_problems("python jobs/prepare.py --source s3://b/c --dest s3://b/d --made-up-flag 3")
    assert len(problems) == 1 and "--made-up-flag" in problems[0]


def test_checker_reports_a_missing_required_flag_and_a_missing_script():
    assert any("--source" in p for p in job_command_problems("python jobs/prepare.py --dest s3://b/d"))
    assert job_command_problems("python jobs/no_such_stage.py --x 1") == ["jobs/no_such_stage.py does not exist"]
    assert job_command_problems("python jobs/prepare.py --source a --dest b --size 176x240") == []


def test_command_extraction_joins_continuations_and_folded_yaml():
    text = "ray job submit --working-dir . \\\n    -- python jobs/prepare.py --source a \\\n    --dest b\nnext line"
    assert find_job_commands(text) == ["python jobs/prepare.py --source a --dest b"]
    entry = yaml.safe_load("entrypoint: >-\n  python jobs/infer.py\n  --model m\n  --bogus 1\n")["entrypoint"]
    (cmd,) = find_job_commands(entry)
    assert cmd.endswith("--bogus 1")


def test_checkers_catch_auth_off_and_credentials():
    assert auth_problems("RAY_AUTH_MODE=disabled ray start --head")
    assert auth_problems("", [{"env": [{"name": "RAY_AUTH_MODE", "value": "disabled"}]}])
    assert auth_problems("", [{"spec": {"authOptions": {"mode": "disabled"}}}])
    assert not auth_problems("export RAY_AUTH_MODE=token")
    assert credential_problems("key: AKIAABCDEFGHIJKLMNOP", is_config=False)
    assert credential_problems("token " + "ab" * 32, is_config=False)
    assert credential_problems("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMIK7MDENG", is_config=False)
    assert credential_problems("aws_access_key_id: x", is_config=True)
    assert credential_problems("", False, [{"env_vars": {"AWS_SECRET_ACCESS_KEY": "x"}}])
    assert credential_problems("", False, [{"env": [{"name": "RAY_AUTH_TOKEN", "value": "x"}]}])
    assert not credential_problems("AWS_REGION=us-east-1", is_config=True)
