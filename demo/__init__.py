"""A local, random-init base model and PEFT LoRA adapters for tests, benchmarks and
the default server, so that nothing has to be downloaded.

`make_demo(dir)` writes::

    dir/demo.json                  stamp: the parameters, written last
    dir/.lock                      serializes concurrent writers
    dir/model/                     Hugging Face layout (config, weights, tokenizer)
    dir/adapters/adapter-000/      PEFT layout (adapter_config.json, adapter_model.safetensors)
    dir/adapters/adapter-001/ ...

The weights are random but deterministic for a seed, scaled so that greedy decoding
produces varied tokens and every adapter visibly changes the output. The adapters are
written directly with safetensors under the key names PEFT uses, so writing them needs
no PEFT; `peft.PeftModel.from_pretrained` loads them as its own.

Modules, by idea: presets (sizes, architectures, target modules, transformers
config), tokenizer, checkpoint (weights), adapters, maker (`make_demo`: stamp, lock,
reuse) and cli (`lorapool make-demo`). Heavy imports (torch, transformers,
tokenizers) are deferred, so that `make-demo` on an up-to-date directory returns at
once.
"""

from lorapool.demo.adapters import (
    ADAPTER_PREFIX,
    DEFAULT_ADAPTER_SCALE,
    MIXES,
    AdapterSpec,
    adapter_name,
    adapter_spec,
    make_adapters,
    module_shapes,
    write_adapter,
)
from lorapool.demo.checkpoint import init_weights, write_checkpoint, write_model
from lorapool.demo.maker import STAMP_NAME, STAMP_VERSION, DemoPaths, default_demo_dir, make_demo
from lorapool.demo.presets import (
    ALL_MODULES,
    ARCHS,
    ATTN_MODULES,
    MLP_MODULES,
    PRESETS,
    Preset,
    model_config,
)
from lorapool.demo.tokenizer import build_tokenizer, write_tokenizer

__all__ = [
    "ADAPTER_PREFIX",
    "ALL_MODULES",
    "ARCHS",
    "ATTN_MODULES",
    "DEFAULT_ADAPTER_SCALE",
    "MIXES",
    "MLP_MODULES",
    "PRESETS",
    "STAMP_NAME",
    "STAMP_VERSION",
    "AdapterSpec",
    "DemoPaths",
    "Preset",
    "adapter_name",
    "adapter_spec",
    "build_tokenizer",
    "default_demo_dir",
    "init_weights",
    "make_adapters",
    "make_demo",
    "model_config",
    "module_shapes",
    "write_adapter",
    "write_checkpoint",
    "write_model",
    "write_tokenizer",
]
