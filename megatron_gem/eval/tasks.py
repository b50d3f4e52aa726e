"""The offline evaluation suite as MTEB tasks (mteb 2.x), built at run time from installed data.

Nine tasks, all English, gold labels written by others (see :mod:`builders`):
  STS             Lee50DocSim, SimLex999, WordSim353                  main score: cosine_spearman
  Retrieval       WordNetDefToExample, PythonFAQ                      main score: mrr_at_10
  Classification  FortunesCategory, WordNetLexname (logistic regression on embeddings)
                                                                      main score: accuracy
  Clustering      FortunesClustering, WordNetLexnameClustering       main score: v_measure

Held-out check (``HELDOUT_TASKS``, not in the suite's average; ``offline_tasks(HELDOUT_TASKS)``):
  Retrieval       GNUInfoSections (GNU info manual heading -> its section)   main score: mrr_at_10

``offline_tasks(names=None, scale=1.0)`` returns task instances ready for ``mteb.evaluate``;
``scale`` shrinks every set proportionally (tests use small scales). Task names carry no
version: the data version is the installed package's, recorded in ``metadata.dataset``.
"""

from __future__ import annotations

from typing import Any

from . import builders

SUITE = {
    "STS": ("Lee50DocSim", "SimLex999", "WordSim353"),
    "Retrieval": ("WordNetDefToExample", "PythonFAQ"),
    "Classification": ("FortunesCategory", "WordNetLexname"),
    "Clustering": ("FortunesClustering", "WordNetLexnameClustering"),
}
OFFLINE_TASKS = tuple(n for names in SUITE.values() for n in names)
# Our own held-out check, kept out of the suite's average (a separate column in the
# reproduction): text from manuals no recipe trains on.
HELDOUT_TASKS = ("GNUInfoSections",)

_SOURCES = {
    "Lee50DocSim": ("gensim", "https://radimrehurek.com/gensim/"),
    "SimLex999": ("gensim", "https://fh295.github.io/simlex.html"),
    "WordSim353": ("gensim", "https://gabrilovich.com/resources/data/wordsim353/wordsim353.html"),
    "WordNetDefToExample": ("debian:wordnet-base", "https://wordnet.princeton.edu/"),
    "PythonFAQ": ("debian:python3.11-doc", "https://docs.python.org/3.11/faq/"),
    "FortunesCategory": ("debian:fortunes", "https://packages.debian.org/bookworm/fortunes"),
    "WordNetLexname": ("debian:wordnet-base", "https://wordnet.princeton.edu/"),
    "FortunesClustering": ("debian:fortunes", "https://packages.debian.org/bookworm/fortunes"),
    "WordNetLexnameClustering": ("debian:wordnet-base", "https://wordnet.princeton.edu/"),
    "GNUInfoSections": ("debian:coreutils+info-manuals", "https://www.gnu.org/manual/"),
}

_TYPE_SCORE = {"STS": "cosine_spearman", "Retrieval": "mrr_at_10", "Classification": "accuracy", "Clustering": "v_measure"}


def task_type(name: str) -> str:
    for t, names in SUITE.items():
        if name in names:
            return t
    if name in HELDOUT_TASKS:
        return "Retrieval"
    raise KeyError(f"unknown offline task {name!r}; known: {', '.join(OFFLINE_TASKS + HELDOUT_TASKS)}")


def _metadata(name: str, description: str):
    from mteb.abstasks.task_metadata import TaskMetadata

    package, reference = _SOURCES[name]
    kind = task_type(name)
    return TaskMetadata(
        name=name,
        description=description + " Built offline by megatron_gem.eval from installed packages.",
        reference=reference,
        dataset={"path": f"megatron_gem.eval/{package}", "revision": "installed"},
        type=kind,
        category="t2t",
        modalities=["text"],
        eval_splits=["test"],
        eval_langs=["eng-Latn"],
        main_score=_TYPE_SCORE[kind],
        date=("2000-01-01", "2023-01-01"),
        domains=["Written"],
        task_subtypes=[],
        license="not specified",
        annotations_creators="human-annotated",
        dialect=[],
        sample_creation="found",
        bibtex_citation="",
    )


def _n(x: int, scale: float, floor: int) -> int:
    return max(floor, int(round(x * scale)))


def _build(name: str, scale: float, seed: int):
    """The labelled set behind task ``name`` at ``scale``."""
    if name == "Lee50DocSim":
        pairs = builders.lee50_pairs()
        if scale < 1:
            keep = builders._subsample(list(range(len(pairs))), _n(len(pairs), scale, 10), seed)
            pairs = builders.PairSet(
                pairs.name, [pairs.text1[i] for i in keep], [pairs.text2[i] for i in keep], [pairs.scores[i] for i in keep], 0.0, 1.0, pairs.description
            )
        return pairs
    if name == "SimLex999":
        return builders.word_pairs("simlex999", _n(999, scale, 10), seed)
    if name == "WordSim353":
        return builders.word_pairs("wordsim353", _n(353, scale, 10), seed)
    if name == "WordNetDefToExample":
        return builders.wordnet_definition_to_example(_n(500, scale, 8), seed)
    if name == "PythonFAQ":
        return builders.python_faq_retrieval(_n(1000, scale, 8), seed)
    if name == "GNUInfoSections":
        return builders.gnu_info_retrieval(_n(1000, scale, 8), seed)
    if name in ("FortunesCategory", "FortunesClustering"):
        return builders.fortune_labels(_n(60, scale, 4), seed)
    if name in ("WordNetLexname", "WordNetLexnameClustering"):
        return builders.wordnet_lexname_labels(_n(60, scale, 4), seed)
    raise KeyError(name)


def _make_sts(name: str, scale: float, seed: int):
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.sts import AbsTaskSTS

    ps = _build(name, scale, seed)

    class Task(AbsTaskSTS):
        metadata = _metadata(name, ps.description)
        min_score = ps.min_score
        max_score = ps.max_score

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            if self.data_loaded:
                return
            self.dataset = DatasetDict({"test": Dataset.from_dict({"sentence1": ps.text1, "sentence2": ps.text2, "score": ps.scores})})
            self.data_loaded = True

    return Task


def _make_retrieval(name: str, scale: float, seed: int):
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData

    rs = _build(name, scale, seed)

    class Task(AbsTaskRetrieval):
        metadata = _metadata(name, rs.description)

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            if self.data_loaded:
                return
            split = RetrievalSplitData(
                queries=Dataset.from_dict({"id": [f"q{i}" for i in range(len(rs.queries))], "text": rs.queries}),
                corpus=Dataset.from_dict({"id": [f"d{i}" for i in range(len(rs.docs))], "text": rs.docs, "title": [""] * len(rs.docs)}),
                relevant_docs={f"q{i}": {f"d{j}": 1 for j in sorted(rel)} for i, rel in enumerate(rs.relevant)},
                top_ranked=None,
            )
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    return Task


def _make_classification(name: str, scale: float, seed: int):
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.classification import AbsTaskClassification

    train, test = _build(name, scale, seed).split(0.5, seed)
    classes = train.classes

    class Task(AbsTaskClassification):
        metadata = _metadata(name, train.description)
        samples_per_label = max(2, min(16, len(train) // len(classes)))
        n_experiments = 5

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            if self.data_loaded:
                return
            as_ds = lambda s: Dataset.from_dict({"text": s.texts, "label": [classes.index(l) for l in s.labels]})
            self.dataset = DatasetDict({"train": as_ds(train), "test": as_ds(test)})
            self.data_loaded = True

    return Task


def _make_clustering(name: str, scale: float, seed: int):
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.clustering import AbsTaskClustering

    ls = _build(name, scale, seed)
    classes = ls.classes

    class Task(AbsTaskClustering):
        metadata = _metadata(name, ls.description)
        max_document_to_embed = None
        max_fraction_of_documents_to_embed = None
        max_documents_per_cluster = len(ls)
        n_clusters = 5  # bootstrap rounds of k-means (mteb's name)

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            if self.data_loaded:
                return
            self.dataset = DatasetDict({"test": Dataset.from_dict({"sentences": ls.texts, "labels": [classes.index(l) for l in ls.labels]})})
            self.data_loaded = True

    return Task


_MAKERS = {"STS": _make_sts, "Retrieval": _make_retrieval, "Classification": _make_classification, "Clustering": _make_clustering}


def offline_tasks(names=None, *, scale: float = 1.0, seed: int = 0) -> list:
    """MTEB task instances of the offline suite (all of it, or ``names``)."""
    if not 0 < scale <= 1:
        raise ValueError(f"scale must lie in (0, 1], got {scale}")
    names = list(OFFLINE_TASKS if names is None else names)
    out = []
    for name in names:
        cls = _MAKERS[task_type(name)](name, scale, seed)
        cls.__name__ = cls.__qualname__ = name
        out.append(cls(seed=seed))
    return out
