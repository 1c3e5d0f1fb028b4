"""The synchronous engine: token ids in, token ids out, many requests sharing every forward pass.

One `step()` is one scheduling iteration (the vLLM / nanochat shape):
  1. take new requests and aborts from the thread-safe inbox;
  2. admit waiting requests into free slots (FIFO, bounded by max_batch_size and a prefill token budget) and prefill
     them together in one right-padded forward, sampling each one's first token;
  3. run one decode forward for every running request (one token each, each at its own position);
  4. retire finished requests (stop token, max_tokens, full context, abort) so their slots are free for the next step.
So requests join and leave at every step: a long generation never holds back a short one.

The engine knows nothing of text or HTTP. Stop *strings* are matched on text by the server, which then aborts the
request here; stop *token ids* are matched here. It is not thread-safe except for `add_request` and `abort`, which may
be called from any thread while another thread runs `step()` (that is how `AsyncEngine` drives it).
"""

from __future__ import annotations

import threading
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from gptforge.engine.cache import SlotKVCache
from gptforge.engine.graphs import GraphDecoder
from gptforge.engine.sampling import SamplingParams, apply_penalties, sample_rows
from gptforge.model.gpt import GPT


@dataclass
class RequestOutput:
    request_id: str
    token_ids: list[int]  # new tokens from this step (a stop token is never included)
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | None
    prompt_tokens: int
    completion_tokens: int


@dataclass
class _Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    stops: frozenset[int]
    generator: torch.Generator | None
    output: list[int] = field(default_factory=list)
    slot: int = -1
    new: list[int] = field(default_factory=list)  # tokens produced in the current step

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)


class Engine:
    def __init__(
        self,
        model: GPT,
        *,
        max_batch_size: int = 8,
        max_seq_len: int | None = None,
        vocab_limit: int | None = None,
        eos_ids: Iterable[int] = (),
        device=None,
        dtype=None,
        max_prefill_tokens: int = 4096,
        cuda_graphs: bool | None = None,
    ) -> None:
        """cuda_graphs: replay each decode step as a CUDA graph (see `graphs.py`); None = on for a CUDA device."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        p = next(model.parameters())
        self.model = model.eval()
        self.device = torch.device(device) if device is not None else p.device
        self.dtype = dtype or p.dtype
        cfg = model.config
        self.max_seq_len = min(max_seq_len or cfg.block_size, cfg.block_size)
        self.vocab_size = cfg.vocab_size
        self.vocab_limit = min(vocab_limit or cfg.vocab_size, cfg.vocab_size)
        self.eos_ids = frozenset(eos_ids)
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.cache = SlotKVCache(cfg, max_batch_size, self.max_seq_len, self.device, self.dtype)
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        self.graphs = GraphDecoder(model, self.cache, capture=True) if cuda_graphs else None
        # Penalty state per slot: generated-token counts (presence/frequency) and prompt-or-output membership
        # (repetition). Allocated lazily: most traffic never uses penalties and V x slots floats is not free.
        self._counts: torch.Tensor | None = None
        self._seen: torch.Tensor | None = None
        self._lock = threading.Lock()
        self._inbox: deque[_Request] = deque()
        self._abort_ids: set[str] = set()
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []  # running[i].slot == i
        self.counters = dict.fromkeys(
            ("steps", "batch_size_sum", "tokens_generated", "prompt_tokens", "requests_finished"), 0
        )

    # ---- thread-safe entry points ----------------------------------------------------------------------------
    def validate(self, prompt_ids: list[int]) -> list[int]:
        """The prompt as ints; raises ValueError naming the problem if it can never run."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("the prompt is empty: at least one token is needed")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        if len(prompt) >= self.max_seq_len:
            raise ValueError(
                f"prompt is {len(prompt)} tokens; the context is {self.max_seq_len}, so no token can be generated"
            )
        return prompt

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a request; raises ValueError naming the problem if it can never run."""
        prompt = self.validate(prompt_ids)
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        rid = request_id or uuid.uuid4().hex
        stops = (frozenset() if params.ignore_eos else self.eos_ids) | frozenset(params.stop_token_ids)
        req = _Request(rid, prompt, params, stops, gen)
        with self._lock:
            self._inbox.append(req)
        return rid

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._abort_ids.add(request_id)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self._inbox)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting or self._inbox or self._abort_ids)

    # ---- the step --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        with self._lock:
            self.waiting.extend(self._inbox)
            self._inbox.clear()
            aborts, self._abort_ids = self._abort_ids, set()
        if aborts:
            outputs += self._apply_aborts(aborts)
        for r in self.running:
            r.new = []
        admitted = self._admit()
        finished: list[tuple[_Request, str]] = []
        if admitted:
            self._prefill(admitted, finished)
        decoding = [r for r in self.running if not any(r is f for f, _ in finished)]
        if decoding:
            self._decode(decoding, finished)
        done = {id(r): reason for r, reason in finished}
        for r in self.running:
            reason = done.get(id(r))
            self.counters["tokens_generated"] += len(r.new)
            outputs.append(RequestOutput(r.id, r.new, reason is not None, reason, len(r.prompt), len(r.output)))
        for r, _ in finished:
            self._release(r)
        self.counters["requests_finished"] += len(finished)
        if admitted or decoding:
            self.counters["steps"] += 1
            self.counters["batch_size_sum"] += len(decoding) or len(admitted)
        return outputs

    def _apply_aborts(self, ids: set[str]) -> list[RequestOutput]:
        outs = []
        for r in [r for r in self.waiting if r.id in ids]:
            self.waiting.remove(r)
            outs.append(RequestOutput(r.id, [], True, "abort", len(r.prompt), 0))
        for r in [r for r in self.running if r.id in ids]:
            outs.append(RequestOutput(r.id, [], True, "abort", len(r.prompt), len(r.output)))
            self._release(r)
        self.counters["requests_finished"] += len(outs)
        return outs

    def _admit(self) -> list[_Request]:
        admitted: list[_Request] = []
        budget = self.max_prefill_tokens
        while self.waiting and len(self.running) < self.max_batch_size:
            r = self.waiting[0]
            # The padded prefill costs (rows x longest prompt); always admit one so a huge prompt cannot starve.
            longest = max([len(r.prompt)] + [len(a.prompt) for a in admitted])
            if admitted and longest * (len(admitted) + 1) > budget:
                break
            self.waiting.popleft()
            r.slot = len(self.running)
            self.running.append(r)
            admitted.append(r)
            self.counters["prompt_tokens"] += len(r.prompt)
        return admitted

    def _prefill(self, reqs: list[_Request], finished: list) -> None:
        T = max(len(r.prompt) for r in reqs)
        idx = torch.zeros(len(reqs), T, dtype=torch.long, device=self.device)
        for i, r in enumerate(reqs):
            idx[i, : len(r.prompt)] = torch.tensor(r.prompt, device=self.device)
        view = self.cache.prefill(reqs[0].slot, len(reqs), T)
        h = self.model.hidden_states(idx, cache=view)  # (n, T, C)
        last = torch.tensor([len(r.prompt) - 1 for r in reqs], device=self.device)
        logits = self.model.lm_head(h[torch.arange(len(reqs), device=self.device), last])  # (n, V)
        if any(r.params.needs_penalties for r in reqs):
            self._penalty_state()
            for r in reqs:
                self._counts[r.slot].zero_()
                self._seen[r.slot].zero_()
                self._seen[r.slot, torch.tensor(r.prompt, device=self.device)] = True
        self._sample(reqs, logits, finished)

    def _decode(self, reqs: list[_Request], finished: list) -> None:
        # Running rows are contiguous (slot == index), so a prefix of them is the batch; requests just finished in
        # prefill are still in place but their rows are simply not read (they are released after this step).
        n = max(r.slot for r in reqs) + 1
        tokens, positions = [0] * n, [0] * n
        for r in self.running[:n]:
            if r.output:
                tokens[r.slot], positions[r.slot] = r.output[-1], r.length - 1
        if self.graphs is not None:
            logits = self.graphs(tokens, positions)  # (n, V)
        else:
            idx = torch.tensor(tokens, device=self.device).view(n, 1)
            logits = self.model(idx, cache=self.cache.decode(positions))[0][:, -1]  # (n, V)
        if len(reqs) < n:
            logits = logits[torch.tensor([r.slot for r in reqs], device=self.device)]
        self._sample(reqs, logits, finished)

    def _sample(self, reqs: list[_Request], logits: torch.Tensor, finished: list) -> None:
        logits = logits.float()
        if self.vocab_limit < logits.size(-1):
            logits[:, self.vocab_limit :] = float("-inf")  # padding rows of a rounded-up vocabulary
        if any(r.params.needs_penalties for r in reqs):
            slots = torch.tensor([r.slot for r in reqs], device=self.device)
            col = lambda name: torch.tensor([[getattr(r.params, name)] for r in reqs], device=self.device)  # noqa: E731
            logits = apply_penalties(
                logits,
                self._counts[slots],
                self._seen[slots],
                col("repetition_penalty"),
                col("presence_penalty"),
                col("frequency_penalty"),
            )
        tokens = sample_rows(logits, [r.params for r in reqs], [r.generator for r in reqs])
        for r, t in zip(reqs, tokens):
            if t in r.stops:
                finished.append((r, "stop"))
                continue
            r.output.append(t)
            r.new.append(t)
            if self._counts is not None:
                self._counts[r.slot, t] += 1
                self._seen[r.slot, t] = True
            if len(r.output) >= r.params.max_tokens or r.length >= self.max_seq_len:
                finished.append((r, "length"))

    def _penalty_state(self) -> None:
        if self._counts is None:
            shape = (self.max_batch_size, self.vocab_size)
            self._counts = torch.zeros(shape, device=self.device)
            self._seen = torch.zeros(shape, dtype=torch.bool, device=self.device)

    def _release(self, r: _Request) -> None:
        """Free r's slot; the last running request moves into it so rows stay contiguous."""
        slot, last = r.slot, self.running[-1]
        if last is not r:
            self.cache.move(last.slot, slot, last.length)
            if self._counts is not None:
                self._counts[slot] = self._counts[last.slot]
                self._seen[slot] = self._seen[last.slot]
            self.running[slot] = last
            last.slot = slot
        self.running.pop()
        r.slot = -1

    # ---- offline convenience -----------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Run prompts to completion (all admitted at once, batched) and return each one's new tokens."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        results: dict[str, list[int]] = {i: [] for i in ids}
        while self.has_unfinished():
            for out in self.step():
                if out.request_id in results:
                    results[out.request_id] += out.token_ids
        return [results[i] for i in ids]

    def abort_all(self) -> list[RequestOutput]:
        """Drop every request (after an unexpected error, so the engine is clean for the next ones)."""
        with self._lock:
            self.waiting.extend(self._inbox)
            self._inbox.clear()
            self._abort_ids.clear()
        return self._apply_aborts({r.id for r in list(self.waiting) + self.running})
