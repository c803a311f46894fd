"""Structured extraction: fill a Pydantic model from free text.

``bd.gen(..., json_schema=Person)`` constrains decoding to JSON that matches the model's JSON
schema. ``meta_info["valid"]`` says whether the finished JSON passed a jsonschema check (it is
False when, say, ``max_tokens`` cut the JSON short; ``meta_info["validation_error"]`` says
why). The constraint guarantees the shape, not the facts: those are still the model's reading
of the text, which is why the program shows the 135M model one worked example first.

Run with `python examples/extract_pydantic.py`.
"""

from pydantic import BaseModel, Field

import braid as bd


class Person(BaseModel):
    name: str = Field(max_length=40)
    age: int = Field(ge=0, le=130)
    city: str = Field(max_length=40)


TEXTS = [
    "Maria Lopez is 34 years old and lives in Madrid, where she works as a nurse.",
    "At 71, retired teacher John Smith still walks his dog every morning in Boston.",
    "Kenji Tanaka, a 25-year-old engineer from Osaka, just started his first job.",
]


EXAMPLE_TEXT = "Ann Lee, a 50-year-old music teacher, lives in Lyon."
EXAMPLE_JSON = Person(name="Ann Lee", age=50, city="Lyon").model_dump_json()


def request(text):
    return f"Text: {text}\nGive the person's name, age and city as JSON."


@bd.program
def extract(s, text):
    s += bd.system("You extract facts from text as JSON.")
    # One worked example in the exact output format. The grammar emits compact JSON
    # ({"age":50}), which small models rarely see; without the example this one misreads ages.
    s += bd.user(request(EXAMPLE_TEXT)) + bd.assistant(EXAMPLE_JSON)
    s += bd.user(request(text))
    s += bd.assistant(bd.gen("data", json_schema=Person, max_tokens=48))


def main() -> None:
    with bd.Engine() as eng:
        states = extract.run_batch([{"text": t} for t in TEXTS], backend=eng, temperature=0)
        for text, state in zip(TEXTS, states):
            print(f"text:  {text}")
            print(f"json:  {state['data']}")
            meta = state.get_meta_info("data")
            print(f"valid: {meta['valid']}")
            if meta["valid"]:
                print(f"model: {Person.model_validate_json(state['data'])!r}\n")
            else:
                print(f"error: {meta['validation_error']}\n")


if __name__ == "__main__":
    main()
