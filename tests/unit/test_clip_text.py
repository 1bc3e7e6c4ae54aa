"""Long prompts in windows of 75 tokens, and (word:1.2) emphasis."""

import pytest
import torch

from library.families import clip_text
from library.sampling.prompt_weighting import parse_weighted_prompt


def test_parse_weighted_prompt_hand_checked():
    assert parse_weighted_prompt("a (red:1.5) cat") == [("a ", 1.0), ("red", 1.5), (" cat", 1.0)]
    assert parse_weighted_prompt("((a))") == [("a", pytest.approx(1.21))]
    assert parse_weighted_prompt("[b]") == [("b", pytest.approx(1 / 1.1))]
    assert parse_weighted_prompt(r"\(x\)") == [("(x)", 1.0)]
    assert parse_weighted_prompt("open (a") == [("open ", 1.0), ("a", pytest.approx(1.1))]


def test_short_prompts_match_plain_tokenization(tiny_sd1):
    tok, te = tiny_sd1.tokenizer, tiny_sd1.text_encoder
    texts = ["sks shape, red circle", ""]
    with torch.no_grad():
        ours = clip_text.encode_prompts(tok, lambda ids: te(ids).last_hidden_state, texts, 75, False, "cpu")
        ids = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        torch.testing.assert_close(ours, te(ids).last_hidden_state)


def test_long_prompts_are_windowed_and_stitched(tiny_sd1):
    tok, te = tiny_sd1.tokenizer, tiny_sd1.text_encoder
    long = ", ".join(["red circle"] * 60)  # 180 tokens
    ids, weights = clip_text.tokenize_with_weights(tok, long, 225, False)
    assert len(ids) == 227 and ids[0] == tok.bos_token_id and ids[181] == tok.eos_token_id
    full = torch.tensor([ids])
    wins = clip_text.windows(full, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert len(wins) == 3 and all(w.shape == (1, 77) for w in wins)
    assert torch.equal(wins[1][0, 1:76], full[0, 76:151])  # window 2 holds tokens 76..150
    assert all(w[0, 0] == tok.bos_token_id and w[0, -1] == tok.eos_token_id for w in wins)
    with torch.no_grad():
        hidden = clip_text.encode_prompts(tok, lambda i: te(i).last_hidden_state, [long], 225, False, "cpu")
        assert hidden.shape == (1, 227, te.config.hidden_size)
        first = te(wins[0]).last_hidden_state
        torch.testing.assert_close(hidden[:, :76], first[:, :76])
        torch.testing.assert_close(hidden[:, -1], te(wins[2]).last_hidden_state[:, -1])


def test_windows_when_padding_differs_from_eos():
    # SD2-style tokenizer: pad 0, eos 9, bos 8. A window that ends inside the text gets EOS;
    # one that starts with padding gets EOS at position 1.
    full = torch.tensor([[8] + [5] * 80 + [9] + [0] * 70])  # 80 tokens, EOS, padding: 75*2 + 2 ids
    w1, w2 = clip_text.windows(full, 8, 9, 0)
    assert w1[0, -1] == 9 and w1[0, 0] == 8
    assert w2[0, 1] == 5 and w2[0, -1] == 0  # ends in padding: kept
    padded = torch.tensor([[8] + [5] * 10 + [9] + [0] * 140])
    _, second = clip_text.windows(padded, 8, 9, 0)
    assert second[0, 1] == 9


def test_weights_scale_positions_and_keep_the_mean(tiny_sd1):
    tok = tiny_sd1.tokenizer
    ids, weights = clip_text.tokenize_with_weights(tok, "a (red:1.5) circle", 75, True)
    red = tok("red", add_special_tokens=False).input_ids
    pos = ids.index(red[0])
    assert weights[pos] == 1.5 and weights[0] == 1.0 and weights[pos - 1] == 1.0
    hidden = torch.randn(1, 77, 8) + 2.0
    w = torch.tensor([weights])
    out = clip_text.apply_weights(hidden, w)
    torch.testing.assert_close(out.mean(), hidden.mean())
    ratio = (out[0, pos] / hidden[0, pos]) / (out[0, 0] / hidden[0, 0])
    torch.testing.assert_close(ratio, torch.full_like(ratio, 1.5))
    torch.testing.assert_close(clip_text.apply_weights(hidden, torch.ones(1, 77)), hidden)


def test_emb_normalize_modes_hand_checked():
    """kohya's --emb_normalize_mode after weighting: original keeps the mean, abs the mean of
    |values|, none nothing; unweighted prompts are never touched."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 5, 4, generator=g) + 0.5  # a mean well away from zero
    weights = torch.tensor([[1.0, 2.0, 1.0, 0.5, 1.0]])
    scaled = hidden * weights.unsqueeze(-1)
    torch.testing.assert_close(clip_text.apply_weights(hidden, weights, "none"), scaled)
    original = clip_text.apply_weights(hidden, weights, "original")
    torch.testing.assert_close(original, scaled * hidden.mean() / scaled.mean())
    absolute = clip_text.apply_weights(hidden, weights, "abs")
    torch.testing.assert_close(absolute, scaled * hidden.abs().mean() / scaled.abs().mean())
    assert not torch.allclose(original, absolute)
    same = torch.ones(1, 5)
    assert all(clip_text.apply_weights(hidden, same, m) is hidden for m in ("original", "abs", "none"))


def test_no_token_padding_cuts_after_the_longest_caption(tiny_sd1):
    """--no_token_padding: ids end after the batch's longest caption; CLIP's causal attention makes
    those positions equal to the same positions of the 77-token encoding."""
    tok, te = tiny_sd1.tokenizer, tiny_sd1.text_encoder
    captions = ["a b", "a b c d e"]
    full = torch.tensor([clip_text.tokenize_with_weights(tok, c, 75, False)[0] for c in captions])
    length = clip_text.longest_in_batch(full, tok.eos_token_id)
    assert length == len(tok("a b c d e").input_ids)  # BOS, its tokens, EOS
    with torch.no_grad():
        short = clip_text.encode_prompts(tok, lambda ids: te(ids).last_hidden_state, captions, 75, False, "cpu",
                                         pad_to_longest=True)
        padded = clip_text.encode_prompts(tok, lambda ids: te(ids).last_hidden_state, captions, 75, False, "cpu")
    assert short.shape[1] == length
    # equal up to float32 rounding: the shorter sequence is multiplied in other blocks (about 1e-6 here)
    torch.testing.assert_close(short, padded[:, :length], rtol=1e-5, atol=1e-5)
