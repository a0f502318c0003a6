import os
os.environ.setdefault("FINETUNE_LAB_PROGRESS", "0")  # no progress bars in test logs
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest


@pytest.fixture(autouse=True)
def _no_pinned_precision():
    "A resumed run pins its training precision in this process until the next run starts (`core.pin_precision`): no test leaves one to the next."
    yield
    from finetune_lab.core import pin_precision
    pin_precision(None)
