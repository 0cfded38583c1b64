"""A growable bitmap of "known" items (allocated pages, reserved slots), cheap to test on a hot path."""

from __future__ import annotations


class Bitmap:
    """One bit per item (a page, a slot, a window): set = known.  Grows as items are marked; an item past
    the end reads as 0.  ``bits`` is public so that a hot path can test one bit inline."""

    __slots__ = ("bits",)

    def __init__(self) -> None:
        self.bits = bytearray()

    def known(self, first: int, last: int) -> bool:
        """Every page in ``[first, last]`` known allocated."""
        bits = self.bits
        b0, b1 = first >> 3, last >> 3
        if b1 >= len(bits):
            return False
        if b0 == b1:
            mask = ((1 << (last - first + 1)) - 1) << (first & 7)
            return bits[b0] & mask == mask
        head = (0xFF << (first & 7)) & 0xFF
        tail = (1 << ((last & 7) + 1)) - 1
        if bits[b0] & head != head or bits[b1] & tail != tail:
            return False
        return b1 - b0 == 1 or bits.count(0xFF, b0 + 1, b1) == b1 - b0 - 1

    def mark(self, first: int, last: int) -> None:
        bits = self.bits
        b0, b1 = first >> 3, last >> 3
        if b1 >= len(bits):
            bits.extend(bytes(b1 + 1 - len(bits)))
        if b0 == b1:
            bits[b0] |= ((1 << (last - first + 1)) - 1) << (first & 7)
            return
        bits[b0] |= (0xFF << (first & 7)) & 0xFF
        bits[b1] |= (1 << ((last & 7) + 1)) - 1
        if b1 - b0 > 1:
            bits[b0 + 1 : b1] = b"\xff" * (b1 - b0 - 1)

    def clear(self, first: int, last: int) -> None:
        bits = self.bits
        last = min(last, len(bits) * 8 - 1)
        if last < first:
            return
        b0, b1 = first >> 3, last >> 3
        if b0 == b1:
            bits[b0] &= ~(((1 << (last - first + 1)) - 1) << (first & 7)) & 0xFF
            return
        bits[b0] &= ~(0xFF << (first & 7)) & 0xFF
        bits[b1] &= ~((1 << ((last & 7) + 1)) - 1) & 0xFF
        if b1 - b0 > 1:
            bits[b0 + 1 : b1] = bytes(b1 - b0 - 1)

    def reset(self) -> None:
        self.bits = bytearray()
