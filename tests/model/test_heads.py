import pytest
import torch
import torch.nn.functional as F

from gptforge.model.gpt import GPTConfig
from gptforge.model.heads import ClassifierGPT, build_classifier

LLAMA = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
GPT2 = dict(
    vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32, pos="learned", norm="layernorm", mlp="gelu", bias=True
)


def make(arch: dict, pooling: str = "last", n_classes: int = 3, seed: int = 0, **kw) -> ClassifierGPT:
    torch.manual_seed(seed)
    return build_classifier(GPTConfig(**arch), n_classes, pooling=pooling, **kw).eval()


@pytest.mark.parametrize("arch", [LLAMA, GPT2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_padding_does_not_change_the_logits(arch, pooling):
    clf = make(arch, pooling)
    lengths = torch.tensor([1, 5, 12, 8])
    rows = [torch.randint(1, 97, (int(n),)) for n in lengths]
    T = 12
    pad_a = torch.zeros(4, T, dtype=torch.long)
    pad_b = torch.randint(1, 97, (4, T))  # different padding tokens must not matter either
    for i, r in enumerate(rows):
        pad_a[i, : len(r)] = r
        pad_b[i, : len(r)] = r
    with torch.no_grad():
        a, b = clf(pad_a, lengths), clf(pad_b, lengths)
        # Reference: each row alone, unpadded, pooled by hand from the body's hidden states.
        ref = []
        for r in rows:
            h = clf.gpt.hidden_states(r[None])[0]  # (len, C)
            ref.append(clf.head(h[-1] if pooling == "last" else h.mean(dim=0)))
        ref = torch.stack(ref)
    assert a.shape == (4, 3) and a.dtype == torch.float32
    torch.testing.assert_close(a, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_gradients_reach_body_and_head_but_not_padding(pooling):
    clf = make(LLAMA, pooling, dropout=0.1).train()
    pad = 0  # appears only as padding, so its embedding row must get no gradient
    idx = torch.randint(1, 97, (3, 10))
    lengths = torch.tensor([10, 4, 7])
    for i, n in enumerate(lengths):
        idx[i, n:] = pad
    F.cross_entropy(clf(idx, lengths), torch.tensor([0, 1, 2])).backward()
    for name, p in clf.named_parameters():
        if name != "gpt.lm_head.weight":  # tied to wte; a classifier never calls lm_head
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert clf.gpt.wte.weight.grad[pad].abs().sum() == 0
    assert clf.gpt.wte.weight.grad[idx[0, 0]].abs().sum() > 0


def toy_rows(n: int, T: int = 12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows starting with token 5 are class 0, with token 6 class 1; the rest is noise of random length."""
    y = torch.arange(n) % 2
    idx = torch.randint(7, 97, (n, T))
    idx[:, 0] = 5 + y
    return idx, torch.randint(2, T + 1, (n,)), y


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_learns_a_separable_toy_task(pooling):
    torch.manual_seed(0)
    # 256 rows: too many for the tiny model to memorize in a few steps, so 100% must come from the first token.
    idx, lengths, y = toy_rows(256)
    held_idx, held_lengths, held_y = toy_rows(200)
    clf = make(LLAMA, pooling, n_classes=2, seed=1).train()
    opt = torch.optim.AdamW(clf.parameters(), lr=3e-3)
    step = 0
    for step in range(100):  # noqa: B007 (reported on failure)
        logits = clf(idx, lengths)
        if bool((logits.argmax(-1) == y).all()):
            break
        F.cross_entropy(logits, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    clf.eval()
    with torch.no_grad():
        acc = (clf(idx, lengths).argmax(-1) == y).float().mean().item()
        held = (clf(held_idx, held_lengths).argmax(-1) == held_y).float().mean().item()
    assert acc == 1.0, f"train accuracy {acc} after {step} steps"
    assert held >= 0.9, f"held-out accuracy {held}: memorized noise instead of the first token"


def test_autocast_gives_float32_logits():
    clf = make(LLAMA, "mean")
    idx, lengths = torch.randint(0, 97, (2, 6)), torch.tensor([6, 3])
    with torch.no_grad():
        ref = clf(idx, lengths)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = clf(idx, lengths)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, atol=0.02, rtol=0.05)


def test_bad_arguments_raise():
    cfg = GPTConfig(**LLAMA)
    with pytest.raises(ValueError, match="n_classes must be >= 2, got 1"):
        build_classifier(cfg, 1)
    with pytest.raises(ValueError, match="pooling must be one of"):
        build_classifier(cfg, 2, pooling="max")
    with pytest.raises(ValueError, match="dropout"):
        build_classifier(cfg, 2, dropout=1.0)
    clf = make(LLAMA)
    idx = torch.randint(0, 97, (2, 6))
    with pytest.raises(ValueError, match=r"lengths\[1\] = 7 is outside 1\.\.6"):
        clf(idx, torch.tensor([3, 7]))
    with pytest.raises(ValueError, match=r"lengths\[0\] = 0"):
        clf(idx, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="lengths must have shape"):
        clf(idx, torch.tensor([3]))
