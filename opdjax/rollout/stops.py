"""The stop ids of a generation: one builder for every job that samples."""
from __future__ import annotations

from typing import Iterable


def stop_ids(tokenizer=None, cfgs: Iterable = (), extra: Iterable[int] = ()) -> tuple[int, ...]:
    """Sorted union of the tokenizer's eos_token_id, each model config's eos_token_id (an id or a
    list of ids; None skipped) and the `extra` ids."""
    ids = set()
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for cfg in cfgs:
        eos = cfg.eos_token_id
        ids.update(int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []))
    ids.update(int(i) for i in extra)
    return tuple(sorted(ids))
