"""Evaluation: sampled generation, ROUGE-L, LLM judge, representation similarity, efficiency, reports."""
