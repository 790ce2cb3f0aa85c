"""Token probes (attentive, moment, token-logistic) trained from a store's tokens."""

import math

import numpy as np
import pytest
import torch

from actcache.probes import _tokens
from actcache.probes._setprobes import initial
from actcache.probes.api import train_probes
from actcache.schemas.probe import ProbeConfig, ProbeKind
from actcache.testing import synthetic_store

KEY = 3


def key_token_store(url, n, hidden=16, layers=2, seed=0, lengths=(12, 32)):
    """Rows of random tokens whose label only the token at position ``KEY`` of the last
    layer carries: feature 0 marks it (4), feature 1 holds the label (±2). Every other
    token's feature 1 is ±2 at random, so the mean over a row hides the label."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    count = rng.integers(*lengths, n)
    tokens, means = {}, {}
    ends = np.cumsum(count)
    for layer in range(layers):
        x = rng.standard_normal((int(ends[-1]), hidden)).astype(np.float32)
        x[:, 1] = rng.choice([-2.0, 2.0], len(x))
        if layer == layers - 1:
            x[ends - count + KEY, 0] = 4.0
            x[ends - count + KEY, 1] = np.where(y == 1, 2.0, -2.0)
        tokens[layer] = x
        means[("mean", layer)] = np.add.reduceat(x, ends - count) / count[:, None]
    return synthetic_store(url, means, metadata=[{"label": int(v)} for v in y],
                           rows_per_unit=128, poolings=("mean", "tokens"), tokens=tokens,
                           token_lengths=count)


class Reference(torch.nn.Module):
    """The attentive probe written plainly: queries attend to one row's tokens."""

    def __init__(self, init):
        super().__init__()
        self.queries = torch.nn.Parameter(init["queries"].clone())
        m_h, k = init["weight"].shape
        self.head = torch.nn.Linear(m_h, k)
        with torch.no_grad():
            self.head.weight.copy_(init["weight"].T)
            self.head.bias.copy_(init["bias"])

    def forward(self, x, mask):
        scores = x @ self.queries.T / math.sqrt(x.shape[-1])
        attn = scores.masked_fill(~mask[:, :, None], float("-inf")).softmax(dim=1)
        return self.head((attn.transpose(1, 2) @ x).flatten(1))


def test_attentive_equals_a_plain_pytorch_reference():
    store = key_token_store("memory://tok-ref", 240, hidden=8, lengths=(3, 11))
    cfg = ProbeConfig(label="label", probes=("attentive",), layers=(1,), epochs=3,
                      batch_size=16, learning_rate=0.01, weight_decays=(0.05,), queries=2,
                      control=False, precision="fp32")
    result = train_probes(store, cfg)
    # The reference: the same tokens read row by row, standardised on the fit rows' tokens,
    # the same init, AdamW and cosine schedule, on the run's batches in the run's order.
    sets = _tokens.prepare_tokens(store, cfg)
    plan = _tokens.schedule(sets, cfg.epochs, cfg.batch_size, cfg.seed)
    rows = {r: store.read(1, "tokens", rows=[r]).astype(np.float64)
            for r in np.flatnonzero(sets.data.role > 0)}
    fit = np.concatenate([rows[r] for r in np.flatnonzero(sets.data.role == 1)])
    mean, std = fit.mean(0), fit.std(0)
    model = Reference(initial(ProbeKind.ATTENTIVE, cfg.seed, 1, 8, 1, 2))
    opt = torch.optim.AdamW([{"params": [model.queries, model.head.weight],
                              "weight_decay": 0.05},
                             {"params": [model.head.bias], "weight_decay": 0.0}], lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / plan.steps)))
    # The run's batches: every fit row once an epoch, no validation or test row.
    fit_rows = np.flatnonzero(sets.data.role == 1)
    assert 0 < len(fit_rows) < int((sets.data.role > 0).sum())
    for epoch in range(cfg.epochs):
        seen = np.concatenate(plan.rows(sets, epoch))
        np.testing.assert_array_equal(np.sort(seen), fit_rows)
    for epoch in range(cfg.epochs):
        for batch in plan.rows(sets, epoch):
            t = max(len(rows[r]) for r in batch)
            x = torch.zeros(len(batch), t, 8)
            mask = torch.zeros(len(batch), t, dtype=torch.bool)
            for i, r in enumerate(batch):
                x[i, :len(rows[r])] = torch.from_numpy((rows[r] - mean) / std).float()
                mask[i, :len(rows[r])] = True
            y = torch.from_numpy(sets.data.y[batch]).float()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                model(x, mask)[:, 0], y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    q = model.queries.detach().double().numpy()
    w = model.head.weight.detach().double().numpy().reshape(1, 2, 8)
    got = result.tensors
    np.testing.assert_allclose(got["attentive.layer1.queries"], q / std, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(got["attentive.layer1.weight"].reshape(1, 2, 8), w / std,
                               rtol=2e-4, atol=1e-6)
    bias = model.head.bias.item() - float((w / std * mean).sum())
    np.testing.assert_allclose(got["attentive.layer1.bias"], [bias], rtol=2e-4, atol=1e-6)


@pytest.fixture(scope="module")
def key_store():
    return key_token_store("memory://tok-key", 1000)


def test_attentive_finds_the_deciding_token_a_linear_probe_on_the_mean_misses(key_store):
    cfg = dict(label="label", layers=(1,), precision="fp32", seed=0)
    linear = train_probes(key_store, ProbeConfig(pooling="mean", **cfg)).metrics
    tokens = train_probes(key_store, ProbeConfig(probes=("attentive",), epochs=20,
                                                 batch_size=32, learning_rate=0.03,
                                                 **cfg)).metrics
    assert linear["test_accuracy"].iloc[0] < 0.7
    assert tokens["test_accuracy"].iloc[0] > 0.95
    assert tokens["test_accuracy_low"].iloc[0] > linear["test_accuracy_high"].iloc[0]
    assert tokens["control_accuracy"].iloc[0] < 0.7


def test_token_logistic_locates_the_deciding_token(key_store):
    result = train_probes(key_store, ProbeConfig(
        label="label", layers=(1,), probes=("token-logistic",), epochs=5,
        learning_rate=0.01, precision="fp32", weight_decays=(0.0,)))
    pos = result.positions.set_index("position")["test_accuracy"]
    assert pos.idxmax() == KEY
    assert pos[KEY] > pos.drop(KEY).max() + 0.15
    row = result.metrics.iloc[0]
    assert row["probe"] == "token-logistic" and 0 < row["test_token_accuracy"] < 1


def test_out_of_core_equals_in_memory(monkeypatch):
    """A store ten times --max-memory, read again every pass and its layers trained in
    groups, gives the heads and metrics of the run that keeps every token in memory."""
    # Small pieces and windows, so that the small store spans many of each.
    monkeypatch.setattr(_tokens, "PIECE_BYTES", 256 * 32 * 4)
    monkeypatch.setattr(_tokens, "WINDOW_BYTES", 1024 * 32 * 4)
    monkeypatch.setattr(_tokens, "WINDOW_BATCHES", 1)
    store = key_token_store("memory://tok-ooc", 960, hidden=32, layers=3, lengths=(20, 40))
    stored = int(store.token_lengths().sum()) * 32 * 4 * 3
    budget = 2**20
    assert stored > 10 * budget
    cfg = dict(label="label", probes=("attentive", "moment", "token-logistic"), epochs=2,
               batch_size=8, learning_rate=0.01, queries=2, precision="fp32")
    kept = train_probes(store, ProbeConfig(max_memory=10**9, **cfg))
    streamed = train_probes(store, ProbeConfig(max_memory=budget, **cfg))
    assert kept.passes == 1.0
    assert streamed.passes == 4.0  # the moments, 2 epochs, the scoring
    metrics = [c for c in kept.metrics.columns if c not in ("probe",)]
    np.testing.assert_allclose(streamed.metrics[metrics].to_numpy(float),
                               kept.metrics[metrics].to_numpy(float), rtol=1e-4, atol=1e-6)
    assert kept.tensors.keys() == streamed.tensors.keys()
    for name, value in kept.tensors.items():
        np.testing.assert_allclose(streamed.tensors[name], value, rtol=1e-3, atol=1e-5,
                                   err_msg=name)


@pytest.mark.parametrize("k", [1, 3])
def test_attentive_forward_is_its_definition_row_by_row(k) -> None:
    """Binary heads fold the classifier into the tokens, several classes pool first: both
    equal the definition, each query's softmax over the row's real tokens only."""
    import math

    import torch

    from actcache.probes._setprobes import Heads
    from actcache.schemas.probe import ProbeKind

    torch.manual_seed(0)
    heads = Heads(ProbeKind.ATTENTIVE, (0, 1), 16, k, 2, 3, 4, 0, torch.device("cpu"))
    with torch.no_grad():
        for p in heads.params.values():
            p.normal_()
    x = torch.randn(2, 5, 7, 16)
    mask = torch.rand(5, 7) > 0.3
    mask[:, 0] = True
    got, _ = heads.forward(x, mask)
    q, w, b = heads.params["queries"], heads.params["weight"], heads.params["bias"]
    for g in range(2):
        for task in range(2):
            for decay in range(3):
                for row in range(5):
                    z = x[g, row][mask[row]]  # the real tokens only
                    attn = torch.softmax(q[g, task, decay] @ z.T / math.sqrt(16), dim=1)
                    pooled = (attn @ z).reshape(-1)  # [o_1 ... o_M]
                    want = pooled @ w[g, task, decay] + b[g, task, decay]
                    torch.testing.assert_close(got[g, task, decay, row], want,
                                               rtol=1e-4, atol=1e-4)


def test_forced_bf16_trains_under_autocast_and_reaches_the_fp32_accuracy(key_store):
    """``--precision bf16`` (whatever the CPU) trains the heads under bf16 autocast: the
    decision is recorded, and the deciding token is found as in float32."""
    cfg = dict(label="label", layers=(1,), probes=("attentive", "token-logistic"),
               epochs=10, batch_size=32, learning_rate=0.03, seed=0)
    fp32 = train_probes(key_store, ProbeConfig(precision="fp32", **cfg))
    bf16 = train_probes(key_store, ProbeConfig(precision="bf16", **cfg))
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    assert '"bf16"' in bf16.metadata["precision"]
    np.testing.assert_allclose(bf16.metrics["test_accuracy"], fp32.metrics["test_accuracy"],
                               atol=0.03)
    assert bf16.metrics["test_accuracy"].iloc[0] > 0.9
