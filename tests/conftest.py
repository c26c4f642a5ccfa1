import os

# Tests never reach a model hub: everything is built from configs or shipped with the repo.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One intra-op thread: the suite's problems are small, and on a loaded 2-core machine two threads per process
# were measured 5-10x slower than one (oversubscription), so one thread keeps the suite's time predictable.
import torch

torch.set_num_threads(1)
