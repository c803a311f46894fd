"""Few-shot question answering with a batch of questions.

Every program starts with the same five worked examples (plain-text Q/A pairs, no chat
template), then asks its own question. ``run_batch`` runs the programs concurrently and the
engine batches their requests. The shared few-shot prefix is computed once, by whichever
request the engine admits first, and the others read it from the radix cache: their
``cached_tokens`` cover the prefix, the first one's is 0.

Run with `python examples/few_shot_qa.py`.
"""

import braid as bd

FEW_SHOT = """Answer each question with a few words.

Q: What is the capital of Italy?
A: Rome
Q: What color is the sky on a clear day?
A: Blue
Q: How many legs does a dog have?
A: Four
Q: What do bees make?
A: Honey
Q: What is the largest planet in the solar system?
A: Jupiter
"""

QUESTIONS = [
    "What is the capital of France?",
    "What color is grass?",
    "What do cows drink?",
    "What is the opposite of hot?",
    "How many days are in a week?",
    "What animal says meow?",
]


@bd.program
def qa(s, question):
    s += FEW_SHOT
    # No space after "A:": the examples tokenize as "A:" + " Rome", so the answer's first token
    # brings its own leading space (a prompt ending in a space makes small models stumble).
    s += f"Q: {question}\nA:" + bd.gen("answer", max_tokens=12, stop="\n")


def main() -> None:
    with bd.Engine() as eng:
        states = qa.run_batch([{"question": q} for q in QUESTIONS], backend=eng, temperature=0)
        for q, state in zip(QUESTIONS, states):
            meta = state.get_meta_info("answer")
            print(f"Q: {q}\nA: {state['answer'].strip()}   "
                  f"[cached prompt tokens: {meta['cached_tokens']} of {meta['prompt_tokens']}]")
        reused = sum(st.get_meta_info("answer")["cached_tokens"] > 0 for st in states)
        print(f"\n{reused} of {len(states)} programs read the few-shot prefix from the radix cache")


if __name__ == "__main__":
    main()
