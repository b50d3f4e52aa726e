"""Evaluation: is GEM's embedding better and its generation intact?

  corpora      readers of installed data (WordNet, fortunes, Python docs, gensim, red-trivia)
  builders     labelled sets built from them at run time (pairs, retrieval, labels, MC)
  quick        a few small tasks and a scorer for any encode(list[str]) function
  baselines    mean / last-token / echo / PromptEOL embeddings of any HF causal LM
  perplexity   held-out perplexity of an HF causal LM
  tasks        the offline suite as MTEB tasks
  mteb_model   MTEB wrappers for GEM checkpoints, the baselines and sentence-transformers
  lm           lm-eval harness: local multiple-choice tasks and runner
Submodules import their heavy dependencies (torch, mteb, lm_eval) only when used.
"""
