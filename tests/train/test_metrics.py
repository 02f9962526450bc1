"""metrics.jsonl appends and truncation, console lines, and the loss-curve PNG."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys

import pytest

from llmctl.core.errors import LlmctlError
from llmctl.train.metrics import Console, MetricsFile, format_record, read_metrics
from llmctl.train.plot import plot_loss_curve


def _record(step, loss=2.0):
    return {"kind": "train", "step": step, "loss": loss, "lr": 1e-3, "grad_norm": 0.5,
            "tokens_per_s": 12345.0, "mfu": None, "memory_gb": 0.25}


def test_append_read_and_truncate(tmp_path):
    log = MetricsFile(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3, 4):
        log.append(_record(step))
    log.append({"kind": "eval", "step": 4, "val_loss": math.nan})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5 and all(isinstance(json.loads(line), dict) for line in lines)
    assert json.loads(lines[-1])["val_loss"] is None  # strict JSON: NaN written as null
    log.truncate_after(2)
    assert [r["step"] for r in log.read()] == [1, 2]
    log.append(_record(3, loss=1.0))
    assert [r["step"] for r in log.read()] == [1, 2, 3]


def test_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(_record(1)) + "\n" + '{"kind": "train", "st')
    assert [r["step"] for r in read_metrics(path)] == [1]


def test_a_line_longer_than_the_record_limit_is_skipped_unread(tmp_path, monkeypatch):
    """An endless line (a metrics.jsonl replaced by garbage) is read past in chunks, never
    held whole, and the records after it still count."""
    import io

    from llmctl.core.files import bounded_lines
    from llmctl.train import metrics

    lines = list(bounded_lines(io.StringIO("ab\n" + "x" * 5000 + "\ncd\nefgh"), 4))
    assert lines == ["ab\n", None, "cd\n", "efgh"]
    assert list(bounded_lines(io.StringIO("abcd\nabcde"), 4)) == ["abcd\n", None]
    monkeypatch.setattr(metrics, "JSONL_RECORD_LIMIT", 2000)
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(_record(1)) + "\n" + '{"kind": "' + "z" * 10**6 + '"}\n'
                    + json.dumps(_record(2)) + "\n")
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def _fill(folder) -> None:
    """Use up every byte of the filesystem holding `folder`."""
    with open(folder / "filler", "wb", buffering=0) as f:
        for chunk in (4096, 1):
            try:
                while True:
                    f.write(b"x" * chunk)
            except OSError:
                pass


def test_append_on_a_full_disk_leaves_no_torn_line(tmpfs):
    disk = tmpfs.mount("64k")
    log = MetricsFile(disk / "metrics.jsonl")
    for step in range(1, 11):  # ~1.2 kB: the file's first page has room left
        log.append(_record(step))
    before = log.path.read_bytes()
    _fill(disk)
    # a record larger than what is left of the page: the write comes up short
    with pytest.raises(LlmctlError, match=r"cannot append to .*metrics\.jsonl"):
        log.append({**_record(11), "note": "y" * 6000})
    assert log.path.read_bytes() == before  # not a byte of the failed record stays
    (disk / "filler").unlink()
    log.append(_record(11))  # space again: the next record follows on a line of its own
    lines = log.path.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 12))


_APPEND_OVER_LIMIT = """
import resource, signal, sys
from llmctl.core.errors import LlmctlError
from llmctl.train.metrics import MetricsFile
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
log = MetricsFile(sys.argv[1])
limit = log.path.stat().st_size + 100
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    log.append({"kind": "train", "step": 3, "note": "z" * 1000})
except LlmctlError as err:
    print(err)
"""


def test_append_past_the_file_size_limit_leaves_no_torn_line(tmp_path):
    # the same short write without root: RLIMIT_FSIZE lets only 100 more bytes through
    log = MetricsFile(tmp_path / "metrics.jsonl")
    log.append(_record(1))
    log.append(_record(2))
    before = log.path.read_bytes()
    done = subprocess.run([sys.executable, "-c", _APPEND_OVER_LIMIT, str(log.path)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr
    assert "cannot append to" in done.stdout and "the partial record was removed" in done.stdout
    assert log.path.read_bytes() == before


def test_plain_console_lines_with_eta():
    out = io.StringIO()
    with Console(total=10, start=0, stream=out) as console:
        console.log(_record(5))
        console.info("saved")
    text = out.getvalue()
    assert "step 5/10 | loss 2.0000 | lr 1.00e-03 | grad 0.500 | 12.3k tok/s" in text
    assert "eta" in text and "saved" in text


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_gets_a_progress_bar():
    out = _Terminal()
    with Console(total=10, start=2, stream=out) as console:
        assert console.tty
        console.advance(5)
        console.log(_record(5))
    text = out.getvalue()
    assert "step 5/10 | loss 2.0000" in text
    assert "5/10" in text and "eta" in text  # the bar's count and time-remaining columns


def test_disabled_console_is_silent():
    out = io.StringIO()
    with Console(total=10, start=0, stream=out, enabled=False) as console:
        console.log(_record(5))
        console.info("x")
    assert out.getvalue() == ""


def test_format_moe_and_mfu():
    line = format_record({**_record(3), "mfu": 0.4123, "aux_loss": 0.01,
                          "imbalance": [0.5, 0.25]}, 9)
    assert "mfu 41.2%" in line and "aux 0.0100" in line and "imb 0.50,0.25" in line


def test_loss_curve_png(tmp_path):
    records = [_record(s, loss=3 - s / 10) for s in range(1, 11)]
    records += [{"kind": "eval", "step": 5, "train_loss": 2.6, "val_loss": 2.7},
                {"kind": "eval", "step": 10, "train_loss": 2.1, "val_loss": 2.3}]
    path = plot_loss_curve(records, tmp_path / "loss_curve.png", title="t")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss_curve.png"]


def test_records_are_checked_as_data(tmp_path):
    """What compare and the loss plot compute with has the right kind of value: a record
    without a whole step is dropped, a known field of the wrong kind reads as unknown."""
    path = tmp_path / "metrics.jsonl"
    rows = ['{"kind": "train", "step": "x", "loss": 1.0}', '[1, 2]', '{"step": 3}',
            '{"kind": "train", "step": -1, "loss": 1.0}',
            '{"kind": "train", "step": 1, "loss": "abc", "tokens": [1], "time": 1e400, '
            '"imbalance": [0.5, "x"], "lr": true}',
            '{"kind": "eval", "step": 2, "val_loss": 1.5, "mtp_loss": [0.1, 0.2]}']
    path.write_text("\n".join(rows) + "\n")
    train, val = read_metrics(path)
    assert train == {"kind": "train", "step": 1, "loss": None, "tokens": None, "time": None,
                     "imbalance": None, "lr": None}
    assert val == {"kind": "eval", "step": 2, "val_loss": 1.5, "mtp_loss": [0.1, 0.2]}


def test_compare_reads_a_garbled_metrics_file_without_a_traceback(tmp_path):
    from typer.testing import CliRunner

    from llmctl.cli import app

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        '{"kind": "train", "step": "x", "loss": "abc"}\n'
        '{"kind": "eval", "step": 1, "val_loss": {"a": 1}}\n'
        '{"kind": "train", "step": 2, "loss": 2.5, "tokens": 64, "time": 1.0}\n')
    result = CliRunner().invoke(app, ["compare", str(run), "--json", "--output",
                                      str(tmp_path / "c.png")])
    assert result.exit_code == 0, result.output
    row = json.loads(result.output)["runs"][0]
    assert row["step"] == 2 and row["final_train_loss"] == 2.5 and row["best_val_loss"] is None
