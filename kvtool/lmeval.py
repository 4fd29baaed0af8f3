"""lm-evaluation-harness backend: any lm-eval task with a kvtool codec inside the model's cache.

Needs the optional extra ``kvtool[lmeval]`` (lm-eval 0.4.13+). Importing this module registers
:class:`KvtoolLM` with lm-eval under the name ``kvtool``; lm-eval 0.4.13 discovers model backends only from
its own registry (no entry-point group), so its own ``lm_eval`` command cannot see it — use ``kvtool lm-eval``
or, from Python::

    import kvtool.lmeval  # registers "kvtool"
    import lm_eval
    results = lm_eval.simple_evaluate(model="kvtool", model_args="model=default,method=turboquant:bits=3",
                                      tasks=["hellaswag"])

``model_args``: ``model`` (a kvtool model spec: ``default``, a .gguf file, a folder, a hub id), ``method`` (a
codec spec for keys and values; lm-eval splits its argument string at commas, so the ``key=value`` pairs
that follow ``method=`` up to the next option of this class are the method's parameters:
``method=turboquant:bits=3,center=true,sink=4`` works), ``keys``/``values`` (per-role specs), ``plan`` (a plan
file), ``dtype``, ``device``, ``max_length``, ``queries``.

Protocol (``kvtool eval``'s prefill protocol):

* loglikelihood: the context minus its last token is prefilled exactly and coded by the codec
  (:meth:`kvtool.cache.CodecCache.from_cache`, the context's last queries in the codecs' context); the last
  context token and the continuation are then fed through the coded cache, and the continuation's tokens are
  scored from those logits. Tokenization, truncation and the empty-context prefix follow lm-eval's ``hf``
  backend, so ``method=none`` gives its numbers (tested).
* loglikelihood_rolling: lm-eval's disjoint rolling windows, each scored as above.
* generate_until: prefill and code the context (minus its last token), then generate greedily through the
  coded cache until a stop sequence or ``max_gen_toks``; sampling is refused.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
    resolve_max_length,
)

from kvtool.cache import DEFAULT_QUERIES, CodecCache
from kvtool.codecs import parse_pair
from kvtool.codecs.assignment import Assignment
from kvtool.codecs.planfile import load_plan
from kvtool.compat import forward_cache_kwarg
from kvtool.errors import InputError
from kvtool.evaluate import exact_prefill, plan_assignment
from kvtool.hooks import codec_attention
from kvtool.models import load_model

NAME = "kvtool"
_OWN = ("model", "method", "keys", "values", "plan", "dtype", "device", "max_length", "queries", "batch_size",
        "max_batch_size", "trust_remote_code", "add_bos_token", "pretrained")
_SPECS = ("method", "keys", "values")


def _text(value: Any) -> str:
    return "true" if value is True else "false" if value is False else str(value)


def join_split_specs(args: dict[str, Any]) -> dict[str, Any]:
    """Undo lm-eval's comma split of a codec spec: keys that are not options of :class:`KvtoolLM` and follow
    ``method=``/``keys=``/``values=`` are appended to that spec as ``,key=value``."""
    out: dict[str, Any] = {}
    current: str | None = None
    for key, value in args.items():
        if key in _OWN:
            out[key] = value
            current = key if key in _SPECS else None
        elif current is not None:
            out[current] = f"{_text(out[current])},{key}={_text(value)}"
        else:
            raise InputError(f"kvtool lm-eval backend: unknown model argument {key!r}; arguments: "
                             f"{', '.join(_OWN)}")
    return out


def assignment_from_args(method: Any = None, keys: Any = None, values: Any = None, plan: Any = None) -> Any:
    """The Assignment (or plan) the backend codes the cache with; ``none`` everywhere by default."""
    if plan is not None:
        if method is not None or keys is not None or values is not None:
            raise InputError("give plan= or method=/keys=/values=, not both")
        return load_plan(str(plan))
    base = _text(method) if method is not None else "none"
    k, v = _text(keys) if keys is not None else base, _text(values) if values is not None else base
    parse_pair(k, k, v)  # a bad spec fails here, in one line
    return Assignment.of(k, v)


@register_model(NAME)
class KvtoolLM(TemplateLM):
    """lm-eval ``LM`` whose cache holds what a kvtool codec stores (module docstring: the protocol)."""

    def __init__(self, model: str = "default", method: Any = None, keys: Any = None, values: Any = None,
                 plan: Any = None, dtype: str = "auto", device: str | None = None, max_length: int | None = None,
                 queries: int = DEFAULT_QUERIES, batch_size: Any = 1, max_batch_size: Any = None,
                 trust_remote_code: bool = False, add_bos_token: bool | None = None,
                 pretrained: str | None = None) -> None:
        super().__init__()
        self.assignment = assignment_from_args(method, keys, values, plan)
        self.loaded = load_model(str(pretrained or model), dtype=dtype, device=device,
                                 trust_remote_code=bool(trust_remote_code))
        if hasattr(self.assignment, "assignment"):  # a plan: checked against the model it was made for
            self.assignment = plan_assignment(self.loaded, self.assignment)
        self.model = self.loaded.model.eval()
        self.tokenizer = self.loaded.tokenizer
        CodecCache(self.model.config, self.assignment, mode="prefill")  # bad specs for this model fail now
        self.queries = int(queries)
        self.add_bos_token = add_bos_token
        self._max_length = int(max_length) if max_length else None
        self._device = torch.device(self.loaded.device)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> KvtoolLM:
        """``model=default,method=turboquant:bits=3,center=true``: lm-eval's parse, the spec re-joined."""
        args = join_split_specs(lm_utils.simple_parse_args_string(arg_string))
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    # -- what lm-eval asks of a TemplateLM -----------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length or resolve_max_length(self.model.config, self.tokenizer)

    @property
    def max_gen_toks(self) -> int:
        return 256

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "kvtool").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        if add_special_tokens is not None:
            special = {"add_special_tokens": add_special_tokens}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        else:
            special = {}
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        return self.tokenizer.encode(string, **special)

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # -- the protocol ------------------------------------------------------------------------------------
    def _coded(self, context: list[int]) -> tuple[Any, list[int]]:
        """(a cache holding ``context[:-1]`` prefilled exactly and coded, the tokens still to feed)."""
        if len(context) < 2:  # nothing to code before the one context token
            return None, list(context)
        ids = torch.as_tensor(context[:-1], device=self.device)[None]
        prefill, records = exact_prefill(self.loaded, ids, self.queries)
        cache = CodecCache.from_cache(self.model, self.assignment, prefill, queries=records)
        return cache, [context[-1]]

    def _feed(self, cache: Any, tokens: list[int]) -> tuple[torch.Tensor, Any]:
        """Logits ``(len(tokens), vocab)`` of ``tokens`` fed through ``cache`` (a fresh one when None)."""
        from transformers import DynamicCache

        cache = cache if cache is not None else DynamicCache(config=self.model.config)
        ids = torch.as_tensor(tokens, device=self.device)[None]
        out = self.model(input_ids=ids, use_cache=True, **{forward_cache_kwarg(self.model): cache})
        return out.logits[0], cache

    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        with torch.inference_mode(), codec_attention(self.model):
            cache, first = self._coded(context)
            logits, _ = self._feed(cache, first + continuation[:-1])
        logits = torch.log_softmax(logits[-len(continuation):].float(), dim=-1)  # (cont, vocab)
        target = torch.as_tensor(continuation, device=logits.device)
        greedy = bool((logits.argmax(-1) == target).all())
        return float(logits.gather(1, target[:, None]).sum()), greedy

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        results = []
        for key, context_enc, continuation_enc in requests:
            # the hf backend's left truncation: the last max_length + 1 tokens, the final one only predicted
            whole = (context_enc + continuation_enc)[-(self.max_length + 1):]
            context = whole[:len(whole) - len(continuation_enc)]
            result = self._score(context, continuation_enc)
            results.append(result)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        out = []
        for (string,) in [req.args for req in requests]:
            windows = map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            total = sum(ll for ll, _ in self._loglikelihood_tokens([(None, c, t) for c, t in windows]))
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        out = []
        for context, gen_kwargs in [req.args for req in requests]:
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            if kwargs.get("do_sample") or kwargs.get("temperature", 0.0) not in (0, 0.0, None):
                raise InputError("the kvtool lm-eval backend generates greedily; set do_sample=false, "
                                 "temperature=0")
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            limit = int(kwargs.pop("max_gen_toks"))
            enc = self.tok_encode(context)[-(self.max_length - limit):]
            text = self._generate(enc, until, limit)
            text = postprocess_generated_text(text, until, None)
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out

    def _generate(self, context: list[int], until: list[str], limit: int) -> str:
        tokens: list[int] = []
        with torch.inference_mode(), codec_attention(self.model):
            cache, feed = self._coded(context)
            for _ in range(limit):
                logits, cache = self._feed(cache, feed)
                token = int(logits[-1].argmax())
                tokens.append(token)
                if token == self.eot_token_id or any(s and s in self.tok_decode(tokens) for s in until):
                    break
                feed = [token]
        return self.tok_decode(tokens)


def simple_evaluate(model: str = "default", method: str | None = None, keys: str | None = None,
                    values: str | None = None, plan: str | None = None, *, tasks: Sequence[str],
                    include_path: str | None = None, num_fewshot: int | None = None, limit: float | None = None,
                    device: str | None = None, dtype: str = "auto", seed: int = 0) -> dict[str, Any]:
    """Run lm-eval ``tasks`` with the kvtool backend; lm-eval's results dict (samples left out).

    ``include_path``: a folder of extra task YAMLs (lm-eval's ``--include_path``)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    args = {"model": model, "dtype": dtype}
    for name, value in (("method", method), ("keys", keys), ("values", values), ("plan", plan),
                        ("device", device)):
        if value is not None:
            args[name] = value
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or any(t not in manager.all_tasks for t in tasks):  # indexing lm-eval's own is slow
        manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise InputError(f"unknown lm-eval task(s) {', '.join(unknown)}; give --include-path for local task "
                         "YAMLs")
    results = lm_eval.simple_evaluate(model=NAME, model_args=args, tasks=list(tasks), num_fewshot=num_fewshot,
                                      limit=limit, task_manager=manager, random_seed=seed, numpy_random_seed=seed,
                                      torch_random_seed=seed, fewshot_random_seed=seed, log_samples=False)
    return copy.deepcopy({k: v for k, v in results.items() if k in ("results", "versions", "n-shot", "configs",
                                                                     "config", "higher_is_better", "n-samples")})
