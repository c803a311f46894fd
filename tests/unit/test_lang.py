"""The language on a scripted backend: IR, states, fork groups, run_batch, streaming, errors.

The scripted backend answers from a function of the prompt and records every call, so these
tests check what the interpreter sends and in which grouping. The same primitives run on real
engines in test_lang_engine.py.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading

import jinja2
import pytest

import braid as bd
from braid.errors import InvalidRequestError, ProgramError, UnsupportedFeatureError
from braid.lang.backend import GenCall, GenResult
from braid.lang.chat_template import PLAIN, markers_from_template
from braid.lang.choices import CHOICES_METHODS, ChoiceLogprobs


class Scripted:
    """Generates ``answer(prompt, sampling)``; scores choice c as ``-len(c)`` (+ bonus if the
    prompt ends with the choice's first letter). Records each call's batch size."""

    name = "scripted"

    def __init__(self, answer=None, fail_on: str | None = None) -> None:
        self.answer = answer or (lambda prompt, sampling: f"<{len(prompt)}>")
        self.fail_on = fail_on
        self.gen_batches: list[int] = []
        self.score_batches: list[int] = []
        self.cached: list[str] = []
        self.lock = threading.Lock()

    def role_markers(self):
        return PLAIN

    def generate(self, calls: list[GenCall]) -> list[GenResult]:
        with self.lock:
            self.gen_batches.append(len(calls))
        out = []
        for c in calls:
            if self.fail_on is not None and self.fail_on in c.prompt:
                raise RuntimeError(f"backend failure on {self.fail_on!r}")
            out.append(GenResult(self.answer(c.prompt, c.sampling), {"sampling": c.sampling}))
        return out

    def generate_stream(self, call: GenCall, on_text) -> GenResult:
        text = self.generate([call])[0].text
        for ch in text:
            on_text(ch)
        return GenResult(text, {})

    def score_choices(self, calls, choices, unconditional):
        prompts = [c.prompt for c in calls]
        with self.lock:
            self.score_batches.append(len(prompts))
        return [[ChoiceLogprobs([-float(len(c)), 0.0], [-1.0, -1.0] if unconditional else None) for c in choices]
                for _ in prompts]

    def cache_prefix(self, prompt: str) -> None:
        self.cached.append(prompt)


# ---- IR ----------------------------------------------------------------------------------------
def test_nodes_combine_with_plus_and_strings():
    expr = "Q: " + bd.gen("a", max_tokens=3) + "\n" + bd.select("b", choices=["x", "y"])
    assert expr.describe() == "text 'Q: ' + gen 'a' + text '\\n' + select 'b'"
    assert bd.user("hi").describe() == "begin of role 'user' + text 'hi' + end of role 'user'"


@pytest.mark.parametrize("make, field", [
    (lambda: bd.gen("x", regex=r"\d+", choices=["a"]), "gen('x')"),
    (lambda: bd.gen("x", dtype=int, regex=r"\d+"), "gen('x')"),
    (lambda: bd.gen("x", dtype=list), "gen('x').dtype"),
    (lambda: bd.gen("x", max_tokens="5"), "gen('x').max_tokens"),
    (lambda: bd.gen("x", ignore_eos=1), "gen('x').ignore_eos"),
    (lambda: bd.gen("x", choices=[]), "gen('x').choices"),
    (lambda: bd.gen("x", choices=["a", "a"]), "gen('x').choices"),
    (lambda: bd.gen("x", json_schema=3), "gen('x').json_schema"),
    (lambda: bd.gen(""), "gen.name"),
    (lambda: bd.select("s", choices=["a", ""]), "select('s').choices"),
    (lambda: bd.role("narrator", "x"), "role"),
    (lambda: bd.user(3), "user"),
    (lambda: "x" + 3 + bd.gen("a"), None),
])
def test_bad_nodes_are_refused_where_they_are_built(make, field):
    if field is None:
        with pytest.raises(TypeError):
            make()
        return
    with pytest.raises(InvalidRequestError) as err:
        make()
    assert err.value.field == field


def test_unknown_choices_method_lists_the_known_ones():
    with pytest.raises(bd.errors.UnknownNameError, match="token_length_normalized"):
        bd.select("s", choices=["a"], choices_method="vibes")


# ---- chat templates ----------------------------------------------------------------------------
CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nDefault"
          "<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def _render(template: str):
    tpl = jinja2.Environment().from_string(template)
    return lambda messages, gen: tpl.render(messages=messages, add_generation_prompt=gen)


@pytest.mark.parametrize("template", [CHATML, LLAMA3])
def test_role_markers_rebuild_the_templates_conversations(template):
    render = _render(template)
    m = markers_from_template(render)
    conv = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
            {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}]
    built = ""
    for i, msg in enumerate(conv):
        built += m.begin_text(msg["role"], i == 0) + msg["content"] + m.end[msg["role"]]
    assert built == render(conv, False)
    user_first = m.first_begin["user"] + "U" + m.end["user"] + m.begin["assistant"]
    assert user_first == render([{"role": "user", "content": "U"}], True)


def test_a_template_that_drops_content_is_refused():
    with pytest.raises(ValueError, match="dropped"):
        markers_from_template(_render("{% for m in messages %}[{{ m['role'] }}]{% endfor %}"))


# ---- choices methods ---------------------------------------------------------------------------
def test_choices_methods_golden():
    lps = [ChoiceLogprobs([-1.0, -3.0], [-0.5, -0.5]), ChoiceLogprobs([-2.5], [-3.0]),
           ChoiceLogprobs([-1.0, -0.5], [-2.0, -2.0])]
    d = CHOICES_METHODS.get("token_length_normalized")(lps)
    assert d.scores == [-2.0, -2.5, -0.75] and d.index == 2
    d = CHOICES_METHODS.get("greedy_token_selection")(lps)  # tie on -1.0, then -0.5 > -3.0
    assert d.scores == [-1.0, -2.5, -1.0] and d.index == 2
    d = CHOICES_METHODS.get("unconditional_likelihood_normalized")(lps)
    assert d.scores == [-1.5, 0.5, 1.25] and d.index == 2


# ---- states ------------------------------------------------------------------------------------
@bd.program
def chat(s, question):
    s += bd.system("Be brief.")
    s += bd.user(question)
    s += bd.assistant(bd.gen("answer", max_tokens=8))
    s += "Sure? " + bd.select("sure", choices=["yes", "no!"])


def test_run_appends_in_order_and_records_messages():
    be = Scripted(answer=lambda p, s: "fine")
    st = chat.run(question="How?", backend=be)
    assert st.text() == "System: Be brief.\nUser: How?\nAssistant: fine\nSure? yes"
    assert st.messages() == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How?"},
                             {"role": "assistant", "content": "fine"}]
    assert st["answer"] == "fine" and st["sure"] == "yes"
    assert st.get_meta_info("sure")["scores"] == [-1.5, -1.5]  # a tie goes to the first choice
    assert st.get_meta_info("answer")["sampling"] == {"max_new_tokens": 8}


def test_with_blocks_roles_and_role_errors():
    @bd.program
    def p(s):
        with s.user():
            s += "hi"
        with s.assistant():
            s += bd.gen("a")

    st = p.run(backend=Scripted(answer=lambda *_: "yo"))
    assert [m["role"] for m in st.messages()] == ["user", "assistant"]

    @bd.program
    def nested(s):
        s += bd.role("user") + bd.role("assistant")

    with pytest.raises(InvalidRequestError, match="inside the open role 'user'"):
        nested.run(backend=Scripted())


def test_reading_an_unset_variable_names_it():
    st = chat.run(question="x", backend=Scripted())
    with pytest.raises(KeyError, match="'missing'.*answer, sure"):
        st["missing"]


def test_assignment_is_ordered_with_gens_and_run_defaults_reach_every_gen():
    @bd.program
    def p(s):
        s += bd.gen("a", max_tokens=3)
        s["b"] = s["a"] + "!"
        s += bd.gen("c")

    be = Scripted(answer=lambda prompt, sampling: str(sorted(sampling.items())))
    st = p.run(backend=be, temperature=0, max_tokens=9)
    assert st["a"] == "[('max_new_tokens', 3), ('temperature', 0)]"
    assert st["b"] == st["a"] + "!"
    assert st["c"] == "[('max_new_tokens', 9), ('temperature', 0)]"
    with pytest.raises(InvalidRequestError, match="unexpected keyword argument 'nonsense'"):
        p.run(backend=be, nonsense=1)


def test_dtype_constrains_and_converts():
    @bd.program
    def p(s):
        s += bd.gen("n", dtype=int) + bd.gen("f", dtype="float") + bd.gen("b", dtype=bool)

    answers = {"regex": "42", "choices": "False"}

    def answer(prompt, sampling):
        if "choices" in sampling:
            assert sampling["choices"] == ["True", "False"]
            return "False"
        return "2.5e3" if "(\\." in sampling["regex"] else answers["regex"]

    st = p.run(backend=Scripted(answer=answer))
    assert (st["n"], st["f"], st["b"]) == (42, 2500.0, False)

    @bd.program
    def q(s):
        s += bd.gen("n", dtype=int)

    with pytest.raises(ProgramError, match="dtype int, but the output 'forty'"):
        q.run(backend=Scripted(answer=lambda *_: "forty"))


def test_fork_children_start_with_the_parent_text_and_group_their_gens():
    be = Scripted(answer=lambda prompt, s: f"[{prompt.count('x')}]")

    @bd.program
    def p(s):
        s += "root "
        forks = s.fork(3)
        for i, f in enumerate(forks):
            f += "x" * i
        forks += bd.gen("g") + " then " + bd.select("c", choices=["a", "bb"])
        forks[1] += bd.gen("only")
        s["gs"] = [f["g"] for f in forks]
        s["texts"] = [f.text() for f in forks]

    st = p.run(backend=be)
    assert st["gs"] == ["[0]", "[1]", "[2]"]
    assert all(t.startswith("root ") for t in st["texts"])
    assert st.text() == "root "  # the parent never sees child text
    assert be.cached == ["root "]
    assert be.gen_batches == [3, 1] and be.score_batches == [3]


def test_a_failing_child_fails_alone_and_its_siblings_finish():
    be = Scripted(fail_on="boom")

    @bd.program
    def p(s):
        forks = s.fork(3)
        forks[1] += "boom" + bd.gen("first")  # fails on child 1 only
        forks += bd.gen("g")  # the group runs over the children still without error
        s["ok"] = [forks[0]["g"], forks[2]["g"]]
        s["bad"] = forks[1]["g"]

    with pytest.raises(ProgramError, match="variable 'g'.*backend failure"):
        p.run(backend=be)
    assert be.gen_batches == [1, 2]


def test_run_batch_keeps_order_and_isolates_errors():
    be = Scripted(answer=lambda prompt, s: prompt.split("User: ")[-1].split("\n")[0], fail_on="bad")
    batch = [{"question": "one"}, {"question": "bad"}, {"question": 3}, {"wrong": 1}, {"question": "four"}]
    states = chat.run_batch(batch, backend=be, num_threads=2)
    assert states[0]["answer"] == "one" and states[4]["answer"] == "four"
    assert isinstance(states[1].error, RuntimeError)
    assert isinstance(states[2].error, InvalidRequestError)
    assert "missing a required argument: 'question'" in str(states[3].error)
    with pytest.raises(ProgramError, match="backend failure"):
        states[1]["answer"]
    with pytest.raises(InvalidRequestError, match="num_threads"):
        chat.run_batch(batch, backend=be, num_threads=0)


def test_streaming_pieces_concatenate_to_the_text():
    be = Scripted(answer=lambda *_: "streamed!")
    st = chat.run(question="q", backend=be, stream=True)
    pieces = list(st.text_iter())
    assert len(pieces) > 5 and "".join(pieces) == st.text()
    assert "".join(chat.run(question="q", backend=be, stream=True).text_iter("answer")) == "streamed!"

    async def collect():
        return [p async for p in chat.run(question="q", backend=be, stream=True).text_async_iter()]

    assert "".join(asyncio.run(collect())) == st.text()


def test_streaming_raises_the_programs_error_after_its_pieces():
    st = chat.run(question="bad", backend=Scripted(fail_on="bad"), stream=True)
    seen = []
    with pytest.raises(ProgramError, match="backend failure"):
        for piece in st.text_iter():
            seen.append(piece)
    assert "".join(seen).startswith("System: Be brief.")


def test_default_backend_and_missing_backend():
    @bd.program
    def p(s):
        s += bd.gen("a")

    program_module = sys.modules["braid.lang.program"]

    saved = dict(program_module._default)
    try:
        program_module._default.clear()
        with pytest.raises(InvalidRequestError, match="no backend given"):
            p.run()
        bd.set_default_backend(Scripted(answer=lambda *_: "d"))
        assert p.run()["a"] == "d"
    finally:
        program_module._default.clear()
        program_module._default.update(saved)
    with pytest.raises(InvalidRequestError, match="expected an Engine"):
        p.run(backend=object())


def test_a_node_kind_the_interpreter_does_not_know_names_itself():
    from braid.lang.interpreter import Interpreter
    from braid.lang.ir import Node

    class Mystery(Node):
        pass

    with pytest.raises(UnsupportedFeatureError, match="mystery.*scripted"):
        Interpreter(Scripted()).run(None, Mystery())


def test_programs_call_other_programs_inline():
    @bd.program
    def inner(s, word):
        s += word + bd.gen("w")

    @bd.program
    def outer(s):
        inner(s, "a")
        inner(s, "b")

    assert outer.run(backend=Scripted(answer=lambda p, _: str(len(p)))).text() == "a1b3"


def test_reading_a_variable_waits_for_the_node_that_sets_it_again():
    counter = iter(range(100))
    be = Scripted(answer=lambda *_: str(next(counter)))

    @bd.program
    def p(s):
        s += bd.gen("x")
        first = s["x"]
        s += " then " + bd.gen("x")
        s["x"] = s["x"] + "!"  # reads the second gen's value, then queues a third write
        s["seen"] = (first, s["x"])

    st = p.run(backend=be)
    assert st["seen"] == ("0", "1!") and st["x"] == "1!"


def test_a_value_whose_new_setter_was_skipped_is_not_returned_stale():
    @bd.program
    def p(s):
        s += bd.gen("x")
        s += "boom" + bd.gen("y")  # fails
        s += bd.gen("x")  # skipped

    (st,) = p.run_batch([{}], backend=Scripted(fail_on="boom"))  # the failed state, not raised
    with pytest.raises(ProgramError, match="variable 'x'"):
        st["x"]


def test_json_schemas_reach_backends_as_json_text():
    import pydantic

    class Person(pydantic.BaseModel):
        name: str

    seen = []
    be = Scripted(answer=lambda prompt, sampling: seen.append(sampling["json_schema"]) or "{}")

    @bd.program
    def p(s):
        s += bd.gen("a", json_schema=Person) + bd.gen("b", json_schema={"type": "object"})

    p.run(backend=be)
    assert [json.loads(x) for x in seen] == [Person.model_json_schema(), {"type": "object"}]


def test_any_whitespace_reaches_the_runtime():
    be = Scripted(answer=lambda prompt, sampling: str(sampling.get("any_whitespace")))

    @bd.program
    def p(s):
        s += bd.gen("a", json_schema={"type": "object"}, any_whitespace=True)

    assert p.run(backend=be)["a"] == "True"
