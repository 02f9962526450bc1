"""llmctl sweep: grid expansion, validation of every point first, training the grid,
restart after a kill, --dry-run commands and the SLURM job array."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmctl.cli import app
from llmctl.config import load_config
from llmctl.core.errors import ConfigError, LlmctlError
from llmctl.experiments.sweep import expand_grid, parse_set, plan_sweep, point_name
from llmctl.runtime.checkpoint import read_checkpoint

from .conftest import GRID, POINTS, assert_same_weights, env, llmctl, write_base

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


# ------------------------------------------------------------------ the grid


def test_parse_set_splits_values_but_not_json_lists():
    assert parse_set("attn=gqa,mla").values == ["gqa", "mla"]
    axis = parse_set('layer_configs=[{"a": 1, "b": 2}],[{"a": 3}]')
    assert axis.key == "layer_configs"
    assert axis.values == ['[{"a": 1, "b": 2}]', '[{"a": 3}]']
    for bad in ("attn", "=gqa", "attn=gqa,,mla", "attn=gqa,gqa"):
        with pytest.raises(LlmctlError):
            parse_set(bad)


def test_expand_grid_is_the_cartesian_product_first_axis_slowest():
    grid = expand_grid([parse_set("attn=gqa,mla"), parse_set("pos_emb=rope,sin,learn")])
    assert len(grid) == 6
    assert grid[0] == {"attn": "gqa", "pos_emb": "rope"}
    assert grid[3] == {"attn": "mla", "pos_emb": "rope"}
    assert [point_name(p) for p in grid[:2]] == ["attn-gqa__pos_emb-rope",
                                                 "attn-gqa__pos_emb-sin"]
    assert point_name({"layers[2].attn": "mla"}) == "layers2.attn-mla"


def test_per_layer_and_sectioned_keys_set_exactly_their_value(base):
    plan = plan_sweep([base()], [parse_set("layers[1].attn=gqa,mla"),
                                 parse_set("train.learning_rate=1e-3")], name="layers")
    assert [p.name for p in plan.points] == ["layers1.attn-gqa__train.learning_rate-1e-3",
                                             "layers1.attn-mla__train.learning_rate-1e-3"]
    second = plan.points[1].run
    assert [layer.attn for layer in second.model.layers] == ["gqa", "mla"]
    assert second.train.learning_rate == 1e-3
    assert second.train.resume == "auto" and second.train.save_model
    assert Path(second.train.out_dir).name == "layers"


def test_bad_keys_are_config_errors_naming_the_key(base):
    with pytest.raises(ConfigError) as err:
        plan_sweep([base()], [parse_set("layers[5].attn=gqa,mla")])
    assert "layers[5].attn" in str(err.value) and "2 layer(s)" in str(err.value)
    with pytest.raises(ConfigError) as err:
        plan_sweep([base()], [parse_set("atn=gqa")])
    assert "atn" in str(err.value) and "did you mean 'attn'" in str(err.value)
    with pytest.raises(ConfigError, match="cannot be swept"):
        plan_sweep([base()], [parse_set("out_dir=a,b")])


def test_a_grid_of_more_than_max_points_is_refused_before_it_is_expanded(base):
    """seed=1..100 on three axes is a million points: refused from the axis sizes alone
    (expanding it took minutes and gigabytes)."""
    from llmctl.experiments.sweep import MAX_POINTS

    values = ",".join(map(str, range(1, 101)))
    axes = [parse_set(f"{key}={values}") for key in ("seed", "warmup_steps", "max_iters")]
    with pytest.raises(ConfigError, match=r"100 x 100 x 100 = 1,000,000 points, more than "
                       f"{MAX_POINTS:,}"):
        plan_sweep([base()], axes)


def test_an_invalid_point_stops_the_sweep_before_any_training_naming_every_bad_point(base):
    path = base()
    # n_embd=32 is not divisible by n_head=3: points 3 and 4 are bad, 1 and 2 fine
    result = invoke("sweep", "-c", str(path), "--set", "n_head=2,3", "--set", "attn=gqa,mla",
                    "--name", "bad")
    assert result.exit_code == 2
    out = result.output
    assert "point 3/4 (n_head=3 attn=gqa)" in out and "point 4/4 (n_head=3 attn=mla)" in out
    assert "point 1/4" not in out and "point 2/4" not in out
    assert "Traceback" not in out
    assert not (path.parent / "runs").exists()  # nothing trained, nothing written


# ------------------------------------------------------------------ training the grid


@pytest.fixture(scope="module")
def reference(exp_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2x2 sweep (60 steps a point); returns its folder."""
    folder = tmp_path_factory.mktemp("reference")
    path = write_base(folder, exp_data, max_iters=60, ckpt_interval=5, eval_interval=20)
    result = invoke("sweep", "-c", str(path), *GRID, "--name", "grid")
    assert result.exit_code == 0, result.output
    return folder / "runs" / "grid"


def test_a_2x2_grid_trains_four_runs_with_the_right_configs(reference: Path):
    for name, (attn, pos) in zip(POINTS, [("gqa", "rope"), ("gqa", "sin"), ("mla", "rope"),
                                          ("mla", "sin")], strict=True):
        info = read_checkpoint(reference / name / "latest")
        assert info.step == 60
        assert {layer.attn for layer in info.run.model.layers} == {attn}
        assert info.run.model.pos_emb == pos
        assert info.run.train.seed == 11  # equal seeds
        assert (reference / name / "metrics.jsonl").is_file()
    rows = json.loads((reference / "comparison.json").read_text())["runs"]
    assert sorted(r["label"] for r in rows) == sorted(
        ["attn=gqa pos_emb=rope", "attn=gqa pos_emb=sin", "attn=mla pos_emb=rope",
         "attn=mla pos_emb=sin"])
    assert (reference / "comparison.png").stat().st_size > 10_000
    assert "| attn=mla pos_emb=sin |" in (reference / "comparison.md").read_text()
    # the MLA and GQA points really differ: different parameter counts
    assert len({r["params_total"] for r in rows}) > 1


def test_rerunning_a_finished_sweep_trains_nothing(reference: Path):
    base = reference.parent.parent / "base.yaml"
    stamps = {p: (reference / p / "latest" / "model.safetensors").stat().st_mtime_ns
              for p in POINTS}
    result = invoke("sweep", "-c", str(base), *GRID, "--name", "grid")
    assert result.exit_code == 0, result.output
    assert result.output.count("skipped") >= 4
    assert stamps == {p: (reference / p / "latest" / "model.safetensors").stat().st_mtime_ns
                      for p in POINTS}


@pytest.mark.slow
def test_killed_during_the_third_point_a_restart_resumes_it_exactly(reference: Path,
                                                                    exp_data: Path,
                                                                    tmp_path: Path):
    path = write_base(tmp_path, exp_data, max_iters=60, ckpt_interval=5, eval_interval=20)
    sweep_dir = tmp_path / "runs" / "grid"
    third = sweep_dir / POINTS[2]
    args = [sys.executable, "-m", "llmctl", "sweep", "-c", str(path), *GRID, "--name", "grid"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            env=env())
    try:
        deadline = time.monotonic() + 240
        # kill once the third point has a checkpoint past its start, before it ends
        while time.monotonic() < deadline and proc.poll() is None:
            latest = third / "latest" / "config.json"
            if latest.is_file() and read_checkpoint(third / "latest").step >= 5:
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = read_checkpoint(third / "latest").step
    assert 5 <= killed_at < 60, "the kill did not land inside the third point"
    assert not (sweep_dir / POINTS[3] / "metrics.jsonl").exists()
    done = {p: ((sweep_dir / p / "latest" / "model.safetensors").stat().st_mtime_ns,
                (sweep_dir / p / "metrics.jsonl").read_bytes()) for p in POINTS[:2]}

    result = llmctl("sweep", "-c", str(path), *GRID, "--name", "grid")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"[3/4] {POINTS[2]}: resuming at step {killed_at}" in result.stdout
    assert f"[1/4] {POINTS[0]}: done (step 60), skipped" in result.stdout
    # the first two were not retrained: same checkpoint files, same metrics
    assert done == {p: ((sweep_dir / p / "latest" / "model.safetensors").stat().st_mtime_ns,
                        (sweep_dir / p / "metrics.jsonl").read_bytes()) for p in POINTS[:2]}
    for name in POINTS:  # the resumed third (and the rest) equal the uninterrupted sweep
        assert_same_weights(sweep_dir / name, reference / name)
    steps = [json.loads(line)["step"] for line in (third / "metrics.jsonl").read_text()
             .splitlines() if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, 61))  # no step lost or logged twice across the kill


# ------------------------------------------------------------------ schedulers


def _llmctl_executable() -> list[str]:
    found = shutil.which("llmctl")
    return [found] if found else [sys.executable, "-m", "llmctl"]


@pytest.mark.slow
def test_dry_run_commands_run_by_hand_give_the_same_runs(reference: Path, exp_data: Path,
                                                         tmp_path: Path):
    path = write_base(tmp_path, exp_data, max_iters=60, ckpt_interval=5, eval_interval=20)
    result = invoke("sweep", "-c", str(path), *GRID, "--name", "grid", "--dry_run")
    assert result.exit_code == 0, result.output
    commands = [shlex.split(line) for line in result.output.splitlines()
                if line.startswith("llmctl train")]
    assert len(commands) == 4
    assert not list((tmp_path / "runs" / "grid").glob("*/latest"))  # nothing trained
    for command in (commands[0], commands[3]):  # one GQA and one MLA point, by hand
        done = subprocess.run(_llmctl_executable() + command[1:], capture_output=True,
                              text=True, env=env(), timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    for name in (POINTS[0], POINTS[3]):
        assert_same_weights(tmp_path / "runs" / "grid" / name, reference / name)
    # and compare works on their folders afterwards
    shown = invoke("compare", str(tmp_path / "runs" / "grid"), "--json")
    data = json.loads(shown.output)
    assert [r["run"] for r in data["runs"]] == [POINTS[0], POINTS[3]]
    assert {Path(s["folder"]).name for s in data["skipped"]} == {POINTS[1], POINTS[2]}


def _shim(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(0o755)


@pytest.mark.slow
def test_slurm_script_passes_bash_n_and_trains_exactly_the_point_of_its_index(
        base, tmp_path: Path):
    path = base()
    script = tmp_path / "grid.sbatch"
    result = invoke("sweep", "-c", str(path), *GRID, "--name", "grid", "--slurm", str(script),
                    "--time", "00:30:00", "--partition", "debug", "--cpus_per_task", "2",
                    "--sbatch=--qos=high")
    assert result.exit_code == 0, result.output
    text = script.read_text()
    for line in ("#SBATCH --array=0-3", "#SBATCH --nodes=1", "#SBATCH --time=00:30:00",
                 "#SBATCH --partition=debug", "#SBATCH --cpus-per-task=2",
                 "#SBATCH --qos=high", "srun torchrun --standalone --nproc_per_node=1"):
        assert line in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0

    # SLURM is not installed: `srun` is a shim that runs its arguments (one task, as the
    # script asks), and `torchrun` is this interpreter's torch.distributed.run
    shims = tmp_path / "bin"
    shims.mkdir()
    _shim(shims, "srun", 'exec "$@"')
    _shim(shims, "torchrun", f'exec {shlex.quote(sys.executable)} -m torch.distributed.run "$@"')
    job_env = {**env(), "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}",
               "SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_JOB_ID": "77", "SLURM_JOB_ID": "78",
               "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_JOB_NUM_NODES": "1",
               "SLURM_JOB_NODELIST": "localhost", "SLURM_NTASKS": "1",
               "SLURM_SUBMIT_DIR": str(tmp_path)}
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=job_env,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    sweep_dir = tmp_path / "runs" / "grid"
    trained = sorted(p.parent.name for p in sweep_dir.glob("*/latest"))
    assert trained == [POINTS[2]]
    info = read_checkpoint(sweep_dir / POINTS[2] / "latest")
    assert info.step == 8 and info.run.model.pos_emb == "rope"
    assert {layer.attn for layer in info.run.model.layers} == {"mla"}
    # the point file is the same config the sweep would train
    assert info.run.model == load_config(sweep_dir / POINTS[2] / "sweep_point.json").model

    bad = subprocess.run(["bash", str(script)], capture_output=True, text=True,
                         env={**job_env, "SLURM_ARRAY_TASK_ID": "4"}, cwd=tmp_path)
    assert bad.returncode == 2 and "this sweep has 4 points" in bad.stderr


def test_the_attention_example_plans_four_valid_points():
    example = Path(__file__).resolve().parents[2] / "examples" / "experiments" / "attention.yaml"
    plan = plan_sweep([example], [parse_set("attn=gqa,mla"), parse_set("pos_emb=rope,sin")])
    assert plan.name == "attention" and [p.name for p in plan.points] == POINTS
    assert {p.run.train.seed for p in plan.points} == {1337}
    assert [p.run.model.layers[0].attn for p in plan.points] == ["gqa", "gqa", "mla", "mla"]


def test_a_point_that_fails_is_reported_and_the_sweep_goes_on(base):
    path = base(max_iters=4, eval=False)
    result = invoke("sweep", "-c", str(path), "--set", "learning_rate=1e12,3e-3", "--name", "lr")
    assert result.exit_code == 1
    assert "[1/2] learning_rate-1e12: failed:" in result.output
    assert "1 point(s) failed: learning_rate-1e12" in result.output
    done = read_checkpoint(path.parent / "runs" / "lr" / "learning_rate-3e-3" / "latest")
    assert done.step == 4
