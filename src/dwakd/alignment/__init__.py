"""Token-level alignment between two tokenizers: decoded token tables, vocabulary maps, sequence alignments.

- `token_table`: what text (bytes) every id of a tokenizer stands for ("Ġ"/"▁"/"##"/"<0xNN>" decoded).
- `build_vocab_map` / `load_or_build_vocab_map`: MinED's teacher→student map by minimum edit distance, cached.
- `exact_text_map`: teacher→student ids with identical text (DSKDv2's shared vocabulary).
- `dtw_path` + `edit_distance_matrix` + `single_matches`: MinED's edit-distance DTW over token strings.
- `exact_offset_alignment` / `exact_string_alignment`: DSKDv2's exact token alignment (offsets / two-pointer).
"""

from dwakd.alignment.dtw import dtw_path, edit_distance_matrix, single_matches
from dwakd.alignment.exact import exact_offset_alignment, exact_string_alignment
from dwakd.alignment.token_strings import TokenTable, token_table
from dwakd.alignment.vocab_map import (
    VocabMap,
    build_vocab_map,
    cached_vocab_map,
    exact_text_map,
    load_or_build_vocab_map,
)

__all__ = [
    "TokenTable",
    "VocabMap",
    "build_vocab_map",
    "cached_vocab_map",
    "dtw_path",
    "edit_distance_matrix",
    "exact_offset_alignment",
    "exact_string_alignment",
    "exact_text_map",
    "load_or_build_vocab_map",
    "single_matches",
    "token_table",
]
