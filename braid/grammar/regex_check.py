"""Checks a regex before any backend compiles it, so every backend's user gets the same clear
error for a construct no token-level automaton can enforce, with where it is.

Regexes match the whole output, so a leading ``^`` and a trailing ``$`` are redundant and are
dropped; anywhere else they (and ``\\b``, lookarounds, backreferences) are refused. ``\\d``,
``\\w`` and ``\\s`` mean their ASCII classes on every backend.
"""

from __future__ import annotations

import re

from braid.grammar.base import GrammarError

_LOOKAROUNDS = ("(?=", "(?!", "(?<=", "(?<!")
_NAMED_GROUP = re.compile(r"(?<!\\)\(\?P?<(?![=!])[A-Za-z_][A-Za-z0-9_]*>")


def _scan(rx: str):
    """``(position, piece, inside a class)`` for each piece of ``rx``: a two-character escape
    (``\\d``) or one character. A ``]`` right after ``[`` or ``[^`` is a literal."""
    i, in_class, class_start = 0, False, -1
    while i < len(rx):
        if rx[i] == "\\":
            yield i, rx[i : i + 2], in_class
            i += 2
            continue
        c = rx[i]
        yield i, c, in_class
        if in_class and c == "]" and i > class_start:
            in_class = False
        elif not in_class and c == "[":
            in_class = True
            class_start = i + 1 + (rx[i + 1 : i + 2] == "^")
        i += 1


# Shorthand classes mean ASCII, as xgrammar reads them; outlines-core (Rust regex) reads them
# as Unicode, where \d also matches "٣". Inside a class only the positive ones expand.
_ASCII_CLASSES = {"d": "0-9", "w": "0-9A-Za-z_", "s": " \\t\\n\\r\\f\\v"}


def _ascii_shorthands(rx: str) -> str:
    """Shorthand classes spelled out in ASCII, and raw control characters as ``\\xNN`` escapes."""
    out = []
    for _, piece, in_class in _scan(rx):
        name = piece[1:] if len(piece) == 2 and piece[0] == "\\" else ""
        if name in _ASCII_CLASSES:
            out.append(_ASCII_CLASSES[name] if in_class else f"[{_ASCII_CLASSES[name]}]")
        elif name.lower() in _ASCII_CLASSES and not in_class:
            out.append(f"[^{_ASCII_CLASSES[name.lower()]}]")
        elif len(piece) == 1 and ord(piece) < 0x20:  # a raw control character (xgrammar refuses one in a class)
            out.append(f"\\x{ord(piece):02x}")
        else:
            out.append(piece)
    return "".join(out)


def normalize_regex(rx: str) -> str:
    """``rx`` as every backend compiles it (no redundant end anchors, ASCII shorthand classes,
    control characters escaped);
    raises GrammarError("regex", ...) naming the problem and its position when ``rx`` is not a
    regex a grammar can enforce."""
    if not isinstance(rx, str) or not rx:
        raise GrammarError("regex", "must be a non-empty string")
    rx = _NAMED_GROUP.sub("(?:", rx)  # names do not change what matches; JS spells them (?<name>
    if rx.startswith("^"):
        rx = rx[1:]
    if rx.endswith("$") and not _escaped(rx, len(rx) - 1):
        rx = rx[:-1]
    for pos, piece, in_class in _scan(rx):
        if in_class:
            continue
        if rx.startswith(_LOOKAROUNDS, pos):
            raise GrammarError("regex", f"lookaround at position {pos} cannot be enforced token by token")
        if piece in "^$":
            raise GrammarError("regex", f"anchor {piece!r} at position {pos}: the regex always matches "
                                        "the whole output, anchors are allowed only at its ends")
    try:
        re.compile(rx)
    except re.error as e:
        if "\\p" not in str(e) and "\\P" not in str(e):  # unicode classes: Python lacks them, backends may not
            raise GrammarError("regex", f"not a valid regular expression: {e}") from None
    _check_with_interegular(rx)
    return _ascii_shorthands(rx)


def _escaped(rx: str, pos: int) -> bool:
    backslashes = len(rx[:pos]) - len(rx[:pos].rstrip("\\"))
    return backslashes % 2 == 1


def _check_with_interegular(rx: str) -> None:
    """interegular parses regexes as a DFA library must; its Unsupported names the construct."""
    import interegular

    try:
        interegular.parse_pattern(rx)
    except interegular.Unsupported as e:
        text = str(e)
        if "unicode" in text:  # \uXXXX escapes and unicode classes: backend decides
            return
        if "Group references" in text:
            text = "backreferences (\\1, (?P=name)) cannot be enforced by a grammar"
        elif "\\b" in text or "\\B" in text:
            text = "word boundaries (\\b, \\B) cannot be enforced token by token"
        raise GrammarError("regex", f"unsupported construct: {text}") from None
    except interegular.InvalidSyntax:
        return  # Python's re accepted it; the backend gives the verdict


def optional_groups_as_alternation(rx: str) -> str:
    """``(X)?`` written ``(X|)``: the same language (lazy ``(X)??`` is left alone)."""
    pieces = list(_scan(rx))
    out, skip = [], set()
    for k, (pos, piece, in_class) in enumerate(pieces):
        if pos in skip:
            continue
        nxt = pieces[k + 1][1] if k + 1 < len(pieces) else ""
        after = pieces[k + 2][1] if k + 2 < len(pieces) else ""
        if piece == ")" and not in_class and nxt == "?" and after != "?":
            out.append("|)")
            skip.add(pieces[k + 1][0])
        else:
            out.append(piece)
    return "".join(out)
