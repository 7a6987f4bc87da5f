"""Evaluation: sampled generation, ROUGE-L, LLM judge, representation similarity, efficiency, reports.

Modules (imported on demand, so `dwakd --help` stays fast):
- `datasets`: named test sets (`dolly`, `selfinst`, `vicuna`, `sni` aliases, `name=path[:limit]`)
- `generation`: protocol sampling (docs/methods.md) with per-item seeds, resumable per-seed JSONL files
- `rouge`: ROUGE-L x100 with stemming, max over references
- `runner`: `run_evaluation` (models x test sets x seeds -> generations -> scores -> report)
- `report`: Table-1-style `ScoreTable` (Markdown, CSV, PNG)
- `judge`: pairwise LLM judge over an OpenAI-compatible endpoint (paper §4.3)
- `similarity`: structure-matrix distances between teacher and students (Appendix B)
- `efficiency`: step time and memory per method (Table 7)
- `cli`: the `dwakd eval | judge | similarity | bench` subcommands
"""
