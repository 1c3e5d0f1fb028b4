import pytest
import torch

from gptforge.model.gpt import GPT, GPTConfig
from gptforge.runtime import Runtime
from gptforge.train.optim import build_optimizer
from gptforge.train.trainer import NonFiniteError, TrainConfig, Trainer

CPU32 = Runtime(device=torch.device("cpu"), dtype=torch.float32)
CFG = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)


def lm_loss(m, batch):
    x, y = batch
    return m(x, y)[1]


def make_trainer(micro: int, accum: int, data: torch.Tensor, steps: int = 4, **kw):
    torch.manual_seed(0)
    model = GPT(CFG)
    cfg = TrainConfig(
        max_steps=steps,
        micro_batch_size=micro,
        grad_accum=accum,
        lr=1e-2,
        warmup_steps=1,
        eval_every=1000,
        save_every=1000,
        **kw,
    )
    opt = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps, CPU32.device)
    chunks = iter(data.split(micro))

    def next_batch():
        d = next(chunks)
        return d[:, :-1], d[:, 1:]

    return Trainer(model, opt, cfg, CPU32, next_batch, lm_loss, lambda b: b[0].numel(), progress=False), model


def test_grad_accumulation_equals_one_big_batch():
    data = torch.randint(0, 64, (4 * 8, 17), generator=torch.Generator().manual_seed(1))
    big, m_big = make_trainer(8, 1, data)
    acc, m_acc = make_trainer(2, 4, data)
    # The accumulated gradient of 4 micro-batches of 2 equals the gradient of one batch of 8.
    big._micro_step(big.next_batch(), last=True)
    for _ in range(4):
        acc._micro_step(acc.next_batch(), last=True)
    for (n, a), b in zip(m_big.named_parameters(), m_acc.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4, msg=n)
    # And whole training steps stay together (Adam amplifies rounding only where gradients are ~0).
    big, m_big = make_trainer(8, 1, data)
    acc, m_acc = make_trainer(2, 4, data)
    big.fit()
    acc.fit()
    for (n, a), b in zip(m_big.named_parameters(), m_acc.parameters()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=n)


def test_nonfinite_step_never_reaches_the_optimizer(monkeypatch):
    data = torch.randint(0, 64, (6 * 4, 17), generator=torch.Generator().manual_seed(1))
    logs = []
    monkeypatch.setenv("GPTFORGE_FAULT", "nan_loss@step=2")
    tr, model = make_trainer(4, 1, data, steps=6)
    tr.log = logs.append
    snapshots = []
    orig = tr.train_step

    def spy():
        before = [p.detach().clone() for p in model.parameters()]
        moments = {k: v["exp_avg"].clone() for k, v in tr.opt.state.items()}
        out = orig()
        snapshots.append((before, moments, out))
        return out

    tr.train_step = spy
    state = tr.fit()
    before, moments, out = snapshots[2]
    assert not out["finite"]
    # At the skipped step itself: weights after == weights before, optimizer moments untouched.
    after_skip = snapshots[3][0]
    assert all(torch.equal(a, b) for a, b in zip(before, after_skip))
    assert all(torch.equal(moments[k], snapshots[3][1][k]) for k in moments)
    assert state.skipped_total == 1 and state.step == 6
    assert any(r.get("skipped") for r in logs)


def test_persistent_nonfinite_stops_with_error(monkeypatch):
    data = torch.randint(0, 64, (20 * 4, 17), generator=torch.Generator().manual_seed(1))
    monkeypatch.setenv("GPTFORGE_FAULT", "nan_loss@steps=3-100")
    tr, _ = make_trainer(4, 1, data, steps=20, max_nonfinite=3)
    with pytest.raises(NonFiniteError, match="3 non-finite steps in a row"):
        tr.fit()
    assert tr.state.step == 6


def test_early_stopping_and_best_save():
    data = torch.randint(0, 64, (20 * 4, 17), generator=torch.Generator().manual_seed(1))
    tr, _ = make_trainer(4, 1, data, steps=20, early_stop_patience=2)
    tr.cfg.eval_every = 1
    losses = iter([3.0, 2.0, 2.5, 2.4, 1.0])
    tr.evaluate = lambda st: {"val_loss": next(losses)}
    saves = []
    tr.save = lambda st, best: saves.append((st.step, best))
    st = tr.fit()
    assert st.step == 4 and "early stop" in tr.stop_reason
    assert st.best_val == 2.0
    assert (1, True) in saves and (2, True) in saves and (4, False) in saves


def test_tokens_per_second_leaves_out_evaluation_and_saving(monkeypatch):
    """A fake clock: each batch takes 1 s, each evaluation and save 100 s. The logged rate is tokens per training
    second, so it must not drop at the steps that evaluate and save."""
    import gptforge.train.trainer as trainer_mod

    clock = [0.0]
    monkeypatch.setattr(trainer_mod.time, "perf_counter", lambda: clock[0])
    data = torch.randint(0, 64, (4 * 6, 17), generator=torch.Generator().manual_seed(1))
    tr, _ = make_trainer(4, 1, data, steps=6, log_every=2)
    tr.cfg.eval_every, tr.cfg.save_every = 1, 3
    batch, logged = tr.next_batch, []

    def timed_batch():
        clock[0] += 1.0
        return batch()

    def slow(*_args):
        clock[0] += 100.0
        return {"val_loss": 1.0}

    tr.next_batch, tr.evaluate, tr.save = timed_batch, slow, slow
    tr.log = logged.append
    tr.fit()
    rates = [r["tok_s"] for r in logged if "tok_s" in r]
    assert rates == [4 * 16] * 3  # 4 sequences x 16 tokens per 1-second step, at steps 2, 4 and 6
