"""The engine deployment's request router: adapter affinity with bounded loads,
calls pinned to one replica, and Serve's power of two choices for the rest.

Why not Serve's default multiplexed routing: it sends an adapter's request to a
holder until that holder's queue is full (max_ongoing_requests), an absolute
test. At light load no holder of a hot adapter ever fills, so its one or two
holders take far more than their share (2x the mean at 30% utilization over 64
replicas in benchmarks/routing_sim.py) while the others idle. Bounded loads
(consistent hashing with bounded loads, Mirrokni et al. 2018) compare a holder
with the fleet instead: a holder takes the request while its in-flight stays
within max(ceil(bound x (fleet in-flight + 1) / N), floor); otherwise the
least-loaded replica takes it and loads the adapter, so a hot adapter gains
holders as its traffic grows. `floor` (a quarter of a replica's batch by
default) keeps a lightly loaded fleet from copying adapters around to balance
replicas that are far from full anyway.

In-flight counts are the router's own: +1 when it routes a call to a replica,
-1 when Serve reports the call completed (every routed call is reported once).
All of the engine's traffic goes through this router (the ingress has one
replica), so these counts are exact without probing. Holders are the replicas
Serve's table lists for the adapter (reported by the replicas' multiplexed
loaders) plus those this router sent it to within the last STICKY_S seconds:
Serve's table learns of a load only some time after it, and a second request for
a new adapter must not load it somewhere else meanwhile. Each engine replica keeps
its entries in Serve's table equal to what its engine holds (engine.py,
follow_residency), so an adapter its engine evicted stops counting as held there
once STICKY_S has passed since the router last sent it that adapter."""

from __future__ import annotations

import math
import random
import time
from collections import OrderedDict

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter

TARGET = "replica"  # keyword that pins an engine call to one replica
# (app, deployment) -> ids of the replicas the ReplicaRouter of this process routes to
_ROUTABLE: dict[tuple[str, str], list[str]] = {}
STICKY_LIMIT = 10_000  # adapter ids whose recent replicas are remembered (oldest first out)
STICKY_S = 10.0  # how long a replica counts as a holder of what it was last sent
BOUND = 1.25
FLOOR = 8


def routable_replicas(app: str, deployment: str) -> list[str] | None:
    """The replicas this process's router for the deployment can route to now (the
    ids a `replica` keyword may name), or None before that router exists (Serve
    creates it with the handle's first call)."""
    return _ROUTABLE.get((app, deployment))


def load_cap(total: int, replicas: int, bound: float, floor: int) -> int:
    """In-flight a holder may reach with the new request: bound x the fleet's mean
    (counting the new request), and never below floor."""
    return max(math.ceil(bound * (total + 1) / max(replicas, 1)), floor)


class ReplicaRouter(PowerOfTwoChoicesRequestRouter):
    """A call with a `replica` keyword goes to that replica; a call with an adapter
    to a holder within the load cap, else to the least-loaded replica; the rest as
    by Serve's default router (power of two choices by queue length)."""

    def initialize_state(self, bound: float = BOUND, floor: int = FLOOR, **kwargs):
        super().initialize_state(**kwargs)
        self._bound, self._floor = bound, floor
        self._state()

    def _state(self) -> None:
        if not hasattr(self, "_inflight"):
            self._inflight: dict[str, int] = {}  # replica id -> calls routed, not completed
            self._calls: dict[str, str] = {}  # internal request id -> replica id
            # adapter -> {replica: time.monotonic() of the last call routed there}
            self._sent_to: OrderedDict[str, dict[str, float]] = OrderedDict()
            self._bound = getattr(self, "_bound", BOUND)
            self._floor = getattr(self, "_floor", FLOOR)

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        if pending_request is None or not candidate_replicas:
            return await super().choose_replicas(candidate_replicas, pending_request)
        target = pending_request.kwargs.get(TARGET)
        if target:
            return [[r for r in candidate_replicas if r.replica_id.unique_id == target]]
        adapter = pending_request.metadata.multiplexed_model_id
        if not adapter:
            return await super().choose_replicas(candidate_replicas, pending_request)
        return self.rank(adapter, candidate_replicas)

    def rank(self, adapter: str, candidates: list) -> list[list]:
        """Replicas to try in order: holders within the cap (least loaded first),
        then the least-loaded replicas, then every replica."""
        self._state()
        load = {
            r.replica_id.unique_id: self._inflight.get(r.replica_id.unique_id, 0)
            for r in candidates
        }
        cap = load_cap(sum(load.values()), len(candidates), self._bound, self._floor)
        held = {r.unique_id for r in self._multiplexed_model_id_to_replica_ids.get(adapter, ())}
        recent = time.monotonic() - STICKY_S
        held |= {r for r, sent in self._sent_to.get(adapter, {}).items() if sent > recent}
        by_load = sorted(candidates, key=lambda r: (load[r.replica_id.unique_id], random.random()))
        holders = [r for r in by_load if r.replica_id.unique_id in held]
        within = [r for r in holders if load[r.replica_id.unique_id] + 1 <= cap]
        least = [
            r
            for r in by_load
            if load[r.replica_id.unique_id] == load[by_load[0].replica_id.unique_id]
        ]
        ranks = [within[:2], least[:2], by_load]
        return [rank for rank in ranks if rank]

    def update_replicas(self, replicas) -> None:
        super().update_replicas(replicas)
        # Serve ships this class to the ingress by value (cloudpickle), with globals
        # of its own: the registry the ingress reads is the imported module's
        from lorapool.server.ray import router

        key = (self._deployment_id.app_name, self._deployment_id.name)
        router._ROUTABLE[key] = sorted(r.replica_id.unique_id for r in replicas)

    def on_request_routed(self, pending_request, replica_id, result) -> None:
        super().on_request_routed(pending_request, replica_id, result)
        self._state()
        replica = replica_id.unique_id
        self._inflight[replica] = self._inflight.get(replica, 0) + 1
        self._calls[pending_request.metadata.internal_request_id] = replica
        adapter = pending_request.metadata.multiplexed_model_id
        if adapter:
            sent = self._sent_to.pop(adapter, {})
            sent[replica] = time.monotonic()
            self._sent_to[adapter] = sent
            if len(self._sent_to) > STICKY_LIMIT:  # bounded: clients may send any id
                self._sent_to.popitem(last=False)

    def on_request_completed(self, replica_id, internal_request_id: str) -> None:
        super().on_request_completed(replica_id, internal_request_id)
        self._state()
        replica = self._calls.pop(internal_request_id, None)
        if replica is not None and self._inflight.get(replica, 0) > 0:
            self._inflight[replica] -= 1

    def on_replica_actor_died(self, replica_id) -> None:
        super().on_replica_actor_died(replica_id)
        self._state()
        self._inflight.pop(replica_id.unique_id, None)
        for sent in self._sent_to.values():
            sent.pop(replica_id.unique_id, None)
