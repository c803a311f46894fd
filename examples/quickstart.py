"""Quickstart: a tour of braid's language on the embedded default model (SmolLM2-135M-Instruct).

It shows, in order: a chat program with a generated answer, a fork into three branches that
share the cached prefix, a choice made with ``bd.select``, the radix cache at work on a second
run, streaming, constrained generation (an ``int`` and a regex), and the raw engine API.

Run with `python examples/quickstart.py` (or `braid run examples/quickstart.py`). It takes well
under a minute on a laptop CPU. The 135M model is small: its answers are well-formed but often
wrong on facts.
"""

import braid as bd


@bd.program
def agent(s, question):
    s += bd.system("You are terse.")
    s += bd.user(question)
    s += bd.assistant(bd.gen("answer", max_tokens=48, stop="\n"))
    # Three branches share the conversation so far; the engine computes that prefix once.
    forks = s.fork(3)
    for f, topic in zip(forks, ["history", "food", "geography"]):
        f += bd.user(f"Give one fact about its {topic}.")
    # One node added to the whole group: the three gens go to the engine as one batch.
    forks += bd.assistant(bd.gen("fact", max_tokens=32, stop="\n"))
    # The parent never sees its children's text, so it copies their results in explicitly.
    facts = [f["fact"] for f in forks]
    s["facts"] = facts
    listing = "\n".join(f"{i}. {fact}" for i, fact in enumerate(facts, 1))
    s += bd.user(f"Here are three facts:\n{listing}\nWhich fact is the most interesting: 1, 2 or 3?")
    s += bd.assistant("Best: " + bd.select("best", choices=["1", "2", "3"]))


@bd.program
def story(s, topic):
    s += bd.user(f"Write two sentences about {topic}.")
    s += bd.assistant(bd.gen("story", max_tokens=48))


@bd.program
def trivia(s):
    s += bd.user("How many legs does a spider have?")
    # A regex fixes the answer's shape; the model only picks the digits. Text the regex forces
    # ("A spider has ") is appended without running the model token by token.
    s += bd.assistant(bd.gen("legs", regex=r"A spider has [0-9]+ legs\.", max_tokens=12))
    s += bd.user("In which year did World War II end?")
    # dtype=int constrains decoding to an integer and converts the text: s["year"] is an int.
    s += bd.assistant(bd.gen("year", dtype=int, max_tokens=5))


def main() -> None:
    with bd.Engine() as eng:  # no model_path: the embedded default model
        question = "What is the capital of France?"

        print("== a program: answer, fork into three facts, select the best")
        state = agent.run(question=question, backend=eng, temperature=0)
        print("answer:", state["answer"])
        for i, fact in enumerate(state["facts"], 1):
            print(f"fact {i}:", fact)
        print("best:  ", state["best"], "  scores:", [round(x, 2) for x in state.get_meta_info("best")["scores"]])

        print("\n== the same program again: its prompt is now in the radix cache")
        again = agent.run(question=question, backend=eng, temperature=0)
        meta = again.get_meta_info("answer")
        print(f"answer: {again['answer']}   [cached prompt tokens: {meta['cached_tokens']} of "
              f"{meta['prompt_tokens']}]")

        print("\n== streaming (sampled with a seed: same seed, same text)")
        streamed = story.run(topic="the sea", backend=eng, stream=True, temperature=0.8, seed=42)
        for piece in streamed.text_iter("story"):  # only the gen's text, not the chat markup
            print(piece, end="", flush=True)
        print()

        print("\n== constrained generation")
        state = trivia.run(backend=eng, temperature=0)
        print(f"legs: {state['legs']!r}")
        print(f"year: {state['year']!r} ({type(state['year']).__name__})")

        print("\n== the whole conversation of the last program, as chat messages")
        for m in state.messages():
            print(f"{m['role']:>9}: {m['content']}")

        print("\n== the raw engine API: a prompt sent as is, no chat template")
        out = eng.generate(prompt="The capital of France is",
                           sampling_params={"max_new_tokens": 12, "temperature": 0, "stop": ["\n", "."]})
        meta = out["meta_info"]
        print(f"The capital of France is{out['text']}   "
              f"[{meta['prompt_tokens']} prompt tokens, {meta['completion_tokens']} generated, "
              f"finish: {meta['finish_reason']['type']}]")


if __name__ == "__main__":
    main()
