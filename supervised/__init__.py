"""The supervised stage: trajectory datasets (S1), reasoning (S2), review (S3), imagination (S4).

``supervised.dataset`` is the on-disk format (docs/data.md) with ``open_dataset`` and
``DatasetWriter``; ``supervised.collect`` runs agents to fill one; ``supervised.stages`` turns
one dataset into the next. Modules import cheaply (no torch, no Ray at import time).
"""

from supervised.dataset import DatasetError, DatasetReader, DatasetWriter, ShardError, open_dataset

__all__ = ["DatasetError", "DatasetReader", "DatasetWriter", "ShardError", "open_dataset"]
