"""A guest's RAM layout: page size and regions, and the range checks every page-bearing
frame goes through."""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field

from postcopy.protocol.errors import RangeError

MAX_REGIONS = 1024
MIN_PAGE_SIZE = 4096
MAX_PAGE_SIZE = 1 << 30
U64_MAX = (1 << 64) - 1



def layout_problem(page_size: object, regions: tuple) -> str | None:
    """What is wrong with a (page_size, regions) pair, or None. Regions are byte
    (offset, length) pairs: page aligned, non-empty, sorted, not overlapping."""
    if (type(page_size) is not int or not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE
            or page_size & (page_size - 1)):
        return f"page size {page_size!r} is not a power of two from {MIN_PAGE_SIZE} to {MAX_PAGE_SIZE}"
    if len(regions) > MAX_REGIONS:
        return f"{len(regions)} RAM regions exceed the limit of {MAX_REGIONS}"
    end = 0
    for i, (offset, length) in enumerate(regions):
        if type(offset) is not int or type(length) is not int or offset < 0 or length <= 0:
            return f"RAM region {i} ({offset!r}, {length!r}) is not a non-negative offset and a positive length"
        if offset % page_size or length % page_size:
            return f"RAM region {i} (offset {offset}, length {length}) is not aligned to the page size {page_size}"
        if offset < end:
            return f"RAM region {i} at offset {offset} overlaps or precedes the region before it"
        end = offset + length
        if end > U64_MAX:
            return f"RAM region {i} ends beyond 2^64 bytes"
    return None


def pairs(value: object) -> tuple[tuple[int, int], ...]:
    """Normalise a sequence of pairs to a tuple of 2-tuples (equality with decoded frames)."""
    try:
        pairs = tuple(tuple(pair) for pair in value)  # type: ignore[union-attr]
    except TypeError:
        raise ValueError(f"expected a sequence of pairs, got {value!r}") from None
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"expected a pair, got {pair!r}")
    return pairs  # type: ignore[return-value]


@dataclass(frozen=True)
class Layout:
    """A guest's RAM layout. Page ``i`` covers bytes ``[i*page_size, (i+1)*page_size)``
    of the RAM offset space; a page range is valid when it lies inside one region."""

    page_size: int
    regions: tuple[tuple[int, int], ...]
    _starts: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _ends: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        regions = pairs(self.regions)
        problem = layout_problem(self.page_size, regions)
        if problem:
            raise ValueError(f"invalid RAM layout: {problem}")
        ps = self.page_size
        object.__setattr__(self, "regions", regions)
        object.__setattr__(self, "_starts", tuple(offset // ps for offset, _ in regions))
        object.__setattr__(self, "_ends", tuple((offset + length) // ps for offset, length in regions))

    @classmethod
    def of(cls, hello) -> Layout:
        """The layout a Hello announces."""
        return cls(page_size=hello.page_size, regions=hello.regions)

    @property
    def total_pages(self) -> int:
        """Number of pages of RAM (all regions)."""
        return sum(length for _, length in self.regions) // self.page_size

    @property
    def total_bytes(self) -> int:
        return sum(length for _, length in self.regions)

    def contains(self, first_page: int, npages: int) -> bool:
        """Whether pages [first_page, first_page + npages) lie inside one region."""
        if npages < 1 or first_page < 0:
            return False
        i = bisect_right(self._starts, first_page) - 1
        # Python integers: first_page + npages cannot wrap around.
        return i >= 0 and first_page + npages <= self._ends[i]

    def check(self, first_page: int, npages: int, what: str = "page range") -> None:
        """Raise :class:`RangeError` unless the range lies inside RAM."""
        if not self.contains(first_page, npages):
            raise RangeError(
                f"{what} of {npages} pages at page {first_page} is outside the guest RAM "
                f"({self.total_pages} pages of {self.page_size} bytes in {len(self.regions)} region(s))"
            )
