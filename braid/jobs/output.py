"""The output of an extraction job: a JSONL file written exactly once per document.

Each record is one line, ``{"id": ..., "data": {...}}`` or ``{"id": ..., "error": "..."}``,
written with a single ``write`` on a file opened for appending and flushed to the OS at once; the
file is fsynced about once a second and at the end. A crash (even SIGKILL) can therefore lose only
the documents in flight and at most leave a partial last line, which the next run detects and cuts
off before appending (that document is then redone). Two jobs cannot write one file at once: the
file is locked (``flock``) while a job holds it.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time

from braid.errors import InvalidRequestError

FSYNC_EVERY_S = 1.0


class OutputFile:
    """Open (creating it if needed), lock and check ``path``. ``done`` holds the id of every
    record already written (JSON texts, as ``documents.scan`` returns them), ``errors`` those of
    error records, and ``repaired_bytes`` the size of a partial last line that was cut off."""

    def __init__(self, path: str) -> None:
        self.path = path
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise InvalidRequestError("output", f"the folder {folder} does not exist (create it first)")
        if os.path.isdir(path):
            raise InvalidRequestError("output", f"{path} is a folder; give a file path such as {path}/out.jsonl")
        self.created = not os.path.exists(path)
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            raise InvalidRequestError("output", f"cannot write {path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise InvalidRequestError("output", f"another job is writing {path}; wait for it or choose another "
                                                "output") from None
        self._lock = threading.Lock()
        self._last_sync = time.monotonic()
        try:
            self.done, self.errors, self.repaired_bytes = self._recover()
        except BaseException:
            os.close(self._fd)
            raise

    def _recover(self) -> tuple[set[str], set[str], int]:
        with open(self.path, "rb") as f:
            data = f.read()
        repaired = 0
        if data and not data.endswith(b"\n"):  # a line cut by a crash: its document is redone
            keep = data.rfind(b"\n") + 1
            repaired = len(data) - keep
            os.ftruncate(self._fd, keep)
            os.fsync(self._fd)
            data = data[:keep]
        done: set[str] = set()
        errors: set[str] = set()
        for number, line in enumerate(data.splitlines(), start=1):
            key, failed = self._parse(number, line)
            done.add(key)
            if failed:
                errors.add(key)
        return done, errors, repaired

    def _parse(self, number: int, line: bytes) -> tuple[str, bool]:
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            problem = f"is not JSON ({exc})"
        else:
            if isinstance(record, dict) and "id" in record and ("data" in record or "error" in record):
                return json.dumps(record["id"], ensure_ascii=False), "error" in record
            problem = 'is not an extract record ({"id", "data"} or {"id", "error"})'
        raise InvalidRequestError("output", f"{self.path} line {number} {problem}; it was not written by braid "
                                            "extract: fix that line or choose another output")

    def write(self, record: dict) -> None:
        """Append one record as one whole line (thread-safe)."""
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        key = json.dumps(record["id"], ensure_ascii=False)
        with self._lock:
            self.done.add(key)
            if "error" in record:
                self.errors.add(key)
            written = 0
            while written < len(data):
                written += os.write(self._fd, data[written:])
            now = time.monotonic()
            if now - self._last_sync >= FSYNC_EVERY_S:
                os.fsync(self._fd)
                self._last_sync = now

    def drop(self, keys: set[str]) -> None:
        """Remove the records of ``keys`` (to redo them), by rewriting the file beside itself and
        renaming it over the old one, so a crash leaves either file whole."""
        keys = set(keys)
        if not keys:
            return
        with self._lock:
            with open(self.path, "rb") as f:
                lines = f.read().splitlines(keepends=True)
            kept = [line for number, line in enumerate(lines, start=1) if self._parse(number, line)[0] not in keys]
            tmp = f"{self.path}.rewrite"
            with open(tmp, "wb") as f:
                f.writelines(kept)
                f.flush()
                os.fsync(f.fileno())
            fd = os.open(tmp, os.O_RDWR | os.O_APPEND)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else holds it
            os.replace(tmp, self.path)
            os.close(self._fd)
            self._fd = fd
        self.done -= keys
        self.errors -= keys

    def close(self) -> None:
        """Sync and close; a file this job created and never wrote to is removed (a job that failed
        before its first record leaves nothing behind)."""
        with self._lock:
            if self._fd < 0:
                return
            os.fsync(self._fd)
            empty = os.fstat(self._fd).st_size == 0
            os.close(self._fd)
            self._fd = -1
            if self.created and empty:
                os.unlink(self.path)

    def __enter__(self) -> OutputFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
