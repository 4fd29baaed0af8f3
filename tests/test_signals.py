"""SIGTERM and SIGHUP are handled like Ctrl-C: temporary files removed, one true line, exit 128 + signum."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import typer
from _real_cache import rewrite

from kvtool.cli import run_guarded, write_json
from kvtool.store import CacheWriter, StoreHeader

ROOT = Path(__file__).resolve().parents[1]
HEADER = StoreHeader(model="m", model_architecture="A", num_layers=1, num_q_heads=2, num_kv_heads=2, head_dim=4,
                     attn_scaling=0.5)


def _stderr_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_sigterm_in_the_middle_of_a_write(tmp_path: Path) -> None:
    """A real CLI process on a real cache, signalled once its temporary output exists."""
    src = rewrite(tmp_path / "in.h5", repeat=3)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "kvtool", "compress", str(src), "--method", "turboquant:bits=3",
                             "--output", str(out / "z.h5"), "--json", str(out / "z.json")],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(out.glob(".z.h5.*.tmp")):
        assert proc.poll() is None, f"finished before it could be signalled: {proc.communicate()}"
        assert time.monotonic() < deadline, "no temporary file appeared"
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM == 143, err
    assert _stderr_lines(err) == ["interrupted: stopped by SIGTERM; no output file was written"]
    assert list(out.iterdir()) == []


def _guarded(work) -> int:
    with pytest.raises(typer.Exit) as exc:
        run_guarded(work)
    return exc.value.exit_code


def test_sighup_removes_the_temporary_file(tmp_path: Path, capsys) -> None:
    # a test run under nohup inherits SIGHUP ignored, which kvtool rightly leaves ignored: start from the default
    inherited = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        _sighup_removes_the_temporary_file(tmp_path, capsys)
    finally:
        signal.signal(signal.SIGHUP, inherited)


def _sighup_removes_the_temporary_file(tmp_path: Path, capsys) -> None:
    before = signal.getsignal(signal.SIGHUP)

    def work() -> None:
        with CacheWriter(tmp_path / "c.h5", HEADER) as w:
            w.add_sequence(np.arange(3), source="x")
            assert len(list(tmp_path.iterdir())) == 1  # the temporary file
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(5)  # the handler raises in here
            raise AssertionError("SIGHUP did not interrupt")

    assert _guarded(work) == 129
    assert list(tmp_path.iterdir()) == []
    assert _stderr_lines(capsys.readouterr().err) == ["interrupted: stopped by SIGHUP; no output file was written"]
    assert signal.getsignal(signal.SIGHUP) is before  # the command's handlers are gone again


def test_the_message_names_what_was_finished(tmp_path: Path, capsys) -> None:
    """Ctrl-C just after the outputs were complete: they are there, and the line says so (exit 2 as ever)."""
    report, cache = tmp_path / "z.json", tmp_path / "z.h5"

    def work() -> None:
        with CacheWriter(cache, HEADER) as w:
            w.add_sequence(np.arange(3), source="x")
        write_json({"a": 1}, report)
        raise KeyboardInterrupt

    assert _guarded(work) == 2
    assert _stderr_lines(capsys.readouterr().err) == [
        f"interrupted: stopped by the user (Ctrl-C); finished before it: {cache}, {report}; nothing partial was left"]
    assert sorted(tmp_path.iterdir()) == sorted([report, cache])

    def nothing() -> None:
        raise KeyboardInterrupt

    assert _guarded(nothing) == 2  # the list starts empty for each command
    assert "no output file was written" in capsys.readouterr().err


def test_a_signal_ignored_by_the_parent_stays_ignored() -> None:
    """nohup-style: a signal the user set to be ignored is not turned into an interruption."""
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        def work() -> int:
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.05)
            return 7

        assert run_guarded(work) == 7
    finally:
        signal.signal(signal.SIGHUP, old)


class _SignalledWhileCollected:
    """An object whose finaliser receives SIGTERM: the handler's exception is raised inside ``__del__``,
    where Python only reports it and goes on (what a weakref callback in h5py did to a real compress)."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs between bytecodes, in here
            time.sleep(0.001)


def test_a_signal_swallowed_in_a_finaliser_still_stops_the_command(tmp_path: Path, capsys) -> None:
    """The exception is lost, yet no output is published, the exit is 143 and stderr has the one line."""
    cache = tmp_path / "c.h5"

    def work() -> None:
        obj = _SignalledWhileCollected()
        del obj  # the signal arrives and its exception is swallowed here; the command goes on
        with CacheWriter(cache, HEADER) as w:
            w.add_sequence(np.arange(3), source="x")
        raise AssertionError("the writer published after a SIGTERM")

    assert _guarded(work) == 143
    assert list(tmp_path.iterdir()) == []
    assert _stderr_lines(capsys.readouterr().err) == ["interrupted: stopped by SIGTERM; no output file was written"]
    with CacheWriter(cache, HEADER) as w:  # the command is over: a library write afterwards publishes as ever
        w.add_sequence(np.arange(3), source="x")
    assert cache.is_file()


def test_a_swallowed_signal_after_the_last_write_still_exits_143(capsys) -> None:
    def work() -> int:
        obj = _SignalledWhileCollected()
        del obj
        return 0

    assert _guarded(work) == 143
    assert _stderr_lines(capsys.readouterr().err) == ["interrupted: stopped by SIGTERM; no output file was written"]
