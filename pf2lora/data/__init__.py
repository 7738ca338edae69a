"""Real heterogeneous text data: offline assets, loaders and client partitioners.

* :mod:`pf2lora.data.assets` finds the fetched data (``scripts/fetch_data.sh``) in the cache.
* :mod:`pf2lora.data.catalogue` is the one table of data sets a task can name (``task.dataset``).
* :mod:`pf2lora.data.dataset` has :class:`TextDataset`, the shape every loader returns.
* :mod:`pf2lora.data.corpora` loads the fetched corpora (VADER, Rotten Tomatoes, WordNet, Shakespeare).
* :mod:`pf2lora.data.user_files` loads users' files (GLUE, E2E, WebNLG, your own CSV/TSV/JSONL).
* :mod:`pf2lora.data.files` reads files with one-line errors (shared by both families).
* :mod:`pf2lora.data.partition` splits a data set among clients.
"""

from pf2lora.data.assets import cache_dir
from pf2lora.data.corpora import (
    load_rotten_tomatoes,
    load_shakespeare,
    load_vader,
    load_wordnet_definitions,
    load_wordnet_topics,
)
from pf2lora.data.dataset import TextDataset
from pf2lora.data.partition import (
    Partition,
    dirichlet,
    iid,
    make_partition,
    natural,
    plot_label_distribution,
    s_similarity,
    subsample,
    train_test_split_per_client,
)
from pf2lora.data.user_files import load_e2e, load_glue, load_table, load_webnlg

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
