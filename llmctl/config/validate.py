"""Every rule a RunConfig must satisfy. Problems are collected, never raised one by one."""

from __future__ import annotations

import re

from ..core.errors import Problem, one_of, preview
from .schema import (
    ATTN_KINDS,
    DEVICE_CHOICES,
    DEVICE_NAMES,
    DTYPES,
    LORA_GROUPS,
    NON_LINEARITIES,
    NORMS,
    OPTIMIZERS,
    POS_EMBS,
    BlockConfig,
    RunConfig,
)

# Upper bounds that keep a config from overflowing tensor sizes; far above real models.
MAX_DIM = 2**20
MAX_LAYERS = 10_000
MAX_VOCAB = 2**31 - 1
MAX_EXPERTS = 4096
MAX_MTP_DEPTH = 16
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class _Checker:
    def __init__(self, origins: dict[str, str]):
        self.origins = origins
        self.problems: list[Problem] = []

    def add(self, key: str, message: str) -> None:
        self.problems.append(Problem(key, message, self.origins.get(key)))

    def size(self, key: str, value: int | None, low: int = 1, high: int = MAX_DIM) -> bool:
        """Integer in [low, high]; reports and returns False otherwise."""
        if value is None:
            return False
        if value < low:
            self.add(key, f"must be >= {low}, got {value}")
            return False
        if value > high:
            self.add(key, f"must be <= {high}, got {value}")
            return False
        return True

    def ratio(self, key: str, value: float, low: float, high: float,
              high_open: bool = False) -> None:
        if value < low or value > high or (high_open and value == high):
            bracket = ")" if high_open else "]"
            self.add(key, f"must be in [{low}, {high}{bracket}, got {value}")


def validate(run: RunConfig, *, custom_layers: bool, world_size: int = 1,
             origins: dict[str, str] | None = None,
             check_batch_split: bool = True) -> list[Problem]:
    check = _Checker(origins or {})
    _check_model(check, run)
    if custom_layers:
        for i, layer in enumerate(run.model.layers):
            _check_block(check, f"layers[{i}].", layer, run)
    elif run.model.layers:
        _check_block(check, "model.", run.model.layers[0], run)
    _check_train(check, run, world_size if check_batch_split else None)
    return check.problems


def _check_model(check: _Checker, run: RunConfig) -> None:
    m = run.model
    check.size("model.n_layer", m.n_layer, high=MAX_LAYERS)
    check.size("model.n_embd", m.n_embd)
    check.size("model.vocab_size", m.vocab_size, high=MAX_VOCAB)
    check.size("model.block_size", m.block_size, high=2**24)
    check.ratio("model.dropout", m.dropout, 0.0, 1.0, high_open=True)
    if m.pos_emb not in POS_EMBS:
        check.add("model.pos_emb", one_of(m.pos_emb, POS_EMBS))
    if m.norm not in NORMS:
        check.add("model.norm", one_of(m.norm, NORMS))
    if m.rope_theta <= 0:
        check.add("model.rope_theta", f"must be > 0, got {m.rope_theta}")
    if m.init_std <= 0:
        check.add("model.init_std", f"must be > 0, got {m.init_std}")
    if m.logit_softcap is not None and not m.logit_softcap >= 0:  # also catches NaN
        check.add("model.logit_softcap", f"must be > 0 (or 0/None: off), got {m.logit_softcap}")
    check.size("model.mtp_depth", m.mtp_depth, low=0, high=MAX_MTP_DEPTH)
    if not m.mtp_weight >= 0:
        check.add("model.mtp_weight", f"must be >= 0, got {m.mtp_weight}")


def _check_block(check: _Checker, p: str, b: BlockConfig, run: RunConfig) -> None:
    n_embd, rope = run.model.n_embd, run.model.pos_emb == "rope"
    if b.attn not in ATTN_KINDS:
        check.add(p + "attn", one_of(b.attn, ATTN_KINDS))
    heads_ok = check.size(p + "n_head", b.n_head)
    if heads_ok and n_embd > 0:
        if n_embd % b.n_head:
            check.add(p + "n_head", f"n_embd={n_embd} must be divisible by n_head={b.n_head}")
        elif rope and b.attn != "mla" and (n_embd // b.n_head) % 2:
            check.add(p + "n_head", f"head dim n_embd/n_head = {n_embd // b.n_head} must be "
                      "even for pos_emb=rope")
    if b.attn == "gqa":
        if b.n_kv_heads is None:
            check.add(p + "n_kv_heads", "gqa needs n_kv_heads")
        elif check.size(p + "n_kv_heads", b.n_kv_heads) and heads_ok and b.n_head % b.n_kv_heads:
            check.add(p + "n_kv_heads", f"n_head={b.n_head} must be divisible by "
                          f"n_kv_heads={b.n_kv_heads}")
    if b.attn == "mla":
        for name in ("q_latent_dim", "kv_latent_dim"):
            value = getattr(b, name)
            if value is None:
                check.add(p + name, f"mla needs {name}")
            else:
                check.size(p + name, value)
        if not 0 < b.latent_norm_eps <= 0.1:  # also catches NaN
            check.add(p + "latent_norm_eps", f"must be in (0, 0.1], got {b.latent_norm_eps}")
        if rope:
            if b.rope_head_dim is None:
                check.add(p + "rope_head_dim", "mla with pos_emb=rope needs rope_head_dim")
            elif check.size(p + "rope_head_dim", b.rope_head_dim, low=2) and b.rope_head_dim % 2:
                check.add(p + "rope_head_dim", f"must be even for RoPE, got {b.rope_head_dim}")
    check.size(p + "up_dim", b.up_dim)
    if b.non_linearity not in NON_LINEARITIES:
        check.add(p + "non_linearity", one_of(b.non_linearity, NON_LINEARITIES))
    if b.moe:
        _check_moe(check, p, b)


def _check_moe(check: _Checker, p: str, b: BlockConfig) -> None:
    sizes = {}
    for name, low in (("n_exp", 1), ("n_shared", 0), ("n_act", 1)):
        value = getattr(b, name)
        if value is None:
            check.add(p + name, f"moe needs {name}")
        elif check.size(p + name, value, low=low, high=MAX_EXPERTS):
            sizes[name] = value
    n_exp, n_shared, n_act = (sizes.get(n) for n in ("n_exp", "n_shared", "n_act"))
    if n_act is not None and n_exp is not None and n_act > n_exp:
        check.add(p + "n_act", f"need n_act <= n_exp, got n_act={n_act}, n_exp={n_exp}")
    if n_act is not None and n_shared is not None and n_shared >= n_act:
        check.add(p + "n_act", f"need n_shared < n_act, got n_shared={n_shared}, n_act={n_act}"
                  " (n_act counts the shared experts; at least one routed expert must be "
                  "active)")
    needed = ("alpha", "gamma") if b.aux_free else ("coeff",)
    mode = "aux_free" if b.aux_free else "moe without aux_free"
    for name in needed:
        value = getattr(b, name)
        if value is None:
            check.add(p + name, f"{mode} needs {name}")
        elif value < 0:
            check.add(p + name, f"must be >= 0, got {value}")


def _check_train(check: _Checker, run: RunConfig, world_size: int | None) -> None:
    t = run.train
    for name in ("batch_size", "max_iters", "eval_interval", "eval_iters", "ckpt_interval",
                 "log_interval"):
        check.size("train." + name, getattr(t, name), high=2**40)
    check.size("train.warmup_steps", t.warmup_steps, low=0, high=2**40)
    check.size("train.seed", t.seed, low=0, high=2**32 - 1)  # NumPy's global seed's range
    if t.learning_rate <= 0:
        check.add("train.learning_rate", f"must be > 0, got {t.learning_rate}")
    if t.min_lr is not None and not 0 <= t.min_lr <= t.learning_rate:
        check.add("train.min_lr", f"must be in [0, learning_rate={t.learning_rate}], "
                  f"got {t.min_lr}")
    if t.weight_decay < 0:
        check.add("train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    check.ratio("train.beta1", t.beta1, 0.0, 1.0, high_open=True)
    check.ratio("train.beta2", t.beta2, 0.0, 1.0, high_open=True)
    if t.grad_clip < 0:
        check.add("train.grad_clip", f"must be >= 0 (0 disables clipping), got {t.grad_clip}")
    if t.peak_flops is not None and t.peak_flops <= 0:
        check.add("train.peak_flops", f"must be > 0, got {t.peak_flops}")
    if t.optimizer not in OPTIMIZERS:
        check.add("train.optimizer", one_of(t.optimizer, OPTIMIZERS))
    elif t.optimizer == "muon" and t.fsdp:
        check.add("train.optimizer", "muon needs whole matrices; use it without fsdp (DDP)")
    if t.muon_lr is not None and not t.muon_lr > 0:
        check.add("train.muon_lr", f"must be > 0, got {t.muon_lr}")
    check.ratio("train.muon_momentum", t.muon_momentum, 0.0, 1.0, high_open=True)
    if t.dtype not in DTYPES:
        check.add("train.dtype", one_of(t.dtype, DTYPES))
    if not DEVICE_NAMES.match(t.device):
        check.add("train.device", f"{preview(t.device)} is not one of {DEVICE_CHOICES}")
    for name in ("dataset", "file_name"):
        value = getattr(t, name)
        if not SAFE_NAME.match(value):
            check.add("train." + name, f"{preview(value)} must be a plain name (letters, digits, "
                      "'.', '_', '-'; no '/')")
    if t.wandb_log and not t.wandb_project.strip():
        check.add("train.wandb_project", "must not be empty when wandb_log is on")
    _check_lora(check, run)
    total_ok = check.size("train.total_batch_size", t.total_batch_size, high=2**50)
    if total_ok and world_size is not None:
        _check_batch_split(check, run, world_size)


def _check_batch_split(check: _Checker, run: RunConfig, world_size: int) -> None:
    t, m = run.train, run.model
    if t.batch_size < 1 or m.block_size < 1:
        return
    micro = run.tokens_per_micro_step(world_size)
    if t.total_batch_size % micro == 0:
        return
    world = f" × world_size {world_size}" if world_size > 1 else ""
    lower = (t.total_batch_size // micro) * micro
    nearest = [v for v in (lower, lower + micro) if v > 0]
    check.add("train.total_batch_size",
              f"{t.total_batch_size} must be a multiple of batch_size × block_size{world} = "
              f"{t.batch_size} × {m.block_size}{f' × {world_size}' if world else ''} = {micro}"
              f"; nearest valid: {' or '.join(map(str, nearest))}")


def batch_split_problems(run: RunConfig, world_size: int) -> list[Problem]:
    """The total_batch_size rule alone, for a world size known only at launch."""
    check = _Checker({})
    _check_batch_split(check, run, world_size)
    return check.problems


def _check_lora(check: _Checker, run: RunConfig) -> None:
    t = run.train
    if t.init_from is not None and not str(t.init_from).strip():
        check.add("train.init_from", "must name a checkpoint or run folder")
    check.size("train.lora_rank", t.lora_rank, low=0, high=MAX_DIM)
    if not t.lora:
        return
    if not t.init_from and not t.resume:
        check.add("train.lora_rank", "LoRA adapts existing weights: give init_from (a "
                  "checkpoint or run folder)")
    if t.lora_alpha <= 0:
        check.add("train.lora_alpha", f"must be > 0, got {t.lora_alpha}")
    check.ratio("train.lora_dropout", t.lora_dropout, 0.0, 1.0, high_open=True)
    groups = t.lora_groups
    if not groups:
        check.add("train.lora_targets", "name at least one group: " + ", ".join(LORA_GROUPS))
    for group in groups:
        if group not in LORA_GROUPS:
            check.add("train.lora_targets", one_of(group, LORA_GROUPS))
