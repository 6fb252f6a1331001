"""Instruction fine-tuning: the data stage and the collate rules (training lands with issue 12's second part)."""
