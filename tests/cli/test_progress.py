"""Progress that reaches a log: with stderr to a pipe, plain lines with elapsed time and time left."""

from __future__ import annotations

import re

from lrc.cli.progress_display import ProgressLog, duration

LINE = re.compile(r"^\[\s*(?P<at>[\d.]+)s\] (?P<phase>.+?) (?P<done>\d+)/(?P<total>\d+)"
                  r"( \((?P<pct>\d+)%\): (?P<spent>[\d.]+)s in this phase, about (?P<left>[\d.]+)s left"
                  r"| done in (?P<took>[\d.]+)s|: started)$")


def progress_lines(stderr: str) -> list[re.Match[str]]:
    return [m for m in map(LINE.match, stderr.splitlines()) if m]


def test_compress_logs_every_layer_with_time_left(compressed_run):
    stderr = compressed_run.result.stderr
    lines = progress_lines(stderr)
    phases = [(m["phase"], int(m["done"]), int(m["total"])) for m in lines]
    # the tiny model has 2 decoder layers and 14 targeted matrices: one line per layer and per matrix
    assert [p for p in phases if p[0] == "calibrate"] == [("calibrate", 1, 2), ("calibrate", 2, 2)]
    assert [p[1] for p in phases if p[0] == "decompose"] == list(range(1, 15))
    # loss-aware's backward sweep: one line per decoder layer (the 4 windows fit one group of the sweep)
    assert [p for p in phases if p[0] == "output gradients"] == [("output gradients", 1, 2), ("output gradients", 2, 2)]
    assert [p[1:] for p in phases if p[0] == "build layers"] == [(i, 14) for i in range(1, 15)]  # one per matrix
    stamps = [float(m["at"]) for m in lines]
    assert stamps == sorted(stamps)
    first: dict[str, re.Match[str]] = {}
    for m in lines:
        done, total = int(m["done"]), int(m["total"])
        start = first.setdefault(m["phase"], m)
        if done == total:
            assert m["took"] is not None
            continue
        assert abs(int(m["pct"]) - 100 * done / total) <= 0.5
        # time left = steps left x time per step since the phase's first line (all printed rounded to 0.1 s)
        if m is start:
            rate, slack = float(m["spent"]) / done, 0.05 / done
        else:
            steps = done - int(start["done"])
            rate, slack = (float(m["at"]) - float(start["at"])) / steps, 0.1 / steps
        assert abs(float(m["left"]) - rate * (total - done)) <= 0.05 + slack * (total - done)
    first, last = stderr.splitlines()[0], stderr.splitlines()
    assert "compress" in first and "loss-aware + knapsack" in first
    assert any(line.endswith(f"wrote {compressed_run.out}") for line in last)
    assert "\r" not in stderr and "\x1b[" not in stderr  # no terminal drawing in a log


def test_eval_logs_windows_of_model_and_baseline(compressed_run, tmp_path):
    from ..conftest import run_lrc

    result = run_lrc("eval", compressed_run.out, "--data", compressed_run.calib, "--seq-len", 64, "--windows", 3,
                     "--batch-size", 1, "--baseline", compressed_run.model, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    phases = [(m["phase"], int(m["done"])) for m in progress_lines(result.stderr)]
    assert phases == [(f"perplexity ({role})", i) for role in ("model", "baseline") for i in (1, 2, 3)]
    assert "perplexity" in result.stdout  # the table, on stdout without --json


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_long_phases_log_every_interval_and_estimate_time_left():
    clock, lines = FakeClock(), []
    log = ProgressLog(interval=10.0, write=lines.append, clock=clock)
    for done in range(1, 201):  # 200 steps of 1 s each: more than PER_STEP_MAX, so one line per 10 s
        clock.now = float(done)
        log("decompose", done, 200)
    assert len(lines) == 21  # first step, then every 10 s (11, 21, ..., 191), then the end
    assert lines[0] == "[    1.0s] decompose 1/200 (0%): 1.0s in this phase, about 3m19s left"
    assert lines[1] == "[   11.0s] decompose 11/200 (6%): 11.0s in this phase, about 3m09s left"
    assert lines[-1] == "[   3m20s] decompose 200/200 done in 3m20s"


def test_a_phase_starts_when_the_previous_one_ended():
    clock, lines = FakeClock(), []
    log = ProgressLog(write=lines.append, clock=clock)
    clock.now = 5.0
    log("calibrate", 1, 1)
    clock.now = 9.0
    log("decompose", 1, 4)  # 4 s since calibrate ended: 4 s per step, 3 steps left
    assert lines == ["[    5.0s] calibrate 1/1 done in 5.0s",
                     "[    9.0s] decompose 1/4 (25%): 4.0s in this phase, about 12.0s left"]
    clock.now = 10.0
    log("decompose", 1, 4)  # a repeated count prints again only for short phases; a finished phase never
    log("calibrate", 1, 1)
    assert len(lines) == 3


def test_time_left_leaves_out_the_setup_in_the_first_step():
    clock, lines = FakeClock(), []
    log = ProgressLog(write=lines.append, clock=clock)
    clock.now = 30.0  # loading the model took most of the first step
    log("calibrate", 1, 10)
    clock.now = 32.0
    log("calibrate", 2, 10)  # 2 s per step since the first report: 8 steps left, 16 s
    assert lines == ["[   30.0s] calibrate 1/10 (10%): 30.0s in this phase, about 4m30s left",
                     "[   32.0s] calibrate 2/10 (20%): 32.0s in this phase, about 16.0s left"]


def test_notes_wait_for_the_first_update():
    clock, lines = FakeClock(), []
    log = ProgressLog(write=lines.append, clock=clock)
    log.note("compress m -> out")
    assert lines == []  # a run that fails now (bad input) prints only its error line
    clock.now = 2.0
    log("calibrate", 1, 2)
    log.note("wrote out")
    assert lines == ["[    2.0s] compress m -> out", "[    2.0s] calibrate 1/2 (50%): 2.0s in this phase, about 2.0s left",
                     "[    2.0s] wrote out"]


def test_duration():
    assert [duration(s) for s in (0.04, 59.94, 60, 3599, 3600, 7322)] == ["0.0s", "59.9s", "1m00s", "59m59s",
                                                                          "1h00m", "2h02m"]
