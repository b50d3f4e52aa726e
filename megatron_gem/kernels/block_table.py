"""Block table of the GEM mask: which (query block, key block) tiles a kernel must visit.

The dense GEM mask (megatron_gem.gem.mask.gem_mask) is cut into tiles of BLOCK_M query rows by
BLOCK_N key columns. Each tile is one of
  EMPTY    no allowed pair: never visited,
  FULL     every pair allowed: visited without evaluating the rule,
  PARTIAL  some pairs allowed: visited, the rule evaluated per element.
The table stores, per (row b, query block i), the key blocks of each visited kind in the
two-list layout of torch FlexAttention's BlockMask (``kv_num_blocks``/``kv_indices`` for
PARTIAL, ``full_kv_num_blocks``/``full_kv_indices`` for FULL; no head dimension, the GEM mask is
the same for every head), and the transposed lists (per key block, the query blocks) that the
dK/dV pass walks. Index lists are ascending, padded with zeros, and trimmed to the longest
list of the batch (FlexAttention keeps all nK columns; trimming is what keeps the table small
at long L).

How tiles are classified (exactly, from O(L) per-block summaries; never a dense [L, L] mask).
Write I = [a, b] for the in-bounds query positions of a query block, J = [c, e] for the key
block. Documents are contiguous runs of one doc_id (checked, see ``validate``).
  * J after I (c > b): every pair has k > q. EMPTY (causality).
  * J overlaps I: contains some (p, p), and a token always sees itself. Visited. Never FULL:
    with even block sizes the tile also holds a pair with k > q.
  * J before I (e < a): every pair is causal. Documents are contiguous, so the only document
    that can have both queries in I and keys in J is doc[e] (the document of J's last key),
    and only if doc[a] == doc[e]; its queries are a leading run of I, its keys a trailing run
    of J. The tile has an allowed pair iff some role pair of those two runs is allowed
    (off the diagonal, so rule 4's "q == k" never applies):
        PREFIX query   sees any key of its document,
        SPECIAL query  sees PREFIX and SUFFIX keys,
        SUFFIX query   sees SPECIAL and SUFFIX keys (and the document start if suffix_sees_bos).
    The tile is FULL iff both blocks are complete (no tail past L) and lie in the one document,
    and no query role of I is denied a key role of J: not (SPECIAL queries and SPECIAL keys),
    not (SUFFIX queries and PREFIX keys other than a visible document start).
Blocks cut by the end of the row (L not a multiple of the block size) are never FULL, so the
kernel's bound checks live only in the PARTIAL path.

With a sliding window W (rule 5 of gem/mask.py: q - k < W) a key block before the query block
is EMPTY when even its closest pair is out of the window (a - e >= W), and FULL only if also its
farthest pair is inside (b - c < W). Otherwise the window leaves a tile as classified above;
that is conservative, not exact: a tile can be visited whose role-allowed pairs all lie out of
the window (its elements are masked one by one, so results stay exact; only work is extra).
Every visited tile still holds or borders the window's diagonal band, so the work per query
block is O(W / block_n) tiles.

``trim=False`` keeps every list nK (or nQ) wide, FlexAttention's layout, with no host sync:
``BlockMask.from_kv_blocks`` takes such lists, and shapes stay known under FakeTensorMode.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from megatron_gem.gem.mask import check_sliding_window, doc_starts
from megatron_gem.gem.roles import Role

_PREFIX, _SPECIAL, _SUFFIX = int(Role.PREFIX), int(Role.SPECIAL), int(Role.SUFFIX)

EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclass
class GemBlockTable:
    """Block-sparse description of the GEM mask of a batch, for one (block_m, block_n) tiling.

    Forward / dQ (per query block; [B, nQ] counts, [B, nQ, W] int32 indices):
        kv_num_blocks, kv_indices            PARTIAL key blocks
        full_kv_num_blocks, full_kv_indices  FULL key blocks
    dK / dV (per key block; [B, nK] counts, [B, nK, W'] indices):
        q_num_blocks, q_indices, full_q_num_blocks, full_q_indices
    """

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    full_kv_num_blocks: torch.Tensor
    full_kv_indices: torch.Tensor
    q_num_blocks: torch.Tensor
    q_indices: torch.Tensor
    full_q_num_blocks: torch.Tensor
    full_q_indices: torch.Tensor
    seq_len: int
    block_m: int
    block_n: int
    suffix_sees_bos: bool
    sliding_window: int | None = None

    @property
    def num_q_blocks(self) -> int:
        return self.kv_num_blocks.shape[1]

    @property
    def num_kv_blocks(self) -> int:
        return self.q_num_blocks.shape[1]

    def nbytes(self) -> int:
        """Memory held by the table's tensors."""
        return sum(
            getattr(self, f.name).numel() * getattr(self, f.name).element_size()
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        )

    def to_dense(self) -> torch.Tensor:
        """int8 [B, nQ, nK] with EMPTY / PARTIAL / FULL, rebuilt from the forward lists."""
        return _lists_to_dense(self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks, self.full_kv_indices, self.num_kv_blocks)

    def to_dense_transposed(self) -> torch.Tensor:
        """int8 [B, nK, nQ] rebuilt from the dK/dV lists (equals to_dense().transpose(1, 2))."""
        return _lists_to_dense(self.q_num_blocks, self.q_indices, self.full_q_num_blocks, self.full_q_indices, self.num_q_blocks)


def _lists_to_dense(num_partial, idx_partial, num_full, idx_full, n_cols):
    B, n_rows = num_partial.shape
    out = torch.zeros(B, n_rows, n_cols + 1, dtype=torch.int8, device=num_partial.device)
    for num, idx, kind in ((num_partial, idx_partial, PARTIAL), (num_full, idx_full, FULL)):
        col = torch.arange(idx.shape[-1], device=idx.device)
        where = torch.where(col < num[..., None], idx.long(), n_cols)  # unused slots -> spare column
        out.scatter_(-1, where, kind)
    return out[..., :n_cols]


def _to_lists(flags: torch.Tensor, trim: bool = True):
    """bool [B, R, C] -> (counts int32 [B, R], ascending indices int32 [B, R, W]), W = max count
    (a host sync) when ``trim``, else W = C."""
    flags = flags.contiguous()
    counts = flags.sum(-1, dtype=torch.int32)
    if trim:
        width = max(int(counts.max()), 1) if counts.numel() else 1
    else:
        width = max(flags.shape[-1], 1)
    # Each set column goes to slot (number of set columns before it): a cumsum and one scatter,
    # no sort. Unset columns are sent to a spare slot W that is cut off afterwards.
    slot = torch.where(flags, torch.cumsum(flags, -1, dtype=torch.int32) - 1, width).long()
    cols = torch.arange(flags.shape[-1], device=flags.device, dtype=torch.int32).expand_as(slot)
    out = torch.zeros(*flags.shape[:-1], width + 1, dtype=torch.int32, device=flags.device)
    out.scatter_(-1, slot, cols)
    return counts, out[..., :width].contiguous()


def _block_summaries(doc_ids, roles, starts, block: int, seg: str):
    """Per block of ``block`` positions: first/last in-bounds doc id, completeness, and the role
    presence inside the block's leading (seg='first') or trailing (seg='last') document run."""
    B, L = doc_ids.shape
    n = -(-L // block)
    pad = n * block - L
    inb = torch.ones(B, L, dtype=torch.bool, device=doc_ids.device)
    d = torch.nn.functional.pad(doc_ids, (0, pad)).view(B, n, block)
    r = torch.nn.functional.pad(roles, (0, pad)).view(B, n, block)
    s = torch.nn.functional.pad(starts, (0, pad)).view(B, n, block)
    inb = torch.nn.functional.pad(inb, (0, pad)).view(B, n, block)
    last_pos = torch.clamp(L - 1 - torch.arange(n, device=doc_ids.device) * block, max=block - 1)  # [n]
    first_doc = d[..., 0]
    last_doc = torch.gather(d, 2, last_pos.expand(B, n)[..., None])[..., 0]
    anchor = first_doc if seg == "first" else last_doc
    in_seg = (d == anchor[..., None]) & inb
    return {
        "first_doc": first_doc,
        "last_doc": last_doc,
        "complete": (torch.arange(1, n + 1, device=doc_ids.device) * block <= L).expand(B, n),
        "pre": (in_seg & (r == _PREFIX)).any(-1),
        "spe": (in_seg & (r == _SPECIAL)).any(-1),
        "suf": (in_seg & (r == _SUFFIX)).any(-1),
        "start": (in_seg & s).any(-1),
        "pre_nonstart": (in_seg & (r == _PREFIX) & ~s).any(-1),
    }


def check_contiguous_documents(doc_ids: torch.Tensor) -> None:
    """Raise if a doc_id label occurs in two separate runs of a row.

    The rule compares labels, so a label reused by a later document would let the two see each
    other; the block table additionally relies on documents being contiguous. One sort per row
    (and one host sync).
    """
    runs = doc_starts(doc_ids).sum(-1)
    srt = torch.sort(doc_ids, dim=-1).values
    distinct = 1 + (srt[..., 1:] != srt[..., :-1]).sum(-1)
    if bool((runs != distinct).any()):
        bad = int(torch.nonzero(runs != distinct)[0, 0])
        raise ValueError(f"doc_ids row {bad}: a doc_id label is used by two separate runs; documents must have distinct labels")


def _role_luts(suffix_sees_bos: bool, device):
    """Lookup tables over (query code * 32 + key code) for the two role conditions of a tile
    whose key block lies before its query block (module docstring):
      some_pair  some query role of I's leading run may see some key role of J's trailing run,
      no_denied  no query role of I is denied any key of J (J, I in one document)."""
    code = torch.arange(256)
    q, k = code // 32, code % 32
    q_pre, q_spe, q_suf = q & 1 > 0, q & 2 > 0, q & 4 > 0
    k_pre, k_spe, k_suf, k_start, k_pre_nonstart = k & 1 > 0, k & 2 > 0, k & 4 > 0, k & 8 > 0, k & 16 > 0
    suffix_keys = k_spe | k_suf | (k_start if suffix_sees_bos else torch.zeros_like(k_start))
    some_pair = q_pre | (q_spe & (k_pre | k_suf)) | (q_suf & suffix_keys)
    hidden_prefix = k_pre_nonstart if suffix_sees_bos else k_pre
    no_denied = ~(q_spe & k_spe) & ~(q_suf & hidden_prefix)
    return some_pair.to(device), no_denied.to(device)


def classify_blocks(doc_ids, roles, *, block_m: int, block_n: int, suffix_sees_bos: bool = False, sliding_window: int | None = None) -> torch.Tensor:
    """int8 [B, nQ, nK]: EMPTY / PARTIAL / FULL per tile (see the module docstring for why)."""
    if block_m < 2 or block_n < 2 or block_m % 2 or block_n % 2:
        raise ValueError(f"block sizes must be even and >= 2, got {block_m}, {block_n}")
    check_sliding_window(sliding_window)
    doc_ids = doc_ids.long()
    roles = roles.long()
    B, L = doc_ids.shape
    dev = doc_ids.device
    starts = doc_starts(doc_ids)
    qs = _block_summaries(doc_ids, roles, starts, block_m, "first")
    ks = _block_summaries(doc_ids, roles, starts, block_n, "last")
    nq, nk = qs["first_doc"].shape[1], ks["first_doc"].shape[1]

    a = torch.arange(nq, device=dev) * block_m  # first query of each query block
    b = torch.clamp(a + block_m, max=L) - 1  # last in-bounds query
    c = torch.arange(nk, device=dev) * block_n
    e = torch.clamp(c + block_n, max=L) - 1
    before = (e[None, :] < a[:, None])[None]  # [1, nQ, nK]: J entirely before I
    overlap = ((c[None, :] <= b[:, None]) & (e[None, :] >= a[:, None]))[None]
    before_full = before
    if sliding_window is not None:
        before = before & (a[:, None] - e[None, :] < sliding_window)[None]  # closest pair in the window
        before_full = before & (b[:, None] - c[None, :] < sliding_window)[None]  # farthest pair too

    # Role presence is packed into small codes (query: 3 bits, key: 5 bits) and the two tile
    # conditions on roles are read from 256-entry lookup tables built from the same rules: a
    # few elementwise ops on [B, nQ, nK] instead of dozens (the table build stays cheap at 32k+).
    qcode = qs["pre"].long() | qs["spe"].long() << 1 | qs["suf"].long() << 2
    kcode = ks["pre"].long() | ks["spe"].long() << 1 | ks["suf"].long() << 2 | ks["start"].long() << 3 | ks["pre_nonstart"].long() << 4
    some_pair_lut, no_denied_lut = _role_luts(suffix_sees_bos, dev)
    code = qcode[:, :, None] * 32 + kcode[:, None, :]
    link = qs["first_doc"][:, :, None] == ks["last_doc"][:, None, :]
    visit = overlap | (before & link & some_pair_lut[code])
    q_whole = qs["complete"] & (qs["first_doc"] == qs["last_doc"])  # complete and in one document
    k_whole = ks["complete"] & (ks["first_doc"] == ks["last_doc"])
    full = before_full & link & q_whole[:, :, None] & k_whole[:, None, :] & no_denied_lut[code]
    # torch.where, not boolean indexing: no data-dependent shapes (FakeTensorMode, torch.compile).
    kind = torch.where(full, FULL, torch.where(visit, PARTIAL, EMPTY))
    return kind.to(torch.int8).expand(B, nq, nk).contiguous()


def build_block_table(
    doc_ids: torch.Tensor,
    roles: torch.Tensor,
    *,
    block_m: int,
    block_n: int,
    suffix_sees_bos: bool = False,
    sliding_window: int | None = None,
    validate: bool = True,
    trim: bool = True,
) -> GemBlockTable:
    """Block table of the GEM mask for integer doc_ids/roles [B, L] (any device).

    Vectorised torch: O(L) summaries, O(nQ * nK) tile flags, one cumsum + scatter per list. ``validate``
    checks that each doc_id label forms one contiguous run (a host sync); ``trim`` cuts the
    lists to the longest one (a host sync; untrimmed lists are nK / nQ wide). With neither,
    the build has no host sync and runs under FakeTensorMode.
    """
    if doc_ids.dim() != 2 or doc_ids.shape != roles.shape:
        raise ValueError(f"doc_ids and roles must both be [B, L]; got {tuple(doc_ids.shape)}, {tuple(roles.shape)}")
    if doc_ids.dtype.is_floating_point or roles.dtype.is_floating_point:
        raise TypeError("doc_ids and roles must be integer tensors")
    if validate:
        check_contiguous_documents(doc_ids)
    kind = classify_blocks(doc_ids, roles, block_m=block_m, block_n=block_n, suffix_sees_bos=suffix_sees_bos, sliding_window=sliding_window)
    partial, full = kind == PARTIAL, kind == FULL
    kv_num, kv_idx = _to_lists(partial, trim)
    fkv_num, fkv_idx = _to_lists(full, trim)
    q_num, q_idx = _to_lists(partial.transpose(1, 2), trim)
    fq_num, fq_idx = _to_lists(full.transpose(1, 2), trim)
    return GemBlockTable(
        kv_num, kv_idx, fkv_num, fkv_idx, q_num, q_idx, fq_num, fq_idx,
        seq_len=doc_ids.shape[1], block_m=block_m, block_n=block_n, suffix_sees_bos=suffix_sees_bos, sliding_window=sliding_window,
    )


def placeholder_block_table(
    B: int, L: int, *, block_m: int, block_n: int, device, suffix_sees_bos: bool = False, sliding_window: int | None = None
) -> GemBlockTable:
    """A table with the shapes of an untrimmed one and no content (zeros), made by factory
    functions only. For FakeTensorMode, where the kernel op's fake implementation reads no
    table and there is no data to classify (on a CPU-only torch, indexing a fake CUDA tensor
    fails, so even build_block_table's shape arithmetic cannot run there)."""
    nq, nk = -(-L // block_m), -(-L // block_n)

    def zeros(*shape):
        return torch.zeros(shape, dtype=torch.int32, device=device)

    return GemBlockTable(
        zeros(B, nq), zeros(B, nq, nk), zeros(B, nq), zeros(B, nq, nk), zeros(B, nk), zeros(B, nk, nq), zeros(B, nk), zeros(B, nk, nq),
        seq_len=L, block_m=block_m, block_n=block_n, suffix_sees_bos=suffix_sees_bos, sliding_window=sliding_window,
    )


def allowed_pair_count(doc_ids: torch.Tensor, roles: torch.Tensor, *, suffix_sees_bos: bool = False, sliding_window: int | None = None) -> torch.Tensor:
    """Number of allowed (query, key) pairs per row, int64 [B], in O(L) memory.

    For query q with document start s: PREFIX sees [s, q]; SPECIAL sees the non-SPECIAL keys of
    [s, q) plus itself; SUFFIX sees the non-PREFIX keys of [s, q] (plus s when suffix_sees_bos).
    With a window W, s is raised to q - W + 1 where that is later (the start itself then stays
    visible to a suffix only if it is inside the window). Counted with prefix sums; equals
    gem_mask(...).sum((-1, -2)) (tested).
    """
    check_sliding_window(sliding_window)
    doc_ids, roles = doc_ids.long(), roles.long()
    B, L = doc_ids.shape
    starts = doc_starts(doc_ids)
    idx = torch.arange(L, device=doc_ids.device).expand(B, L)
    s = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=-1).values
    if sliding_window is not None:
        s = torch.maximum(s, idx - sliding_window + 1)

    def window_count(flag):  # number of flagged keys in [s(q), q]
        cs = torch.nn.functional.pad(torch.cumsum(flag.long(), -1), (1, 0))
        return torch.gather(cs, 1, idx + 1) - torch.gather(cs, 1, s)

    non_special = window_count(roles != _SPECIAL)
    suffix_visible = roles != _PREFIX
    if suffix_sees_bos:
        suffix_visible = suffix_visible | starts
    per_q = torch.where(
        roles == _PREFIX,
        idx - s + 1,
        torch.where(roles == _SPECIAL, non_special + 1, window_count(suffix_visible)),
    )
    return per_q.sum(-1)
