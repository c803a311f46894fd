"""``@program``: a Python function over a state, run on a backend with ``run`` / ``run_batch``."""

from __future__ import annotations

import functools
import inspect
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from braid.errors import InvalidRequestError
from braid.lang.backend import Backend
from braid.lang.interpreter import Interpreter
from braid.lang.ir import GEN_SAMPLING_FIELDS, check_sampling_types
from braid.lang.state import ProgramState

# Functions that turn a user's backend object (an Engine, ...) into a Backend; braid.backend
# registers its own on import, so this package needs nothing above it.
BACKEND_ADAPTERS: list[Callable[[Any], Backend | None]] = []
_default: dict[str, Any] = {}
# run_batch's "auto": programs mostly wait on the backend, so many can run at once; the
# runtime batches their calls
AUTO_THREADS_MAX = 128


def set_default_backend(backend: Any) -> None:
    """The backend ``run`` and ``run_batch`` use when none is given (an Engine, ...)."""
    _default["backend"] = resolve_backend(backend)


def resolve_backend(obj: Any) -> Backend:
    if obj is None:
        if "backend" not in _default:
            raise InvalidRequestError("backend", "no backend given and none set: pass backend=bd.Engine(...) or call "
                                                 "bd.set_default_backend(...)")
        return _default["backend"]
    for adapt in BACKEND_ADAPTERS:
        backend = adapt(obj)
        if backend is not None:
            return backend
    if all(hasattr(obj, m) for m in ("generate", "generate_stream", "score_choices", "role_markers")):
        return obj
    raise InvalidRequestError("backend", f"expected an Engine, an endpoint or a braid Backend, got "
                                         f"{type(obj).__name__}")


class Program:
    """A function ``f(s, ...)`` decorated with ``@bd.program``.

    ``run(**args)`` executes it on a fresh state; keyword arguments that are not parameters of
    the function but are gen sampling fields (``temperature=0``, ``max_tokens=64``) become
    defaults for every gen of the run, as in SGLang. Calling the program with a state as the
    first argument runs it inline, inside another program.
    """

    def __init__(self, func: Callable[..., Any]) -> None:
        params = list(inspect.signature(func).parameters)
        if not params:
            raise InvalidRequestError("program", f"{func.__name__} must take the state as its first parameter")
        self.func = func
        self._signature = inspect.signature(func)
        self._arg_names = set(params[1:])
        functools.update_wrapper(self, func)

    def __call__(self, state: ProgramState, *args: Any, **kwargs: Any) -> Any:
        return self.func(state, *args, **kwargs)

    def bind(self, args: tuple, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Split into (the function's arguments, sampling defaults); raise on unknown names."""
        defaults = {k: v for k, v in kwargs.items() if k not in self._arg_names and k in GEN_SAMPLING_FIELDS}
        check_sampling_types("run", defaults)
        own = {k: v for k, v in kwargs.items() if k not in defaults}
        try:
            bound = self._signature.bind(None, *args, **own)
        except TypeError as exc:
            raise InvalidRequestError(f"{self.func.__name__}(...)", str(exc)) from None
        arguments = dict(bound.arguments)
        arguments.pop(next(iter(self._signature.parameters)))
        return arguments, defaults

    def run(self, *args: Any, backend: Any = None, stream: bool = False, **kwargs: Any) -> ProgramState:
        """Run once; returns the final state (raises the program's error, if any). With
        ``stream=True`` returns at once; read ``state.text_iter()`` as the program runs."""
        arguments, defaults = self.bind(args, kwargs)
        state = ProgramState(Interpreter(resolve_backend(backend)), defaults, stream=stream)
        if stream:
            threading.Thread(target=self._execute, args=(state, arguments), name="braid-program-stream",
                             daemon=True).start()
            return state
        self._execute(state, arguments)
        if state.error is not None:
            raise state.error
        return state

    def run_batch(self, batch: list[dict[str, Any]], backend: Any = None, num_threads: int | str = "auto",
                  progress_bar: bool = False, **defaults: Any) -> list[ProgramState]:
        """Run once per dict of arguments, concurrently; states come back in input order. A
        program that fails does not stop the others: its state's ``error`` holds the exception."""
        if not isinstance(batch, list) or not all(isinstance(b, dict) for b in batch):
            raise InvalidRequestError("run_batch", "expected a list of dicts of arguments")
        check_sampling_types("run_batch", defaults)
        workers = _threads(num_threads, len(batch))
        interp = Interpreter(resolve_backend(backend))
        states = [ProgramState(interp, defaults) for _ in batch]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="braid-batch") as pool:
            futures = [pool.submit(self._execute_kwargs, st, kw) for st, kw in zip(states, batch)]
            done = as_completed(futures)
            if progress_bar:
                from tqdm import tqdm

                done = tqdm(done, total=len(futures), desc=self.func.__name__)
            for _ in done:
                pass
        return states

    def _execute_kwargs(self, state: ProgramState, kwargs: dict[str, Any]) -> None:
        try:
            arguments, defaults = self.bind((), kwargs)
        except InvalidRequestError as exc:
            state.error = exc
            state.mark_done()
            return
        state.defaults.update(defaults)
        self._execute(state, arguments)

    def _execute(self, state: ProgramState, arguments: dict[str, Any]) -> None:
        try:
            self.func(state, **arguments)
        except BaseException as exc:  # the program's own code failed (or read a failed value)
            state.sync()
            if state.error is None:
                state.error = exc
        else:
            state.sync()
        finally:
            state.mark_done()


def _threads(num_threads: int | str, count: int) -> int:
    if num_threads == "auto":
        return max(1, min(count, AUTO_THREADS_MAX, 16 * (os.cpu_count() or 1)))
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise InvalidRequestError("num_threads", f"expected an integer >= 1 or 'auto', got {num_threads!r}")
    return num_threads


def program(func: Callable[..., Any]) -> Program:
    """Decorator: ``@bd.program def f(s, ...)``."""
    return Program(func)
