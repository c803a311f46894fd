"""Sample several candidate answers in parallel, then let the model pick the best one.

The program forks its state into three children. Each child samples an answer at
temperature 0.8 with its own seed, so the candidates differ but a rerun prints the same ones.
The children share the parent's prompt, which the engine computes once. The parent then
lists the candidates and scores the choices "1", "2", "3" with ``bd.select`` (prompt
log-probabilities, no sampling).

Run with `python examples/fork_select_best.py`.
"""

import braid as bd


@bd.program
def best_of(s, task, n=3):
    s += bd.system("You are a helpful assistant.")
    s += bd.user(task)
    forks = s.fork(n)
    for seed, f in enumerate(forks):
        # Per-child gens with different seeds; the children run concurrently, so the engine
        # still decodes the candidates together in one batch.
        f += bd.assistant(bd.gen("candidate", max_tokens=48, stop="\n", temperature=0.8, seed=seed))
    candidates = [f["candidate"].strip() for f in forks]
    s["candidates"] = candidates
    listing = "\n".join(f"{i}. {c}" for i, c in enumerate(candidates, 1))
    # The parent never saw its children's text: the judging turn restates the task and candidates.
    s += bd.user(f"Task: {task}\nCandidates:\n{listing}\nWhich candidate is best? Answer with its number.")
    s += bd.assistant("The best candidate is " + bd.select("best", choices=[str(i) for i in range(1, n + 1)]))


def main() -> None:
    with bd.Engine() as eng:
        task = "Give one tip for sleeping better, in one sentence."
        state = best_of.run(task=task, backend=eng)
        print(f"task: {task}\n")
        for i, candidate in enumerate(state["candidates"], 1):
            print(f"candidate {i}: {candidate}")
        scores = state.get_meta_info("best")["scores"]
        print(f"\nscores (mean log-probability per token): {[round(x, 3) for x in scores]}")
        best = int(state["best"])
        print(f"best: {best} -> {state['candidates'][best - 1]}")


if __name__ == "__main__":
    main()
