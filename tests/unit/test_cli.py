"""The `braid` command line, run as a user would (a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.engine_helpers import make_engine_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_engine_model("qwen2", tmp_path_factory.mktemp("cli"))


def _braid(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "braid.cli", *args], capture_output=True, text=True, timeout=300)


def test_generate_prints_json(folder):
    r = _braid("generate", "The quick brown", "--model-path", folder, "--raw", "--json", "--max-new-tokens", "5",
               "--max-total-tokens", "512", "--cpu-threads", "1")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["meta_info"]["completion_tokens"] <= 5 and "text" in out


def test_generate_reports_bad_settings(folder):
    r = _braid("generate", "hi", "--model-path", folder, "--schedule-policy", "nope")
    assert r.returncode == 2
    assert "unknown schedule policy 'nope'" in r.stderr and "lpm" in r.stderr


def test_run_executes_a_program_file(tmp_path):
    prog = tmp_path / "prog.py"
    prog.write_text("import sys\nprint('ran with', sys.argv[1:])\n")
    r = _braid("run", str(prog), "a", "b")
    assert r.returncode == 0, r.stderr
    assert "ran with ['a', 'b']" in r.stdout
