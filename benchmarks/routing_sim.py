"""Routing policies for many adapters over N replicas, simulated (no Ray, no model).

A discrete-event simulation: requests arrive as a Poisson stream, each names one of
--adapters adapters drawn with power-law (zipf, exponent --zipf) popularity, and
runs on the replica it is routed to for an exponential time (mean 1). A replica
runs up to --slots requests at once (its batch) and queues the rest; its load is
its in-flight requests (running + queued). The arrival rate keeps the fleet at
--utilization of its slots. Every replica holds at most K adapters, evicting the
least recently used; a request for an adapter its replica does not hold is a miss
(one adapter load).

Policies:

- bounded: what `lorapool serve-ray` does (server/ray/router.py): the less loaded
  of two holders of the adapter, taken only while its in-flight stays within
  max(ceil(--bound x (fleet in-flight + 1) / N), --floor), i.e. consistent hashing's
  bounded loads relative to the fleet mean, with a floor under which a replica's
  batch is far from full; otherwise (or when nobody holds the adapter) the
  least-loaded replica of the fleet, which loads it.
- affinity: Serve's stock multiplexed routing in outline: among the replicas
  holding the adapter, the less loaded of two drawn at random (the one holder when
  there is one); when that one is busy (in-flight >= --busy, default --slots: new
  requests would queue) or no replica holds the adapter, the least-loaded replica of the fleet (which then loads it). Its busy
  test is absolute, so at light load a hot adapter's few holders take far more
  than their share.
- round-robin: replica i, i+1, ... regardless of adapter or load.
- consistent-hash: the adapter's point on a ring of 100 virtual nodes per replica;
  no load awareness.

Reported per policy and N, then for bounded and affinity at the largest N by
utilization (--sweep): miss rate (adapter loads per request) and the busiest
replica's requests over the mean (max/mean load), over the requests after a
warm-up of --warmup of them. The last line of stdout is one JSON object.
Deterministic for a given --seed.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import heapq
import itertools
import json
import random
import sys
import time
from collections import OrderedDict
from collections.abc import Callable

POLICIES = ("bounded", "affinity", "round-robin", "consistent-hash")
TARGET = {"replicas": 64, "miss_rate": 0.01, "max_over_mean": 1.3}


class Fleet:
    """N replicas: in-flight counts, per-replica LRU adapter sets, counters."""

    def __init__(self, n: int, k: int):
        self.n, self.k = n, k
        self.inflight = [0] * n
        self.running = 0  # sum of inflight
        self.lru: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(n)]
        self.holders: dict[int, set[int]] = {}  # adapter -> replicas holding it
        self.served = [0] * n
        self.misses = 0

    def least_loaded(self) -> int:
        inflight = self.inflight
        return min(range(self.n), key=inflight.__getitem__)

    def total(self) -> int:
        return self.running

    def start(self, replica: int) -> None:
        self.inflight[replica] += 1
        self.running += 1

    def end(self, replica: int) -> None:
        self.inflight[replica] -= 1
        self.running -= 1

    def use(self, replica: int, adapter: int) -> bool:
        """Run the adapter on the replica (LRU touch, or load and evict); True on a miss."""
        lru = self.lru[replica]
        if adapter in lru:
            lru.move_to_end(adapter)
            return False
        if len(lru) >= self.k:
            old, _ = lru.popitem(last=False)
            self.holders[old].discard(replica)
        lru[adapter] = None
        self.holders.setdefault(adapter, set()).add(replica)
        return True


def holder_pick(fleet: Fleet, adapter: int, rng: random.Random) -> int | None:
    """The less loaded of two random holders of the adapter (power of two
    choices), its only holder, or None when no replica holds it."""
    holders = fleet.holders.get(adapter)
    if not holders:
        return None
    if len(holders) == 1:
        (pick,) = holders
        return pick
    a, b = rng.sample(sorted(holders), 2)
    return a if fleet.inflight[a] <= fleet.inflight[b] else b


def affinity(busy: int, rng: random.Random) -> Callable[[Fleet, int], int]:
    def route(fleet: Fleet, adapter: int) -> int:
        pick = holder_pick(fleet, adapter, rng)
        if pick is not None and fleet.inflight[pick] < busy:
            return pick
        return fleet.least_loaded()

    return route


def bounded(c: float, floor: int, rng: random.Random) -> Callable[[Fleet, int], int]:
    """Affinity with bounded loads: a holder takes the request only while its
    in-flight stays within c x the fleet's mean (counting the new request), as in
    consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018),
    or within `floor` (a load at which a replica's batch is far from full, so
    that a lightly loaded fleet does not copy adapters to balance idle replicas)."""
    from math import ceil

    def route(fleet: Fleet, adapter: int) -> int:
        cap = max(ceil(c * (fleet.total() + 1) / fleet.n), floor)
        pick = holder_pick(fleet, adapter, rng)
        if pick is not None and fleet.inflight[pick] + 1 <= cap:
            return pick
        return fleet.least_loaded()

    return route


def round_robin() -> Callable[[Fleet, int], int]:
    counter = itertools.count()
    return lambda fleet, adapter: next(counter) % fleet.n


def consistent_hash(n: int, vnodes: int = 100) -> Callable[[Fleet, int], int]:
    def point(text: str) -> int:
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")

    ring = sorted((point(f"replica-{r}#{v}"), r) for r in range(n) for v in range(vnodes))
    keys = [p for p, _ in ring]
    cache: dict[int, int] = {}

    def route(fleet: Fleet, adapter: int) -> int:
        replica = cache.get(adapter)
        if replica is None:
            i = bisect.bisect(keys, point(f"adapter-{adapter}")) % len(ring)
            replica = cache[adapter] = ring[i][1]
        return replica

    return route


def zipf_weights(n: int, s: float) -> list[float]:
    weights = [1.0 / (rank**s) for rank in range(1, n + 1)]
    total = sum(weights)
    return list(itertools.accumulate(w / total for w in weights))


def simulate(policy: str, n: int, args: argparse.Namespace, utilization: float = 0.0) -> dict:
    """One cell: the policy on n replicas at `utilization` (default --utilization)."""
    utilization = utilization or args.utilization
    rng = random.Random(f"{args.seed}/{n}")  # same arrivals and adapters for every policy
    route_rng = random.Random(f"{args.seed}/{n}/route")
    fleet = Fleet(n, args.k)
    route = {
        "bounded": lambda: bounded(args.bound, args.floor, route_rng),
        "affinity": lambda: affinity(args.busy or args.slots, route_rng),
        "round-robin": round_robin,
        "consistent-hash": lambda: consistent_hash(n),
    }[policy]()
    cum = zipf_weights(args.adapters, args.zipf)
    # adapter ids shuffled so that popularity is not correlated with the id (hashing)
    ids = list(range(args.adapters))
    rng.shuffle(ids)
    rate = utilization * n * args.slots  # arrivals per unit time (service mean 1)
    departures: list[tuple[float, int]] = []
    now = 0.0
    warmup = int(args.requests * args.warmup)
    misses = 0
    served = [0] * n
    for i in range(args.requests):
        now += rng.expovariate(rate)
        while departures and departures[0][0] <= now:
            _, replica = heapq.heappop(departures)
            fleet.end(replica)
        adapter = ids[bisect.bisect(cum, rng.random() * cum[-1])]
        duration = rng.expovariate(1.0)
        replica = route(fleet, adapter)
        miss = fleet.use(replica, adapter)
        # the replica runs `slots` at once: a queued request ends one service after
        # the request ahead of it frees a slot (approximated: FIFO by in-flight rank)
        ahead = fleet.inflight[replica] - args.slots + 1
        wait = ahead / args.slots if ahead > 0 else 0.0
        fleet.start(replica)
        heapq.heappush(departures, (now + wait + duration, replica))
        if i >= warmup:
            misses += miss
            served[replica] += 1
    measured = args.requests - warmup
    mean = measured / n
    return {
        "policy": policy,
        "replicas": n,
        "utilization": utilization,
        "miss_rate": misses / measured,
        "max_over_mean": max(served) / mean,
        "adapters_per_replica_slots": args.k,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--zipf", type=float, default=1.0, help="popularity exponent")
    parser.add_argument("--replicas", default="2,4,8,16,32,64", help="N values, comma-separated")
    parser.add_argument("--k", type=int, default=64, help="adapters held per replica (LRU)")
    parser.add_argument("--slots", type=int, default=32, help="requests a replica runs at once")
    parser.add_argument(
        "--busy", type=int, default=0, help="affinity: in-flight that is busy (0: --slots)"
    )
    parser.add_argument(
        "--bound", type=float, default=1.25, help="bounded: a holder's cap over the mean load"
    )
    parser.add_argument(
        "--floor", type=int, default=8, help="bounded: in-flight always within the cap"
    )
    parser.add_argument("--utilization", type=float, default=0.7, help="offered load / slots")
    parser.add_argument(
        "--sweep",
        default="0.1,0.3,0.5,0.7,0.9",
        help="utilizations for the second table (bounded vs affinity at the largest N); '' = off",
    )
    parser.add_argument("--requests", type=int, default=100_000, help="per policy and N")
    parser.add_argument("--warmup", type=float, default=0.2, help="fraction not measured")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    ns = [int(x) for x in args.replicas.split(",")]
    rows = [simulate(policy, n, args) for n in ns for policy in POLICIES]

    print(
        f"{args.adapters} adapters, zipf s={args.zipf}, K={args.k} per replica (LRU), "
        f"{args.slots} slots per replica at {args.utilization:.0%} utilization, "
        f"{args.requests} requests per cell ({args.warmup:.0%} warm-up), seed {args.seed}"
    )
    header = "| N | " + " | ".join(f"{p} miss | {p} max/mean" for p in POLICIES) + " |"
    print(header)
    print("|" + "---:|" * (1 + 2 * len(POLICIES)))
    by = {(r["policy"], r["replicas"]): r for r in rows}
    for n in ns:
        cells = []
        for p in POLICIES:
            r = by[(p, n)]
            cells += [f"{r['miss_rate']:.2%}", f"{r['max_over_mean']:.2f}"]
        print(f"| {n} | " + " | ".join(cells) + " |")
    sweep = []
    if args.sweep:
        n = max(ns)
        utilizations = [float(x) for x in args.sweep.split(",")]
        sweep = [simulate(p, n, args, u) for u in utilizations for p in ("bounded", "affinity")]
        print(f"\nN = {n}, by utilization (offered load / slots):")
        print(
            "| utilization | bounded miss | bounded max/mean | affinity miss | affinity max/mean |"
        )
        print("|---:|---:|---:|---:|---:|")
        cells = {(r["policy"], r["utilization"]): r for r in sweep}
        for u in utilizations:
            b, a = cells[("bounded", u)], cells[("affinity", u)]
            print(
                f"| {u:.0%} | {b['miss_rate']:.2%} | {b['max_over_mean']:.2f} | "
                f"{a['miss_rate']:.2%} | {a['max_over_mean']:.2f} |"
            )
    verdict = None
    if TARGET["replicas"] in ns and args.k == 64:
        r = by[("bounded", TARGET["replicas"])]
        met = r["miss_rate"] < TARGET["miss_rate"] and r["max_over_mean"] < TARGET["max_over_mean"]
        verdict = {"target": TARGET, "bounded": r, "met": met}
        print(
            f"target at N=64, K=64 (bounded miss < 1%, max/mean < 1.3): "
            f"miss {r['miss_rate']:.2%}, max/mean {r['max_over_mean']:.2f} -> "
            f"{'met' if met else 'NOT met'}"
        )
    elapsed = time.perf_counter() - started
    print(f"({elapsed:.1f} s)", file=sys.stderr)
    summary = {"config": vars(args), "rows": rows, "sweep": sweep, "target": verdict}
    print(json.dumps({**summary, "seconds": elapsed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
