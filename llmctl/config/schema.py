"""The config tree: `RunConfig(model=LLMConfig(layers=[BlockConfig, ...]), train=TrainConfig)`.

Every field carries `metadata["help"]` (shown by the CLI and the README's parameter table) and
`metadata["panel"]` (the group it is listed under). Derived values are properties.
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field
from typing import Any

ATTN_KINDS = ("mha", "mqa", "gqa", "mla")
POS_EMBS = ("learn", "sin", "rope", "alibi")
NORMS = ("layer", "rms")
# Gated variants (glu, swiglu, geglu, reglu) use two input projections of up_dim each.
NON_LINEARITIES = (
    "relu", "relu2", "gelu", "gelu_tanh", "silu", "swish", "mish", "selu", "celu", "elu",
    "lrelu", "tanh", "sigmoid", "softplus", "glu", "swiglu", "geglu", "reglu",
)
GATED_NON_LINEARITIES = ("glu", "swiglu", "geglu", "reglu")
DTYPES = ("auto", "float32", "bfloat16", "float16")
OPTIMIZERS = ("adamw", "muon")
DEVICE_NAMES = re.compile(r"^(auto|cpu|mps|cuda(:\d{1,3})?)$")  # torch: index < 128
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"
# LoRA target groups (runtime.lora maps them to module / parameter names)
LORA_GROUPS = ("attention", "mlp", "experts", "router", "lm_head")


def _f(default: Any = None, *, help: str, panel: str, factory: Any = None) -> Any:
    meta = {"help": help, "panel": panel}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class BlockConfig:
    """What may differ from one transformer block to the next."""

    attn: str = _f("mqa", help="Attention kind: mha, mqa, gqa or mla.", panel="Attention")
    n_head: int = _f(8, help="Number of query heads.", panel="Attention")
    n_kv_heads: int | None = _f(
        8, help="Key/value heads (gqa only; mha uses n_head, mqa uses 1, so the default 8 "
        "matters only with attn=gqa).", panel="Attention")
    q_latent_dim: int | None = _f(
        None, help="MLA only: latent dimension of the down-projected query.", panel="Attention")
    kv_latent_dim: int | None = _f(
        None, help="MLA only: latent dimension of the joint key/value compression.",
        panel="Attention")
    rope_head_dim: int | None = _f(
        None, help="MLA with RoPE only: head dimension of the decoupled rotary keys/queries.",
        panel="Attention")
    moe: bool = _f(False, help="Replace the MLP with a sparse mixture of experts.", panel="MoE")
    up_dim: int = _f(256, help="Hidden size of the MLP (or of each expert).", panel="Feed-forward")
    non_linearity: str = _f(
        "gelu", help="Activation: " + ", ".join(NON_LINEARITIES) + ".", panel="Feed-forward")
    n_exp: int | None = _f(None, help="MoE: total number of experts per layer.", panel="MoE")
    n_shared: int | None = _f(
        None, help="MoE: experts (of n_exp) that process every token.", panel="MoE")
    n_act: int | None = _f(
        None, help="MoE: experts active per token, shared ones included.", panel="MoE")
    coeff: float | None = _f(
        None, help="MoE without aux_free: coefficient of the load-balancing auxiliary loss.",
        panel="MoE")
    aux_free: bool = _f(
        False, help="MoE: auxiliary-loss-free balancing with a per-expert routing bias.",
        panel="MoE")
    alpha: float | None = _f(
        None, help="aux_free only: coefficient of the complementary sequence-wise loss.",
        panel="MoE")
    gamma: float | None = _f(
        None, help="aux_free only: update speed of the per-expert routing bias.", panel="MoE")
    qk_norm: bool = _f(
        False, help="QK-norm: RMS-normalise each head's query and key (learned gains) before "
        "RoPE and the dot product; bounds attention logits (every attention kind).",
        panel="Attention")
    latent_norm_eps: float = _f(
        1e-5, help="MLA only: epsilon of the norms over the query and key/value latents "
        "(DeepSeek's transformers models use 1e-6; import of a DeepSeek model sets that).",
        panel="Attention")

    @property
    def kv_heads(self) -> int:
        """Key/value heads actually used by this block's attention."""
        if self.attn == "mqa":
            return 1
        if self.attn == "gqa":
            return int(self.n_kv_heads or self.n_head)
        return self.n_head

    @property
    def n_routed_act(self) -> int:
        """Routed experts each token picks (n_act counts the shared ones)."""
        return (self.n_act or 0) - (self.n_shared or 0) if self.moe else 0

    @property
    def ffn_kind(self) -> str:
        """The feed-forward kind of this layer: "moe" or "mlp"."""
        return "moe" if self.moe else "mlp"


@dataclass
class LLMConfig:
    """Global model settings plus one BlockConfig per layer."""

    n_layer: int = _f(6, help="Number of transformer blocks.", panel="Model")
    n_embd: int = _f(256, help="Width of the residual stream (embedding size).", panel="Model")
    vocab_size: int = _f(
        50304, help="Vocabulary size (50304 = GPT-2's 50257 padded to a multiple of 64).",
        panel="Model")
    block_size: int = _f(512, help="Maximum context length in tokens.", panel="Model")
    dropout: float = _f(0.0, help="Dropout rate (attention, residual and MLP).", panel="Model")
    pos_emb: str = _f(
        "learn", help="Positional embedding: learn, sin, rope or alibi (per-head linear "
        "distance biases; exact with the KV cache up to block_size, and sampling may go past "
        "block_size with a sliding cache of the last block_size tokens, which approximates "
        "re-running the cropped context).", panel="Model")
    norm: str = _f("layer", help="Normalization: layer (LayerNorm) or rms (RMSNorm).",
                   panel="Model")
    rope_theta: float = _f(10000.0, help="RoPE base frequency.", panel="Model")
    init_std: float = _f(0.02, help="Standard deviation of the GPT-2 style weight init.",
                         panel="Model")
    layers: list[BlockConfig] = _f(
        help="Per-layer block configs (filled from the flat flags when not given).",
        panel="Layers", factory=list)
    tie_embeddings: bool = _f(True, help="Share the token embedding with the LM head (false: "
                              "a separate head matrix).", panel="Model")
    zero_init_proj: bool = _f(False, help="Initialise the residual output projections "
                              "(attention and MLP/expert down projections) and an untied head "
                              "to zero, so every block starts as the identity.", panel="Model")
    logit_softcap: float | None = _f(None, help="Cap the LM logits smoothly at +-this value: "
                                     "cap * tanh(logits / cap) (None/0: off).", panel="Model")
    mtp_depth: int = _f(
        0, help="Multi-token prediction (DeepSeek-V3): D extra sequential modules, module k "
        "predicting the token k+1 ahead; they share the embedding and head, each adds one "
        "block like the last layer. 0 = off. sample --speculative drafts with them.",
        panel="Model")
    mtp_weight: float = _f(
        0.3, help="Weight of the mean MTP loss added to the training loss (mtp_depth > 0).",
        panel="Model")

    def __post_init__(self) -> None:
        # A homogeneous model is the same list with equal entries.
        if not self.layers:
            self.layers = [BlockConfig() for _ in range(self.n_layer)]

    @property
    def homogeneous(self) -> bool:
        return all(layer == self.layers[0] for layer in self.layers)

    @property
    def has_moe(self) -> bool:
        return any(layer.moe for layer in self.layers)


def unix_time_name() -> str:
    """The reference's default W&B run name: the current unix time as a string."""
    return str(int(time.time()))


@dataclass
class TrainConfig:
    """The training loop, optimisation, evaluation, checkpointing and logging."""

    dataset: str = _f("shakespeare", help="Prepared dataset name under data_dir "
                      "(shakespeare, tinystories, wikitext, fineweb, or a --name of prepare).",
                      panel="Training")
    data_dir: str = _f("data", help="Folder holding prepared datasets.", panel="Training")
    total_batch_size: int = _f(
        1024, help="Tokens per optimisation step (sets gradient accumulation). "
        "total_batch_size_str takes an arithmetic expression such as '2**11'.",
        panel="Training")
    batch_size: int = _f(2, help="Micro-batch size (sequences per forward pass).",
                         panel="Training")
    max_iters: int = _f(500, help="Number of optimisation steps.", panel="Training")
    learning_rate: float = _f(3e-4, help="Peak AdamW learning rate.", panel="Training")
    min_lr: float | None = _f(None, help="Final learning rate of the cosine decay "
                              "(default learning_rate / 10).", panel="Training")
    warmup_steps: int = _f(100, help="Linear warmup steps from 0 to learning_rate.",
                           panel="Training")
    weight_decay: float = _f(0.1, help="AdamW weight decay (applied to >=2-D weights only).",
                             panel="Training")
    beta1: float = _f(0.9, help="AdamW beta1.", panel="Training")
    beta2: float = _f(0.95, help="AdamW beta2.", panel="Training")
    grad_clip: float = _f(1.0, help="Gradient-norm clipping threshold (0 disables).",
                          panel="Training")
    act_recomp: bool = _f(False, help="Activation recomputation (checkpointing) per block.",
                          panel="Performance")
    compile: bool | None = _f(
        None, help="Compile the model with torch.compile. Default: on for CUDA, off elsewhere "
        "(the reference compiles on every POSIX system; on CPU and MPS compiling costs more "
        "time than it saves for llmctl's models).", panel="Performance")
    device: str = _f("auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps.",
                     panel="Performance")
    dtype: str = _f("auto", help="auto (bf16 autocast on CUDA if supported, else fp16; fp32 "
                    "on CPU), float32, bfloat16 or float16.", panel="Performance")
    seed: int = _f(1337, help="Random seed (model init, data sampling, dropout).",
                   panel="Training")
    fsdp: bool = _f(False, help="Shard parameters with FSDP2 instead of DDP under torchrun.",
                    panel="Performance")
    peak_flops: float | None = _f(None, help="Peak FLOP/s per device for MFU (default: "
                                  "looked up from the GPU name).", panel="Performance")
    eval: bool = _f(False, help="Periodically evaluate on the train and val splits.",
                    panel="Evaluation")
    eval_interval: int = _f(100, help="Steps between evaluations.", panel="Evaluation")
    eval_iters: int = _f(100, help="Batches per evaluation estimate.", panel="Evaluation")
    save_model: bool = _f(False, help="Save checkpoints (latest every ckpt_interval, best on "
                          "val, and at the end). Off by default, as the reference's flag (its "
                          "dataclass says true, but a run without --save_model saves nothing).",
                          panel="Checkpointing")
    ckpt_interval: int = _f(250, help="Steps between checkpoints.", panel="Checkpointing")
    file_name: str = _f("llm_model", help="Run name: checkpoints go to out_dir/file_name/.",
                        panel="Checkpointing")
    out_dir: str = _f("runs", help="Folder holding run folders.", panel="Checkpointing")
    resume: str | None = _f(None, help="Checkpoint folder to resume from, or 'auto' for the "
                            "run folder's latest.", panel="Checkpointing")
    log_interval: int = _f(10, help="Steps between log lines / metrics records.",
                           panel="Logging")
    wandb_log: bool = _f(False, help="Log metrics to Weights & Biases.", panel="Logging")
    wandb_project: str = _f("llms", help="Weights & Biases project.", panel="Logging")
    wandb_run_name: str | None = _f(
        None, help="Weights & Biases run name (default: the unix time at which the run starts; "
        "a resumed run keeps its W&B name).", panel="Logging")
    init_from: str | None = _f(
        None, help="Start a new run from these weights: a checkpoint or run folder (fresh "
        "optimizer, schedule and step; the architecture comes from the checkpoint). Not with "
        "resume.", panel="Fine-tuning")
    lora_rank: int = _f(0, help="LoRA rank (through peft; 0 = full fine-tuning). Only the "
                        "adapters train; needs init_from.", panel="Fine-tuning")
    lora_alpha: float = _f(32.0, help="LoRA scaling numerator (the update is scaled by "
                           "lora_alpha / lora_rank).", panel="Fine-tuning")
    lora_dropout: float = _f(0.05, help="Dropout on the LoRA input.", panel="Fine-tuning")
    lora_targets: str = _f("attention,mlp", help="Comma-separated groups that get adapters: "
                           + ", ".join(LORA_GROUPS) + ".", panel="Fine-tuning")
    optimizer: str = _f("adamw", help="adamw, or muon: Muon (torch.optim.Muon, RMS matched "
                        "to AdamW) for the 2-D weights inside the blocks, AdamW for embeddings, "
                        "head, norms, biases, router and stacked experts.", panel="Training")
    muon_lr: float | None = _f(None, help="Muon's peak learning rate (default learning_rate; "
                               "follows the same warmup + cosine schedule).", panel="Training")
    muon_momentum: float = _f(0.95, help="Muon's (Nesterov) momentum.", panel="Training")

    @property
    def muon_learning_rate(self) -> float:
        return self.learning_rate if self.muon_lr is None else self.muon_lr

    @property
    def final_lr(self) -> float:
        return self.learning_rate / 10 if self.min_lr is None else self.min_lr

    @property
    def lora(self) -> bool:
        return self.lora_rank > 0

    @property
    def lora_groups(self) -> list[str]:
        return [g.strip() for g in self.lora_targets.split(",") if g.strip()]


@dataclass
class RunConfig:
    model: LLMConfig = field(default_factory=LLMConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def tokens_per_micro_step(self, world_size: int = 1) -> int:
        return self.train.batch_size * self.model.block_size * world_size

    def grad_accum_steps(self, world_size: int = 1) -> int:
        return self.train.total_batch_size // self.tokens_per_micro_step(world_size)

    def to_dict(self) -> dict[str, Any]:
        """Sectioned, JSON-ready form; `load_config` reads it back to an equal config."""
        model = dataclasses.asdict(self.model)
        layers = model.pop("layers")
        return {"model": model, "layers": layers, "train": dataclasses.asdict(self.train)}


# The reference's spellings.
LLMconfig = LLMConfig
Trainconfig = TrainConfig

MODEL_FIELDS = {f.name: f for f in dataclasses.fields(LLMConfig) if f.name != "layers"}
BLOCK_FIELDS = {f.name: f for f in dataclasses.fields(BlockConfig)}
TRAIN_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
