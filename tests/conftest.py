import os
os.environ.setdefault("FINETUNE_LAB_PROGRESS", "0")  # no progress bars in test logs
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
