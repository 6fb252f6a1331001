"""codeparrot: pretrain a GPT-2-style code model from a BigQuery export of Python files."""

__version__ = "0.1.0"
