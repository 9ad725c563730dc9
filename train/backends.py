"""Training backends: how the base model is loaded and wrapped with LoRA.

    unsloth  Unsloth's FastLanguageModel (CUDA only): fused kernels, 4-bit base, Unsloth's gradient checkpointing
             (activations offloaded to CPU RAM when loaded for 512 tokens or more: see --gradient-checkpointing).
    hf       transformers + PEFT (anywhere): fp32 on CPU, bf16/fp16 on CUDA, optional bitsandbytes 4-bit.

Both hand the same thing to TRL's SFTTrainer (a PEFT model and a tokenizer) and both save the same PEFT
adapter; for DPO (train/dpo.py) each also loads a finished SFT adapter, trainable, for TRL's DPOTrainer. Backends register themselves by name and import their libraries only when used, so importing
anything under train/ on a CPU machine never imports unsloth.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from common.cli import UsageError, first_line

from .config import TrainConfig
from .tiny import is_builtin

BACKENDS: dict[str, "Backend"] = {}


@dataclass
class Loaded:
    model: object  # a peft.PeftModel
    tokenizer: object
    dtype: str  # "fp32" | "bf16" | "fp16"
    device: str  # "cpu" | "cuda:0 (<GPU name>)"
    base_path: str  # what was actually loaded (a Hub id or a folder)


@dataclass
class Backend:
    name: str
    load: Callable[[TrainConfig, str], Loaded]  # (config, resolved model name or path) -> Loaded
    optimizer: Callable[[TrainConfig], str]  # TrainingArguments.optim for this backend
    # DPO: (config, model path, SFT adapter folder) -> Loaded whose model is the base with the SFT adapter, trainable,
    # as PEFT's "default" adapter (TRL's DPOTrainer adds the frozen "ref" copy itself).
    load_dpo: Callable[[TrainConfig, str, Path], Loaded] | None = None


def register(name: str, optimizer: Callable[[TrainConfig], str]):
    def wrap(load):
        BACKENDS[name] = Backend(name, load, optimizer)
        return load

    return wrap


def register_dpo(name: str):
    """The DPO loader of an already registered backend."""
    def wrap(load_dpo):
        BACKENDS[name].load_dpo = load_dpo
        return load_dpo

    return wrap


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def unsloth_installed() -> bool:
    return importlib.util.find_spec("unsloth") is not None


def gpu_unusable() -> bool:
    """Whether the machine has an NVIDIA GPU and driver and a CUDA build of torch that cannot use them (on Colab: a
    torch for another CUDA than the driver serves). A CPU build of torch on a GPU machine is a choice, not this."""
    import torch

    present = shutil.which("nvidia-smi") is not None or Path("/proc/driver/nvidia/gpus").is_dir()
    return present and torch.version.cuda is not None and not torch.cuda.is_available()


def unusable_gpu_problem() -> str:
    """The one line for a GPU that is there but that torch cannot use (a torch built for another CUDA)."""
    import torch

    return (f"--backend auto: this machine has an NVIDIA GPU (nvidia-smi) but torch {torch.__version__} (built for "
            f"CUDA {torch.version.cuda or 'none: a CPU build'}) cannot use it, and training would fall back to the CPU; "
            "reinstall a torch that matches the driver (on Colab: restart the runtime to get Colab's own torch back), "
            "or pass --backend hf to train on the CPU on purpose")


def select_backend(requested: str, *, has_cuda: bool, has_unsloth: bool, gpu_unusable: bool = False) -> str:
    """Resolve --backend. auto: unsloth when a CUDA GPU is present and unsloth installed, else hf; never a silent
    fall back to the CPU when a GPU is there but the CUDA build of torch cannot use it (gpu_unusable).

    >>> select_backend("auto", has_cuda=False, has_unsloth=True)
    'hf'
    >>> select_backend("auto", has_cuda=True, has_unsloth=True)
    'unsloth'
    """
    if requested == "auto":
        if gpu_unusable and not has_cuda:
            raise UsageError([unusable_gpu_problem()])
        return "unsloth" if (has_cuda and has_unsloth) else "hf"
    if requested == "unsloth":
        if not has_cuda:
            raise UsageError(["--backend unsloth: needs a CUDA GPU and none is visible; use --backend hf (or auto) on CPU"])
        if not has_unsloth:
            raise UsageError(["--backend unsloth: unsloth is not installed; pip install -r requirements-train.txt"])
    return requested


BF16_CAPABILITY = (8, 0)  # Ampere: the first GPUs with bf16 arithmetic


def compute_dtype(requested: str, *, capability: tuple[int, int] | None) -> str:
    """The training dtype for a CUDA device of this compute capability (None: no CUDA device): fp32 on CPU, bf16 from
    Ampere (8.0) on, fp16 below (a T4 is 7.5). Decided from the capability, not torch.cuda.is_bf16_supported(),
    which answers True on a T4 (emulated bf16, several times slower) unless unsloth has patched it.

    >>> [compute_dtype("auto", capability=c) for c in (None, (7, 5), (8, 0), (8, 9), (9, 0))]
    ['fp32', 'fp16', 'bf16', 'bf16', 'bf16']
    """
    if requested == "bf16" and capability is not None and capability < BF16_CAPABILITY:
        raise UsageError([f"--dtype bf16: this GPU (compute capability {capability[0]}.{capability[1]}) has no bf16 "
                          "arithmetic; use --dtype fp16 or auto"])
    if requested != "auto":
        return requested
    if capability is None:
        return "fp32"
    return "bf16" if capability >= BF16_CAPABILITY else "fp16"


def cuda_capability() -> tuple[int, int] | None:
    """The first CUDA device's compute capability, or None without one."""
    import torch

    return tuple(torch.cuda.get_device_capability(0)) if torch.cuda.is_available() else None


def _default_optimizer(config: TrainConfig) -> str:
    if config.optim != "auto":
        return config.optim
    # 8-bit AdamW halves optimizer memory on CUDA (Unsloth's recipe); bitsandbytes has no CPU kernels here.
    if cuda_available() and importlib.util.find_spec("bitsandbytes") is not None:
        return "adamw_8bit"
    return "adamw_torch"


def _device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda:0 ({torch.cuda.get_device_name(0)})"
    return "cpu"


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _ensure_chat_template(tokenizer) -> None:
    """Llama-3.2-Instruct tokenizers carry the template; a base model's may not: give it the same one."""
    from common.llama3 import EOT, PAD, TEMPLATE_PATH

    if not tokenizer.chat_template:
        tokenizer.chat_template = TEMPLATE_PATH.read_text()
    # Llama-3's eos for chat is <|eot_id|>; padding with it would mask the stop token, use the reserved pad.
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        if PAD in tokenizer.get_vocab():
            tokenizer.pad_token = PAD
    if EOT in tokenizer.get_vocab():
        tokenizer.eos_token = EOT


def _hf_base(config: TrainConfig, model_path: str, tokenizer_path: str):
    """The base model as transformers loads it here (dtype, optional 4-bit, one GPU per process) and its tokenizer,
    ready for a LoRA adapter (gradient checkpointing, k-bit preparation)."""
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer

    has_cuda = torch.cuda.is_available()
    dtype = compute_dtype(config.dtype, capability=cuda_capability())
    kwargs = dict(dtype=_torch_dtype(dtype))
    quantized = config.load_in_4bit and has_cuda
    if quantized:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=_torch_dtype(dtype),
        )
    if has_cuda:
        # The whole model on this process's GPU: under `accelerate launch` each process holds one replica on
        # its own device (LOCAL_RANK), as TRL's get_kbit_device_map does; alone, that is GPU 0.
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    _ensure_chat_template(tokenizer)
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    elif config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    return model, tokenizer, dtype


@register("hf", optimizer=_default_optimizer)
def load_hf(config: TrainConfig, model_path: str) -> Loaded:
    import torch
    from peft import LoraConfig, get_peft_model

    model, tokenizer, dtype = _hf_base(config, model_path, model_path)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        use_rslora=config.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    # LoRA A is drawn from the global RNG: seed it so the adapter's start is reproducible.
    torch.manual_seed(config.seed)
    model = get_peft_model(model, lora)
    return Loaded(model, tokenizer, dtype, _device_name(), model_path)


@register_dpo("hf")
def load_hf_dpo(config: TrainConfig, model_path: str, sft_adapter: Path) -> Loaded:
    from peft import PeftModel

    # The tokenizer the SFT run saved with its adapter: the same chat template and special tokens it trained with.
    model, tokenizer, dtype = _hf_base(config, model_path, str(sft_adapter))
    model = PeftModel.from_pretrained(model, str(sft_adapter), is_trainable=True)  # PEFT names it "default"
    return Loaded(model, tokenizer, dtype, _device_name(), model_path)


@register("unsloth", optimizer=_default_optimizer)
def load_unsloth(config: TrainConfig, model_path: str) -> Loaded:
    # Unsloth patches transformers/TRL on import, so it is imported here, first, and nowhere else.
    try:
        import unsloth  # noqa: F401
        from unsloth import FastLanguageModel
    except Exception as error:  # a CUDA, xformers or triton build that does not match torch fails in many ways
        raise UsageError([f"--backend unsloth: importing unsloth failed ({type(error).__name__}: {first_line(error)}); "
                          "its CUDA packages do not match the installed torch: reinstall with the project's install "
                          "step for this machine (README, Train on a Colab T4), or use --backend hf"]) from error

    dtype = compute_dtype(config.dtype, capability=cuda_capability())
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=model_path,
        max_seq_length=config.max_seq_length,
        dtype=_torch_dtype(dtype),
        load_in_4bit=config.load_in_4bit,
    )
    _ensure_chat_template(tokenizer)
    model = FastLanguageModel.get_peft_model(
        model,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        bias="none",
        use_gradient_checkpointing="unsloth" if config.gradient_checkpointing else False,
        random_state=config.seed,
        use_rslora=config.use_rslora,
        loftq_config=None,
    )
    return Loaded(model, tokenizer, dtype, _device_name(), model_path)


@register_dpo("unsloth")
def load_unsloth_dpo(config: TrainConfig, model_path: str, sft_adapter: Path) -> Loaded:
    """Unsloth's DPO path (its notebooks': PatchDPOTrainer, then the LoRA folder loaded by FastLanguageModel, which
    reads the base from the adapter's config). Not run in this project's CI: it needs a CUDA GPU."""
    try:
        import unsloth  # noqa: F401
        from unsloth import FastLanguageModel
    except Exception as error:
        raise UsageError([f"--backend unsloth: importing unsloth failed ({type(error).__name__}: {first_line(error)}); "
                          "reinstall with the project's install step for this machine, or use --backend hf"]) from error
    patch = getattr(unsloth, "PatchDPOTrainer", None)  # older unsloth releases need it before DPOTrainer exists
    if patch is not None:
        patch()
    dtype = compute_dtype(config.dtype, capability=cuda_capability())
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(sft_adapter), max_seq_length=config.max_prompt_length + config.max_answer_length,
        dtype=_torch_dtype(dtype), load_in_4bit=config.load_in_4bit,
        # from_pretrained sets up checkpointing itself when it loads an adapter (its default: "unsloth", on)
        use_gradient_checkpointing="unsloth" if config.gradient_checkpointing else False,
    )
    _ensure_chat_template(tokenizer)
    for name, parameter in model.named_parameters():  # the SFT adapter is the policy: trainable
        if "lora_" in name and ".default." in name:
            parameter.requires_grad_(True)
    return Loaded(model, tokenizer, dtype, _device_name(), model_path)


def resolve_model_path(model_name: str, seed: int) -> str:
    """The built-in tiny model is built on first use; anything else is passed through."""
    if is_builtin(model_name):
        from .tiny import ensure_tiny_model

        return str(ensure_tiny_model(seed))
    path = Path(model_name).expanduser()
    return str(path) if path.is_dir() else model_name
