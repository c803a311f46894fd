"""``ProgramState`` (the ``s`` of a program) and ``ForkGroup``.

Execution is asynchronous, as in SGLang: ``s += node`` queues the node and returns at once;
each state runs its queue in order on its own worker thread (started when work arrives, gone
when the queue is empty). So fork children, and the programs of a ``run_batch``, run
concurrently without the program saying so. Reading a result waits for it: ``s[name]`` until
the variable is set (or the queue is done), ``text()`` and ``messages()`` until the queue is
empty.

Ownership: the worker thread is the only writer of a state's text, variables and messages;
readers take ``_cv``'s lock. After a node fails, the state keeps its error, skips the rest of
its queue, and every read of a value it lacks raises :class:`ProgramError` from that error.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from braid.errors import InvalidRequestError, ProgramError
from braid.lang.ir import Gen, Node, Select, SetVar, as_node, flatten, role, role_end

_END = object()


class ProgramState:
    """The text, variables and messages of one program run (or one fork child)."""

    def __init__(self, interpreter, defaults: dict[str, Any] | None = None, stream: bool = False) -> None:
        self._interp = interpreter
        self.defaults: dict[str, Any] = dict(defaults or {})  # run-level sampling defaults (gen names)
        self.streaming = stream
        self.error: BaseException | None = None
        self._pieces: list[tuple[str, str | None]] = []  # (text, name of the gen/select that made it)
        self._vars: dict[str, Any] = {}
        self._meta: dict[str, dict] = {}
        self._messages: list[dict[str, str]] = []
        self.open_role: tuple[str, int] | None = None  # (role, text length where its content starts)
        self._cv = threading.Condition()
        self._queue: deque[tuple[Callable[[], None], tuple[str, ...]]] = deque()
        self._pending: dict[str, int] = {}  # variable -> queued nodes that will set it
        self._busy = False
        self._done = not stream  # a streamed run is done when its program function has returned

    # ---- writing (any thread) -------------------------------------------------------------------
    def __iadd__(self, other: Any) -> ProgramState:
        node = as_node(other, "s += ...")
        self.submit(lambda: self._interp.run(self, node), names_set_by(node))
        return self

    def __setitem__(self, name: str, value: Any) -> None:
        node = SetVar(name, value)
        self.submit(lambda: self._interp.run(self, node), (name,))

    def submit(self, work: Callable[[], None], names: tuple[str, ...] = ()) -> None:
        """Queue ``work``, which sets variables ``names``: until it has run, reading one of
        them waits for it (not for an older value of the same name)."""
        with self._cv:
            self._queue.append((work, names))
            for name in names:
                self._pending[name] = self._pending.get(name, 0) + 1
            if not self._busy:
                self._busy = True
                threading.Thread(target=self._drain, name="braid-program", daemon=True).start()

    def _drain(self) -> None:
        while True:
            with self._cv:
                if not self._queue:
                    self._busy = False
                    self._cv.notify_all()
                    return
                work, names = self._queue.popleft()
            try:
                if self.error is None:
                    work()
                else:  # skipped: an older value of a name it would set must not pass for its result
                    with self._cv:
                        for name in names:
                            self._vars.pop(name, None)
                    if hasattr(work, "skip"):  # a group task must still hear from every member
                        work.skip()
            except BaseException as exc:  # kept, and raised to whoever reads a value it lacks
                with self._cv:
                    self.error = exc
            finally:
                with self._cv:
                    for name in names:
                        self._pending[name] -= 1
                    self._cv.notify_all()

    # ---- roles as blocks ---------------------------------------------------------------------------
    def system(self) -> _RoleBlock:
        return _RoleBlock(self, "system")

    def user(self) -> _RoleBlock:
        return _RoleBlock(self, "user")

    def assistant(self) -> _RoleBlock:
        return _RoleBlock(self, "assistant")

    # ---- reading (any thread; waits) ------------------------------------------------------------
    def sync(self) -> None:
        """Wait until every queued node has run."""
        with self._cv:
            self._cv.wait_for(lambda: not self._busy)

    def __getitem__(self, name: str) -> Any:
        with self._cv:
            self._cv.wait_for(lambda: (name in self._vars and not self._pending.get(name)) or not self._busy)
            if name in self._vars:
                return self._vars[name]
        self._raise_error(f"variable {name!r}")
        known = ", ".join(sorted(self._vars)) or "none"
        raise KeyError(f"no variable {name!r} was set by a gen, select or assignment; set: {known}")

    def __contains__(self, name: str) -> bool:
        self.sync()
        return name in self._vars

    def get_meta_info(self, name: str) -> dict:
        """The ``meta_info`` of the gen or select that set ``name``."""
        self[name]
        with self._cv:
            if name not in self._meta:
                raise KeyError(f"variable {name!r} was assigned, not generated: it has no meta_info")
            return self._meta[name]

    def text(self) -> str:
        self.sync()
        return self.text_now()

    def messages(self) -> list[dict[str, str]]:
        """The finished messages, in order, as ``{"role", "content"}`` dicts."""
        self.sync()
        with self._cv:
            return [dict(m) for m in self._messages]

    def variables(self) -> dict[str, Any]:
        self.sync()
        with self._cv:
            return dict(self._vars)

    def text_iter(self, var_name: str | None = None) -> Iterator[str]:
        """Text pieces as they are produced (all of them, or only those of gen/select
        ``var_name``); they concatenate to ``text()`` (or ``s[var_name]``'s text). Raises the
        program's error, if it fails, after the pieces made before it."""
        i = 0
        while True:
            with self._cv:
                self._cv.wait_for(lambda seen=i: seen < len(self._pieces) or self._finished())
                fresh = self._pieces[i:]
                finished = self._finished() and i + len(fresh) == len(self._pieces)
            i += len(fresh)
            for text, var in fresh:
                if var_name is None or var == var_name:
                    yield text
            if finished:
                self._raise_error("the stream")
                return

    async def text_async_iter(self, var_name: str | None = None) -> AsyncIterator[str]:
        """``text_iter`` for asyncio callers (the waiting happens on a worker thread)."""
        it = self.text_iter(var_name)
        while True:
            piece = await asyncio.to_thread(next, it, _END)
            if piece is _END:
                return
            yield piece

    def fork(self, n: int) -> ForkGroup:
        """``n`` children that start with this state's text, variables and messages. The
        prefix is cached by the backend first, so the children compute it once."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidRequestError("fork", f"expected a number of children >= 1, got {n!r}")
        self.sync()
        self._raise_error("fork")
        text = self.text_now()
        if text:
            self._interp.backend.cache_prefix(text)
        return ForkGroup([self._child() for _ in range(n)])

    def __repr__(self) -> str:
        return f"ProgramState(text={self.text_now()[-60:]!r}, vars={sorted(self._vars)})"

    # ---- for the interpreter (worker thread) ---------------------------------------------------------
    def text_now(self) -> str:
        with self._cv:
            return "".join(t for t, _ in self._pieces)

    @property
    def text_len(self) -> int:
        with self._cv:
            return sum(len(t) for t, _ in self._pieces)

    @property
    def has_messages(self) -> bool:
        return bool(self._messages)

    def append(self, text: str, var: str | None = None) -> None:
        if text:
            with self._cv:
                self._pieces.append((text, var))
                self._cv.notify_all()

    def set_var(self, name: str, value: Any, meta: dict | None = None) -> None:
        with self._cv:
            self._vars[name] = value
            if meta is not None:
                self._meta[name] = meta
            else:
                self._meta.pop(name, None)
            self._cv.notify_all()

    def messages_now(self) -> list[dict[str, str]]:
        with self._cv:
            return [dict(m) for m in self._messages]

    def add_message(self, role_name: str, content: str) -> None:
        with self._cv:
            self._messages.append({"role": role_name, "content": content})

    def mark_done(self) -> None:
        with self._cv:
            self._done = True
            self._cv.notify_all()

    # ---- internals ------------------------------------------------------------------------------------
    def _finished(self) -> bool:
        return self._done and not self._busy

    def _raise_error(self, what: str) -> None:
        if self.error is not None:
            raise ProgramError(f"{what}: the program failed before setting it: {self.error}") from self.error

    def _child(self) -> ProgramState:
        child = ProgramState(self._interp, self.defaults)
        with self._cv:
            text = "".join(t for t, _ in self._pieces)
            child._pieces = [(text, None)] if text else []
            child._vars = dict(self._vars)
            child._meta = dict(self._meta)
            child._messages = [dict(m) for m in self._messages]
            child.open_role = self.open_role
        return child


def names_set_by(node: Node) -> tuple[str, ...]:
    return tuple(leaf.name for leaf in flatten(node) if isinstance(leaf, (Gen, Select, SetVar)) and leaf.name)


class _RoleBlock:
    """``with s.user(): s += ...``: the role's begin marker on entry, its end on exit."""

    def __init__(self, state: ProgramState, role_name: str) -> None:
        self.state = state
        self.role = role_name

    def __enter__(self) -> ProgramState:
        self.state += role(self.role)
        return self.state

    def __exit__(self, *exc: object) -> None:
        self.state += role_end(self.role)


class ForkGroup:
    """The children of ``s.fork(n)``. ``forks += node`` applies ``node`` to every child: gens
    and selects of all children go to the backend as one call (one batch over the shared
    prefix), once every child has run what was queued on it before."""

    def __init__(self, children: list[ProgramState]) -> None:
        self.children = children

    def __len__(self) -> int:
        return len(self.children)

    def __getitem__(self, i: int) -> ProgramState:
        return self.children[i]

    def __iter__(self) -> Iterator[ProgramState]:
        return iter(self.children)

    def __setitem__(self, i: int, child: ProgramState) -> None:
        # `forks[i] += x` reads the child, adds in place, then stores it back here
        if child is not self.children[i]:
            raise InvalidRequestError("forks[i]", "a fork group's children cannot be replaced")

    def __iadd__(self, other: Any) -> ForkGroup:
        node = as_node(other, "forks += ...")
        if not any(isinstance(leaf, (Gen, Select)) for leaf in flatten(node)):
            for child in self.children:
                child += node
            return self
        task = _GroupTask(self.children, lambda states: self.children[0]._interp.run_group(states, node))
        for child in self.children:
            child.submit(task.bind(child), names_set_by(node))
        return self


class _GroupTask:
    """Queued on every member; the last member to reach it runs ``run`` over the members still
    without error, and the others wait for it, so each member's queue order is kept."""

    def __init__(self, members: list[ProgramState], run: Callable[[list[ProgramState]], None]) -> None:
        self._members = members
        self._run = run
        self._lock = threading.Lock()
        self._arrived: list[ProgramState] = []
        self._participants: list[ProgramState] = []
        self._done = threading.Event()
        self._error: BaseException | None = None

    def _arrive(self, state: ProgramState, participates: bool) -> None:
        with self._lock:
            self._arrived.append(state)
            if participates:
                self._participants.append(state)
            last = len(self._arrived) == len(self._members)
        if not last:
            self._done.wait()
            return
        try:
            if self._participants:
                self._run(self._participants)
        except BaseException as exc:
            self._error = exc
        finally:
            self._done.set()

    def bind(self, state: ProgramState) -> Callable[[], None]:
        """The work item for ``state``'s queue; its ``skip`` is called instead when ``state``
        has failed before reaching it."""

        def work() -> None:
            self._arrive(state, participates=True)
            if self._error is not None:
                raise self._error

        work.skip = lambda: self._arrive(state, participates=False)  # type: ignore[attr-defined]
        return work
