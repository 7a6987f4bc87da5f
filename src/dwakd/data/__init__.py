"""Data: instruction records, dual tokenization and collation, the built-in demo suite."""

from dwakd.data.collator import DistillationCollator, collate_side, pad_sequences
from dwakd.data.records import DataError, InstructionRecord, LoadReport, build_prompt, load_records, split_records
from dwakd.data.tokenization import DualTokenizedDataset, EncodedExample, TokenizationStats, encode_records

__all__ = [
    "DataError",
    "DistillationCollator",
    "DualTokenizedDataset",
    "EncodedExample",
    "InstructionRecord",
    "LoadReport",
    "TokenizationStats",
    "build_prompt",
    "collate_side",
    "encode_records",
    "load_records",
    "pad_sequences",
    "split_records",
]
