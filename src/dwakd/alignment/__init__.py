"""Token-level alignment between two tokenizers: decoded token tables, vocabulary maps, sequence alignments."""
