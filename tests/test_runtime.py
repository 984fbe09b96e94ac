"""segray/runtime.py: what a job's workers inherit through its runtime environment."""

from __future__ import annotations

import json

from segray import runtime


def test_cpu_workers_get_the_malloc_settings_and_gpu_workers_do_not(monkeypatch):
    for k in runtime.CPU_MALLOC_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    cpu = runtime.worker_env()
    assert {k: cpu[k] for k in runtime.CPU_MALLOC_ENV} == runtime.CPU_MALLOC_ENV
    gpu = runtime.worker_env(gpu=True)
    assert not set(runtime.CPU_MALLOC_ENV) & set(gpu)


def test_a_users_own_malloc_setting_wins(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert runtime.worker_env()["MALLOC_MMAP_THRESHOLD_"] == "131072"


def test_settings_are_forwarded_credentials_are_not(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sentinel-secret")
    env = runtime.worker_env()
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9"
    assert "sentinel-secret" not in env.values()


def test_variables_already_in_a_submitted_jobs_runtime_env_are_not_repeated(monkeypatch):
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv(
        "RAY_JOB_CONFIG_JSON_ENV_VAR",
        json.dumps({"runtime_env": {"env_vars": {"AWS_REGION": "us-east-1", "MALLOC_MMAP_THRESHOLD_": "1"}}}),
    )
    env = runtime.worker_env()
    assert "AWS_REGION" not in env and "MALLOC_MMAP_THRESHOLD_" not in env
