"""The diff report: one :class:`Report` model built from the passes' records and before/after
snapshots (:mod:`.model`), its renderings (:mod:`.text`, :mod:`.html`) and its JSON schema
(:mod:`.schema`). Reporting never prepares: :func:`qprep.diff` does that and builds one."""

from .model import FORMATS, Report, report_format, preparation_of, snapshot, source_uri, split_location
from .schema import SCHEMA, json_schema, jsonable, validate

__all__ = [
    "Report", "snapshot", "preparation_of", "FORMATS", "SCHEMA", "json_schema", "validate", "jsonable",
    "split_location", "source_uri", "report_format",
]
