"""KV storage for prefill and batched decode: preallocated slabs instead of a ``torch.cat`` per step.

transformers' ``DynamicCache`` concatenates every layer's whole K/V on every token (O(length) copy
per step). Here each layer's K/V live in a slab ``[rows, num_kv_heads, capacity, head_dim]``;
a step writes its one new column in place and attention reads a view of the columns in use.

Batched decode left-pads: row ``r`` holds its ``lens[r]`` positions in columns
``[length - lens[r], length)``; every step appends one column to every row. The padding columns
are masked out of attention (they hold zeros or another request's finite K/V: never NaN, which
masking could not cancel), and RoPE gets each row's own positions, so a batched row computes what
it would alone.

Memory: a joining row reserves the columns its request may still generate, so a batch grows only
when a request joins (``add``), and an allocation that fails there raises ``KVAllocationError``
with the batch untouched: that request fails, the others go on.
"""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import Cache, DynamicLayer

from llm_worker.engine.kv import KVCache


class KVAllocationError(MemoryError):
    """The slabs could not grow for a joining request (no memory for its reservation); the batch is
    as it was before the ``add``."""


class SlabLayer(DynamicLayer):
    """A transformers cache layer over caller-owned buffers ``[batch, heads, capacity, head_dim]``
    holding ``length`` columns: ``update`` writes the new ones in place (the caller reserved room)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        super().__init__()
        self._slab_keys, self._slab_values = keys, values
        self.dtype, self.device = keys.dtype, keys.device
        self.length = length
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # NOTE: the buffers exist from the start

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self._slab_keys.shape[-2]:
            raise RuntimeError(f"slab of {self._slab_keys.shape[-2]} columns cannot take {end}")
        self._slab_keys[:, :, self.length:end].copy_(key_states)
        self._slab_values[:, :, self.length:end].copy_(value_states)
        self.length = end
        self.keys, self.values = self._slab_keys[:, :, :end], self._slab_values[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0


def cache_kwarg(model: torch.nn.Module) -> str:
    """The name ``model``'s forward takes a cache by: ``cache`` from transformers 5.24, where
    ``past_key_values`` still works but warns on every forward; else ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def slab_cache(keys: list[torch.Tensor], values: list[torch.Tensor], length: int) -> Cache:
    """A cache for one forward over per-layer slabs that already hold ``length`` columns."""
    return Cache(layers=[SlabLayer(k, v, length) for k, v in zip(keys, values)])


class BatchKV:
    """The left-padded KV of a decode batch's rows (see the module docstring).

    Accounting (``lens``, ``length``) lives beside the slabs: a row is added by copying its
    prompt KV in, removed by moving the last row into its place, and the slabs are reallocated
    only when rows or columns run out or a longer row joins (then everything shifts right).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lens: list[int] = []
        """Positions held per row."""
        self.length = 0
        """Columns in use: ``max(lens)``."""

    @property
    def num_rows(self) -> int:
        return len(self.lens)

    @property
    def row_capacity(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    @property
    def column_capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def add(self, kv: KVCache, reserve_tokens: int) -> int:
        """Copy ``kv`` in as a new last row with room for ``reserve_tokens`` more; its row index.

        Raises ``KVAllocationError`` (nothing changed) when the grown slabs cannot be allocated."""
        shape = (self.num_layers, self.num_kv_heads, kv.num_tokens, self.head_dim)
        if tuple(kv.keys.shape) != shape:
            raise ValueError(f"KV of shape {tuple(kv.keys.shape)} does not fit this model's {shape}")
        new_length = max(self.length, kv.num_tokens)
        columns = new_length + max(reserve_tokens, 1)
        shift = new_length - self.length
        rows_full = self.num_rows == self.row_capacity
        if rows_full or columns > self.column_capacity or shift:
            rows = max(2 * self.row_capacity, 1) if rows_full else self.row_capacity
            # NOTE: shifted rows keep the room they reserved: capacity grows by the shift too.
            self._reallocate(rows, max(columns, self.column_capacity + shift), shift)
        row, start = self.num_rows, new_length - kv.num_tokens
        for layer in range(self.num_layers):
            # NOTE: a copy_ across devices is the host → GPU transfer of a handed-off KV.
            self.keys[layer][row, :, start:new_length].copy_(kv.keys[layer])
            self.values[layer][row, :, start:new_length].copy_(kv.values[layer])
        self.lens.append(kv.num_tokens)
        self.length = new_length
        return row

    def remove(self, row: int) -> None:
        """Drop ``row``; the last row takes its index. Leading all-padding columns are dropped too."""
        last = self.num_rows - 1
        if row != last:
            cols = slice(self.length - self.lens[last], self.length)
            for slab in self.keys + self.values:
                slab[row, :, cols] = slab[last, :, cols]
            self.lens[row] = self.lens[last]
        self.lens.pop()
        unused = self.length - max(self.lens, default=0)
        if unused:
            # NOTE: views, not copies: the columns before the longest row's first are padding everywhere.
            self.keys = [k[:, :, unused:] for k in self.keys]
            self.values = [v[:, :, unused:] for v in self.values]
            self.length -= unused

    def reserve_column(self) -> None:
        """Make room for one more column (grows the slabs by half when full)."""
        if self.length + 1 > self.column_capacity:
            self._reallocate(self.row_capacity, max(self.length + 1, self.column_capacity * 3 // 2), 0)

    def cache(self) -> Cache:
        """The cache for the next forward (one new column per row); call ``advance`` after it."""
        rows = self.num_rows
        return slab_cache([k[:rows] for k in self.keys], [v[:rows] for v in self.values], self.length)

    def attention_mask(self) -> torch.Tensor | None:
        """``[rows, length + 1]`` bool (True = attend) for the next step; None when nothing is padded."""
        if all(n == self.length for n in self.lens):
            return None
        lens = torch.tensor(self.lens, device=self.device)
        columns = torch.arange(self.length + 1, device=self.device)
        return columns[None, :] >= (self.length - lens)[:, None]

    def advance(self) -> None:
        """Account for the column the last forward wrote."""
        self.length += 1
        self.lens = [n + 1 for n in self.lens]

    def _reallocate(self, rows: int, columns: int, shift: int) -> None:
        """New slabs ``[rows, heads, columns, head_dim]`` with the rows held moved ``shift`` columns
        right. All-or-nothing: the old slabs stay in place until every new one exists."""
        shape = (rows, self.num_kv_heads, columns, self.head_dim)
        old_rows = self.num_rows
        keys, values = [], []
        for old_k, old_v in zip(self.keys or [None] * self.num_layers, self.values or [None] * self.num_layers):
            try:
                new_k, new_v = self._allocate(shape), self._allocate(shape)
            except (RuntimeError, MemoryError) as e:  # NOTE: torch.OutOfMemoryError is a RuntimeError
                nbytes = 2 * self.num_layers * rows * self.num_kv_heads * columns * self.head_dim * self.dtype.itemsize
                raise KVAllocationError(f"no memory for KV slabs of {rows} rows x {columns} positions "
                                        f"({nbytes} bytes): {e}") from e
            if old_rows:
                new_k[:old_rows, :, shift:shift + self.length] = old_k[:old_rows, :, :self.length]
                new_v[:old_rows, :, shift:shift + self.length] = old_v[:old_rows, :, :self.length]
            keys.append(new_k)
            values.append(new_v)
        self.keys, self.values = keys, values
        self.length += shift

    def _allocate(self, shape: tuple[int, ...]) -> torch.Tensor:
        # NOTE: zeros, not empty: padding must hold finite numbers (see the module docstring).
        return torch.zeros(shape, dtype=self.dtype, device=self.device)
