"""The fleet's answers to ListAdapters and GetStats, and its Prometheus samples,
merged from every replica's."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from lorapool.v1 import lorapool_pb2 as pb

REPLICA_LABEL = "replica"


def merge_adapters(replies: list[tuple[str, pb.ListAdaptersResponse]]) -> pb.ListAdaptersResponse:
    """One entry per adapter id; `replicas` names those holding its weights (state
    HOST or DEVICE); the other fields come from the first of them (or the first
    replica that lists it), with the usage counters summed."""
    merged: dict[str, pb.AdapterInfo] = {}
    held = (pb.ADAPTER_STATE_HOST, pb.ADAPTER_STATE_DEVICE)
    for replica, reply in sorted(replies, key=lambda item: item[0]):
        for info in reply.adapters:
            entry = merged.get(info.adapter_id)
            if entry is None:
                entry = merged[info.adapter_id] = pb.AdapterInfo()
                entry.CopyFrom(info)
                entry.requests_served = entry.running_requests = 0
            elif info.state in held and entry.state not in held:
                kept = (entry.requests_served, entry.running_requests, list(entry.replicas))
                entry.CopyFrom(info)
                entry.requests_served, entry.running_requests = kept[0], kept[1]
                entry.replicas[:] = kept[2]
            entry.requests_served += info.requests_served
            entry.running_requests += info.running_requests
            entry.last_used = max(entry.last_used, info.last_used)
            if info.state in held:
                entry.replicas.append(replica)
    return pb.ListAdaptersResponse(adapters=[merged[k] for k in sorted(merged)])


def sum_stats(replies: list[tuple[str, pb.GetStatsResponse]]) -> pb.GetStatsResponse:
    """The fleet's figures: every scalar counter summed over the replicas
    (page_bytes is one replica's: they share a model), and `replicas` holding each
    replica's own stats, sorted by replica id."""
    total = pb.GetStatsResponse()
    for replica, reply in sorted(replies, key=lambda item: item[0]):
        for field in pb.GetStatsResponse.DESCRIPTOR.fields:
            if field.is_repeated:
                continue
            if field.name == "page_bytes":
                total.page_bytes = max(total.page_bytes, reply.page_bytes)
            else:
                setattr(total, field.name, getattr(total, field.name) + getattr(reply, field.name))
        own = pb.GetStatsResponse()
        own.CopyFrom(reply)
        del own.replicas[:]
        total.replicas.add(replica_id=replica, stats=own)
    return total


def label_replicas(replies: list[tuple[str, bytes]]) -> list:
    """Every replica's metric families (Prometheus text, as its registry exports
    them) as one set of families: each sample gains a `replica` label with the
    replica's id, and a metric that several replicas export is one family holding
    all their samples (a name may appear only once in an exposition)."""
    families: dict[str, object] = {}
    for replica, text in sorted(replies, key=lambda item: item[0]):
        for family in text_string_to_metric_families(text.decode()):
            samples = [
                s._replace(labels={**s.labels, REPLICA_LABEL: replica}) for s in family.samples
            ]
            merged = families.setdefault(family.name, family)
            if merged is family:
                family.samples = samples
            else:
                merged.samples.extend(samples)
    return list(families.values())
