"""The documents of an extraction job: JSONL rows or a folder of text files, read twice.

The first pass (``scan``) checks every document before any work starts and returns their ids;
the second (``iter_documents``) streams them again, so a job over millions of documents never
holds their texts in memory at once. An id is kept as the JSON text of the input's value
(``"a-1"``, ``17``): it goes back to the output unchanged, and ``17`` and ``"17"`` stay distinct.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from braid.errors import InvalidRequestError

FOLDER_SUFFIXES = (".txt", ".md")
DUPLICATES_SHOWN = 5


@dataclass(frozen=True)
class Document:
    key: str  # the id's JSON text
    text: str


@dataclass(frozen=True)
class DocumentSource:
    """Where the documents are: ``path`` (a .jsonl file or a folder), the JSONL field names, and
    ``limit`` (only the first N documents, in input order; None = all)."""

    path: str
    text_field: str = "text"
    id_field: str = "id"
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int)
                                       or self.limit < 1):
            raise InvalidRequestError("limit", f"expected an integer >= 1, got {self.limit!r}")

    @property
    def is_folder(self) -> bool:
        return os.path.isdir(self.path)


def scan(source: DocumentSource) -> list[str]:
    """Check every document and return their ids (JSON texts) in input order. Raises
    InvalidRequestError naming the first problem: an unreadable input, a line that is not a JSON
    object, a missing or non-string text, a missing or non-scalar id, duplicate ids."""
    seen: dict[str, str] = {}  # id -> where it was first seen
    duplicates: list[str] = []
    for where, doc in _read(source):
        if doc.key in seen:
            duplicates.append(f"{doc.key} ({seen[doc.key]} and {where})")
        else:
            seen[doc.key] = where
    if duplicates:
        shown = ", ".join(duplicates[:DUPLICATES_SHOWN])
        more = f" and {len(duplicates) - DUPLICATES_SHOWN} more" if len(duplicates) > DUPLICATES_SHOWN else ""
        raise InvalidRequestError("input", f"duplicate ids in {source.path}: {shown}{more}")
    if not seen:
        raise InvalidRequestError("input", f"{source.path} holds no documents")
    return list(seen)


def iter_documents(source: DocumentSource) -> Iterator[Document]:
    """The documents again, in input order (call ``scan`` first: this pass trusts the input)."""
    for _, doc in _read(source):
        yield doc


def _read(source: DocumentSource) -> Iterator[tuple[str, Document]]:
    reader = _read_folder if source.is_folder else _read_jsonl
    for count, item in enumerate(reader(source), start=1):
        yield item
        if source.limit is not None and count >= source.limit:
            return


def _read_jsonl(source: DocumentSource) -> Iterator[tuple[str, Document]]:
    path = source.path
    try:
        handle = open(path, encoding="utf-8")
    except OSError as exc:
        raise InvalidRequestError("input", f"cannot read {path}: {exc.strerror or exc}") from None
    with handle:
        number = 0
        try:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"line {number}"
                yield where, _row_document(path, where, line, source)
        except UnicodeDecodeError as exc:
            raise InvalidRequestError("input", f"{path} line {number + 1} is not UTF-8: {exc.reason}") from None


def _row_document(path: str, where: str, line: str, source: DocumentSource) -> Document:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError("input", f"{path} {where} is not JSON: {exc.msg}") from None
    if not isinstance(row, dict):
        raise InvalidRequestError("input", f"{path} {where}: expected a JSON object, got {type(row).__name__}")
    if source.id_field not in row:
        raise InvalidRequestError("input", f"{path} {where} has no {source.id_field!r} field "
                                           f"(choose the id field with --id-field)")
    doc_id = row[source.id_field]
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        raise InvalidRequestError("input", f"{path} {where}: the id must be a string or an integer, got "
                                           f"{json.dumps(doc_id)[:80]}")
    if source.text_field not in row:
        raise InvalidRequestError("input", f"{path} {where} (id {json.dumps(doc_id)}) has no "
                                           f"{source.text_field!r} field (choose the text field with --text-field)")
    text = row[source.text_field]
    if not isinstance(text, str):
        raise InvalidRequestError("input", f"{path} {where} (id {json.dumps(doc_id)}): {source.text_field!r} "
                                           f"must be a string, got {type(text).__name__}")
    return Document(json.dumps(doc_id, ensure_ascii=False), text)


def _read_folder(source: DocumentSource) -> Iterator[tuple[str, Document]]:
    root = Path(source.path)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in FOLDER_SUFFIXES)
    for path in files:
        rel = path.relative_to(root).as_posix()
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRequestError("input", f"{path} is not UTF-8 text: {exc.reason}") from None
        except OSError as exc:
            raise InvalidRequestError("input", f"cannot read {path}: {exc.strerror or exc}") from None
        yield rel, Document(json.dumps(rel, ensure_ascii=False), text)
