"""CLIP prompt encoding beyond 77 tokens (kohya's ``--max_token_length`` 150/225) and with
AUTOMATIC1111 emphasis weights (``--weighted_captions``); shared by the CLIP-based families.

A prompt of up to 75 * k tokens is cut into k windows of ``<BOS> + 75 tokens + <EOS>``, each window
is encoded on its own, and the hidden states are stitched back to 75 * k + 2 positions: the first
window's BOS state, the 75 inner states of every window, and the last window's final state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from library.sampling.prompt_weighting import parse_weighted_prompt

CHUNK = 75


def tokenize_with_weights(tokenizer, text: str, max_token_length: int, weighted: bool) -> tuple[list[int], list[float]]:
    """``[BOS] + tokens + [EOS] + padding`` of length ``max_token_length + 2`` and a weight per id."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    segments = parse_weighted_prompt(text) if weighted else [(text, 1.0)]
    ids: list[int] = []
    weights: list[float] = []
    for segment, weight in segments:
        seg_ids = tokenizer(segment, add_special_tokens=False).input_ids
        ids += seg_ids
        weights += [weight] * len(seg_ids)
    ids, weights = ids[:max_token_length], weights[:max_token_length]
    fill = max_token_length - len(ids)
    return [bos] + ids + [eos] + [pad] * fill, [1.0] + weights + [1.0] * (fill + 1)


def windows(full: torch.Tensor, bos: int, eos: int, pad: int) -> list[torch.Tensor]:
    """Cut (B, 75k + 2) ids into k windows of 77 ids, each starting with BOS and ending with EOS
    (for tokenizers whose padding differs from EOS, a window that ends in padding keeps it and a
    window that starts with padding gets EOS at position 1, as kohya does)."""
    k = (full.shape[1] - 2) // CHUNK
    out = []
    for i in range(k):
        w = full[:, i * CHUNK:(i + 1) * CHUNK + 2].clone()
        w[:, 0] = bos
        if pad == eos:
            w[:, -1] = eos
        else:
            ends_in_text = (w[:, -1] != eos) & (w[:, -1] != pad)
            w[:, -1] = torch.where(ends_in_text, torch.full_like(w[:, -1], eos), w[:, -1])
            starts_with_pad = w[:, 1] == pad
            w[:, 1] = torch.where(starts_with_pad, torch.full_like(w[:, 1], eos), w[:, 1])
        out.append(w)
    return out


def stitch(hidden: list[torch.Tensor]) -> torch.Tensor:
    """Window hidden states (each (B, 77, d)) -> (B, 75k + 2, d)."""
    if len(hidden) == 1:
        return hidden[0]
    parts = [hidden[0][:, :1]] + [h[:, 1:-1] for h in hidden] + [hidden[-1][:, -1:]]
    return torch.cat(parts, dim=1)


def apply_weights(hidden: torch.Tensor, weights: torch.Tensor, normalize: str = "original") -> torch.Tensor:
    """Scale each position's state by its weight, then restore each prompt's mean (lpw's rule,
    kohya's ``--emb_normalize_mode original``), its mean absolute value (``abs``), or nothing
    (``none``). Prompts without emphasis are returned unchanged, and a mean too close to zero to
    divide by (layer-normed states can average to ~0) is not restored."""
    weights = weights.to(hidden.device, torch.float32)
    if torch.all(weights == 1):
        return hidden
    scaled = hidden.float() * weights.unsqueeze(-1)
    if normalize == "none":
        return scaled.to(hidden.dtype)
    measure = torch.abs if normalize == "abs" else (lambda x: x)
    before = measure(hidden.float()).mean(dim=(-2, -1), keepdim=True)
    after = measure(scaled).mean(dim=(-2, -1), keepdim=True)
    safe = after.abs() > 1e-4 * hidden.float().abs().mean(dim=(-2, -1), keepdim=True)
    ratio = torch.where(safe, before / torch.where(safe, after, torch.ones_like(after)), torch.ones_like(after))
    return (scaled * ratio).to(hidden.dtype)


def longest_in_batch(full: torch.Tensor, eos: int) -> int:
    """The length of the longest ``[BOS] tokens [EOS]`` of a batch of padded ids (kohya's
    ``--no_token_padding`` pads to it instead of to 77, as diffusers' DreamBooth does)."""
    return max(row.index(eos, 1) + 1 if eos in row[1:] else len(row) for row in full.tolist())


def encode_prompts(tokenizer, encode_window: Callable[[torch.Tensor], torch.Tensor], texts: list[str],
                   max_token_length: int, weighted: bool, device, normalize: str = "original",
                   pad_to_longest: bool = False) -> torch.Tensor:
    """Encode ``texts`` with windows of 77 tokens; ``encode_window`` maps (B, 77) ids to (B, 77, d).
    ``pad_to_longest`` (one window only): ids cut after the batch's longest caption."""
    pairs = [tokenize_with_weights(tokenizer, t, max_token_length, weighted) for t in texts]
    full = torch.tensor([ids for ids, _ in pairs], device=device)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if pad_to_longest:
        length = longest_in_batch(full, eos)
        hidden = encode_window(full[:, :length])
        if weighted:
            hidden = apply_weights(hidden, torch.tensor([w[:length] for _, w in pairs]), normalize)
        return hidden
    hidden = stitch([encode_window(w) for w in windows(full, bos, eos, pad)])
    if weighted:
        hidden = apply_weights(hidden, torch.tensor([w for _, w in pairs]), normalize)
    return hidden
