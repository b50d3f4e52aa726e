"""gem_model_provider + GEMForwardStep under megatron-core's own schedule (torchrun subprocess:
megatron-core's parallel state and CPU shims must not touch the pytest process)."""

import json
import os

import pytest

from tests.launch import run_torchrun

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "megatron_lm_worker.py")


def test_megatron_provider_forward_backward_on_cpu(tmp_path):
    pytest.importorskip("megatron.core")
    from megatron_gem.testing import save_tiny_checkpoint

    ckpt = save_tiny_checkpoint(tmp_path / "hf")
    out = tmp_path / "out.json"
    run_torchrun([WORKER, ckpt, str(out)], timeout=300)
    r = json.loads(out.read_text())
    assert r["ntp_rows"] > 0 and r["num_texts"] == 6 and r["rows"] > r["ntp_rows"]
    p1, p2 = r["step0"], r["step1"]
    # Phase 1: NTP only; the megatron-core model's loss on the GEM batch equals the HF model's.
    assert set(p1["reports"]) == {"lm loss"}
    assert p1["reports"]["lm loss"] == pytest.approx(r["hf_ntp_loss"], abs=1e-5)
    assert p1["grad_embedding"] > 0 and p1["grad_logit_scale"] == 0.0
    # Phase 2: InfoNCE joins; the logit scale gets a gradient.
    assert set(p2["reports"]) == {"lm loss", "gem cl loss"} and p2["reports"]["gem cl loss"] > 0
    assert p2["grad_logit_scale"] > 0 and p2["grad_total"] > 0
