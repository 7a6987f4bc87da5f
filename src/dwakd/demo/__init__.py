"""Embedded `dwakd demo`: build a suite and two tokenizers, train a teacher and students, evaluate, report."""
