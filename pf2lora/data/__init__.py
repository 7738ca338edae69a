"""Real heterogeneous text data: offline assets, loaders and client partitioners.

* :mod:`pf2lora.data.assets` finds the fetched data (``scripts/fetch_data.sh``) in the cache.
* :mod:`pf2lora.data.text` has :class:`TextDataset` and the loaders (VADER, Rotten Tomatoes,
  WordNet, Shakespeare, GLUE, E2E, WebNLG, and your own CSV/JSONL).
* :mod:`pf2lora.data.partition` splits a data set among clients.
"""

from pf2lora.data.assets import cache_dir
from pf2lora.data.partition import (
    Partition,
    dirichlet,
    iid,
    natural,
    make_partition,
    plot_label_distribution,
    s_similarity,
    subsample,
    train_test_split_per_client,
)
from pf2lora.data.text import (
    TextDataset,
    load_e2e,
    load_glue,
    load_rotten_tomatoes,
    load_shakespeare,
    load_table,
    load_vader,
    load_webnlg,
    load_wordnet_definitions,
    load_wordnet_topics,
)

__all__ = [
    "Partition",
    "TextDataset",
    "cache_dir",
    "dirichlet",
    "iid",
    "load_e2e",
    "load_glue",
    "load_rotten_tomatoes",
    "load_shakespeare",
    "load_table",
    "load_vader",
    "load_webnlg",
    "load_wordnet_definitions",
    "load_wordnet_topics",
    "make_partition",
    "natural",
    "plot_label_distribution",
    "s_similarity",
    "subsample",
    "train_test_split_per_client",
]
