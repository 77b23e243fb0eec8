"""A seeded bijection on ``[0, n)`` evaluated on the fly: the shuffle of one epoch of one source,
without a permutation array (so 127M samples cost nothing to set up)."""

from __future__ import annotations

_MASK64 = (1 << 64) - 1


def mix64(x: int) -> int:
    """splitmix64 finaliser: a cheap, well-distributed 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class Permutation:
    """A seeded bijection on ``[0, n)``: a 4-round Feistel network on the smallest even-bit
    domain ≥ n, with cycle walking back into range. O(1) memory, ~µs per lookup."""

    ROUNDS = 4

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError("a permutation needs n >= 1")
        self.n = n
        self.half_bits = max(1, ((n - 1).bit_length() + 1) // 2)
        self.mask = (1 << self.half_bits) - 1
        self.keys = [mix64(seed * 1_000_003 + r) for r in range(self.ROUNDS)]

    def _encrypt(self, x: int) -> int:
        left, right = x >> self.half_bits, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (mix64(right ^ key) & self.mask)
        return (left << self.half_bits) | right

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"{i} outside [0, {self.n})")
        x = self._encrypt(i)
        while x >= self.n:  # domain < 4n, so a few steps on average
            x = self._encrypt(x)
        return x
