"""A ReAct-style agent: the model picks a tool, the program runs it, the result goes back in.

Each step the model chooses an action with ``bd.select`` ("calculate", "look up" or "answer
the question"), then writes the action's input under a constraint that fits the tool: an
arithmetic expression (a regex), or one of the lookup table's topics (another select). Plain
Python runs the tool and appends its result as the next user turn; the loop stops at the
answer or after three steps. Ordinary Python control flow around ``s += ...`` is the whole
agent framework.

The 135M default model needs help to act sensibly, and the program gives it in two ways that
real agents use too: actions are phrases that continue "I need to ..." (a small model scores
those far better than bare tool names), and the harness restricts the choices: the first step
must use a tool, and no step repeats the previous step's tool (small models echo their last
turn). Greedy selects keep the run reproducible.

Run with `python examples/react_tools.py`.
"""

import ast
import operator

import braid as bd

FACTS = {
    "Eiffel Tower height": "The Eiffel Tower is 330 metres tall.",
    "Mount Everest height": "Mount Everest is 8849 metres high.",
    "speed of light": "Light travels about 300000 km per second.",
}
CALCULATE, LOOK_UP, ANSWER = "calculate", "look up", "answer the question"


def calculate(expression):
    """Evaluates + - * and parentheses on integers; eval() would run any Python the model wrote."""
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        raise ValueError("unsupported expression")

    try:
        return str(value(ast.parse(expression.strip(), mode="eval").body))
    except (SyntaxError, ValueError) as exc:
        return f"error: {exc}"


@bd.program
def react(s, question, max_steps=3):
    s += bd.user(f"Question: {question}")
    previous = None
    for step in range(max_steps):
        allowed = [CALCULATE, LOOK_UP] if step == 0 else [CALCULATE, LOOK_UP, ANSWER]
        allowed = [a for a in allowed if a != previous]
        # Fresh names each step: the state keeps every step's action and input, and a read
        # never picks up an earlier step's value.
        action, given = f"action_{step}", f"input_{step}"
        with s.assistant():
            s += "I need to " + bd.select(action, choices=allowed)
            if s[action] == CALCULATE:
                # The regex ends in a period so the model can close the expression where it
                # wants to; without an end the grammar would keep it writing digits.
                s += bd.gen(given, regex=r"[0-9+*() -]+\.", max_tokens=16)
            elif s[action] == LOOK_UP:
                s += " the " + bd.select(given, choices=list(FACTS)) + "."
            else:
                s += ". The answer is" + bd.gen(given, max_tokens=24, stop="\n")
        if s[action] == ANSWER:
            s["answer"] = s[given].strip(" :.")
            return
        result = calculate(s[given].rstrip(".")) if s[action] == CALCULATE else FACTS[s[given]]
        s += bd.user(f"Result: {result}")
        previous = s[action]
    s["answer"] = None  # out of steps


def main() -> None:
    questions = [
        "A ticket costs 12 dollars. How much do 7 tickets cost?",
        "How tall is the Eiffel Tower?",
        "What is 17 * 23 + 4?",
    ]
    with bd.Engine() as eng:
        states = react.run_batch([{"question": q} for q in questions], backend=eng, temperature=0)
        for q, state in zip(questions, states):
            print(f"question: {q}")
            for m in state.messages()[1:]:  # the question is printed above
                print(f"  {m['role']:>9}: {m['content']}")
            print(f"answer: {state['answer']}\n")


if __name__ == "__main__":
    main()
