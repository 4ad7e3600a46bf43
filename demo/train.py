"""Train the demo LoRA adapters on SmolLM2-135M-Instruct, on the CPU, in bounded time.

Each adapter learns one visible style (lorapool.demo.styles) from data made by rules
from the base model's own greedy answers: the base model answers the training
questions once (cached), each style rewrites those answers, and an adapter learns
to produce the rewritten answer after the chat-formatted question.

What keeps this to minutes on two cores:
- short sequences (the chat prompt and an answer of at most two sentences);
- LoRA of rank 8 on every projection (q, k, v, o, gate, up, down) of every layer, of
  which only the top TRAINED_LAYERS layers are trained: the others keep lora_B = 0,
  so they change nothing, and the hidden states entering the first trained layer are
  computed once per example instead of at every step. The saved adapter is a
  standard PEFT adapter that covers every layer (zero deltas below), as lorapool
  requires and as PEFT loads it;
- bfloat16 autocast for the training steps (float32 master weights);
- the loss on the answer tokens only, so lm_head runs on those rows only.

After training, each adapter answers held-out questions greedily (float32, PEFT);
a style is shipped only when every answer shows it.
"""

from __future__ import annotations

import contextlib
import math
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from lorapool.demo.styles import Style, sentences

RANK = 8
ALPHA = 16
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TRAINED_LAYERS = 6
STEPS = 24
BATCH = 8
LR = 4e-3
ANSWER_TOKENS = 40  # the base model's answers are generated up to this many tokens
ANSWER_SENTENCES = 2  # and cut to this many sentences
SEED = 0


@dataclass
class Example:
    ids: list[int]
    first_label: int  # ids[first_label:] are the answer tokens the loss is taken on


@dataclass
class Trained:
    name: str
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def chat_ids(tokenizer: Any, question: str) -> list[int]:
    """The question as the chat template renders it, ready for the answer."""
    return list(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": question}],
            add_generation_prompt=True,
            return_dict=False,
        )
    )


def greedy_answers(
    model: Any,
    tokenizer: Any,
    questions: list[str],
    max_new_tokens: int,
    sentences_: int = 0,
    **generate: Any,
) -> list[str]:
    """Greedy answers, all questions in one left-padded batch. With `sentences_`, a
    row stops once it has that many complete sentences; `generate` goes to
    model.generate (PEFT's adapter_names: one adapter a row)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    prompts = [chat_ids(tokenizer, q) for q in questions]
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id

    class EnoughSentences(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            texts = tokenizer.batch_decode(input_ids[:, width:], skip_special_tokens=True)
            return torch.tensor([len(complete_sentences(t)) >= sentences_ for t in texts])

    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            stopping_criteria=StoppingCriteriaList([EnoughSentences()] if sentences_ else []),
            **generate,
        )
    return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]


def complete_sentences(text: str) -> list[str]:
    """The sentences of `text`, less a final one that may be cut off."""
    found = sentences(text)
    if found and (not found[-1].endswith((".", "!", "?")) or re.search(r"\d\.$", found[-1])):
        found = found[:-1]  # a fragment, or a number that may go on ("about 3." of "3.2")
    return found


def base_answers(model: Any, tokenizer: Any, questions: list[str]) -> list[tuple[str, str]]:
    """(question, answer): the base model's greedy answers cut to their first
    ANSWER_SENTENCES complete sentences; a question answered by no complete sentence
    within ANSWER_TOKENS tokens is left out."""
    answers = greedy_answers(model, tokenizer, questions, ANSWER_TOKENS, ANSWER_SENTENCES)
    pairs = []
    for question, answer in zip(questions, answers, strict=True):
        kept = complete_sentences(answer)[:ANSWER_SENTENCES]
        if kept:
            pairs.append((question, " ".join(kept)))
    return pairs


def build_examples(tokenizer: Any, pairs: list[tuple[str, str]], style: Style) -> list[Example]:
    examples = []
    for question, answer in pairs:
        prompt = chat_ids(tokenizer, question)
        target = tokenizer.encode(style.rewrite(answer), add_special_tokens=False)
        examples.append(Example(prompt + target + [tokenizer.eos_token_id], len(prompt)))
    return examples


def _padded(examples: list[Example], pad: int) -> tuple[Any, Any]:
    import torch

    width = max(len(e.ids) for e in examples)
    ids = torch.tensor([e.ids + [pad] * (width - len(e.ids)) for e in examples])
    mask = torch.tensor([[1] * len(e.ids) + [0] * (width - len(e.ids)) for e in examples])
    return ids, mask


@contextlib.contextmanager
def top_layers(llama: Any, first: int) -> Iterator[None]:
    """Let the decoder stack run only layers[first:] (inputs_embeds then carries the
    hidden states entering layer `first`)."""
    import torch

    layers = llama.layers
    llama.layers = torch.nn.ModuleList(list(layers)[first:])
    try:
        yield
    finally:
        llama.layers = layers


def train_style(
    model: Any,
    tokenizer: Any,
    pairs: list[tuple[str, str]],
    style: Style,
    steps: int = STEPS,
    progress: bool | None = None,
) -> Any:
    """A PeftModel with one adapter (named after the style) trained on `model`.
    Call `.unload()` on it to get the base model back unchanged."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lorapool.progress import bar

    start = time.perf_counter()
    torch.manual_seed(SEED)
    config = LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        target_modules=TARGET_MODULES,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config, adapter_name=style.name)
    llama = peft_model.base_model.model.model
    num_layers = len(llama.layers)
    first = max(0, num_layers - TRAINED_LAYERS)
    for name, param in peft_model.named_parameters():
        param.requires_grad = "lora_" in name and _layer_of(name) >= first

    examples = build_examples(tokenizer, pairs, style)
    pad = tokenizer.pad_token_id
    # hidden states entering layer `first`: the layers below are not trained and
    # their adapters are zero, so these are computed once
    hidden = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for i in range(0, len(examples), 16):
            chunk = examples[i : i + 16]
            ids, mask = _padded(chunk, pad)
            out = llama(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            for j, e in enumerate(chunk):
                hidden.append(out.hidden_states[first][j, : len(e.ids)].float())

    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 4) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    rng = random.Random(SEED)
    order: list[int] = []
    trained = Trained(style.name)
    lm_head = peft_model.base_model.model.lm_head
    peft_model.train()
    shown = bar(steps, f"training {style.name}", "step", flag=progress)
    for _ in range(steps):
        if len(order) < BATCH:
            order += rng.sample(range(len(examples)), len(examples))
        batch, order = order[:BATCH], order[BATCH:]
        loss = _loss(
            llama, lm_head, [examples[i] for i in batch], [hidden[i] for i in batch], first
        )
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        trained.losses.append(loss.item())
        shown.set_postfix_str(f"loss {loss.item():.3f}")
        shown.update()
    shown.close()
    peft_model.eval()
    trained.seconds = time.perf_counter() - start
    peft_model.trained = trained
    return peft_model


def _loss(llama: Any, lm_head: Any, examples: list[Example], hidden: list[Any], first: int) -> Any:
    import torch

    width = max(len(e.ids) for e in examples)
    embeds = torch.zeros(len(examples), width, hidden[0].shape[-1])
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    rows, cols, labels = [], [], []
    for i, (e, h) in enumerate(zip(examples, hidden, strict=True)):
        embeds[i, : len(e.ids)] = h
        mask[i, : len(e.ids)] = 1
        for t in range(e.first_label, len(e.ids)):
            rows.append(i)
            cols.append(t - 1)  # the position whose output predicts ids[t]
            labels.append(e.ids[t])
    with top_layers(llama, first), torch.autocast("cpu", dtype=torch.bfloat16):
        out = llama(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        logits = lm_head(out[rows, cols])
    return torch.nn.functional.cross_entropy(logits.float(), torch.tensor(labels))


def _layer_of(name: str) -> int:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else -1
