"""The interpreter: runs IR nodes on program states through a backend, one method per node kind.

``run`` executes a node on one state (on that state's worker thread); ``run_group`` executes it
on several fork children at once, sending all their gens (or selects) to the backend in one
call. A node kind the interpreter does not know raises UnsupportedFeatureError naming it.
"""

from __future__ import annotations

from typing import Any

from braid.errors import InvalidRequestError, ProgramError, UnsupportedFeatureError
from braid.lang.backend import Backend, Conversation, GenCall, GenResult
from braid.lang.chat_template import RoleMarkers
from braid.lang.choices import CHOICES_METHODS, NEEDS_UNCONDITIONAL
from braid.lang.ir import SAMPLING_NAMES, Gen, Node, RoleBegin, RoleEnd, Select, SetVar, Text, flatten

# dtype -> the constraint that makes the output parse as that type
_INT = r"-?(0|[1-9][0-9]*)"
DTYPE_CONSTRAINTS: dict[type, tuple[str, Any]] = {
    int: ("regex", _INT),
    float: ("regex", _INT + r"(\.[0-9]+)?([eE][+-]?[0-9]+)?"),
    bool: ("choices", ("True", "False")),
}


class Interpreter:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    @property
    def markers(self) -> RoleMarkers:
        return self.backend.role_markers()  # each backend reads them once and keeps them

    # ---- dispatch ------------------------------------------------------------------------------------
    def run(self, state, node: Node) -> None:
        for leaf in flatten(node):
            self._guarded(leaf, lambda leaf=leaf: self._method(leaf)(state, leaf))

    def run_group(self, states: list, node: Node) -> None:
        for leaf in flatten(node):
            if isinstance(leaf, Gen):
                self._guarded(leaf, lambda leaf=leaf: self.gen_group(states, leaf))
            elif isinstance(leaf, Select):
                self._guarded(leaf, lambda leaf=leaf: self.select_group(states, leaf))
            else:
                for state in states:
                    self._guarded(leaf, lambda leaf=leaf, state=state: self._method(leaf)(state, leaf))

    def _method(self, leaf: Node):
        method = getattr(self, _METHODS.get(type(leaf), ""), None)
        if method is None:
            raise UnsupportedFeatureError(f"the node {leaf.describe()}", f"interpreter ({self.backend.name})")
        return method

    @staticmethod
    def _guarded(leaf: Node, work) -> None:
        try:
            work()
        except InvalidRequestError as exc:  # name the node (and the gen's own field name), keep the class
            field = _GEN_NAMES.get(exc.field, exc.field)
            raise InvalidRequestError(f"{leaf.describe()}: {field}", exc.problem) from exc

    # ---- one method per node kind ----------------------------------------------------------------------
    def text(self, state, node: Text) -> None:
        state.append(node.value)

    def set_var(self, state, node: SetVar) -> None:
        state.set_var(node.name, node.value)

    def role_begin(self, state, node: RoleBegin) -> None:
        if state.open_role is not None:
            raise InvalidRequestError("role", f"{node.role!r} begins inside the open role {state.open_role[0]!r}")
        is_first = not state.has_messages and state.text_len == 0
        state.append(self.markers.begin_text(node.role, is_first))
        state.open_role = (node.role, state.text_len)

    def role_end(self, state, node: RoleEnd) -> None:
        if state.open_role is None or state.open_role[0] != node.role:
            now = "none is open" if state.open_role is None else f"{state.open_role[0]!r} is open"
            raise InvalidRequestError("role", f"end of {node.role!r}, but {now}")
        start = state.open_role[1]
        state.add_message(node.role, state.text_now()[start:])
        state.open_role = None
        state.append(self.markers.end[node.role])

    def gen(self, state, node: Gen) -> None:
        call = self._gen_call(state, node)
        if state.streaming:
            result = self.backend.generate_stream(call, lambda piece: state.append(piece, node.name))
        else:
            result = self.backend.generate([call])[0]
            state.append(result.text, node.name)
        self._capture(state, node, result)

    def select(self, state, node: Select) -> None:
        self.select_group([state], node)

    # ---- group forms -----------------------------------------------------------------------------------
    def gen_group(self, states: list, node: Gen) -> None:
        results = self.backend.generate([self._gen_call(s, node) for s in states])
        for state, result in zip(states, results):
            state.append(result.text, node.name)
            self._capture(state, node, result)

    def select_group(self, states: list, node: Select) -> None:
        method = CHOICES_METHODS.get(node.choices_method)
        scored = self.backend.score_choices([GenCall(s.text_now(), {}, conversation=_conversation(s)) for s in states],
                                            node.choices, unconditional=node.choices_method in NEEDS_UNCONDITIONAL)
        for state, logprobs in zip(states, scored):
            decision = method(logprobs)
            choice = node.choices[decision.index]
            state.append(choice, node.name)
            if node.name is not None:
                state.set_var(node.name, choice, {
                    "choices_method": node.choices_method,
                    "scores": decision.scores,
                    "choice_token_logprobs": [c.conditional for c in logprobs],
                })

    # ---- helpers ---------------------------------------------------------------------------------------
    def _gen_call(self, state, node: Gen) -> GenCall:
        merged = {**state.defaults, **node.sampling}
        sampling = {SAMPLING_NAMES.get(k, k): v for k, v in merged.items()}
        constraint = node.constraint or DTYPE_CONSTRAINTS.get(node.dtype)
        if constraint is not None:
            kind, spec = constraint
            sampling[kind] = list(spec) if kind == "choices" else spec
        return GenCall(state.text_now(), sampling, node.return_logprob, node.top_logprobs_num, _conversation(state))

    @staticmethod
    def _capture(state, node: Gen, result: GenResult) -> None:
        if node.name is None:
            return
        value: Any = result.text
        if node.dtype is not None and node.dtype is not str:
            value = _convert(node, result)
        state.set_var(node.name, value, result.meta_info)


def _conversation(state) -> Conversation:
    text = state.text_now()
    role, start = state.open_role if state.open_role is not None else (None, len(text))
    return Conversation(tuple(state.messages_now()), role, text[start:])


def _convert(node: Gen, result: GenResult) -> Any:
    text = result.text.strip()
    try:
        if node.dtype is bool:
            if text not in ("True", "False"):
                raise ValueError(text)
            return text == "True"
        return node.dtype(text)
    except ValueError:
        finish = result.meta_info.get("finish_reason")
        raise ProgramError(f"{node.describe()}: dtype {node.dtype.__name__}, but the output {result.text!r} "
                           f"does not parse as one (finish_reason {finish})") from None


_GEN_NAMES = {runtime: own for own, runtime in SAMPLING_NAMES.items()}
_METHODS = {Text: "text", SetVar: "set_var", RoleBegin: "role_begin", RoleEnd: "role_end", Gen: "gen",
            Select: "select"}
