"""Quickstart: the embedded default model (SmolLM2-135M-Instruct) on this machine's CPU or GPU.

Run with `python examples/quickstart.py` (or `braid run examples/quickstart.py`).
The 135M model is small: its answers are well-formed but often wrong on facts.
"""

import braid as bd


def chat(eng: bd.Engine, question: str) -> str:
    """The model is instruction-tuned: wrap the question in its chat template.
    (`eng.generate` sends prompts as they are; `eng.chat(messages)` does this for you.)"""
    return eng.tokenizer.apply_chat_template([{"role": "user", "content": question}])


def main() -> None:
    with bd.Engine() as eng:  # no model_path: the embedded default model
        greedy = {"max_new_tokens": 32, "temperature": 0}

        print("== one prompt, greedy")
        out = eng.chat([{"role": "user", "content": "What is the capital of France?"}], sampling_params=greedy)
        print(out["text"])
        meta = out["meta_info"]
        print(f"   ({meta['prompt_tokens']} prompt tokens, {meta['completion_tokens']} generated, "
              f"finish: {meta['finish_reason']})")

        print("== a batch of prompts sharing a chat prefix (the radix cache computes it once)")
        questions = ["Name a primary color.", "What is 2 + 2?", "Say hello in French."]
        for q, o in zip(questions, eng.generate(prompt=[chat(eng, q) for q in questions],
                                                sampling_params={**greedy, "stop": ["\n"]})):
            print(f"Q: {q}\nA: {o['text']}   [cached prompt tokens: {o['meta_info']['cached_tokens']}]")

        print("== streaming, sampled with a seed (same seed, same text)")
        params = {"max_new_tokens": 40, "temperature": 0.8, "top_p": 0.95, "seed": 42}
        for piece in eng.generate(prompt=chat(eng, "Write one sentence about the sea."), sampling_params=params,
                                  stream=True):
            print(piece["text"], end="", flush=True)
        print()


if __name__ == "__main__":
    main()
