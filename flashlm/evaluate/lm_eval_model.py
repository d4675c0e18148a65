"""lm-eval's model ``flashlm``: EleutherAI's LM Evaluation Harness runs its tasks on a FlashLM model, no server.

    python -m flashlm.evaluate.lm_eval_model --model flashlm --model_args path=runs/quick --tasks lambada_openai

lm-eval 0.4 finds models only in its own registry (its package entry points name its console scripts, not
plugins), so this module registers ``flashlm`` there when imported; running it as ``__main__`` imports it
and hands the arguments to lm-eval's own command line (``lm_eval run ...``), so every lm-eval option
works. From Python, ``import flashlm.evaluate.lm_eval_model`` and then ``lm_eval.simple_evaluate(model=
"flashlm", model_args="path=...")``. lm-eval is the optional ``eval`` extra: only this module imports it.

``model_args``: ``path`` (a model folder, or a run folder: its ``latest``), ``device`` (default cuda when
present), ``precision`` (auto, fp32, bf16, fp16), ``batch_size`` (rows per forward pass; no effect on the
scores), ``add_bos_token`` (default false) and ``max_gen_toks`` (default 256).

Scores are `flashlm.evaluate.lm`'s teacher-forced scores (`score_rows`), so they equal the server's
``echo``/``logprobs`` and `flashlm eval ppl`'s:

- ``loglikelihood``: lm-eval's own tokenisation of (context, continuation) (`TemplateLM`), the same as
  ``local-completions`` with the exported tokenizer: the context carries ``<bos>`` only with
  ``add_bos_token=true``, as in lm-eval's ``local-completions`` model, so both backends give the same
  numbers with the same ``model_args``. An empty context is ``<bos>``.
- ``loglikelihood_rolling``: ``<bos>`` + the text's tokens, every token scored once with sliding windows
  (`flashlm eval ppl`'s, stride half the context); for a text that fits the context this is lm-eval's
  rolling windows exactly, and ``-nats`` of ``perplexity(..., add_eos=False)``.
- ``generate_until``: greedy (or sampled with ``do_sample``) decoding of the context's tokens, cut at the
  first of ``until``; ``<eos>`` ends it too.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401 - lm-eval's own names; `get_model` only adds them to an empty registry
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from flashlm.errors import CheckpointError, FlashLMError
from flashlm.evaluate.lm import IGNORE, batched, score_rows, sliding_windows
from flashlm.generation import Sampling, generate_tokens, stream_pieces

log = logging.getLogger(__name__)


def model_dir(path: str | Path) -> Path:
    """A model folder, or a run folder's newest checkpoint (its ``latest``)."""
    path = Path(path)
    if not (path / "config.json").is_file() and (path / "latest" / "config.json").is_file():
        return path / "latest"
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json; give a FlashLM model folder or a run folder (path=...)")
    return path


def _flag(value: Any) -> bool:
    """lm-eval passes model_args as parsed values, or strings when it could not parse them."""
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes")


@register_model("flashlm")
class FlashLMEval(TemplateLM):
    """A FlashLM model as an lm-eval `LM` (loglikelihood, loglikelihood_rolling, generate_until)."""

    def __init__(
        self,
        path: str,
        device: str | None = None,
        precision: str = "auto",
        batch_size: int | str | None = 8,
        add_bos_token: bool | str = False,
        max_gen_toks: int = 256,
        **unused: Any,  # lm-eval's additional config (max_batch_size, ...)
    ) -> None:
        super().__init__()
        from flashlm.hardware import default_device, dtype_of, resolve_precision
        from flashlm.model.transformer import FlashLM
        from flashlm.tokenizer import Tokenizer

        folder = model_dir(path)
        device = str(default_device("auto")) if device in (None, "", "auto") else str(device)
        if device.startswith("cuda") and not torch.cuda.is_available():
            log.warning("device %s asked for, but CUDA is not available: running on the CPU", device)
            device = "cpu"
        dtype = dtype_of(resolve_precision(str(precision), device))
        self.model = FlashLM.from_pretrained(folder, device=device, dtype=dtype)
        self.tok = Tokenizer.load(folder)
        self.tok.check_fits(self.model.cfg.vocab_size, folder)
        self.add_bos_token = _flag(add_bos_token)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() and int(batch_size) > 0 else 8
        self.max_gen_toks = int(max_gen_toks)
        self.context = self.model.cfg.max_seq_len

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> FlashLMEval:
        """As lm-eval's, except that `model_args` win over its own options (``device`` may be in both)."""
        from lm_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    # ---- tokenisation (TemplateLM's protocol) ------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context and a rolling text start with: ``<bos>`` (``<eos>`` without one)."""
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        add = self.add_bos_token if add_special_tokens is None else add_special_tokens or self.add_bos_token
        return self.tok.encode(string, add_bos=add and self.tok.bos_id is not None)

    # ---- scoring -----------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list:
        """(log p(continuation | context), greedy?) for each (key, context ids, continuation ids)."""
        rows = []
        for _, context, continuation in requests:
            whole = (list(context) + list(continuation))[-(self.context + 1) :]
            scored = min(len(continuation), len(whole) - 1)
            rows.append((whole[:-1], [IGNORE] * (len(whole) - 1 - scored) + whole[len(whole) - scored :]))
        results = []
        for batch in batched(rows, self.batch_size):
            for score in score_rows(self.model, batch, self.tok.pad_id or 0):
                results.append((-score.nats, score.all_correct))
        for (key, _, _), result in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text after ``<bos>``, every token scored once (sliding windows)."""
        results = []
        for (text,) in [req.args for req in requests]:
            ids = [self.prefix_token_id, *self.tok.encode(text)]
            nats = 0.0
            windows = sliding_windows(ids, self.context, max(1, self.context // 2))
            for batch in batched(windows, self.batch_size):
                nats += sum(score.nats for score in score_rows(self.model, batch, self.tok.pad_id or 0))
            results.append(-nats)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), -nats)
        return results

    # ---- generation --------------------------------------------------------------------------------
    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        results = []
        for context, gen_kwargs in [req.args for req in requests]:
            kwargs = dict(gen_kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            budget = max(1, min(int(kwargs.get("max_gen_toks", self.max_gen_toks)), self.context - 1))
            sample = _flag(kwargs.get("do_sample", False)) and float(kwargs.get("temperature", 1.0)) > 0
            sampling = Sampling(
                max_new_tokens=budget,
                temperature=float(kwargs.get("temperature", 1.0)) if sample else 0.0,
                top_p=kwargs.get("top_p") if sample else None,
                top_k=kwargs.get("top_k") if sample else None,
                stop=until,
            )
            ids = self.tok_encode(context)[-(self.context - budget) :]
            steps = generate_tokens(self.model, [ids], sampling, eos_id=self.tok.eos_id, pad_id=self.tok.pad_id or 0)
            text = "".join(stream_pieces(self.tok, ids, steps, sampling))  # ends at <eos> or cut at a stop
            results.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return results


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the ``flashlm`` model registered (``lm_eval run`` and its options)."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    except FlashLMError as exc:  # a wrong model path and the like: one line, not lm-eval's traceback
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
