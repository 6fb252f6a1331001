"""Instruction fine-tuning: the data stage, the collate rules and LoRA (the training stage lands with issue 12)."""
