"""Batch jobs over many inputs: ``extract`` (one JSON schema over many documents, resumable,
exactly-once output), in this process or on Ray Data."""

from braid.jobs.extract import DEFAULT_INSTRUCTION, ExtractSummary, extract

__all__ = ["DEFAULT_INSTRUCTION", "ExtractSummary", "extract"]
