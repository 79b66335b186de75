"""The offline API: `LLM(model=...).generate(prompts, params)`.

from engine_core import LLM, SamplingParams
llm = LLM(model="tessera/smollm2-135m-instruct")
outs = llm.generate(["The capital of France is"], SamplingParams(max_tokens=16))
print(outs[0].outputs[0].text)
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from engine_core.args import EngineArgs
from engine_core.client import EngineDeadError, make_sync_client
from engine_core.config import resolve_config
from engine_core.messages import EngineCoreRequest
from engine_core.output_processor import OutputProcessor
from engine_core.outputs import RequestOutput
from engine_core.processor import InputProcessor, PromptType
from engine_core.sampling_params import RequestOutputKind, SamplingParams
from engine_core.tokenizer import Tokenizer


@dataclass
class _Job:
    """One prompt, checked and made into engine requests, not yet sent."""

    request_id: str
    text: str | None
    prompt_ids: list[int]
    params: SamplingParams
    requests: list[EngineCoreRequest]


class LLM:
    def __init__(self, model: str = "facebook/opt-125m", **engine_args: Any) -> None:
        self.config = resolve_config(EngineArgs(model=model, **engine_args), offline=True)
        m = self.config.model
        self.tokenizer = None if m.skip_tokenizer_init else self._load_tokenizer()
        self.engine = make_sync_client(self.config)
        self.inputs = InputProcessor(self.config, self.tokenizer)
        self.outputs = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()
        # Under external_launcher every rank must order requests alike: arrival by
        # count, not by each rank's clock (the priority policy breaks ties by arrival).
        self._lockstep = self.config.parallel.distributed_executor_backend == "external_launcher"

    def _load_tokenizer(self) -> Tokenizer:
        m = self.config.model
        assert m.tokenizer is not None
        return Tokenizer.load(m.tokenizer, None, m.tokenizer_mode, m.trust_remote_code)

    def get_tokenizer(self):
        return self.tokenizer

    # ---- generation ---------------------------------------------------------------
    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in the order of the prompts.

        Every prompt is checked before any is sent, so a bad one raises with nothing
        running; an error or Ctrl-C while they run aborts what is left of them.
        """
        prompt_list = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompt_list))
        priorities = _as_priorities(priority, len(prompt_list))
        jobs = [self._prepare(*job) for job in zip(prompt_list, params, priorities, strict=True)]
        sent: list[str] = []
        try:
            for job in jobs:
                self._send(job)
                sent.append(job.request_id)
            finished = self._run(len(jobs), use_tqdm)
        except BaseException:
            self._abort(sent)
            raise
        return [finished[job.request_id] for job in jobs]

    def _prepare(self, prompt: PromptType, params: SamplingParams | None, priority: int) -> _Job:
        text, prompt_ids = self.inputs.tokenize(prompt)
        self.inputs.check_token_ids(prompt_ids)
        salt = self.inputs.cache_salt(prompt)
        params = self.inputs.resolve_params(params, len(prompt_ids))
        params = msgspec.structs.replace(params, output_kind=RequestOutputKind.FINAL_ONLY)
        number = next(self._ids)
        request_id = str(number)
        arrival = float(number) if self._lockstep else None
        requests = self.inputs.make_requests(
            request_id, prompt_ids, params, priority, arrival, cache_salt=salt
        )
        return _Job(request_id, text, prompt_ids, params, requests)

    def _send(self, job: _Job) -> None:
        self.outputs.add_request(job.request_id, job.text, job.prompt_ids, job.params)
        for req in job.requests:
            self.engine.add_request(req)

    def _abort(self, request_ids: list[str]) -> None:
        """Forget these requests here and stop them in the engine (the next generate
        would wait for them otherwise)."""
        core_ids = [rid for request_id in request_ids for rid in self.outputs.abort(request_id)]
        if core_ids:
            with contextlib.suppress(EngineDeadError):  # a dead engine runs nothing
                self.engine.abort(core_ids)

    def _run(self, total: int, use_tqdm: bool) -> dict[str, RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = _progress(total, use_tqdm)
        while self.outputs.has_unfinished():
            step = self.engine.get_outputs()
            results, to_abort = self.outputs.process(step.outputs)
            if to_abort:
                self.engine.abort(to_abort)
            for r in results:
                if r.finished:
                    finished[r.request_id] = r
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return finished

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> list[RequestOutput]:
        """Apply the chat template to each conversation, then generate."""
        if self.tokenizer is None:
            raise ValueError(
                "chat() needs a tokenizer (the engine runs with --skip-tokenizer-init)"
            )
        convs: list[list[dict[str, Any]]] = (
            [messages] if messages and isinstance(messages[0], dict) else messages  # type: ignore[list-item,assignment]
        )
        prompts: list[PromptType] = []
        for conv in convs:
            text = self.tokenizer.apply_chat_template(
                conv,
                chat_template=chat_template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
            )
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm)

    # ---- utilities ----------------------------------------------------------------
    def reset_prefix_cache(self) -> bool:
        return self.engine.call("reset_prefix_cache")

    def collective_rpc(self, method: str, args: tuple = ()) -> list[Any]:
        """Call `method(*args)` on every worker (a method of the worker class, e.g. one
        that --worker-extension-cls adds); one result per rank, in rank order. Under
        external_launcher each rank answers for itself: a list of one."""
        return self.engine.call("collective_rpc", method, list(args))

    def start_profile(self) -> None:
        """Start the torch profiler in every worker; TESSERA_TORCH_PROFILER_DIR must name
        a folder (set before the engine starts, so that its workers see it)."""
        self.engine.call("profile_start")

    def stop_profile(self) -> list[str]:
        """Stop it: every worker's Chrome trace and table of the top ops, by path."""
        return self.engine.call("profile_stop")

    def shutdown(self) -> None:
        """Stop the engine (its processes too). Also run at exit and on garbage collection."""
        engine = self.__dict__.pop("engine", None)
        if engine is not None:
            engine.shutdown()

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes not set: `engine` after shutdown() took it.
        if name == "engine":
            raise RuntimeError("this LLM has been shut down: make a new one to generate")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:
            pass


def _as_prompt_list(prompts) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if not isinstance(prompts, Sequence) and not hasattr(prompts, "__array__"):
        raise TypeError(
            "prompts are a string, a list of token ids, a dict, or a list of those; "
            f"not {type(prompts).__name__}"
        )
    if len(prompts) and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]
    return list(prompts)


def _as_params_list(params, n: int) -> list[SamplingParams | None]:
    if params is None or isinstance(params, SamplingParams):
        return [params] * n
    if not isinstance(params, Sequence) or not all(
        p is None or isinstance(p, SamplingParams) for p in params
    ):
        raise TypeError(
            "sampling_params is a SamplingParams or a list of them, one per prompt; "
            f"not {type(params).__name__}"
        )
    if len(params) != n:
        raise ValueError(f"{len(params)} sampling params for {n} prompts")
    return list(params)


def _as_priorities(priority: Sequence[int] | None, n: int) -> list[int]:
    if priority is None:
        return [0] * n
    if len(priority) != n:
        raise ValueError(f"{len(priority)} priorities for {n} prompts")
    if not all(isinstance(p, int) and not isinstance(p, bool) for p in priority):
        raise TypeError(f"priorities must be integers, got {list(priority)!r}")
    return list(priority)


def _progress(total: int, use_tqdm: bool):
    if not use_tqdm or total < 2:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="generating", unit="req", dynamic_ncols=True)
