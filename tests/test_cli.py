"""One command: ``segray <stage>``, ``python -m segray <stage>`` and ``python jobs/<stage>.py`` are
the same parser (segray/commands/), each with ``--help`` and ``--version``."""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
import tomllib

import pytest
from conftest import REPO

import segray
from segray import cli

STAGES = ["prepare", "train", "infer", "evaluate", "demo"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as e:  # argparse's --help and --version
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_has_help_and_version_and_the_parser_of_its_jobs_file(capsys, stage):
    code, out, _ = run_cli(capsys, stage, "--help")
    assert code == 0 and out.startswith(f"usage: segray {stage} ")
    code, version, _ = run_cli(capsys, stage, "--version")
    assert code == 0 and version.startswith(f"segray {segray.__version__} (ray ")
    spec = importlib.util.spec_from_file_location(f"jobs_{stage}", REPO / "jobs" / f"{stage}.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    command = importlib.import_module(f"segray.commands.{stage}")
    assert job.main is command.main, "jobs/<stage>.py runs the command of segray/commands/"


def test_the_top_level_lists_the_stages_and_refuses_an_unknown_one(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and all(f"  {s} " in out for s in STAGES)
    assert run_cli(capsys)[0] == 2
    code, _, err = run_cli(capsys, "segment")
    assert code == 2 and "unknown stage 'segment'" in err
    code, out, _ = run_cli(capsys, "--version")
    assert (code, out.strip()) == (0, f"segray {segray.__version__}")


def test_python_dash_m_and_the_console_script_run_the_same_command():
    proc = subprocess.run([sys.executable, "-m", "segray", "infer", "--help"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and "--frames-per-task" in proc.stdout
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert meta["scripts"] == {"segray": "segray.cli:main"} and meta["version"] == segray.__version__
    # What the script pip writes for that entry point does: import it, exit with what it returns.
    module, _, function = meta["scripts"]["segray"].partition(":")
    wrapper = f"import sys; from {module} import {function}; sys.argv[0] = 'segray'; sys.exit({function}())"
    proc = subprocess.run([sys.executable, "-c", wrapper, "evaluate", "--help"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: segray evaluate ")
    proc = subprocess.run([sys.executable, "-c", wrapper, "nonsense"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown stage 'nonsense'" in proc.stderr


def _train_config(*argv: str):
    from segray.commands import train as command

    return command.config_from_args(command.parse_args(list(argv)), environ={})


def test_the_shipped_recipes_make_the_documented_configs_and_flags_override_them():
    base = ("--data", "d", "--storage", "s", "--name", "n")
    cpu = _train_config("--recipe", str(REPO / "recipes" / "cpu-camvid.yaml"), *base)
    flags = _train_config(*base, "--base-channels", "32", "--precision", "bf16", "--ema", "0.998", "--logit-adjust", "0.75",
                          "--num-workers", "2",
                          "--batch-size", "4", "--lr", "3e-3", "--lr-schedule", "onecycle", "--weight-decay", "0.05",
                          "--crop", "128x192", "--scale-range", "0.8,1.25", "--epochs", "50")
    assert cpu == flags, "the YAML recipe is the command of docs/quality.md"
    assert _train_config("--recipe", str(REPO / "recipes" / "cpu-camvid.yaml"), *base, "--epochs", "3").epochs == 3
    gpu = _train_config("--recipe", str(REPO / "recipes" / "gpu-camvid.toml"), *base)
    assert (gpu.use_gpu, gpu.num_workers, gpu.base_channels, gpu.augmentation.crop, gpu.max_failures) == (
        True, 4, 64, (352, 352), 3)


@pytest.mark.parametrize("recipe, flags", [
    ("cpu-camvid.yaml", ("--epochs", "7", "--jitter", "0.1", "--arch-arg", "depth=3")),
    ("gpu-camvid.toml", ("--threads", "3", "--class-weighting", "none", "--max-failures", "1")),
    (None, ("--no-augment", "--arch", "fcn", "--keep-checkpoints", "1")),
])
def test_a_runs_saved_config_is_a_recipe_that_makes_the_same_config_and_flags_override_it(tmp_path, recipe, flags):
    from segray.runrecord import write_config_file

    config = _train_config(*(("--recipe", str(REPO / "recipes" / recipe)) if recipe else ()), "--data", "d",
                           "--storage", str(tmp_path), "--name", "n", *flags)
    saved = write_config_file(config.run_uri, config.to_dict())
    assert saved == f"{tmp_path}/n/config.yaml"
    assert _train_config("--recipe", saved) == config  # the file and the flags, together
    again = _train_config("--recipe", saved, "--lr", "0.5", "--name", "other")
    assert (again.lr, again.name) == (0.5, "other") and again == dataclasses.replace(config, lr=0.5, name="other")


def test_a_recipe_can_hold_any_flag_and_a_bad_one_is_one_line_naming_the_file(tmp_path, capsys):
    from segray.train import TrainError

    good = tmp_path / "r.toml"
    good.write_text('data = "d"\nstorage = "s"\nname = "n"\naugment = false\narch = "fcn"\n[arch-arg]\ndepth = 3\n')
    config = _train_config("--recipe", str(good))
    assert (config.data, config.augmentation.enabled, config.arch, config.arch_args) == ("d", False, "fcn", {"depth": 3})
    for text, match in [("batch-sise: 4\n", "'batch-sise' is not a flag of jobs/train.py"),
                        ("lr-schedule: sometimes\n", "lr-schedule: 'sometimes' is not one of"),
                        ("crop: 12by8\n", "crop: '12by8' is not a valid value"),
                        ("- a list\n", "expected a mapping")]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(TrainError, match=match):
            _train_config("--recipe", str(bad), "--data", "d", "--storage", "s", "--name", "n")
    code, _, err = run_cli(capsys, "train", "--recipe", str(tmp_path / "missing.yaml"))
    assert code == 1 and err.strip().splitlines() == [f"train: error: TrainError: --recipe {tmp_path}/missing.yaml: "
                                                      f"cannot be read (StorageError: {tmp_path}/missing.yaml: not found)"]
    (tmp_path / "r.json").write_text("{}")
    with pytest.raises(TrainError, match="a .yaml, .yml or .toml file"):
        _train_config("--recipe", str(tmp_path / "r.json"))
