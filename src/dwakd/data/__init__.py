"""Data: instruction records, dual tokenization and collation, the built-in demo suite."""

from dwakd.data.records import (
    DataError,
    InstructionRecord,
    build_prompt,
    load_records,
    split_records,
)

__all__ = ["DataError", "InstructionRecord", "build_prompt", "load_records", "split_records"]
