"""Benchmarks through lm-evaluation-harness on the llmctl model itself (no export): its LM
interface (loglikelihood, rolling loglikelihood, generate-until), batched, on the loaded
checkpoint's device and precision.

Log-probabilities are normalised over the tokenizer's vocabulary, so the padding rows of a
padded vocabulary never take probability (as in generation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..core.errors import LlmctlError
from . import require

require("lm_eval")
from lm_eval.api.model import LM  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402


class LlmctlLM(LM):
    def __init__(self, loaded: Any, batch_size: int = 8) -> None:
        super().__init__()
        self.loaded = loaded
        self.model = loaded.model
        self.tok = loaded.tokenizer
        self.block = loaded.block_size
        self.batch = batch_size
        self.vocab = self.tok.vocab_size

    # ------------------------------------------------------------ scoring

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) -> (sum of log p(continuation), greedy?), batched
        by right-padding (causal attention: padding after a row changes nothing before it)."""
        results: list[tuple[float, bool]] = []
        for start in range(0, len(pairs), self.batch):
            chunk = pairs[start:start + self.batch]
            rows = [(ctx + cont)[-(self.block + 1):][:-1] for ctx, cont in chunk]
            width = max(map(len, rows))
            idx = torch.zeros(len(rows), width, dtype=torch.long)
            for i, row in enumerate(rows):
                idx[i, :len(row)] = torch.tensor(row)
            with self.loaded.precision.autocast():
                logits = self.model(idx.to(self.loaded.device), use_cache=False).logits
            logp = F.log_softmax(logits[..., :self.vocab].float(), dim=-1)  # (B, T, V)
            for i, (row, (_, cont)) in enumerate(zip(rows, chunk, strict=True)):
                n = len(cont)
                lp = logp[i, len(row) - n:len(row)]  # (n, V): predictions of the continuation
                target = torch.tensor(cont, device=lp.device)
                total = lp.gather(-1, target[:, None]).sum().item()
                results.append((total, bool((lp.argmax(-1) == target).all())))
        return results

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # trailing spaces of the context belong to the continuation (as lm-eval's HFLM does)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        ctx = self.tok.encode(context) if context else [self.tok.eot_id]
        whole = self.tok.encode(context + continuation) if context else \
            self.tok.encode(continuation)
        cont = whole[len(ctx):] if context and whole[:len(ctx)] == ctx else \
            self.tok.encode(continuation)
        if not cont:
            raise LlmctlError(f"empty continuation for context {context[-40:]!r}")
        return ctx, cont

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return self._score([self._encode_pair(*r.args) for r in requests])

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for r in requests:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok.encode(r.args[0]), self.tok.eot_id, self.block, 1)]
            out.append(sum(ll for ll, _ in self._score(windows)))
        return out

    # ------------------------------------------------------------ generation

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        from ..infer.decode import stream_tokens
        from ..infer.fastpath import FastDecoder, supports

        # one decoder for every request: its weight copies are made once
        decoder = FastDecoder(self.model, self.block) if supports(self.model) else None
        out = []
        for r in requests:
            context, kwargs = r.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0)) if sample else 0.0
            ids = self.tok.encode(context) or [self.tok.eot_id]
            idx = torch.tensor([ids[-self.block:]], device=self.loaded.device)
            generated: list[int] = []
            text = ""
            with self.loaded.precision.autocast():
                for token in stream_tokens(self.model, idx, max_new, temperature=temperature,
                                           eot_id=self.tok.eot_id, vocab_limit=self.vocab,
                                           decoder=decoder):
                    if int(token[0]) == self.tok.eot_id:
                        break
                    generated.append(int(token[0]))
                    text = self.tok.decode(generated)
                    if any(stop in text for stop in until):
                        break
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


@dataclass
class TaskResults:
    results: dict[str, dict[str, Any]]  # task -> metric -> value
    versions: dict[str, Any]
    n_samples: dict[str, Any]
    config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"results": self.results, "versions": self.versions,
                "n_samples": self.n_samples, "config": self.config}

    def rows(self) -> list[tuple[str, str, float, float | None]]:
        """(task, metric, value, stderr) for every numeric metric."""
        table = []
        for task, metrics in self.results.items():
            for key, value in metrics.items():
                if "_stderr" in key or not isinstance(value, (int, float)) or \
                        key in ("alias", "sample_len"):
                    continue
                metric, _, filt = key.partition(",")
                err = metrics.get(f"{metric}_stderr,{filt}")
                table.append((task, metric, float(value),
                              float(err) if isinstance(err, (int, float)) else None))
        return table


def run_tasks(loaded: Any, tasks: list[str], *, num_fewshot: int | None = None,
              limit: float | None = None, include_path: str | None = None,
              batch_size: int = 8, seed: int = 1234) -> TaskResults:
    """Evaluate lm-eval `tasks` (names of lm-eval's registry or of YAML configs under
    `include_path`) on a loaded llmctl model."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = None
    if include_path:  # local tasks only: skip indexing lm-eval's thousands of built-in YAMLs
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if any(t not in manager.all_tasks for t in tasks):
            manager = None
    manager = manager or TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise LlmctlError(f"unknown lm-eval task(s): {', '.join(unknown)} (a local task needs "
                          "its YAML under --include_path)")
    try:
        out = lm_eval.simple_evaluate(
            model=LlmctlLM(loaded, batch_size=batch_size), tasks=tasks, num_fewshot=num_fewshot,
            limit=limit, task_manager=manager, log_samples=False, bootstrap_iters=1000,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=seed)
    except FileNotFoundError as err:  # a local data file, or a Hub dataset offline
        raise LlmctlError(f"task data for {', '.join(tasks)} could not be loaded "
                          f"({_short(err)}): a data file the task's YAML names is missing, or "
                          "the Hugging Face Hub is unreachable or offline (offline, use a task "
                          "whose YAML reads local files under --include_path)") from None
    except (ConnectionError, OSError) as err:
        raise LlmctlError(_hub_message(tasks, err)) from None
    except Exception as err:  # datasets wraps the offline failure in its own error types
        if any(word in str(err).lower() for word in ("offline", "connection", "hub", "resolve")):
            raise LlmctlError(_hub_message(tasks, err)) from None
        if include_path and isinstance(err, (TypeError, KeyError, IndexError, ValueError)):
            # a YAML of the user's: an unknown key, an answer index past its choices ...
            raise LlmctlError(f"lm-eval could not run {', '.join(tasks)} ({_short(err)}); "
                              f"check the task's YAML and data under {include_path}") from None
        raise
    return TaskResults(out["results"], out.get("versions", {}), out.get("n-samples", {}),
                       {"num_fewshot": num_fewshot, "limit": limit, "tasks": tasks})


def _short(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err)[:200]}"


def _hub_message(tasks: list[str], err: BaseException) -> str:
    return (f"task data for {', '.join(tasks)} could not be loaded: the Hugging Face Hub is "
            f"unreachable or offline ({_short(err)}). Offline, use a "
            "task whose YAML reads local files (dataset_path: json + data_files) under "
            "--include_path")
