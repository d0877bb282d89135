"""Deterministic integer hashing: splitmix64 on Python ints, a 32-bit finaliser on int64 tensors.

Everything that must decide the same on every rank and in every run (samples, shuffles, synthetic rows)
draws from these, never from a global random state.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["MASK32", "MASK64", "hash32", "mix32", "mix_seed", "splitmix64"]

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF


def splitmix64(value: int) -> int:
    """One splitmix64 step of a Python int (the 64-bit result)."""
    value = (value + 0x9E3779B97F4A7C15) & MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & MASK64
    return value ^ (value >> 31)


def mix_seed(*parts: int) -> int:
    """A non-negative 63-bit seed from several ints: distinct ``(seed, epoch, window)`` give unrelated streams."""
    value = 0
    for part in parts:  # splitmix64-like rounds (the sum is masked only after the first multiply, as always)
        value = (value ^ (part & MASK64)) + 0x9E3779B97F4A7C15 & MASK64
        value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & MASK64
        value ^= value >> 31
    return value & 0x7FFFFFFFFFFFFFFF


def mix32(x: Tensor) -> Tensor:
    """A 32-bit integer finaliser on int64 tensors holding values in [0, 2^32) (products stay below 2^63)."""
    for _ in range(2):
        x = x ^ (x >> 16)
        x = (x * 0x45D9F3B) & MASK32
    return x ^ (x >> 16)


def hash32(positions: Tensor, seed: int) -> Tensor:
    """A 32-bit hash of ``(seed, position)`` on int64 tensors."""
    return mix32((positions & MASK32) ^ ((seed * 0x9E3779B1) & MASK32))
