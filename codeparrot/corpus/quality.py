"""Quality buckets: a (noisy) quality signal per kept file, which training can feed to the model as a token.

The names are a contract: `prepare` writes one of them in each clean record's `quality` field, the tokenizer
reserves one special token per bucket (`<quality_low>` ...), and `generate --quality high` asks for one.
"""
from __future__ import annotations

QUALITY_BUCKETS = ("low", "medium", "high")  # worst first: a bucket's index orders it
UNKNOWN_QUALITY = 255  # a document's bucket index when its record has no (valid) `quality` field
