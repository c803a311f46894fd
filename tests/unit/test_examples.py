"""Every program under examples/ runs on the embedded default model, prints sensible output, and
finishes in under a minute (they are the documentation users run first)."""

from __future__ import annotations

import importlib.util
import re
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TIME_LIMIT_S = 60


@pytest.fixture
def run_example(smollm2_hf_dir, monkeypatch, capsys):
    """``run_example(name)`` imports examples/NAME.py by path, runs its ``main()`` and returns
    (the module, its stdout). The examples call ``bd.Engine()`` without a model path, which
    resolves the default model under ``$BRAID_CACHE``: point that at the folder the session
    fixture converted into (``<cache>/models/<name>``), so nothing is converted twice."""
    monkeypatch.setenv("BRAID_CACHE", str(Path(smollm2_hf_dir).parent.parent))
    loaded: list[str] = []

    def run(name: str) -> tuple[ModuleType, str]:
        module_name = f"braid_example_{name}"
        spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # pydantic and dataclasses look their module up here
        loaded.append(module_name)
        spec.loader.exec_module(module)
        capsys.readouterr()
        start = time.monotonic()
        module.main()
        elapsed = time.monotonic() - start
        out = capsys.readouterr().out
        assert elapsed < TIME_LIMIT_S, f"examples/{name}.py took {elapsed:.1f} s"
        return module, out

    yield run
    for module_name in loaded:
        sys.modules.pop(module_name, None)


def _field(out: str, pattern: str) -> list[str]:
    return re.findall(pattern, out, flags=re.MULTILINE)


def test_quickstart(run_example):
    _, out = run_example("quickstart")
    assert len(_field(out, r"^answer: \S")) == 2
    assert len(_field(out, r"^fact [123]: \S")) == 3
    assert _field(out, r"^best:\s+([123]) ")
    cached = _field(out, r"cached prompt tokens: (\d+) of (\d+)")
    assert cached and 0 < int(cached[0][0]) <= int(cached[0][1])  # the second run hit the radix cache
    assert _field(out, r"^legs: 'A spider has \d+ legs\.'$")  # the regex held
    assert _field(out, r"^year: -?\d+ \(int\)$")  # dtype=int converted the text
    assert "== streaming" in out and out.split("== streaming")[1].split("==")[0].count("\n") >= 2
    assert _field(out, r"^ *(user|assistant): ") == ["user", "assistant"] * 2  # the last program's messages
    assert _field(out, r"^The capital of France is.*\[5 prompt tokens, \d+ generated, finish: \w+\]$")


def test_few_shot_qa(run_example):
    module, out = run_example("few_shot_qa")
    answers = _field(out, r"^A: (.*)\s+\[cached prompt tokens: (\d+) of (\d+)\]$")
    assert len(answers) == len(module.QUESTIONS)
    assert sum(bool(a.strip()) for a, _, _ in answers) >= len(answers) - 1
    prefix_tokens = len(module.FEW_SHOT) // 8  # far below the few-shot prefix's real token count
    reused = [int(c) for _, c, _ in answers if int(c) > 0]
    assert reused and all(c > prefix_tokens for c in reused)  # the shared prefix came from the cache
    assert _field(out, rf"^{len(reused)} of {len(answers)} programs read the few-shot prefix")


def test_fork_select_best(run_example):
    _, out = run_example("fork_select_best")
    candidates = _field(out, r"^candidate ([123]): (.*)$")
    assert [i for i, _ in candidates] == ["1", "2", "3"]
    assert len({c for _, c in candidates}) > 1  # different seeds, different samples
    best = _field(out, r"^best: ([123]) -> (.*)$")
    assert len(best) == 1
    assert best[0][1] == dict(candidates)[best[0][0]]
    assert len(re.findall(r"-?\d+\.\d+", _field(out, r"^scores.*: \[(.*)\]$")[0])) == 3


def test_extract_pydantic(run_example):
    module, out = run_example("extract_pydantic")
    assert _field(out, r"^valid: (\w+)$") == ["True"] * len(module.TEXTS)
    for raw in _field(out, r"^json:  (.*)$"):
        person = module.Person.model_validate_json(raw)
        assert person.name and person.city and 0 <= person.age <= 130
    assert len(_field(out, r"^model: Person\(name=")) == len(module.TEXTS)


def test_react_tools(run_example):
    module, out = run_example("react_tools")
    runs = out.split("question: ")[1:]
    assert len(runs) == 3
    for run in runs:
        steps = _field(run, r"^ *assistant: I need to (calculate|look up|answer the question)(.*)$")
        assert 1 <= len(steps) <= 3
        assert steps[0][0] in ("calculate", "look up")  # the first step must use a tool
        results = _field(run, r"^ *user: Result: (.*)$")
        assert results
        for (action, given), result in zip(steps, results):
            if action == "calculate":  # the program really ran the tool on the generated expression
                assert re.fullmatch(r" [0-9+*() -]+\.", given) and result == module.calculate(given.rstrip("."))
            else:
                assert result in module.FACTS.values()
        assert _field(run, r"^answer: (.+)$")


def test_multi_turn_chat(run_example):
    module, out = run_example("multi_turn_chat")
    turns = len(module.QUESTIONS)
    roles = _field(out, r"^ *(system|user|assistant): ")
    assert roles == ["system"] + ["user", "assistant"] * turns
    for q in module.QUESTIONS:
        assert f"     user: {q}\n" in out
    replies = _field(out, r"^reply (\d+): (\d+) tokens.*; (\d+) of (\d+) prompt tokens were cached$")
    assert [int(r[0]) for r in replies] == list(range(turns))
    assert all(int(r[1]) > 0 for r in replies)
    assert all(int(r[2]) > 0 for r in replies[1:])  # each turn reuses the conversation so far
