import numpy as np
import pytest
import torch

from megatron_gem.gem import IGNORE_INDEX, PAD_DOC_ID, GEMConfig, Role, build_layout, draw_layout, next_token_labels, position_ids_from_doc_ids, prefix_dropout
from megatron_gem.gem.layout import document_rng

P, S, X = int(Role.PREFIX), int(Role.SPECIAL), int(Role.SUFFIX)


def test_layouts():
    toks = [1, 10, 11, 12]
    ids, roles = build_layout(toks, "plain", [90, 91])
    assert ids.tolist() == toks and roles.tolist() == [P] * 4
    ids, roles = build_layout(toks, "split", [90, 91], cut=2)
    assert ids.tolist() == [1, 10, 90, 91, 11, 12] and roles.tolist() == [P, P, S, S, X, X]
    ids, roles = build_layout(toks, "reconstruct", [90], bos_id=1)
    assert ids.tolist() == [1, 10, 11, 12, 90, 10, 11, 12] and roles.tolist() == [P] * 4 + [S] + [X] * 3
    ids, roles = build_layout(toks, "embed", [90, 91])
    assert ids.tolist() == [1, 10, 11, 12, 90, 91] and roles.tolist() == [P] * 4 + [S, S]


@pytest.mark.parametrize("cut", [0, 4, None])
def test_split_rejects_bad_cut(cut):
    with pytest.raises(ValueError, match="cut"):
        build_layout([1, 2, 3, 4], "split", [9], cut=cut)


def test_unknown_layout_and_empty_document():
    with pytest.raises(ValueError, match="unknown layout"):
        build_layout([1, 2], "sideways", [9])
    with pytest.raises(ValueError, match="empty"):
        build_layout([], "plain", [9])


def test_draw_layout_respects_lengths_and_probability():
    cfg = GEMConfig(p_raw=0.8, min_prefix_len=3, min_suffix_len=2)
    counts = {"plain": 0, "split": 0}
    for i in range(4000):
        layout, cut = draw_layout(20, cfg, document_rng(0, 0, i))
        counts[layout] += 1
        if layout == "split":
            assert 3 <= cut <= 20 - 2
    assert abs(counts["split"] / 4000 - 0.2) < 0.03
    # too short for a split: always plain
    assert all(draw_layout(4, cfg, document_rng(0, 0, i))[0] == "plain" for i in range(200))
    # every cut point is reachable, including both ends
    cuts = {draw_layout(7, GEMConfig(p_raw=0.0, min_prefix_len=3, min_suffix_len=2), document_rng(1, 0, i))[1] for i in range(300)}
    assert cuts == {3, 4, 5}


def test_document_rng_is_a_pure_function_of_its_key():
    a = document_rng(5, 1, 42).random(3)
    assert np.array_equal(a, document_rng(5, 1, 42).random(3))
    assert not np.array_equal(a, document_rng(5, 2, 42).random(3))
    assert not np.array_equal(a, document_rng(5, 1, 43).random(3))


def test_prefix_dropout():
    toks = np.arange(1, 201)
    view = prefix_dropout(toks, 0.1, np.random.default_rng(0))
    assert view[0] == 1 and 150 < len(view) < 200
    assert set(view.tolist()) <= set(toks.tolist()) and np.all(np.diff(view) > 0)  # order kept
    assert len(prefix_dropout([7], 0.99, np.random.default_rng(0))) == 1


def test_positions_restart_per_document():
    docs = torch.tensor([[0, 0, 0, 1, 1, 2, PAD_DOC_ID, PAD_DOC_ID], [5, 5, 5, 5, 5, 5, 5, 5]])
    pos = position_ids_from_doc_ids(docs)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]]


def test_labels_follow_the_spec():
    # doc 0: split  BOS a | S1 S2 | b c ; doc 1: plain BOS d ; padding x2
    ids0, r0 = build_layout([1, 10, 11, 12], "split", [90, 91], cut=2)
    ids = torch.tensor(ids0.tolist() + [1, 13, 0, 0])
    roles = torch.tensor(r0.tolist() + [P, P, P, P])
    docs = torch.tensor([0] * 6 + [1, 1] + [PAD_DOC_ID] * 2)
    labels = next_token_labels(ids, roles, docs)
    I = IGNORE_INDEX
    # BOS->a, a->(S1: never a target), S1->(S2), S2->b (last special predicts first suffix),
    # b->c, c->(doc end), BOS->d, d->(row/padding), padding never trained
    assert labels.tolist() == [10, I, I, 11, 12, I, 13, I, I, I]


def test_config_round_trip_and_validation(tmp_path):
    cfg = GEMConfig(num_special_tokens=3, p_raw=0.5, layout="reconstruct", special_token_ids=[5, 6, 7])
    cfg.save(tmp_path)
    assert GEMConfig.load(tmp_path) == cfg
    assert cfg.special_tokens == ["<|gem_0|>", "<|gem_1|>", "<|gem_2|>"]
    with pytest.raises(ValueError, match="p_raw"):
        GEMConfig(p_raw=1.5)
    with pytest.raises(ValueError, match="layout"):
        GEMConfig(layout="embed")
    with pytest.raises(ValueError, match="special_token_ids"):
        GEMConfig(num_special_tokens=2, special_token_ids=[1])
    (tmp_path / "gem_config.json").write_text('{"p_raw": 0.5, "bogus": 1}')
    with pytest.raises(ValueError, match="bogus"):
        GEMConfig.load(tmp_path)
    (tmp_path / "gem_config.json").write_text('{"p_raw": 0.5,\n oops}')
    with pytest.raises(ValueError, match="line 2"):
        GEMConfig.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="gem_config.json"):
        GEMConfig.load(tmp_path / "nowhere")
