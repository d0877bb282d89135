"""Profiling a data loader: feed its batches to an AccessProfile, producing only the sampled ones when it can."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew.profile.access import AccessProfile

__all__ = ["profile_dataloader"]


def profile_dataloader(profile: AccessProfile, batches: Iterable[Any], progress: bool = True,
                       max_batches: int | None = None, description: str = "profiling") -> AccessProfile:
    """Feed every batch (a torchrec ``Batch`` or a ``KeyedJaggedTensor``) of ``batches`` to ``profile``.

    Shows a tqdm bar with inputs per second when ``progress``; stops after ``max_batches``. Returns
    ``profile``, with :attr:`AccessProfile.seconds` set to the time spent (loading included).

    When the profile samples whole batches (``sample_by="batches"``) and the loader's dataset can produce
    any batch on its own (a ``batch_at(index)`` method and ``batch_size``, as the synthetic stream has),
    batches outside the sample are never produced: a 5% profile then costs about 5% of a pass.
    """
    from tqdm.auto import tqdm

    source = getattr(batches, "dataset", batches)
    if profile.sample_by == "batches" and hasattr(source, "batch_at") and hasattr(source, "batch_size"):
        batches = _SampledBatches(profile, source)

    total = None
    try:
        total = len(batches)  # type: ignore[arg-type]
    except TypeError:
        pass
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    began = time.perf_counter()
    with tqdm(total=total, desc=description, unit="batch", disable=not progress, dynamic_ncols=True) as bar:
        for index, batch in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            if batch is not None:  # None: a batch outside the sample, already accounted for
                profile.update(batch if isinstance(batch, KeyedJaggedTensor) else batch.sparse_features)
            bar.update(1)
            if index % 20 == 0:
                elapsed = max(time.perf_counter() - began, 1e-9)
                bar.set_postfix(inputs_per_s=f"{profile.num_inputs_seen / elapsed:,.0f}", refresh=False)
    profile.seconds = time.perf_counter() - began
    return profile


class _SampledBatches:
    """Yields the sampled batches of a seekable stream and accounts for the others without producing them."""

    def __init__(self, profile: AccessProfile, source: Any) -> None:
        self.profile, self.source = profile, source

    def __len__(self) -> int:
        return len(self.source)

    def __iter__(self):
        for index in range(len(self.source)):
            if self.profile.counts_next_batch():
                yield self.source.batch_at(index)
            else:
                self.profile.skip_batch(self.source.batch_size)
                yield None
