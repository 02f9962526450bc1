"""llmctl compare: the figure, the table's numbers against metrics.jsonl / config, and
folders that are not (yet) runs."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmctl.cli import app
from llmctl.config import load_config
from llmctl.experiments.compare import FIGURE_DPI, FIGURE_SIZE

from .conftest import write_base

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def two_runs(exp_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/ holding two finished tiny runs: gqa and mla (8 steps, evaluated every 4)."""
    from llmctl.train.trainer import train

    folder = tmp_path_factory.mktemp("compare")
    base = write_base(folder, exp_data, save_model=True)
    for attn in ("gqa", "mla"):
        train(load_config(base, overrides={"attn": attn, "file_name": attn}), verbose=False)
    return folder / "runs"


def records(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_the_figure_exists_has_its_size_and_is_not_blank(two_runs: Path, tmp_path: Path):
    import matplotlib.pyplot as plt

    png = tmp_path / "cmp.png"
    result = invoke("compare", str(two_runs), "-o", str(png))
    assert result.exit_code == 0, result.output
    pixels = plt.imread(png)  # (H, W, RGBA) floats
    width, height = (int(v * FIGURE_DPI) for v in FIGURE_SIZE)
    assert pixels.shape[:2] == (height, width)
    assert pixels[..., :3].std() > 0.05
    # both panels hold drawn lines: coloured (not grey) pixels in each half
    rgb = pixels[..., :3]
    coloured = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.3
    assert coloured[:, : width // 2].sum() > 200 and coloured[:, width // 2:].sum() > 200
    assert f"figure: {png}" in result.output


def test_default_figure_goes_into_the_folder_of_runs(two_runs: Path):
    result = invoke("compare", str(two_runs))
    assert result.exit_code == 0, result.output
    assert (two_runs / "comparison.png").is_file()


def test_every_x_axis_draws_and_a_bad_one_is_an_error(two_runs: Path, tmp_path: Path):
    for x in ("step", "tokens", "time", "flops"):
        png = tmp_path / f"{x}.png"
        assert invoke("compare", str(two_runs), "--x", x, "-o", str(png)).exit_code == 0
        assert png.stat().st_size > 10_000
    bad = invoke("compare", str(two_runs), "--x", "epochs", "-o", str(tmp_path / "b.png"))
    assert bad.exit_code == 2 and "not one of step, tokens, time, flops" in bad.output


def test_the_table_numbers_equal_the_metrics_and_the_config(two_runs: Path, tmp_path: Path):
    from llmctl.model import LLM
    from llmctl.runtime.checkpoint import read_checkpoint

    md = tmp_path / "table.md"
    result = invoke("compare", str(two_runs / "gqa"), str(two_runs / "mla"), "--json",
                    "--markdown", str(md), "-o", str(tmp_path / "c.png"))
    assert result.exit_code == 0, result.output
    rows = {r["run"]: r for r in json.loads(result.output)["runs"]}
    assert set(rows) == {"gqa", "mla"}
    assert rows["gqa"]["label"] == "attn=gqa" and rows["mla"]["label"] == "attn=mla"
    for name, row in rows.items():
        run = two_runs / name
        train, evals = records(run, "train"), records(run, "eval")
        assert row["step"] == 8 and row["max_iters"] == 8
        assert row["tokens"] == train[-1]["tokens"] == 8 * 128
        assert row["final_train_loss"] == train[-1]["loss"]
        assert row["best_val_loss"] == min(r["val_loss"] for r in evals)
        assert row["final_val_loss"] == evals[-1]["val_loss"]
        assert row["tokens_per_s"] == statistics.median(r["tokens_per_s"] for r in train)
        assert row["wall_time_s"] == train[-1]["time"]
        assert row["mfu"] is None  # unknown on CPU: no peak FLOP/s
        assert row["imbalance"] is None  # dense
        config = read_checkpoint(run / "latest").run
        n_params = sum(p.numel() for p in LLM(config.model).parameters())
        assert row["params_total"] == row["params_active"] == n_params
    assert rows["gqa"]["params_total"] != rows["mla"]["params_total"]
    table = md.read_text()
    assert table.startswith("| run | steps | params |")
    assert f"| attn=mla | 8/8 | {rows['mla']['params_total'] / 1e3:.1f}k |" in table
    assert f"{rows['gqa']['best_val_loss']:.4f}" in table


def test_the_terminal_table_names_what_differs(two_runs: Path, tmp_path: Path):
    result = invoke("compare", str(two_runs), "-o", str(tmp_path / "c.png"))
    assert "attn=gqa" in result.output and "attn=mla" in result.output
    assert "best val" in result.output


def test_folders_without_metrics_are_named_and_skipped(two_runs: Path, tmp_path: Path):
    runs = tmp_path / "runs"
    shutil.copytree(two_runs / "gqa", runs / "gqa")
    (runs / "empty").mkdir()
    (runs / "started").mkdir()
    (runs / "started" / "metrics.jsonl").write_text("")
    result = invoke("compare", str(runs), "--json", "-o", str(tmp_path / "c.png"))
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [r["run"] for r in data["runs"]] == ["gqa"]
    reasons = {Path(s["folder"]).name: s["reason"] for s in data["skipped"]}
    assert reasons.keys() == {"empty", "started"}
    assert "no metrics.jsonl" in reasons["empty"] and "no records" in reasons["started"]
    shown = invoke("compare", str(runs), "-o", str(tmp_path / "c.png"))
    assert f"skipped {runs / 'empty'}: no metrics.jsonl" in shown.output

    nothing = invoke("compare", str(runs / "empty"))
    assert nothing.exit_code == 2 and "no runs with metrics to compare" in nothing.output
    missing = invoke("compare", str(tmp_path / "nope"))
    assert missing.exit_code == 2 and "no such folder" in missing.output
    assert "Traceback" not in nothing.output + missing.output


def test_a_run_in_progress_is_read_as_far_as_it_goes(two_runs: Path, tmp_path: Path):
    live = tmp_path / "runs" / "live"
    live.mkdir(parents=True)
    lines = (two_runs / "mla" / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["step"] <= 5]
    # no checkpoint yet, and a torn last line (the writer is mid-append)
    (live / "metrics.jsonl").write_text("\n".join(kept) + '\n{"kind": "train", "st')
    shutil.copytree(two_runs / "gqa", tmp_path / "runs" / "gqa")
    result = invoke("compare", str(tmp_path / "runs"), "--json", "-o", str(tmp_path / "c.png"))
    assert result.exit_code == 0, result.output
    rows = {r["run"]: r for r in json.loads(result.output)["runs"]}
    assert rows["live"]["step"] == 5 and rows["live"]["params_total"] is None
    assert rows["live"]["tokens"] == 5 * 128
    assert rows["live"]["final_val_loss"] == json.loads(
        [line for line in kept if '"eval"' in line][-1])["val_loss"]
    assert "no config" in rows["live"]["notes"][0]
    assert (tmp_path / "c.png").stat().st_size > 10_000


def test_moe_runs_report_their_final_per_layer_imbalance(exp_data: Path, tmp_path: Path):
    from llmctl.train.trainer import train

    base = write_base(tmp_path, exp_data, max_iters=4)
    moe = {"moe": True, "n_exp": 4, "n_shared": 1, "n_act": 2, "aux_free": True,
           "alpha": 0.01, "gamma": 0.01, "up_dim": 16, "file_name": "moe", "eval": False,
           "save_model": True}
    train(load_config(base, overrides=moe), verbose=False)
    result = invoke("compare", str(tmp_path / "runs" / "moe"), "--json",
                    "-o", str(tmp_path / "c.png"))
    assert result.exit_code == 0, result.output
    row = json.loads(result.output)["runs"][0]
    last = records(tmp_path / "runs" / "moe", "train")[-1]
    assert row["imbalance"] == last["imbalance"] and len(row["imbalance"]) == 2
    assert row["params_active"] < row["params_total"]
    assert row["best_val_loss"] is None  # trained without evaluation
