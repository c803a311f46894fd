"""A multi-turn chat written with role blocks.

``with s.user():`` and ``with s.assistant():`` open a chat turn and close it on exit, so a
turn can be built from several pieces: text, gens, selects. Each assistant turn is generated
with the whole conversation so far as its prompt, most of which the radix cache already holds
from the previous turn. ``state.messages()`` returns the finished conversation as
``{"role", "content"}`` dicts, ready for any chat API.

Run with `python examples/multi_turn_chat.py`.
"""

import braid as bd

QUESTIONS = [
    "Hi! I want to grow tomatoes on my balcony. Is that a good idea?",
    "How often should I water them?",
    "Do they need full sun?",
    "Thanks! Give my balcony garden a fun name.",
]


@bd.program
def chat(s, questions):
    s += bd.system("You are a helpful assistant.")
    for turn, question in enumerate(questions):
        with s.user():
            s += question
        with s.assistant():
            s += bd.gen(f"reply_{turn}", max_tokens=40)


def main() -> None:
    with bd.Engine() as eng:
        state = chat.run(questions=QUESTIONS, backend=eng, temperature=0)
        for m in state.messages():
            print(f"{m['role']:>9}: {m['content']}")
        print()
        for turn in range(len(QUESTIONS)):
            meta = state.get_meta_info(f"reply_{turn}")
            cut = " (cut at max_tokens)" if meta["finish_reason"]["type"] == "length" else ""
            print(f"reply {turn}: {meta['completion_tokens']} tokens{cut}; "
                  f"{meta['cached_tokens']} of {meta['prompt_tokens']} prompt tokens were cached")


if __name__ == "__main__":
    main()
