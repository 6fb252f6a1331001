"""Instruction fine-tuning: the records (`sft-data`), the collate and packing rules, LoRA, and the `sft` stage."""
