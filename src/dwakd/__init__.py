"""dwakd: cross-tokenizer knowledge distillation (DWA-KD, DSKD and baselines) on Hugging Face Trainer."""

__version__ = "0.1.0"
