"""zoo/: a tiny lab zoo has the Model Zoos layout, is reproducible, resumable, and its CLI rejects bad input."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zoo import build_model, evaluate, generate, load_digits_split
from zoo.grid import trial_name, trial_params
from zoo.trial import TrialTask, run_trial

ROOT = Path(__file__).resolve().parent.parent
MODELS, EPOCHS, SEED = 4, 2, 0
NAME_RE = re.compile(r"^NN_tune_trainable_[0-9a-f]{5}_(\d{5})_(\d+)_[^/]{1,130}$")
PARAMS_KEYS = {
    "model::type",
    "model::channels_in",
    "model::o_dim",
    "model::nlin",
    "model::dropout",
    "model::init_type",
    "optim::optimizer",
    "optim::lr",
    "optim::wd",
    "optim::momentum",
    "seed",
    "training::batchsize",
    "training::epochs_train",
    "dataset::dump",
    "cuda",
}


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    """4 CNNs x 2 epochs, trained by 2 worker processes; (folder, summary)."""
    out = tmp_path_factory.mktemp("zoo") / "tiny"
    summary = generate(out, models=MODELS, epochs=EPOCHS, seed=SEED, workers=2, arch="cnn")
    return out, summary


def trials(zoo: Path) -> list[Path]:
    return sorted(p for p in zoo.iterdir() if p.is_dir() and not p.name.startswith("."))


def weights(zoo: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every checkpoint of a zoo, keyed by 'trial/checkpoint_dir'."""
    return {
        f"{t.name}/{c.name}": torch.load(c / "checkpoints", weights_only=True)
        for t in trials(zoo)
        for c in sorted(t.glob("checkpoint_*"))
    }


def test_summary_counts_and_accuracies(tiny_zoo):
    _, summary = tiny_zoo
    assert (summary["trained"], summary["skipped"], summary["failed"]) == (MODELS, 0, 0)
    assert summary["failures"] == []
    acc = summary["test_acc"]
    assert 0.0 <= acc["min"] <= acc["q25"] <= acc["median"] <= acc["q75"] <= acc["max"] <= 1.0


def test_layout(tiny_zoo):
    zoo, _ = tiny_zoo
    config = json.loads((zoo / "config.json").read_text())
    assert config["model::type"] == "CNN"
    assert set(config["model::init_type"]["grid_search"]) == {
        "uniform",
        "normal",
        "kaiming_uniform",
        "kaiming_normal",
    }
    assert set(config["model::nlin"]["grid_search"]) == {"tanh", "relu", "sigmoid", "gelu"}
    assert len(config["seed"]["grid_search"]) == MODELS
    assert sorted(p.name for p in zoo.iterdir() if p.is_file()) == ["config.json"]

    folders = trials(zoo)
    assert len(folders) == MODELS
    assert not [p for p in zoo.iterdir() if p.name.startswith(".tmp-")]
    indices = []
    for folder in folders:
        match = NAME_RE.match(folder.name)
        assert match, folder.name
        assert int(match.group(1)) == int(match.group(2))
        indices.append(int(match.group(2)))

        params = json.loads((folder / "params.json").read_text())
        assert set(params) == PARAMS_KEYS
        assert params["model::type"] == "CNN" and params["dataset::dump"] == "sklearn:digits"
        assert params["cuda"] is False and params["training::epochs_train"] == EPOCHS
        assert f"seed={params['seed']}" in folder.name

        lines = [json.loads(line) for line in (folder / "result.json").read_text().splitlines()]
        assert [line["training_iteration"] for line in lines] == list(range(EPOCHS + 1))
        assert lines[0]["train_loss"] == -999 and lines[0]["train_acc"] == -999
        for line in lines[1:]:
            assert 0.0 <= line["train_acc"] <= 1.0 and line["train_loss"] >= 0.0
        for line in lines:
            assert 0.0 <= line["test_acc"] <= 1.0 and line["time_this_iter_s"] >= 0.0
            assert line["config"] == params
            assert line["trial_id"] == f"{folder.name.split('_')[3]}_{int(match.group(1)):05d}"
        assert [line["done"] for line in lines] == [False] * EPOCHS + [True]

        checkpoints = sorted(p.name for p in folder.glob("checkpoint_*"))
        assert checkpoints == [f"checkpoint_{e:06d}" for e in range(EPOCHS + 1)]
        assert sorted(p.name for p in folder.iterdir() if p.is_file()) == ["params.json", "result.json"]
    assert sorted(indices) == list(range(MODELS))


def test_checkpoints_load_into_build_model_and_match_result_json(tiny_zoo):
    zoo, _ = tiny_zoo
    _, _, x_test, y_test = load_digits_split()
    for folder in trials(zoo):
        params = json.loads((folder / "params.json").read_text())
        lines = [json.loads(line) for line in (folder / "result.json").read_text().splitlines()]
        states = []
        for epoch, line in enumerate(lines):
            state = torch.load(folder / f"checkpoint_{epoch:06d}" / "checkpoints", weights_only=True)
            assert all(k.startswith("module_list.") for k in state)
            assert all(type(v) is torch.Tensor for v in state.values())
            model = build_model(params)
            model.load_state_dict(state)  # strict: exactly the same keys and shapes
            loss, acc = evaluate(model, x_test, y_test)
            assert acc == pytest.approx(line["test_acc"], abs=1e-9)
            assert loss == pytest.approx(line["test_loss"], rel=1e-5)
            states.append(state)
        assert any(not torch.equal(states[0][k], states[-1][k]) for k in states[0]), (
            "training changed nothing"
        )


def test_same_seed_gives_identical_weights_other_seed_differs(tiny_zoo, tmp_path):
    zoo, _ = tiny_zoo
    again = tmp_path / "again"
    generate(
        again, models=MODELS, epochs=EPOCHS, seed=SEED, workers=1, arch="cnn"
    )  # in-process, not 2 workers
    assert [p.name for p in trials(again)] == [p.name for p in trials(zoo)]
    for a, b in zip(trials(zoo), trials(again), strict=True):
        assert (a / "params.json").read_text() == (b / "params.json").read_text()
    first, second = weights(zoo), weights(again)
    assert first.keys() == second.keys() and len(first) == MODELS * (EPOCHS + 1)
    for key, state in first.items():
        assert state.keys() == second[key].keys()
        assert all(torch.equal(state[k], second[key][k]) for k in state), key

    other = tmp_path / "other"
    generate(other, models=1, epochs=EPOCHS, seed=SEED + 1, workers=1, arch="cnn")
    assert trials(other)[0].name not in {p.name for p in trials(zoo)}


def test_rerun_skips_done_trials_and_redoes_a_stale_temp_folder(tiny_zoo, tmp_path):
    zoo = tmp_path / "zoo"
    shutil.copytree(tiny_zoo[0], zoo)
    before = weights(zoo)
    victim = trials(zoo)[1]
    # A run killed mid-trial: the folder is still under its temporary name, with half its checkpoints.
    stale = zoo / f".tmp-{victim.name}"
    victim.rename(stale)
    shutil.rmtree(stale / f"checkpoint_{EPOCHS:06d}")
    untouched = {p: p.stat().st_mtime_ns for p in zoo.glob("NN_*/checkpoint_*/checkpoints")}

    summary = generate(zoo, models=MODELS, epochs=EPOCHS, seed=SEED, workers=1, arch="cnn")
    assert (summary["trained"], summary["skipped"], summary["failed"]) == (1, MODELS - 1, 0)
    assert not stale.exists() and victim.is_dir()
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched  # finished trials were not rewritten
    after = weights(zoo)
    assert after.keys() == before.keys()
    assert all(all(torch.equal(s[k], after[key][k]) for k in s) for key, s in before.items())

    summary = generate(zoo, models=MODELS, epochs=EPOCHS, seed=SEED, workers=2, arch="cnn")
    assert (summary["trained"], summary["skipped"], summary["failed"]) == (0, MODELS, 0)
    assert summary["test_acc"] == tiny_zoo[1]["test_acc"]  # read back from result.json


def test_generate_refuses_a_folder_of_another_zoo(tiny_zoo, tmp_path):
    zoo = tmp_path / "zoo"
    shutil.copytree(tiny_zoo[0], zoo)
    with pytest.raises(ValueError, match="another zoo"):
        generate(zoo, models=MODELS, epochs=EPOCHS + 1, seed=SEED, workers=1)
    assert [p.name for p in trials(zoo)] == [p.name for p in trials(tiny_zoo[0])]


def test_generate_refuses_a_folder_in_use(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what a running generate() holds
        with pytest.raises(ValueError, match="in use"):
            generate(tmp_path, models=1, epochs=1, workers=1)
    finally:
        os.close(fd)
    assert list(tmp_path.iterdir()) == []


def test_a_smaller_zoo_is_a_prefix_of_a_larger_one():
    small = [trial_params(SEED, "cnn", EPOCHS, i) for i in range(3)]
    large = [trial_params(SEED, "cnn", EPOCHS, i) for i in range(500)]  # past the 384-point grid: a new cycle
    assert large[:3] == small
    assert len({p["seed"] for p in large}) == 500
    assert trial_name(large[0], "abcde", 0) == trial_name(small[0], "abcde", 0)
    assert {p["model::type"] for p in (trial_params(SEED, "mixed", 1, i) for i in range(50))} == {
        "CNN",
        "MLP",
    }


def test_failed_trial_is_reported_not_raised(tmp_path):
    params = trial_params(SEED, "cnn", 1, 0) | {"model::nlin": "swish"}
    outcome = run_trial(TrialTask(str(tmp_path), "NN_tune_trainable_bad00_00000_0_x", "bad00_00000", params))
    assert outcome.status == "failed" and "swish" in outcome.error
    assert list(tmp_path.iterdir()) == []


def test_mlp_trial_and_dropout_shifts_indices(tmp_path):
    params = trial_params(SEED, "mlp", 1, 0) | {"model::dropout": 0.0}
    outcome = run_trial(TrialTask(str(tmp_path), "NN_tune_trainable_mlp00_00000_0_x", "mlp00_00000", params))
    assert outcome.status == "trained", outcome.error
    state = torch.load(tmp_path / outcome.name / "checkpoint_000001" / "checkpoints", weights_only=True)
    assert list(state) == [
        "module_list.1.weight",
        "module_list.1.bias",
        "module_list.3.weight",
        "module_list.3.bias",
    ]
    build_model(params).load_state_dict(state)

    cnn = trial_params(SEED, "cnn", 1, 0)
    plain = build_model(cnn | {"model::dropout": 0.0}).state_dict()
    dropped = build_model(cnn | {"model::dropout": 0.1}).state_dict()
    assert [v.shape for v in plain.values()] == [v.shape for v in dropped.values()]
    assert list(plain) != list(dropped)  # dropout layers take indices
    assert 2_000 <= sum(v.numel() for v in plain.values()) <= 10_000


def test_init_types_follow_the_model_zoos():
    base = trial_params(SEED, "cnn", 1, 0)
    torch.manual_seed(0)
    uniform = build_model(base | {"model::init_type": "uniform"}).state_dict()
    weights_ = [v for k, v in uniform.items() if k.endswith("weight")]
    assert all(float(w.min()) >= 0.0 and float(w.max()) <= 1.0 for w in weights_)  # raw U(0, 1)
    assert all(torch.all(v == 0.01) for k, v in uniform.items() if k.endswith("bias"))
    normal = build_model(base | {"model::init_type": "normal"}).state_dict()
    assert (
        0.8 < float(torch.cat([v.flatten() for k, v in normal.items() if k.endswith("weight")]).std()) < 1.2
    )


def test_digits_split_is_fixed():
    x_train, y_train, x_test, y_test = load_digits_split()
    assert x_train.shape == (1347, 1, 8, 8) and x_test.shape == (450, 1, 8, 8)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert 0.0 <= float(x_train.min()) and float(x_train.max()) <= 1.0
    assert set(y_test.tolist()) == set(range(10))
    assert torch.equal(load_digits_split()[3], y_test)


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "zoo", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120
    )


@pytest.mark.parametrize(
    "args",
    [
        ["--models", "-3"],
        ["--epochs", "0"],
        ["--workers", "two"],
        ["--arch", "resnet"],
        ["--out-file"],
    ],
)
def test_cli_rejects_bad_input(args, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    out = ["--out", str(a_file)] if args == ["--out-file"] else ["--out", str(tmp_path / "zoo"), *args]
    result = run_cli(*out)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0], result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "zoo").exists()


def test_cli_help_and_a_small_run(tmp_path):
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in ("--out", "--models", "--epochs", "--seed", "--workers", "--arch"):
        assert flag in result.stdout

    result = run_cli("--out", str(tmp_path / "zoo"), "--models", "2", "--epochs", "1", "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert "2 trained, 0 skipped (already done), 0 failed" in result.stdout
    assert len(result.stdout.strip().splitlines()) == 1  # the summary is the only thing printed
    assert len(trials(tmp_path / "zoo")) == 2

    result = run_cli("--out", str(tmp_path / "zoo"), "--models", "2", "--epochs", "1", "--workers", "1")
    assert result.returncode == 0 and "0 trained, 2 skipped" in result.stdout
