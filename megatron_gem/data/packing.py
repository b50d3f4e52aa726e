"""Packing pieces into fixed-length rows, and rows into the micro-batch contract.

The packer is *online best fit over a bounded set of open rows*: pieces arrive in order; each
goes into the open row with the least room that still fits it; if none fits, a new row opens;
a row closes (is emitted) when full, or, when more than ``max_open_rows`` are open, the
fullest one is closed. Deterministic given the piece order, O(log R) per piece, and it needs
only lengths, so the same code packs a precomputed plan (map-style loading) and a stream.

Padding goes only at a row's end. ``collate_rows`` produces the batch contract:
``input_ids, labels, position_ids, doc_ids, roles``, int64 [B, seq_length], doc_ids unique
within the micro-batch (padding PAD_DOC_ID), labels from ``gem.layout.next_token_labels``.
"""

from __future__ import annotations

import bisect
from typing import Hashable, Sequence

import numpy as np
import torch

from ..gem.layout import next_token_labels, position_ids_from_doc_ids
from ..gem.roles import PAD_DOC_ID, Role

DEFAULT_MAX_OPEN_ROWS = 64


class BestFitPacker:
    """Online bounded best-fit packing of (item, length) into rows of ``capacity`` tokens.

    ``add`` and ``flush`` return the rows they close, each a list of items in insertion order.
    """

    def __init__(self, capacity: int, max_open_rows: int = DEFAULT_MAX_OPEN_ROWS):
        if capacity < 1 or max_open_rows < 1:
            raise ValueError("capacity and max_open_rows must be >= 1")
        self.capacity, self.max_open_rows = int(capacity), int(max_open_rows)
        self._free: list[tuple[int, int]] = []  # sorted (room left, row serial)
        self._rows: dict[int, list] = {}  # serial -> [(arrival number, item, length)]
        self._serial = 0
        self._count = 0

    def add(self, item: Hashable, length: int) -> list[list]:
        if not 0 < length <= self.capacity:
            raise ValueError(f"piece of {length} tokens cannot go in a row of {self.capacity}")
        closed = []
        i = bisect.bisect_left(self._free, (length, -1))
        if i < len(self._free):
            room, serial = self._free.pop(i)
        else:
            room, serial = self.capacity, self._serial
            self._serial += 1
            self._rows[serial] = []
        self._rows[serial].append((self._count, item, length))
        self._count += 1
        room -= length
        if room == 0:
            closed.append(self._items(self._rows.pop(serial)))
        else:
            bisect.insort(self._free, (room, serial))
            if len(self._free) > self.max_open_rows:
                _, fullest = self._free.pop(0)
                closed.append(self._items(self._rows.pop(fullest)))
        return closed

    @staticmethod
    def _items(row: list) -> list:
        return [item for _, item, _ in row]

    def flush(self) -> list[list]:
        """Close every open row, oldest first.

        The open rows at the end of a stream are the ones nothing more would fit: their pieces
        are re-packed first-fit decreasing, which often needs fewer rows (kept if it does).
        Pieces keep their arrival order inside each row.
        """
        rows = [self._rows[s] for s in sorted(self._rows)]
        self._free, self._rows = [], {}
        entries = sorted((e for r in rows for e in r), key=lambda e: (-e[2], e[0]))
        bins: list[list] = []
        room: list[int] = []
        for e in entries:
            for b, free in enumerate(room):
                if e[2] <= free:
                    bins[b].append(e)
                    room[b] -= e[2]
                    break
            else:
                bins.append([e])
                room.append(self.capacity - e[2])
        if len(bins) < len(rows):
            rows = sorted((sorted(b) for b in bins), key=lambda b: b[0][0])
        return [self._items(r) for r in rows]


def pack_lengths(lengths: Sequence[int] | np.ndarray, capacity: int, max_open_rows: int = DEFAULT_MAX_OPEN_ROWS):
    """Plan rows for pieces of the given lengths, in order.

    Returns (row_offsets int64 [R+1], item_order int64 [N]): row r holds the pieces
    ``item_order[row_offsets[r]:row_offsets[r+1]]``.
    """
    packer = BestFitPacker(capacity, max_open_rows)
    rows: list[list] = []
    for i, n in enumerate(np.asarray(lengths, dtype=np.int64).tolist()):
        rows += packer.add(i, n)
    rows += packer.flush()
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    order = np.fromiter((i for r in rows for i in r), dtype=np.int64, count=int(offsets[-1]))
    return offsets, order


def assemble_row(
    pieces: Sequence[tuple[np.ndarray, np.ndarray]], seq_length: int, pad_id: int = 0, doc_numbers: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate pieces into one row, padded at the end.

    Returns (ids int64 [L], roles int8 [L], seg int64 [L]); ``seg`` numbers the pieces
    0..n-1 (or ``doc_numbers``) and is PAD_DOC_ID on padding.
    """
    lens = np.fromiter((p[0].shape[0] for p in pieces), dtype=np.int64, count=len(pieces))
    used = int(lens.sum())
    if used > seq_length:
        raise ValueError(f"pieces of {used} tokens overflow a row of {seq_length}")
    ids = np.full(seq_length, pad_id, dtype=np.int64)
    roles = np.full(seq_length, Role.PREFIX, dtype=np.int8)
    seg = np.full(seq_length, PAD_DOC_ID, dtype=np.int64)
    if pieces:
        ids[:used] = np.concatenate([p[0] for p in pieces])
        roles[:used] = np.concatenate([p[1] for p in pieces])
        numbers = np.arange(len(pieces), dtype=np.int64) if doc_numbers is None else np.asarray(doc_numbers, dtype=np.int64)
        seg[:used] = np.repeat(numbers, lens)
    return ids, roles, seg


def collate_rows(rows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], *, renumber: bool = True, prefix_targets: bool = True) -> dict[str, torch.Tensor]:
    """Stack rows into the micro-batch contract.

    With ``renumber`` the row-local piece numbers become unique across the micro-batch (row 1's
    first document follows row 0's last); otherwise ``seg`` is taken as final doc ids.
    ``prefix_targets``: see ``gem.layout.next_token_labels`` (False in summary mode).
    """
    ids = torch.from_numpy(np.stack([r[0] for r in rows]))
    roles = torch.from_numpy(np.stack([r[1] for r in rows]).astype(np.int64))
    seg = np.stack([r[2] for r in rows])
    if renumber:
        counts = seg.max(axis=1) + 1  # pieces per row (seg is 0..n-1, padding -1)
        base = np.concatenate([[0], np.cumsum(counts)[:-1]])
        seg = np.where(seg == PAD_DOC_ID, PAD_DOC_ID, seg + base[:, None])
    doc_ids = torch.from_numpy(np.ascontiguousarray(seg, dtype=np.int64))
    return {
        "input_ids": ids,
        "labels": next_token_labels(ids, roles, doc_ids, prefix_targets=prefix_targets),
        "position_ids": position_ids_from_doc_ids(doc_ids),
        "doc_ids": doc_ids,
        "roles": roles,
    }


def pack_texts(
    items: Sequence[tuple[np.ndarray, np.ndarray]], seq_length: int, *, pad_id: int = 0, num_rows: int | None = None
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Pack a small set of texts (the contrastive micro-batch) into as few rows as possible.

    Item i gets doc id i. First-fit decreasing, ties by index, so deterministic. With
    ``num_rows`` the result always has exactly that many rows (extra rows are all padding);
    raises if the texts do not fit.
    """
    lens = [int(x[0].shape[0]) for x in items]
    if any(n > seq_length for n in lens):
        raise ValueError(f"a text of {max(lens)} tokens exceeds seq_length={seq_length}")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(items)), key=lambda i: (-lens[i], i)):
        for r, free in enumerate(room):
            if lens[i] <= free:
                rows[r].append(i)
                room[r] -= lens[i]
                break
        else:
            rows.append([i])
            room.append(seq_length - lens[i])
    if num_rows is not None:
        if len(rows) > num_rows:
            raise ValueError(f"{len(items)} texts need {len(rows)} rows of {seq_length} > num_rows={num_rows}")
        rows += [[] for _ in range(num_rows - len(rows))]
    rows = [sorted(r) for r in rows]  # doc ids increase along a row; the fit is unchanged
    return [assemble_row([items[i] for i in r], seq_length, pad_id, doc_numbers=r) for r in rows]
