"""The engine deployment's request router: Serve's multiplexed affinity and power
of two choices, plus calls pinned to one replica and stickiness for adapters Serve
does not yet know the place of."""

from __future__ import annotations

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter

TARGET = "replica"  # keyword that pins an engine call to one replica
STICKY_LIMIT = 10_000  # adapter ids ReplicaRouter remembers (oldest forgotten first)


class ReplicaRouter(PowerOfTwoChoicesRequestRouter):
    """A call with a `replica` keyword goes to that replica; the rest are routed as
    by Serve's default router (multiplexed affinity, then power of two choices).

    Serve learns which replica holds an adapter only when that replica reports it
    (through the controller, some time after the load), so two quick requests for
    a new adapter could land on two replicas. This router remembers where it sent
    each adapter and prefers that replica until Serve's own table knows the
    adapter; a busy preferred replica still falls back to the others."""

    def initialize_state(self, **kwargs):
        super().initialize_state(**kwargs)
        self._sent_to: dict[str, str] = {}  # adapter id -> replica it was last routed to

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        if pending_request is None:
            return await super().choose_replicas(candidate_replicas, pending_request)
        target = pending_request.kwargs.get(TARGET)
        if target:
            return [[r for r in candidate_replicas if r.replica_id.unique_id == target]]
        adapter = pending_request.metadata.multiplexed_model_id
        known = self._multiplexed_model_id_to_replica_ids.get(adapter) if adapter else True
        if not known:
            sent = getattr(self, "_sent_to", {}).get(adapter)
            first = [r for r in candidate_replicas if r.replica_id.unique_id == sent]
            if first:
                rest = [r for r in candidate_replicas if r.replica_id.unique_id != sent]
                return [first, rest] if rest else [first]
        return await super().choose_replicas(candidate_replicas, pending_request)

    def on_request_routed(self, pending_request, replica_id, result) -> None:
        super().on_request_routed(pending_request, replica_id, result)
        adapter = pending_request.metadata.multiplexed_model_id
        if adapter:
            if not hasattr(self, "_sent_to"):
                self._sent_to = {}
            self._sent_to.pop(adapter, None)
            self._sent_to[adapter] = replica_id.unique_id
            if len(self._sent_to) > STICKY_LIMIT:  # bounded: clients may send any id
                del self._sent_to[next(iter(self._sent_to))]
