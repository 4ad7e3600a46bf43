"""The report of a `lorapool bench` run: ghz's summary text and ghz's JSON
schema, with a `tokens` object for what ghz cannot see in a stream."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from lorapool.client.stats import (
    PERCENTAGES,
    CallResult,
    format_duration,
    histogram,
    percentile,
    to_ns,
)

if TYPE_CHECKING:
    from lorapool.client.bench import BenchConfig


def status_name(code: Any) -> str:
    """grpc.StatusCode in Go's spelling, as ghz reports it (Canceled, NotFound)."""
    if code.name in ("OK", "CANCELLED"):
        return {"OK": "OK", "CANCELLED": "Canceled"}[code.name]
    return "".join(part.capitalize() for part in code.name.split("_"))


def _rfc3339(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s, UTC).isoformat().replace("+00:00", "Z")


@dataclass
class BenchReport:
    """The ghz report of one run. Fastest, slowest, histogram and distribution
    cover successful calls; average covers every call (ghz's definitions)."""

    name: str
    date: float
    end_reason: str
    options: dict[str, Any]
    count: int
    total_s: float
    average_s: float
    fastest_s: float
    slowest_s: float
    rps: float
    histogram: list[tuple[float, int, float]]
    latency_distribution: list[tuple[int, float]]
    status_codes: dict[str, int]
    errors: dict[str, int]
    finish_reasons: dict[str, int]  # of OK calls: a stream cut by a drain is OK + CANCELLED
    results: list[CallResult]
    generated_tokens: int
    tokens_per_second: float
    ttft: dict[str, float | None]
    itl: dict[str, float | None]
    ttft_source: str  # "stream" (measured here) or "server" (Usage.ttft_ms, for complete)

    @classmethod
    def build(
        cls,
        target: str,
        config: BenchConfig,
        results: list[CallResult],
        total_s: float,
        end_reason: str = "normal",
    ) -> BenchReport:
        ok = sorted(r.latency_s for r in results if r.status == "OK")
        ttfts = sorted(r.ttft_s for r in results if r.ttft_s is not None)
        itls = sorted(x for r in results for x in r.itl_s)
        tokens = sum(r.tokens for r in results)
        count = len(results)
        return cls(
            name=config.name,
            date=time.time(),
            end_reason=end_reason,
            options=_options(target, config),
            count=count,
            total_s=total_s,
            average_s=sum(r.latency_s for r in results) / count if count else 0.0,
            fastest_s=ok[0] if ok else 0.0,
            slowest_s=ok[-1] if ok else 0.0,
            rps=count / total_s if total_s > 0 else 0.0,
            histogram=histogram(ok),
            latency_distribution=[(p, percentile(ok, p) or 0.0) for p in PERCENTAGES if ok],
            status_codes=dict(Counter(r.status for r in results)),
            errors=dict(Counter(r.error for r in results if r.error)),
            finish_reasons=dict(Counter(r.finish_reason for r in results if r.finish_reason)),
            results=results if config.details else [],
            generated_tokens=tokens,
            tokens_per_second=tokens / total_s if total_s > 0 else 0.0,
            ttft={f"p{p}": percentile(ttfts, p) for p in (50, 90, 99)},
            itl={f"p{p}": percentile(itls, p) for p in (50, 99)},
            ttft_source="server" if config.call == "complete" else "stream",
        )

    def to_json(self) -> dict[str, Any]:
        """ghz's JSON report (durations in nanoseconds, histogram marks in
        seconds) with a `tokens` object added."""
        return {
            "name": self.name,
            "endReason": self.end_reason,
            "options": self.options,
            "date": _rfc3339(self.date),
            "count": self.count,
            "total": to_ns(self.total_s),
            "average": to_ns(self.average_s),
            "fastest": to_ns(self.fastest_s),
            "slowest": to_ns(self.slowest_s),
            "rps": self.rps,
            "errorDistribution": self.errors,
            "statusCodeDistribution": self.status_codes,
            "latencyDistribution": [
                {"percentage": p, "latency": to_ns(v)} for p, v in self.latency_distribution
            ],
            "histogram": [{"mark": m, "count": c, "frequency": f} for m, c, f in self.histogram],
            "details": [
                {
                    "timestamp": _rfc3339(r.timestamp),
                    "latency": to_ns(r.latency_s),
                    "error": r.error,
                    "status": r.status,
                }
                for r in self.results
            ],
            "tokens": {
                "total": self.generated_tokens,
                "tokens_per_second": self.tokens_per_second,
                "ttft": {k: to_ns(v) for k, v in self.ttft.items()},
                "itl": {k: to_ns(v) for k, v in self.itl.items()},
                "ttft_source": self.ttft_source,
                "finish_reasons": self.finish_reasons,
            },
        }

    def text(self) -> str:
        """ghz's summary layout, then the token section."""
        lines = [
            "",
            "Summary:",
            f"  Count:        {self.count}",
            f"  Total:        {format_duration(self.total_s)}",
            f"  Slowest:      {format_duration(self.slowest_s)}",
            f"  Fastest:      {format_duration(self.fastest_s)}",
            f"  Average:      {format_duration(self.average_s)}",
            f"  Requests/sec: {self.rps:.2f}",
        ]
        lines += self._histogram_lines() + self._distribution_lines() + self._token_lines()
        return "\n".join(lines)

    def _histogram_lines(self) -> list[str]:
        lines = ["", "Response time histogram:"]
        top = max((c for _, c, _ in self.histogram), default=0)
        width = len(f"[{top}]")
        for mark, c, _ in self.histogram:
            bar = "∎" * (round(40 * c / top) if top else 0)
            lines.append(f"  {mark * 1e3:10.3f} {f'[{c}]':<{width}}  |{bar}")
        return lines

    def _distribution_lines(self) -> list[str]:
        """Latency percentiles, status codes and (when any) errors."""
        lines = ["", "Latency distribution:"]
        lines += [f"  {p} % in {format_duration(v)}" for p, v in self.latency_distribution]
        lines += ["", "Status code distribution:"]
        width = max((len(s) + 2 for s in self.status_codes), default=0)
        for status, n in sorted(self.status_codes.items()):
            lines.append(f"  {f'[{status}]':<{width}}  {n} responses")
        if self.errors:
            lines += ["", "Error distribution:"]
            width = max(len(str(n)) + 2 for n in self.errors.values())
            for error, n in sorted(self.errors.items(), key=lambda x: -x[1]):
                lines.append(f"  {f'[{n}]':<{width}}  {error}")
        return lines

    def _token_lines(self) -> list[str]:
        source = "server-reported" if self.ttft_source == "server" else "measured on the stream"
        ttft = ", ".join(f"{k} {format_duration(v)}" for k, v in self.ttft.items())
        itl = ", ".join(f"{k} {format_duration(v)}" for k, v in self.itl.items())
        finished = ", ".join(f"{k} {n}" for k, n in sorted(self.finish_reasons.items()))
        return [
            "",
            "Tokens:",
            f"  Generated:    {self.generated_tokens}",
            f"  Tokens/sec:   {self.tokens_per_second:.2f}",
            f"  Finished:     {finished or '-'}",
            f"  TTFT:         {ttft}  ({source})",
            f"  ITL:          {itl}",
            "",
        ]


def _options(target: str, config: BenchConfig) -> dict[str, Any]:
    """ghz's `options` block, plus the workload under `lorapool`."""
    method = "Complete" if config.call == "complete" else "Generate"
    return {
        "host": target,
        "call": f"lorapool.v1.LoraPoolService.{method}",
        "insecure": not (config.tls or config.root_certificates),
        "total": config.total or 0,
        "concurrency": config.concurrency or (0 if config.rps else 8),
        "rps": config.rps or 0,
        "duration": to_ns(config.duration) or 0,
        "timeout": to_ns(config.timeout),
        "name": config.name,
        "lorapool": {
            "adapters": config.adapters,
            "adapter_prefix": config.adapter_prefix,
            "zipf": config.zipf,
            "base_fraction": config.base_fraction,
            "prompt_tokens": list(config.prompt_tokens),
            "max_new_tokens": list(config.max_new_tokens),
            "input_ids": config.input_ids,
            "ignore_eos": config.ignore_eos,
            "temperature": config.temperature,
            "seed": config.seed,
        },
    }
