"""Worker of test_data_cache.py (torchrun, gloo): every rank opens the same text input through
training.data_setup.open_documents with a cache directory (rank 0 tokenises, the others wait),
twice, then a file with a bad record; writes what it saw to argv[1]/rank{R}.json."""

import json
import os
import sys

import torch.distributed as dist

from megatron_gem.data import DataError
from megatron_gem.testing import make_tiny_tokenizer
from megatron_gem.training.config import DataConfig


def main(out_dir: str, data: str, bad: str, cache: str) -> None:
    from megatron_gem.training.data_setup import open_documents

    dist.init_process_group("gloo")
    r = dist.get_rank()
    tokenizer = make_tiny_tokenizer()
    config = DataConfig([data], skip_bad_records=True)
    first = open_documents(data, tokenizer, config, cache)
    second = open_documents(data, tokenizer, config, cache)
    try:
        open_documents(bad, tokenizer, DataConfig([bad]), cache)
        error = None
    except DataError as e:
        error = str(e)
    out = {
        "docs": [first.get(i).tolist() for i in range(len(first))],
        "notes": [first.cache_note, second.cache_note],
        "stats": first.stats.report("read"),
        "error": error,
    }
    with open(os.path.join(out_dir, f"rank{r}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
