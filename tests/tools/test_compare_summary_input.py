"""tools/compare_summary_input.py at unit level on the tiny model (the measurement itself trains
SmolLM2 for an hour: not run here): the learned arm's vectors start as the frozen rows (step 0
is the token arm exactly, through the training forward and the evaluation embedder), receive
gradient through the phase-2 fast path (equal to the full-row forward's), change in training,
and are what the evaluation embedder reads; bad arguments fail naming the flag."""

import pytest
import torch

from megatron_gem.data.corpus import InMemoryCorpus, PairCorpus
from megatron_gem.testing import make_tiny_llama, make_tiny_tokenizer, sample_sentences
from megatron_gem.training.step import contrastive_micro_loss
from tests.launch import load_tool

SUMMARY_TOKENS = ["<unk>", "Ł"]  # K existing tokens of the tiny tokenizer (as tests/hf/test_summary_mode.py)
TEXTS = ["the cat sleeps under the tree.", "a red bird sings in the morning", "water"]


@pytest.fixture(scope="module")
def tool():
    return load_tool("compare_summary_input")


def arm(tool, name, *, k=2, seed=0, dtype=torch.float32):
    tok = make_tiny_tokenizer()
    config = tool.summary_config(k, SUMMARY_TOKENS[:k])
    model, learned = tool.build_arm(make_tiny_llama(len(tok), seed=7).to(dtype), tok, config, name, seed)
    return tok, config, model, learned


def loader(tool, tok, config, seed=0):
    sents = sample_sentences(48, seed=4)
    pairs = PairCorpus(InMemoryCorpus.from_texts(sents[:24], tok), InMemoryCorpus.from_texts(sents[24:], tok))
    return tool.contrastive_loader(pairs, tok, config, batch_size=6, max_length=20, seq_length=64, seed=seed)


def test_step0_learned_arm_is_the_token_arm_exactly(tool):
    tok, config, token_model, none = arm(tool, "token")
    _, _, learned_model, learned = arm(tool, "learned")
    assert none is None
    emb = token_model.lm.get_input_embeddings().weight
    assert torch.equal(learned.vectors, emb[config.special_token_ids]) and learned.vectors.requires_grad
    # Nonzero deltas (the same in both arms), so the summary states depend on the adapter too.
    for a, b in zip(token_model.adapter.deltas.values(), learned_model.adapter.deltas.values()):
        assert torch.equal(a.lora_A, b.lora_A)  # same seed, same init
        torch.nn.init.normal_(a.lora_B, std=0.2, generator=torch.Generator().manual_seed(1))
        torch.nn.init.normal_(b.lora_B, std=0.2, generator=torch.Generator().manual_seed(1))
    batch = next(iter(loader(tool, tok, config)))
    assert torch.equal(token_model.embeddings(batch), learned_model.embeddings(batch))  # the fast path
    assert torch.equal(token_model.embeddings(batch, fast=False), learned_model.embeddings(batch, fast=False))
    a = tool.embedder(token_model, tok, config, 64).encode(TEXTS, batch_size=2)
    b = tool.embedder(learned_model, tok, config, 64).encode(TEXTS, batch_size=2)
    assert torch.equal(a, b)
    with torch.no_grad():
        learned.vectors[0] += 0.5  # the hook is live: a moved vector moves the embeddings
    assert not torch.equal(a, tool.embedder(learned_model, tok, config, 64).encode(TEXTS, batch_size=2))


def test_vector_gradient_of_the_fast_path_equals_the_full_row_forward(tool):
    grads = []
    for fast in (True, False):
        tok, config, model, learned = arm(tool, "learned", dtype=torch.float64)
        model.fast_summary = fast
        contrastive_micro_loss(model, next(iter(loader(tool, tok, config)))).loss.backward()
        grads.append(learned.vectors.grad)
    assert float(grads[1].abs().max()) > 0
    assert float((grads[0] - grads[1]).abs().max()) <= 1e-10 * float(grads[1].abs().max())


def test_learned_vectors_train_and_the_embedder_reads_them(tool):
    tok, config, model, learned = arm(tool, "learned")
    start = learned.vectors.detach().clone()
    out = tool.train(model, learned, loader(tool, tok, config), steps=3, lr=1e-2, warmup_fraction=0.0, log_interval=10, name="test")
    assert len(out["losses"]) == 3 and all(g > 0 for g in out["vector_grad_norms"])
    assert not torch.equal(learned.vectors.detach(), start) and out["vector_change"] > 0
    emb = tool.embedder(model, tok, config, 64)
    with_vectors = emb.encode(TEXTS, batch_size=2)
    learned.detach()  # the frozen rows again: the evaluation must have read the trained vectors
    assert not torch.equal(with_vectors, emb.encode(TEXTS, batch_size=2))
    _, _, token_model, _ = arm(tool, "token")
    assert not any(n.startswith("vectors") for n, _ in token_model.named_parameters())


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--steps", "0"], "--steps"),
        (["--seeds", "0,x"], "--seeds"),
        (["--seeds", "1,1"], "--seeds"),
        (["--arms", "token,vectors"], "--arms"),
        (["--max-length", "1"], "--max-length"),
        (["--heldout-items", "1"], "--heldout-items"),
        (["--lr", "nan"], "--lr"),
        (["--model", "/nonexistent/model"], "--model"),
        (["--merge", "/nonexistent.json"], "--merge"),
    ],
)
def test_bad_arguments_fail_naming_the_flag(tool, capsys, argv, flag):
    with pytest.raises(SystemExit) as e:
        tool.parse_args(argv)
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_merge_combines_runs_of_one_recipe_and_refuses_others(tool, tmp_path, capsys):
    import json

    def out_file(name, arm, seed, score, **changed):
        args = tool.parse_args(["--seeds", str(seed), "--arms", arm])
        for k, v in changed.items():
            setattr(args, k, v)
        runs = {arm: {seed: {"scores": {"quick_avg": score}}}}
        path = tmp_path / name
        path.write_text(json.dumps(tool.summarise(runs, None, args)))
        return str(path)

    files = [
        out_file("a.json", "token", 0, 0.30),
        out_file("b.json", "learned", 0, 0.34),
        out_file("c.json", "token", 1, 0.20),
        out_file("d.json", "learned", 1, 0.28),
    ]
    assert tool.main(["--merge", *files]) == 0
    merged = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert merged["args"]["seeds"] == [0, 1] and merged["args"]["merged_from"] == files
    assert merged["arms"]["token"]["mean"]["quick_avg"] == pytest.approx(0.25)
    diff = merged["difference_learned_minus_token"]
    assert diff["seeds"]["0"]["quick_avg"] == pytest.approx(0.04) and diff["seeds"]["1"]["quick_avg"] == pytest.approx(0.08)
    assert diff["mean"]["quick_avg"] == pytest.approx(0.06) and diff["spread"]["quick_avg"] == pytest.approx(0.04 / 2**0.5)
    assert tool.main(["--merge", files[0], files[1]]) == 0  # one seed: no spread (None, not 0)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["difference_learned_minus_token"]["spread"] is None
    with pytest.raises(ValueError, match="e.json: settings \\['lr'\\] differ"):
        tool.main(["--merge", files[0], out_file("e.json", "learned", 0, 0.3, lr=2e-3)])
    with pytest.raises(ValueError, match="arm 'token' seed 0 is also in an earlier file"):
        tool.main(["--merge", files[0], files[0]])
