"""`mambast bench gpu` on the CPU at a tiny size: every stage timed, the projections follow from the stage times and
the end-to-end fps from its own run; a config's random weights go through the same stylize job."""
import json

import pytest

from jobs.cli import main

TINY = ["bench", "gpu", "--json", "--size", "160x96", "--working-size", "64", "--device", "cpu"]
STAGES = {"decode", "prepare_host", "prepare_device", "upload", "flow", "model", "post_host", "post_device", "download",
          "encode"}


def run_bench(capsys, *extra) -> dict:
    assert main(TINY + list(extra)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines  # --json: the JSON line alone
    return json.loads(lines[0])


def test_every_stage_is_timed_and_the_fps_follow_from_the_times(capsys):
    report = run_bench(capsys, "--frames", "4")
    stages = report["stages"]
    assert set(stages) == STAGES
    for name, stage in stages.items():
        assert stage["ms_per_frame"] > 0, name
        assert stage["measured_on"].startswith("cpu"), name  # labelled with where it ran
    assert set(report["projected"]) == {"host", "device"}
    for route in report["projected"].values():
        ms = [stages[name]["ms_per_frame"] for name in route["stages"]]
        assert route["serial_fps"] == pytest.approx(1000 / sum(ms), rel=1e-3)
        assert route["overlapped_fps"] == pytest.approx(1000 / max(ms), rel=1e-3)
        assert stages[route["slowest"]]["ms_per_frame"] == max(ms)
    e2e = report["end_to_end"]
    assert e2e["frames"] == report["frames"] == 4
    for mode, fps in e2e["fps"].items():
        assert fps > 0 and fps == pytest.approx(e2e["frames"] / e2e["seconds"][mode], rel=1e-3)
    if "pipelined" in e2e["fps"]:
        assert e2e["pipelined_over_serial"] == pytest.approx(e2e["fps"]["pipelined"] / e2e["fps"]["serial"], rel=1e-2)
    assert report["weights"] == "bundled" and not report["random_weights"]


def test_a_config_is_benchmarked_with_random_weights(capsys):
    report = run_bench(capsys, "--config", "small", "--frames", "2")
    assert report["random_weights"] and report["config"] == "small" and report["frames"] == 2
    assert report["stages"]["model"]["ms_per_frame"] > 0 and all(v > 0 for v in report["end_to_end"]["fps"].values())


@pytest.mark.parametrize("flags", [["--size", "1080"], ["--size", "8x8"], ["--frames", "0"]])
def test_bad_flags_are_one_line_errors(capsys, flags):
    assert main(TINY + flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mambast: error:") and len(err.splitlines()) == 1


def test_the_stylize_command_is_timed_against_an_earlier_revision(capsys):
    """--baseline: `mambast stylize` of a git revision's code and of today's, each in a fresh process; HEAD stands in
    for the older revision here (the same code: only that both ran and the ratio follows from their fps)."""
    report = run_bench(capsys, "--frames", "2", "--baseline", "HEAD")
    against = report["end_to_end"]["against_baseline"]
    assert against["revision"] == "HEAD" and against["runs_each"] == 3
    assert against["fps"]["today"] > 0 and against["fps"]["baseline"] > 0
    assert against["today_over_baseline"] == pytest.approx(against["fps"]["today"] / against["fps"]["baseline"],
                                                           rel=1e-2)


def test_an_unknown_baseline_revision_is_a_one_line_error(capsys):
    assert main(TINY + ["--frames", "1", "--baseline", "no-such-revision"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no-such-revision" in err and len(err.splitlines()) == 1
