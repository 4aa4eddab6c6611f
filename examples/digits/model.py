"""The digits models, for job specs that name ``examples/digits/model.py:Net``.

They live in the package (``coordinator/demo/model.py``) so ``ember demo --backend torch`` finds
them in an installed copy too; this file is where a reader of the examples looks for them.
"""

from coordinator.demo.model import CLASSES, FEATURES, Net, SmallCNN

__all__ = ["CLASSES", "FEATURES", "Net", "SmallCNN"]
