"""Session-shaped synthetic streams: consecutive samples of one user, with the user's ID and item history."""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_skew.data.synthetic.powerlaw import PowerLawTables, rank_to_row, scatter_multiplier

__all__ = ["SESSION_BLOCK_SAMPLES", "SessionFeatures", "SessionGenerator", "SessionLayout", "Sessions"]

# Each stream is cut into blocks of this many samples; a block's sessions come from a generator seeded by
# (seed, split, block), so any sample range is generated without its prefix. A session running past a block's
# end is cut there (about mean_samples / SESSION_BLOCK_SAMPLES of the sessions).
SESSION_BLOCK_SAMPLES = 65536

# Seeds of the session blocks live far from those of the sample chunks (same seed function, other chunk numbers).
_SESSION_CHUNK_BASE = 1 << 40


@dataclass(frozen=True)
class Sessions:
    """The shape of sessions in a synthetic click log (``SyntheticDataModule(sessions=...)``).

    A session is a run of consecutive samples of one user; sessions follow each other in random order (each draws
    its user from the user popularity, so a user's sessions are scattered over the stream). Every sample of a
    session carries the same user-level features: the user ID (``user_id``) and the user's history (``history``,
    a multi-hot bag of item IDs). Both enter the teacher's click probability.

    Args:
        mean_samples: Mean samples per session; the count is ``1 + Geometric`` with this mean. Default 10:
            MovieLens-100k's rating sessions (a user's ratings with gaps under 30 minutes) have a median of 11
            ratings (mean 36).
        max_history: Most items in a history (longer draws are cut). Default 50: DIN's user-behaviour sequences
            (Taobao) and DIEN's are truncated at 50.
        mean_history: Mean history length before the cut at ``max_history``: ``1 + Geometric`` with this mean.
            Default 65, the median number of ratings per MovieLens-100k user; cut at 50 the mean is about 35
            (MovieLens-100k: a rating's previous ratings of its user, cut at 50, average 38).
        num_users: Rows of the user table (capped by ``max_rows_per_table``).
        num_items: Rows of the history's item table (capped by ``max_rows_per_table``).
        user_exponent: Power-law exponent of user popularity (how many sessions a user has).
        item_exponent: Power-law exponent of item popularity in histories.
        logit_share: Share of the teacher's logit variance that the user and the history carry (half each).
    """

    mean_samples: float = 10.0
    max_history: int = 50
    mean_history: float = 65.0
    num_users: int = 1_000_000
    num_items: int = 1_000_000
    user_exponent: float = 1.05
    item_exponent: float = 1.05
    logit_share: float = 0.3

    def __post_init__(self) -> None:
        checks = [
            (self.mean_samples >= 1, "mean_samples must be >= 1"),
            (isinstance(self.max_history, int) and self.max_history >= 1, "max_history must be an integer >= 1"),
            (self.mean_history >= 1, "mean_history must be >= 1"),
            (isinstance(self.num_users, int) and self.num_users >= 1, "num_users must be an integer >= 1"),
            (isinstance(self.num_items, int) and self.num_items >= 1, "num_items must be an integer >= 1"),
            (self.user_exponent >= 0 and self.item_exponent >= 0, "user_exponent and item_exponent must be >= 0"),
            (0 <= self.logit_share < 1, "logit_share must lie in [0, 1)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"Sessions: {message}, got {self}")


@dataclass(frozen=True)
class SessionLayout:
    """The sessions of one block: where each starts and its user-level draws."""

    starts: Tensor  # [S] int64, first sample of each session (block-relative), starts[0] == 0
    users: Tensor  # [S] int64, user row
    history_lengths: Tensor  # [S] int64, in [1, max_history]
    history_items: Tensor  # [S, max_history] int64, item rows (only the first history_lengths[s] are used)


@dataclass(frozen=True)
class SessionFeatures:
    """User-level features of a range of samples (constant within a session)."""

    session: Tensor  # [n] int64, a session number unique within the stream (block * block size + start)
    user: Tensor  # [n] int64
    history_lengths: Tensor  # [n] int64
    history_values: Tensor  # [sum(history_lengths)] int64, each sample's history consecutive
    logit: Tensor  # [n] float32, the user-level part of the teacher's logit


def _geometric(uniforms: Tensor, mean: float) -> Tensor:
    """``1 + Geometric`` draws with the given mean (``mean == 1``: all ones) from float64 uniforms in [0, 1)."""
    if mean <= 1.0:
        return torch.ones_like(uniforms, dtype=torch.int64)
    log_keep = math.log1p(-1.0 / mean)
    return 1 + torch.floor(torch.log1p(-uniforms) / log_keep).to(torch.int64)


class SessionGenerator:
    """Draws session layouts per block and the user-level features of any sample range (seekable).

    Args:
        shape: the session shape.
        num_users: user table rows in force (after the cap).
        num_items: item table rows in force (after the cap).
        seed_of: ``seed_of(split, chunk)`` gives the 32-bit seed of a generator (the click log's seed function).
        structure: the click log's structure generator (draws the row scatter and the teacher's salts).
        user_std: standard deviation of the user's logit part.
        history_std: standard deviation of the history's logit part.
    """

    def __init__(self, shape: Sessions, num_users: int, num_items: int, seed_of, structure: torch.Generator,
                 user_std: float, history_std: float) -> None:
        self.shape, self.num_users, self.num_items = shape, num_users, num_items
        self.seed_of = seed_of
        self.tables = PowerLawTables.build([num_users, num_items], [shape.user_exponent, shape.item_exponent])
        spread = torch.rand(2, generator=structure, dtype=torch.float64).tolist()
        offsets = torch.rand(2, generator=structure, dtype=torch.float64).tolist()
        salts = (torch.rand(2, generator=structure, dtype=torch.float64) * 2**32).to(torch.int64).tolist()
        self.user_scatter = (scatter_multiplier(num_users, 0.2 + 0.6 * spread[0]), int(offsets[0] * num_users))
        self.item_scatter = (scatter_multiplier(num_items, 0.2 + 0.6 * spread[1]), int(offsets[1] * num_items))
        self.user_salt, self.item_salt = salts
        self.user_std, self.history_std = user_std, history_std
        self._cache: OrderedDict[tuple[str, int], SessionLayout] = OrderedDict()

    def layout(self, split: str, block: int) -> SessionLayout:
        """The sessions of ``block`` of ``split``'s stream (cached: consecutive batches share blocks)."""
        key = (split, block)
        if key not in self._cache:
            self._cache[key] = self._draw(split, block)
            while len(self._cache) > 2:
                self._cache.popitem(last=False)
        return self._cache[key]

    def _draw(self, split: str, block: int) -> SessionLayout:
        shape = self.shape
        rng = torch.Generator().manual_seed(self.seed_of(split, _SESSION_CHUNK_BASE + block))
        count = int(SESSION_BLOCK_SAMPLES / shape.mean_samples * 1.5) + 64
        lengths = _geometric(torch.rand(count, generator=rng, dtype=torch.float64), shape.mean_samples)
        while int(lengths.sum()) < SESSION_BLOCK_SAMPLES:  # rare: draw more until the block is covered
            more = _geometric(torch.rand(count, generator=rng, dtype=torch.float64), shape.mean_samples)
            lengths = torch.cat([lengths, more])
        starts = torch.cumsum(lengths, 0) - lengths
        starts = starts[starts < SESSION_BLOCK_SAMPLES]
        num_sessions = starts.numel()
        ranks = self.tables.sample(torch.rand(2, num_sessions * shape.max_history, generator=rng,
                                              dtype=torch.float64))
        users = rank_to_row(ranks[0, :num_sessions], self.num_users, *self.user_scatter)
        items = rank_to_row(ranks[1], self.num_items, *self.item_scatter).view(num_sessions, shape.max_history)
        history = _geometric(torch.rand(num_sessions, generator=rng, dtype=torch.float64), shape.mean_history)
        return SessionLayout(starts=starts, users=users, history_lengths=history.clamp(max=shape.max_history),
                             history_items=items)

    def features(self, split: str, start: int, stop: int) -> SessionFeatures:
        """The user-level features of samples ``[start, stop)`` of ``split``'s stream."""
        from lightning_skew.data.synthetic.generator import hashed_gaussian  # that module imports this one

        sessions, users, lengths, items = [], [], [], []
        for block in range(start // SESSION_BLOCK_SAMPLES, (stop - 1) // SESSION_BLOCK_SAMPLES + 1):
            base = block * SESSION_BLOCK_SAMPLES
            lo, hi = max(start, base) - base, min(stop, base + SESSION_BLOCK_SAMPLES) - base
            layout = self.layout(split, block)
            session = torch.searchsorted(layout.starts, torch.arange(lo, hi), right=True) - 1
            sessions.append(base + layout.starts[session])
            users.append(layout.users[session])
            lengths.append(layout.history_lengths[session])
            items.append(layout.history_items[session])
        user, length, item = torch.cat(users), torch.cat(lengths), torch.cat(items)
        values = item[torch.arange(item.shape[1])[None, :] < length[:, None]]
        user_effect = hashed_gaussian(user, self.user_salt)
        owner = torch.repeat_interleave(torch.arange(user.numel()), length)
        item_effect = torch.zeros(user.numel()).index_add_(0, owner, hashed_gaussian(values, self.item_salt))
        logit = self.user_std * user_effect + self.history_std * item_effect / length.float().sqrt()
        return SessionFeatures(session=torch.cat(sessions), user=user, history_lengths=length,
                               history_values=values, logit=logit)
