"""Conversion: converted models give the HF logits; HF -> Megatron -> HF is bit-equal."""

import json
import os

import pytest
import torch

from tests.launch import load_tool, run_python, run_torchrun


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory):
    """One single-process launch of worker.py equivalence (its results, read by the tests below)."""
    out = tmp_path_factory.mktemp("mcore_equivalence") / "eq.json"
    run_torchrun(["tests/mcore/worker.py", "equivalence", str(out)])
    return json.loads(out.read_text())


def test_megatron_logits_equal_hf(equivalence):
    """Single process: tiny Llama configs (GQA untied, tied, Llama-3 rope scaling, MHA) and a
    Mistral (also with a sliding window shorter than its documents), packed GEM batch, logits of
    the converted megatron-core model vs HF."""
    r = equivalence
    for name in ("untied_gqa", "tied", "llama3_rope_scaling", "mha_3layers", "mistral", "mistral_window"):
        assert r[name]["max_abs_diff"] <= 1e-5 * max(1.0, r[name]["ref_scale"]), (name, r[name])
        assert r[name]["padding_is_masked"], name
    assert r["mistral_window"]["windowless_diff"] > 1e-3  # the window (8 < the documents' 28 and 20 tokens) is executed
    assert r["llama3_without_scaling_diff"] > 1e-3  # the comparison is sensitive to rope scaling
    # Summary mode: megatron's fused-layer deltas mapped to HF q/k/v, gate/up (mcore.summary.hf_adapter_state).
    for positions in ("special", "special+suffix"):
        s = r[f"summary_{positions}"]
        assert s["max_abs_diff"] <= 1e-5 * max(1.0, s["ref_scale"]), (positions, s)
        assert s["changed_by_delta"] > 1e-2 and s["fresh_equals_base"] and s["untouched_equal_base"], (positions, s)
        assert s["hf_keys"][0] == "model.layers.0.mlp.down_proj.lora_A.weight" and s["hf_keys"][-1] == 2 * 7 * 2, s  # A, B x 7 projections x 2 layers
        assert s["trainable"] == ["gem_adapter", "logit_scale"], s
    # The apex layer implementation (mcore/fused.py; its kernel is a stand-in on CPU): every norm
    # goes through the kernel seam with the model's eps, the state-dict names are the local
    # spec's, and the logits are HF's.
    a = r["apex"]
    assert a["norms"] == ["FusedRMSNorm"] and a["same_state_dict_names"], a
    assert a["kernel_calls"] == 2 * r["num_layers"] + 1 and a["kernel_eps"] == [r["rms_norm_eps"]], a
    assert a["max_abs_diff"] <= 1e-5 * max(1.0, a["ref_scale"]) and a["local_max_abs_diff"] <= 1e-5 * max(1.0, a["ref_scale"]), a
    # Dist checkpoints of the local spec already use TransformerEngine's names for the norms that
    # TE fuses into the next linear (megatron-core's sharded_state_dict_keys_map): both specs
    # read each other's checkpoints; hf_mapping maps TE's plain names back (test_layer_impl.py).
    assert r["local_sharded_norm_keys"] == [
        "decoder.final_layernorm.weight",
        "decoder.layers.mlp.linear_fc1.layer_norm_weight",
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
    ], r["local_sharded_norm_keys"]


def test_summary_mode_syncs_once_per_micro_batch(equivalence):
    """megatron-core summary mode, forward + backward with every layer recomputed: the rows are
    found once per micro-batch (recompute reuses them), so the syncs do not grow with the layers;
    the column-parallel linears (linear_qkv, linear_fc1) take their delta in their own output."""
    r = {int(k): v for k, v in equivalence["summary_syncs"].items()}
    assert sorted(r) == [1, 2, 3]
    for layers, s in r.items():
        assert s["from_summary"] == 1 and s["ops"].get("aten::nonzero") == 1, (layers, s)
        assert len(s["column_outputs_kept"]) >= 2 * 2 * layers and all(s["column_outputs_kept"]), (layers, s)  # forward + recompute
        assert s["lora_grads"], (layers, s)
    assert len({s["total"] for s in r.values()}) == 1, r


def test_round_trip_bit_equal_and_tp2_pp2_load(gem_hf_checkpoint, converted_checkpoint, layout_logits, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_gem.gem.config import GEMConfig

    meta = json.loads((converted_checkpoint / "megatron_gem.json").read_text())
    assert meta["tensor_model_parallel_size"] == 2 and meta["pipeline_model_parallel_size"] == 2
    vocab = meta["vocab_size"]
    assert meta["padded_vocab_size"] % (128 * 2) == 0 and meta["padded_vocab_size"] > vocab
    back = tmp_path / "hf_back"
    run_python(["tools/convert_checkpoint.py", "megatron-to-hf", "--input", str(converted_checkpoint), "--output", str(back)])
    a = load_file(gem_hf_checkpoint / "model.safetensors")
    b = load_file(back / "model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (gem_hf_checkpoint, back))
    assert {k: v for k, v in ca.items() if k != "transformers_version"} == {k: v for k, v in cb.items() if k != "transformers_version"}
    assert GEMConfig.load(back).special_token_ids == GEMConfig.load(gem_hf_checkpoint).special_token_ids
    assert len(AutoTokenizer.from_pretrained(back)) == vocab
    AutoModelForCausalLM.from_pretrained(back)  # loads as a plain HF model

    # The same dist checkpoint loaded at TP=2 x PP=2 (4 processes; in layout_logits' launch) gives
    # the HF logits.
    from tests.mcore.worker import hf_logits

    got, _, batch, _ = layout_logits[COMMAND_LINE]
    hf = AutoModelForCausalLM.from_pretrained(gem_hf_checkpoint)
    ref = hf_logits(hf, *batch)
    assert got.shape[-1] == meta["padded_vocab_size"]
    assert torch.allclose(got[..., :vocab], ref, atol=1e-5, rtol=1e-5), float((got[..., :vocab] - ref).abs().max())


@pytest.fixture(scope="module")
def tied_rope_scaled_checkpoint(tmp_path_factory):
    """A tiny tied-embedding HF Llama with Llama-3 rope scaling, as a user's checkpoint."""
    from megatron_gem.testing import save_tiny_checkpoint

    d = tmp_path_factory.mktemp("mg_tied") / "hf"
    save_tiny_checkpoint(d, tie_word_embeddings=True, seed=4)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(
        rope_theta=500000.0,
        max_position_embeddings=256,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    )
    (d / "config.json").write_text(json.dumps(cfg))
    return d


LAYOUTS = [(1, 1, "untied"), (2, 1, "tied"), (1, 2, "tied"), (2, 2, "tied")]
# conftest's converted_checkpoint (the command line's hf-to-megatron, untied, TP=2 x PP=2) loaded
# in the same 4-process launch: test_round_trip_bit_equal_and_tp2_pp2_load reads its logits.
COMMAND_LINE = (2, 2, "command line")


@pytest.fixture(scope="module")
def layout_logits(gem_hf_checkpoint, tied_rope_scaled_checkpoint, converted_checkpoint, tmp_path_factory):
    """Each layout's checkpoint converted (one process, convert.hf_to_megatron) and loaded at its
    TP x PP (one 4-process launch; megatron-core's parallel state rebuilt per layout), the
    command line's conversion too: the logits of one packed GEM batch per layout.
    {(tp, pp, kind): (logits, source checkpoint, batch, loss report)}."""
    work = tmp_path_factory.mktemp("mg_layouts")
    plan = []
    for tp, pp, kind in LAYOUTS:
        src = gem_hf_checkpoint if kind == "untied" else tied_rope_scaled_checkpoint
        plan.append({"src": str(src), "dir": str(work / f"mg_{tp}{pp}{kind}"), "tp": tp, "pp": pp, "out": str(work / f"logits_{tp}{pp}{kind}.pt")})
    (work / "convert.json").write_text(json.dumps(plan))
    run_torchrun(["tests/mcore/worker.py", "convert_layouts", str(work / "convert.json")])
    from transformers import AutoConfig

    from tests.mcore.worker import packed_batch

    plan.append({"src": str(gem_hf_checkpoint), "dir": str(converted_checkpoint), "tp": 2, "pp": 2, "out": str(work / "logits_command_line.pt")})
    for i, item in enumerate(plan):  # a batch in each source's vocabulary
        item["batch"] = str(work / f"batch_{i}.pt")
        torch.save(packed_batch(AutoConfig.from_pretrained(item["src"]).vocab_size, seed=2 if i < len(LAYOUTS) else 1), item["batch"])
    (work / "plan.json").write_text(json.dumps(plan))
    run_torchrun(["tests/mcore/worker.py", "load_logits_layouts", str(work / "plan.json")], nproc=4)
    return {
        layout: (torch.load(item["out"]), item["src"], torch.load(item["batch"]), json.loads(open(item["out"] + ".loss.json").read()))
        for layout, item in zip([*LAYOUTS, COMMAND_LINE], plan)
    }


@pytest.mark.parametrize("tp,pp,kind", LAYOUTS)
def test_converted_logits_equal_hf_at_each_layout(tp, pp, kind, layout_logits):
    """hf-to-megatron, loaded at TP x PP: the packed GEM batch gives the HF logits (fp32). Tied
    embeddings + Llama-3 rope scaling at TP2, PP2 and TP2xPP2 (the untied checkpoint at TP2xPP2
    and the command line: test_round_trip_bit_equal_and_tp2_pp2_load)."""
    from transformers import AutoModelForCausalLM

    from tests.mcore.worker import hf_logits

    got, src, batch, _ = layout_logits[(tp, pp, kind)]
    hf = AutoModelForCausalLM.from_pretrained(src)
    vocab = hf.config.vocab_size
    ref = hf_logits(hf, *batch)
    assert torch.allclose(got[..., :vocab], ref, atol=1e-5, rtol=1e-5), float((got[..., :vocab] - ref).abs().max())


@pytest.mark.parametrize("tp,pp,kind", LAYOUTS)
def test_vocab_parallel_loss_equals_one_process_at_each_layout(tp, pp, kind, layout_logits):
    """The next-token loss without logits (mcore/loss.py vocab_parallel_token_losses, chunked;
    the same launch as the logits above): through the converted model at TP x PP it equals the
    cross-entropy of its gathered logits; the function alone, on this TP group's vocabulary
    shards with and without sequence parallelism, gives the one-process loss and gradients."""
    report = layout_logits[(tp, pp, kind)][3]
    assert report["model_loss_max_abs_diff"] <= 1e-5 * max(1.0, report["model_loss_scale"]), report
    checks = report["function"]
    assert sorted(checks) == (["sp", "tp"] if tp > 1 else ["tp"])
    for name, c in checks.items():
        for what in ("loss", "grad_hidden", "grad_weight"):
            assert c[what] <= 1e-5 * max(1.0, c["scale"]), (name, what, c)


def test_streaming_conversion_equals_in_memory_reference(gem_hf_checkpoint, tmp_path):
    """The tensor-by-tensor converter writes the same dist checkpoint layout as megatron-core's
    save of a real model filled from HF, and it loads to bit-equal weights."""
    proc = run_torchrun(["tests/mcore/worker.py", "stream_vs_reference", str(gem_hf_checkpoint), str(tmp_path)])
    assert json.loads(proc.stdout.strip().splitlines()[-1])["equal"] is True


def test_megatron_to_hf_shards_and_refuses_unsafe_metadata(converted_checkpoint, gem_hf_checkpoint, tmp_path):
    """--max-shard-size splits the HF output into an indexed set of shards HF loads; a .metadata
    pickle that would run code is refused."""
    import pickle
    import shutil

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sharded"
    run_python(["tools/convert_checkpoint.py", "megatron-to-hf", "--input", str(converted_checkpoint), "--output", str(out), "--max-shard-size", "60KB"])
    files = sorted(out.glob("model-*-of-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(files) > 2 and sorted(set(index["weight_map"].values())) == [f.name for f in files]
    got = {}
    for f in files:
        got.update(load_file(f))
    ref = load_file(gem_hf_checkpoint / "model.safetensors")
    assert sorted(got) == sorted(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    AutoModelForCausalLM.from_pretrained(out)

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    bad = tmp_path / "bad"
    shutil.copytree(converted_checkpoint, bad)
    (bad / ".metadata").write_bytes(pickle.dumps(Evil()))
    proc = run_python(["tools/convert_checkpoint.py", "megatron-to-hf", "--input", str(bad), "--output", str(tmp_path / "o")], check=False)
    assert proc.returncode == 2 and "refusing to load" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "o").exists()


def test_refuses_unknown_architecture(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    convert_checkpoint = load_tool("convert_checkpoint")  # the refusal comes before megatron-core starts

    assert convert_checkpoint.main(["hf-to-megatron", "--input", str(tmp_path / "gpt2"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "GPT2LMHeadModel" in err and "not supported" in err
    assert not (tmp_path / "out").exists()
    assert convert_checkpoint.main(["megatron-to-hf", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 2


def test_add_gem_tokens_tool(gem_hf_checkpoint, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from megatron_gem.gem.config import GEMConfig

    cfg = GEMConfig.load(gem_hf_checkpoint)
    tok = AutoTokenizer.from_pretrained(gem_hf_checkpoint)
    assert tok.convert_tokens_to_ids(cfg.special_tokens) == cfg.special_token_ids
    w = load_file(gem_hf_checkpoint / "model.safetensors")
    emb, head = w["model.embed_tokens.weight"], w["lm_head.weight"]
    (gid,) = cfg.special_token_ids
    assert torch.allclose(emb[gid], emb[:gid].mean(0), atol=1e-6) and torch.allclose(head[gid], head[:gid].mean(0), atol=1e-6)
    add_gem_tokens = load_tool("add_gem_tokens")

    assert add_gem_tokens.main(["--input", str(gem_hf_checkpoint), "--output", str(tmp_path / "again")]) == 0  # idempotent
    assert torch.equal(load_file(tmp_path / "again" / "model.safetensors")["model.embed_tokens.weight"], emb)
    with pytest.raises(SystemExit):
        add_gem_tokens.main(["--output", "x"])


@pytest.mark.parametrize("tied", [False, True])
def test_add_gem_tokens_streaming_equals_live_model(tied, tmp_path):
    """The streaming tool (tensor by tensor) against the reference: gem.tokens.add_gem_tokens on
    the loaded HF model, then save_pretrained. Same tensors (bit-equal), vocab size, token ids."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_gem.gem.config import GEMConfig
    from megatron_gem.gem.tokens import add_gem_tokens
    from megatron_gem.mcore.convert import add_gem_tokens_to_hf_dir
    from megatron_gem.testing import save_tiny_checkpoint

    base = tmp_path / "base"
    save_tiny_checkpoint(base, tie_word_embeddings=tied, seed=7)
    ids = add_gem_tokens_to_hf_dir(str(base), str(tmp_path / "streamed"), GEMConfig(num_special_tokens=2), progress=False)
    model, tok = AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    ref_ids = add_gem_tokens(model, tok, GEMConfig(num_special_tokens=2))
    model.save_pretrained(tmp_path / "reference")
    assert ids == ref_ids
    got, ref = load_file(tmp_path / "streamed" / "model.safetensors"), load_file(tmp_path / "reference" / "model.safetensors")
    assert sorted(got) == sorted(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k
    cfg = json.loads((tmp_path / "streamed" / "config.json").read_text())
    assert cfg["vocab_size"] == model.config.vocab_size == len(tok) and cfg["tie_word_embeddings"] == tied
    assert AutoTokenizer.from_pretrained(tmp_path / "streamed").convert_tokens_to_ids(GEMConfig(num_special_tokens=2).special_tokens) == ids


@pytest.mark.long  # a benchmark's smoke run; the round trip it times is make test's (test_round_trip_bit_equal_and_tp2_pp2_load)
def test_bench_convert_tool_runs_on_a_small_shape(tmp_path):
    """tools/bench_convert.py end to end on a small shape: round trip bit-exact, figures in
    its last-line JSON (the 8B run itself is a benchmark, outside the suite)."""
    proc = run_python(["tools/bench_convert.py", "--shape", "tiny", "--workdir", str(tmp_path)])
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["bit_exact"] is True and r["mismatches"] == [] and r["tensors"] == 4 * 9 + 3
    assert r["hf_to_megatron_peak_rss_gb"] > 0 and r["copy_s"] > 0 and len(r["copy_runs_s"]) == 2
    assert not (tmp_path / "tiny").exists()  # cleaned up without --keep
