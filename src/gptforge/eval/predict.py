"""Model outputs for evaluation: class probabilities of a classifier, replies of a chat model.

Classifier rows are sorted by length before batching, so a batch pads to its own longest row rather than the
dataset's; probabilities come back in the input order.
"""

from __future__ import annotations

import numpy as np
import torch

from gptforge.runtime import Runtime


@torch.no_grad()
def predict_proba(model: torch.nn.Module, seqs: list[list[int]], pad_id: int, batch_size: int, runtime: Runtime):
    """(N, n_classes) float64 class probabilities for token sequences (each starting with the BOS token)."""
    from gptforge.data.sft import collate_classify

    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out: list[np.ndarray] = [None] * len(seqs)  # type: ignore[list-item]
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        ids, lengths = collate_classify([seqs[i] for i in idx], pad_id)
        with runtime.autocast():
            logits = model(ids.to(runtime.device), lengths.to(runtime.device))
        probs = torch.softmax(logits.float(), dim=-1).double().cpu().numpy()
        for j, i in enumerate(idx):
            out[i] = probs[j]
    return np.stack(out) if out else np.zeros((0, 0))


@torch.no_grad()
def chat_reply(
    model: torch.nn.Module,
    tok,
    messages: list[dict],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    runtime: Runtime | None = None,
) -> str:
    """The assistant's next turn for a conversation (its last message is usually the user's)."""
    from gptforge.tokenizer.chat import chat_prompt_ids, stop_ids

    device = runtime.device if runtime else torch.device("cpu")
    ids = chat_prompt_ids(tok, messages)
    room = model.config.block_size - len(ids)
    if room <= 0:
        raise ValueError(f"the conversation is {len(ids)} tokens, the model's context is {model.config.block_size}")
    gen = torch.Generator(device=device).manual_seed(seed)
    stops = stop_ids(tok)
    y = model.generate(
        torch.tensor([ids], device=device),
        min(max_new_tokens, room),
        temperature,
        top_k or None,
        generator=gen,
        stop_ids=stops,
        vocab_limit=tok.vocab_size,
    )
    new = y[0, len(ids) :].tolist()
    for i, t in enumerate(new):
        if t in stops:
            new = new[:i]
            break
    return tok.decode(new, skip_special=True)
