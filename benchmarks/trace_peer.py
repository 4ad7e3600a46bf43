"""The peer for bench_trace.py: Hugging Face transformers + PEFT on the same
checkpoint and trace. One PeftModel holds every adapter of the fleet; requests
are taken in arrival order in static, left-padded, mixed-adapter batches, greedy,
with EOS disabled; its outputs are compared with ours request by request."""

from __future__ import annotations

import statistics
import time

import torch
from cpu_time import CORES

from lorapool.client.trace import prompt_ids
from lorapool.server.model.checkpoint import load_spec


def load_peer(paths, n: int):
    """One PeftModel holding the first n adapters of the demo (n = 0: the plain
    transformers model), with EOS disabled (ignore-EOS semantics: nothing stops a
    row before max_new_tokens); returns (model, seconds the loading took)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(str(paths.model_dir), dtype=torch.float32)
    if n == 0:
        base.eval()
        base.generation_config.eos_token_id = None
        return base, time.perf_counter() - t0
    dirs = paths.adapter_dirs[:n]
    model = PeftModel.from_pretrained(base, str(dirs[0]), adapter_name=dirs[0].name)
    for d in dirs[1:]:
        model.load_adapter(str(d), adapter_name=d.name)
    model.eval()
    model.generation_config.eos_token_id = None
    model.base_model.model.generation_config.eos_token_id = None
    return model, time.perf_counter() - t0


def peer_generate(model, items, vocab: int, pad: int) -> tuple[list[list[int]], float, float]:
    """One left-padded mixed-adapter static batch, greedy, every row run to the
    batch's longest max_new_tokens: each request's own tokens, wall seconds and
    CPU seconds of the generate call."""
    prompts = [prompt_ids(it, vocab) for it in items]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(items), width), pad, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    new = max(it.max_new_tokens for it in items)
    mixed = {}  # a PeftModel takes each row's adapter; the plain model takes none
    if hasattr(model, "peft_config"):
        mixed["adapter_names"] = [it.adapter_id or "__base__" for it in items]
    t, c = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            **mixed,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=pad,
        )
    dt = time.perf_counter() - t
    cpu = time.process_time() - c
    gen = out[:, width:]
    if gen.shape[1] != new:
        raise RuntimeError(f"peer generated {gen.shape[1]} tokens, expected {new}")
    return [gen[i, : it.max_new_tokens].tolist() for i, it in enumerate(items)], dt, cpu


def run_peer(args, paths, trace, n: int) -> dict:
    """The trace in arrival order, in static batches of --peer-batch: a batch
    starts when its last request has arrived and the previous batch is done."""
    spec = load_spec(paths.model_dir)
    pad = spec.hf_config.pad_token_id if spec.hf_config is not None else 0
    pad = 0 if pad is None else pad
    model, load_s = load_peer(paths, n)
    peer_generate(model, trace[:2], spec.vocab_size, pad)  # warm-up
    clock, compute, cpu, outputs, batches = 0.0, 0.0, 0.0, {}, 0
    for b in range(0, len(trace), args.peer_batch):
        items = trace[b : b + args.peer_batch]
        start = max(clock, items[-1].arrival_s)
        outs, dt, batch_cpu = peer_generate(model, items, spec.vocab_size, pad)
        clock, compute, batches = start + dt, compute + dt, batches + 1
        cpu += batch_cpu
        for it, o in zip(items, outs, strict=True):
            outputs[it.index] = o
    tokens = sum(it.max_new_tokens for it in trace)
    return {
        "adapters": n,
        "batch": args.peer_batch,
        "batches": batches,
        "requests": len(trace),
        "tokens": tokens,
        "load_s": load_s,
        "compute_s": compute,
        "span_s": clock,
        "tok_s": tokens / clock,
        "compute_tok_s": tokens / compute,
        "cpu_s": cpu,
        "tok_per_cpu_s": tokens / cpu if cpu > 0 else 0.0,
        "cpu_share": cpu / (compute * CORES) if compute > 0 else 0.0,
        "outputs": outputs,
    }


def agreement(ours: dict, peer: dict) -> dict:
    """Requests whose greedy tokens match the peer's exactly, and the mean fraction
    of leading tokens that match (random-init weights have near ties, so a single
    float difference can fork a continuation)."""
    same, prefix = 0, []
    for idx, toks in ours.items():
        other = peer.get(idx)
        if other is None:
            continue
        same += toks == other
        k = next((i for i, (a, b) in enumerate(zip(toks, other, strict=False)) if a != b), None)
        prefix.append(1.0 if k is None else k / max(len(toks), 1))
    return {
        "identical": same,
        "compared": len(prefix),
        "mean_prefix": statistics.fmean(prefix) if prefix else None,
    }
