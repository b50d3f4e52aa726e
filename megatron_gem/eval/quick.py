"""A few small labelled embedding tasks for quick checks (the CPU demo, smoke runs).

``demo_tasks()`` builds them at run time from installed data (see :mod:`corpora`);
``score_embeddings(encode, tasks)`` runs any ``encode(list[str]) -> [n, d]`` function on them.
Metrics (higher is better; each task has ``.name`` and ``.metric``):
  PythonFAQ            mrr       Python FAQ question -> its answer among all answers
  WordNetDefToExample  mrr       held-out WordNet definition -> its example sentences
  SimLex999            spearman  cosine of the two words vs human similarity
  WordSim353           spearman  cosine of the two words vs human relatedness
MRR is the mean over queries of 1 / rank of the first relevant document (cosine ranking,
ties counted against the query); Spearman is the rank correlation in [-1, 1].
For the full offline suite (as MTEB tasks) see :mod:`megatron_gem.eval.tasks`.
"""

from __future__ import annotations

from typing import Callable, Sequence

from . import builders

QUICK_TASKS = ("PythonFAQ", "WordNetDefToExample", "SimLex999", "WordSim353")


def demo_tasks(max_items: int = 300, seed: int = 0) -> list:
    """The quick tasks, each subsampled to at most ``max_items`` queries or pairs."""
    if max_items < 2:
        raise ValueError(f"max_items must be >= 2, got {max_items}")
    return [
        builders.python_faq_retrieval(max_items, seed),
        builders.wordnet_definition_to_example(max_items, seed),
        builders.word_pairs("simlex999", max_items, seed),
        builders.word_pairs("wordsim353", max_items, seed),
    ]


def score_embeddings(encode: Callable[[list[str]], object], tasks: Sequence) -> dict[str, float]:
    """{task name: score} for an ``encode(list[str]) -> [n, d]`` array or tensor function.

    Embeddings are compared by cosine (rows are normalised here, so ``encode`` need not).
    """
    scores = {}
    for task in tasks:
        if task.name in scores:
            raise ValueError(f"two tasks are named {task.name!r}")
        scores[task.name] = float(task.score(encode))
    return scores
