"""Expert placement: which rank holds which routed expert under expert parallelism.

The map is data (`Placement.owner`, one rank per expert), the same on every
rank and in the router; it is printed when an EP runner starts. Two ways to
build it:

- `contiguous`: rank r holds experts [r*E/W, (r+1)*E/W) (the first E mod W
  ranks one more when W does not divide E), the usual default;
- `balanced`: from a measured load per expert (tokens routed to it), greedy
  longest-processing-time: heaviest expert first onto the least loaded rank
  that still has room, every rank holding ceil(E/W) experts at most.

Each rank's experts are kept in ascending global id: the local order of its
weight shard and of its routing statistics.
"""

import msgspec


class Placement(msgspec.Struct, frozen=True):
    num_ranks: int
    owner: list[int]          # (E,) the rank holding each expert

    def __post_init__(self):
        if self.num_ranks < 1:
            raise ValueError(f"placement needs at least one rank, got {self.num_ranks}")
        bad = [(e, r) for e, r in enumerate(self.owner) if not 0 <= r < self.num_ranks]
        if bad:
            raise ValueError(f"placement: expert {bad[0][0]} on rank {bad[0][1]}, outside 0..{self.num_ranks - 1}")
        empty = [r for r in range(self.num_ranks) if r not in self.owner]
        if empty:
            raise ValueError(f"placement: rank {empty[0]} holds no expert ({len(self.owner)} experts over "
                             f"{self.num_ranks} ranks); use at most as many ranks as experts")

    @property
    def num_experts(self) -> int:
        return len(self.owner)

    def experts_of(self, rank: int) -> list[int]:
        """Global ids held by `rank`, ascending (its local order)."""
        return [e for e, r in enumerate(self.owner) if r == rank]

    def local_index(self) -> list[int]:
        """(E,) position of each expert within its owner's shard."""
        seen = [0] * self.num_ranks
        out = []
        for r in self.owner:
            out.append(seen[r])
            seen[r] += 1
        return out

    def describe(self) -> str:
        return "expert placement: " + "; ".join(
            f"rank {r}: experts {_ranges(self.experts_of(r))}" for r in range(self.num_ranks))


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out, i = [], 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(out)


def contiguous(num_experts: int, num_ranks: int) -> Placement:
    if num_ranks > num_experts:
        raise ValueError(f"expert parallelism over {num_ranks} ranks needs at least as many experts, "
                         f"the model has {num_experts}")
    base, extra = divmod(num_experts, num_ranks)
    owner = []
    for r in range(num_ranks):
        owner += [r] * (base + (r < extra))
    return Placement(num_ranks, owner)


def balanced(load: list[float], num_ranks: int) -> Placement:
    """Spread measured per-expert load (e.g. tokens routed, summed over layers)
    evenly: heaviest first onto the least loaded rank with room; ties go to the
    lower expert id and the lower rank, so the result is deterministic."""
    E = len(load)
    if num_ranks > E:
        raise ValueError(f"expert parallelism over {num_ranks} ranks needs at least as many experts, "
                         f"the load covers {E}")
    if any(x < 0 for x in load):
        raise ValueError("expert load must be non-negative")
    room = -(-E // num_ranks)
    owner, total, held = [0] * E, [0.0] * num_ranks, [0] * num_ranks
    for e in sorted(range(E), key=lambda e: (-load[e], e)):
        r = min((r for r in range(num_ranks) if held[r] < room), key=lambda r: (total[r], held[r], r))
        owner[e] = r
        total[r] += load[e]
        held[r] += 1
    return Placement(num_ranks, owner)
