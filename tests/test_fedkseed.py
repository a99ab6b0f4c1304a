"""FedKSeed and FedKSeed-Pro on tiny models: the ZO step's arithmetic, the exact message sizes,
rebuilding the global model from w0 and the per-seed scalars (and the drift of a client that
trains and undoes in place), Pro's probabilities on a hand-computed history, and bad uploads
rejected without touching the server."""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import pytest
import torch

from fedtune import wire
from fedtune.config import TrainConfig
from fedtune.methods.base import FitContext, Upload, trainable_parameters
from fedtune.methods.fedkseed import (
    MAX_K,
    Config,
    KSeedClient,
    KSeedProClient,
    KSeedProServer,
    KSeedServer,
    encode_upload,
    make_pool,
    spec_fedkseed,
    spec_fedkseed_pro,
)
from fedtune.methods.zo import ZOStepper
from fedtune.randomness import add_directions_, derive_seed, directions
from fedtune.tasks import CausalLMTask, ClientData

RUN_SEED = 11


class _Tok:
    pad_token_id = 0
    eos_token_id = 1


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    conf = LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    return LlamaForCausalLM(conf).eval()


def client_data(cid: int, n: int = 6) -> ClientData:
    """Token sequences whose response repeats the prompt: learnable, deterministic."""
    g = torch.Generator().manual_seed(100 + cid)
    examples = []
    for _ in range(n):
        prompt = torch.randint(2, 128, (6,), generator=g).tolist()
        ids = prompt + prompt[:4] + [1]
        examples.append({"input_ids": ids, "labels": [-100] * 6 + ids[6:]})
    return ClientData(examples)


TASK = CausalLMTask(_Tok())


def ctx(r: int, cid: int, steps: int = 3, bs: int = 2) -> FitContext:
    return FitContext(round=r, client_id=cid, seed=derive_seed(RUN_SEED, r, cid),
                      train=TrainConfig(local_steps=steps, batch_size=bs), task=TASK)


def reference_model(model0: torch.nn.Module, server: KSeedServer, cfg: Config) -> dict:
    """w0 - eta * sum_s A32_s z(s), computed in float64 (the exact global model)."""
    pool, _ = make_pool(RUN_SEED, cfg.k)
    params = trainable_parameters(model0)
    out = {n: p.detach().double().clone() for n, p in params.items()}
    shapes = [p.shape for p in params.values()]
    acc32 = server.acc.astype(np.float32).astype(np.float64)
    for s in np.flatnonzero(acc32):
        for n, z in zip(out, directions(pool[s], shapes, cfg.distribution)):
            out[n] -= cfg.eta * acc32[s] * z.double()
    return out


def rel_errors(model: torch.nn.Module, ref: dict) -> list[float]:
    return [float((p.detach().double() - ref[n]).norm() / ref[n].norm())
            for n, p in trainable_parameters(model).items()]


def run_rounds(cfg: Config, rounds: int, pro: bool = False, clients=(0, 1, 2),
               weighting: str = "examples"):
    """The in-process engine's call sequence with one shared client; returns the pieces."""
    model = tiny_llama()
    model0 = copy.deepcopy(model)
    spec = spec_fedkseed_pro if pro else spec_fedkseed
    client = spec.make_client(cfg, model, RUN_SEED)
    server = spec.make_server(cfg, None, RUN_SEED, weighting)
    last: dict[int, int | None] = {}
    down_bytes = []
    for r in range(rounds):
        uploads = []
        for cid in clients:
            down = server.download(r, since=last.get(cid))
            down_bytes.append(len(down))
            data = client_data(cid)
            uploads.append(Upload(cid, len(data), client.fit(down, data, ctx(r, cid))))
            last[cid] = r
        server.aggregate(r, uploads)
        client.sync(server.download(r + 1, since=client.round))  # evaluation sync
    return model0, model, client, server, down_bytes


# --- the step ------------------------------------------------------------------------------


def test_zo_step_arithmetic_inplace_equals_keep():
    torch.manual_seed(0)
    model = tiny_llama()
    batch = TASK.collate(client_data(0).examples[:2])
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = list(trainable_parameters(model).values())
    eps, eta, seed = 1e-3, 1e-2, 424242
    def loss():
        return TASK.loss(model, batch)

    res = ZOStepper(params, eps, eta, "gaussian", "inplace").step(seed, loss)
    after_inplace = {n: p.detach().clone() for n, p in model.named_parameters()}
    # the same step by hand in float64
    zs = [z.double().clone() for z in directions(seed, [p.shape for p in params])]
    with torch.no_grad():
        for p, n in zip(params, w):
            p.copy_(w[n])
        for p, z in zip(params, zs):
            p.add_((eps * z).float())
        lp = float(loss())
        for p, n, z in zip(params, w, zs):
            p.copy_((w[n].double() - eps * z).float())
        lm = float(loss())
    g = (lp - lm) / (2 * eps)
    assert math.isclose(res.g, g, rel_tol=1e-3)
    assert math.isclose(res.loss, (lp + lm) / 2, rel_tol=1e-6)
    for (n, p), z in zip(trainable_parameters(model).items(), zs):
        expected = w[n].double() - eta * res.g * z
        assert torch.allclose(after_inplace[n].double(), expected, atol=1e-6)
    # keep mode from the same start rounds every move as the fused kernel does: the same bits
    # (a one-ulp difference in the perturbed weights can move a float32 loss by an ulp, and
    # that moves g by ~5e-5 of itself, hence bit identity rather than a tolerance)
    with torch.no_grad():
        for p, n in zip(params, w):
            p.copy_(w[n])
    res2 = ZOStepper(params, eps, eta, "gaussian", "keep").step(seed, loss)
    assert (res2.loss_plus, res2.loss_minus, res2.g) == (res.loss_plus, res.loss_minus, res.g)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), after_inplace[n]), n


@pytest.mark.parametrize("mode", ["onthefly", "inplace"])
def test_non_finite_step_is_skipped_and_model_restored(mode):
    model = tiny_llama()
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    stepper = ZOStepper(list(trainable_parameters(model).values()), 1e-3, 1.0, mode=mode,
                        model=model)
    res = stepper.step(5, lambda: torch.tensor(float("nan")))
    assert res.g is None
    for n, p in model.named_parameters():
        if mode == "onthefly":  # the stored weights were never touched
            assert torch.equal(p.detach(), w[n])
        else:
            assert torch.allclose(p.detach(), w[n], atol=1e-6)


def test_onthefly_forward_sees_the_perturbed_weights_and_the_update_is_one_add():
    model = tiny_llama()
    batch = TASK.collate(client_data(0).examples[:2])
    params = list(trainable_parameters(model).values())
    w = [p.detach().clone() for p in params]
    eps, eta, seed = 1e-3, 1e-2, 77
    seen = []
    res = ZOStepper(params, eps, eta, "gaussian", "onthefly", model).step(
        seed, lambda: seen.append(float(TASK.loss(model, batch))) or seen[-1])
    after = [p.detach().clone() for p in params]
    # the same perturbed weights materialised by hand give bit-identical losses
    for sign, loss in zip((1, -1), seen):
        with torch.no_grad():
            for p, w0 in zip(params, w):
                p.copy_(w0)
            add_directions_(params, [(seed, sign * eps)], "gaussian")
        with torch.no_grad():
            assert float(TASK.loss(model, batch)) == loss
    # and the weights moved by exactly one fused add of -eta g z from w
    ref = [w0.clone() for w0 in w]
    add_directions_(ref, [(seed, -eta * res.g)], "gaussian")
    assert all(torch.equal(a, b) for a, b in zip(after, ref))


def test_bfloat16_weights_are_restored_exactly_by_onthefly_steps():
    """MeZO's in-place w + eps z - 2 eps z + eps z is not w in bfloat16; on-the-fly steps never
    write the perturbation, so steps with a zero update leave every bit in place."""
    from fedtune.models import place

    model = place(tiny_llama(), torch.bfloat16, torch.device("cpu"))
    batch = TASK.collate(client_data(0).examples[:2])
    params = list(trainable_parameters(model).values())
    w = [p.detach().clone() for p in params]
    stepper = ZOStepper(params, 1e-2, 1e-3, "gaussian", "onthefly", model)
    stepper.eta = 0.0  # a step with eta = 0: only the perturbations happen
    for seed in range(20):
        res = stepper.step(seed, lambda: TASK.loss(model, batch))
        assert res.g is not None and res.g != 0  # the perturbations did change the loss
    assert all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(params, w))
    # the in-place sequence does drift in bfloat16 (why the inplace mode refuses 16-bit)
    drift = [t.clone() for t in w]
    for seed in range(5):
        for alpha in (1e-2, -2e-2, 1e-2):
            add_directions_(drift, [(seed, alpha)], "gaussian")
    assert not all(torch.equal(a, b) for a, b in zip(drift, w))
    with pytest.raises(ValueError, match="onthefly"):
        ZOStepper(params, 1e-2, 1e-3, "gaussian", "inplace")


def test_client_skips_nan_steps_and_uploads_only_good_pairs():
    cfg = Config(k=16)
    client = KSeedClient(cfg, tiny_llama(), RUN_SEED)
    server = KSeedServer(cfg, None, RUN_SEED, "examples")
    calls = {"n": 0}

    class NanEveryOther:
        def collate(self, ex):
            return TASK.collate(ex)

        def loss(self, model, batch):
            calls["n"] += 1
            return torch.tensor(float("nan")) if calls["n"] % 4 in (1, 2) else TASK.loss(model,
                                                                                          batch)

    c = ctx(0, 0, steps=4)
    c.task = NanEveryOther()
    up = client.fit(server.download(0, None), client_data(0), c)
    assert client.skipped == 2
    assert len(up) == wire.HEADER_SIZE + 8 + 6 * 2
    server.aggregate(0, [Upload(0, 6, up)])


# --- messages ----------------------------------------------------------------------------------


def test_message_sizes():
    cfg = Config()  # K = 4096
    s = KSeedServer(cfg, None, RUN_SEED, "examples")
    assert len(s.download(0, None)) == wire.HEADER_SIZE + 13 + 4 * 4096  # 16,411 bytes
    pro = KSeedProServer(cfg, None, RUN_SEED, "examples")
    assert len(pro.download(0, None)) == wire.HEADER_SIZE + 13 + 6 * 4096
    _, pid = make_pool(RUN_SEED, cfg.k)
    up = encode_upload(3, 0, pid, np.arange(200), np.ones(200))
    assert len(up) == wire.HEADER_SIZE + 8 + 6 * 200  # 1,222 bytes for tau = 200
    # after a round touching 3 seeds, a client one round behind gets only those (sparse)
    s.aggregate(0, [Upload(0, 1, encode_upload(3, 0, pid, np.array([5, 9, 5]),
                                               np.array([1.0, 2.0, 3.0])))])
    assert len(s.download(1, since=0)) == wire.HEADER_SIZE + 13 + 4 + 6 * 2
    assert len(s.download(1, since=1)) == wire.HEADER_SIZE + 13 + 4
    assert len(s.download(1, since=None)) == wire.HEADER_SIZE + 13 + 4 * 4096


def test_weighted_and_equal_accumulation_by_hand():
    cfg = Config(k=8)
    _, pid = make_pool(RUN_SEED, 8)
    ups = [Upload(0, 1, encode_upload(3, 0, pid, np.array([1, 2, 1]), np.array([1., 2., 3.]))),
           Upload(1, 3, encode_upload(3, 0, pid, np.array([2, 7]), np.array([-4., 8.])))]
    s = KSeedServer(cfg, None, RUN_SEED, "examples")
    metrics = s.aggregate(0, ups)
    # |g| over both uploads: 1, 2, 3, 4, 8 (the run log's step-size statistics)
    assert metrics == {"steps": 5.0, "seeds_touched": 3.0, "abs_g_median": 3.0, "abs_g_max": 8.0}
    # seed 1: 1/4 * (1 + 3) = 1; seed 2: 1/4 * 2 + 3/4 * -4 = -2.5; seed 7: 3/4 * 8 = 6
    assert np.allclose(s.acc, [0, 1, -2.5, 0, 0, 0, 0, 6])
    e = KSeedServer(cfg, None, RUN_SEED, "equal")
    e.aggregate(0, ups)
    assert np.allclose(e.acc, [0, 2, -1, 0, 0, 0, 0, 4])


def _bad(pid, k):
    good = encode_upload(3, 0, pid, np.array([1, 2]), np.array([0.5, -0.5]))
    return {
        "index outside the pool": encode_upload(3, 0, pid, np.array([k]), np.array([1.0])),
        "NaN scalar": encode_upload(3, 0, pid, np.array([1]), np.array([np.nan])),
        "infinite scalar": encode_upload(3, 0, pid, np.array([1]), np.array([np.inf])),
        "scalar above the bound": encode_upload(3, 0, pid, np.array([1]), np.array([3.4e38])),
        "truncated": good[:-1],
        "padded": good + b"\0",
        "count larger than the body": (good[:wire.HEADER_SIZE] + good[wire.HEADER_SIZE:][:4]
                                       + (7).to_bytes(4, "little") + good[wire.HEADER_SIZE + 8:]),
        "another round": encode_upload(3, 1, pid, np.array([1]), np.array([1.0])),
        "another pool": encode_upload(3, 0, pid ^ 1, np.array([1]), np.array([1.0])),
        "another method": encode_upload(5, 0, pid, np.array([1]), np.array([1.0])),
        "a download": wire.frame(3, wire.DOWN, 0, good[wire.HEADER_SIZE:]),
    }


@pytest.mark.parametrize("what", list(_bad(0, 8)))
def test_bad_uploads_are_rejected_and_leave_the_server_untouched(what):
    cfg = Config(k=8)
    _, pid = make_pool(RUN_SEED, 8)
    s = KSeedProServer(cfg, None, RUN_SEED, "examples")
    s.aggregate(0, [Upload(0, 2, encode_upload(3 + 1, 0, pid, np.array([3]), np.array([2.0])))])
    before = s.state_dict()
    down_before = s.download(1, None)
    good = encode_upload(4, 1, pid, np.array([1, 2]), np.array([0.5, -0.5]))
    bad = _bad(pid, 8)[what]
    # the bad messages are built for method 3 at round 0: re-target them to Pro at round 1
    bad = bytearray(bad)
    if what != "another method":
        bad[3] = 4
    if what != "another round":
        bad[6:10] = (1).to_bytes(4, "little")
    else:
        bad[6:10] = (2).to_bytes(4, "little")
    with pytest.raises(wire.MessageError, match="client 7"):
        s.aggregate(1, [Upload(6, 3, good), Upload(7, 3, bytes(bad))])
    after = s.state_dict()
    assert after["round"] == before["round"] == 1
    for key in ("acc", "hist_sum", "hist_count"):
        assert torch.equal(after[key], before[key])
    assert s.download(1, None) == down_before


def test_client_rejects_foreign_or_stale_downloads():
    cfg = Config(k=16)
    server = KSeedServer(cfg, None, RUN_SEED, "examples")
    other = KSeedClient(cfg, tiny_llama(), RUN_SEED + 1)
    with pytest.raises(wire.MessageError, match="run seed or k"):
        other.sync(server.download(0, None))
    _, pid = make_pool(RUN_SEED, 16)
    for r in range(3):
        server.aggregate(r, [Upload(0, 1, encode_upload(3, r, pid, np.array([r]),
                                                        np.array([1.0])))])
    behind = KSeedClient(cfg, tiny_llama(), RUN_SEED)  # at round 0
    with pytest.raises(wire.MessageError, match="since=None"):
        behind.sync(server.download(3, since=2))
    behind.sync(server.download(3, since=0))
    assert behind.round == 3
    with pytest.raises(wire.MessageError, match="shorter"):
        behind.sync(b"FT")


def test_config_validation():
    with pytest.raises(ValueError, match="k"):
        Config(k=MAX_K + 1)
    with pytest.raises(ValueError, match="distribution"):
        Config(distribution="uniform")
    with pytest.raises(ValueError, match="mode"):
        Config(mode="snapshot")
    with pytest.raises(ValueError, match="eta"):
        Config(eta=0)


# --- rebuilding the global model ---------------------------------------------------------------


@pytest.mark.parametrize("dist, mode", [("gaussian", "inplace"), ("rademacher", "keep")])
def test_rebuild_from_w0_matches_the_global_model(dist, mode):
    cfg = Config(k=64, eta=2e-3, eps=1e-3, distribution=dist, mode=mode)
    rounds = 5
    model0, shared_model, _, server, _ = run_rounds(cfg, rounds)
    ref = reference_model(model0, server, cfg)
    assert np.count_nonzero(server.acc) > 10  # the rounds did move the model
    moved = max(float((p.detach().double() - ref[n]).norm())
                for n, p in trainable_parameters(model0).items())
    assert moved > 1e-3
    # a new client rebuilds w_R from w0 and the K accumulated scalars
    fresh = KSeedClient(cfg, copy.deepcopy(model0), RUN_SEED)
    fresh.sync(server.download(rounds, since=None))
    err_fresh = rel_errors(fresh.model, ref)
    assert max(err_fresh) < 1e-6, err_fresh
    # the shared client trained (in place) and undid 3 clients' steps every round: its drift
    # from the exact global model stays within float32 rounding of the steps it replayed
    err_shared = rel_errors(shared_model, ref)
    print(f"\n{dist}/{mode}: max rel error rebuilt {max(err_fresh):.2e}, "
          f"trained-in-place client {max(err_shared):.2e}")
    assert max(err_shared) < 1e-5


def test_lagging_client_catches_up_with_a_sparse_download():
    cfg = Config(k=64, eta=2e-3, eps=1e-3)
    model0 = tiny_llama()
    server = KSeedServer(cfg, None, RUN_SEED, "examples")
    trainer = KSeedClient(cfg, copy.deepcopy(model0), RUN_SEED)
    lagging = KSeedClient(cfg, copy.deepcopy(model0), RUN_SEED)
    for r in range(4):
        ups = [Upload(c, 6, trainer.fit(server.download(r, trainer.round), client_data(c),
                                        ctx(r, c))) for c in (0, 1)]
        server.aggregate(r, ups)
        if r == 0:
            lagging.sync(server.download(1, since=0))
    assert lagging.round == 1
    down = server.download(4, since=1)
    assert len(down) < wire.HEADER_SIZE + 13 + 4 * cfg.k  # only the seeds changed since round 1
    lagging.sync(down)
    ref = reference_model(model0, server, cfg)
    assert max(rel_errors(lagging.model, ref)) < 1e-6
    assert np.array_equal(lagging.applied, server.acc.astype(np.float32).astype(np.float64))


def test_rebuild_generates_one_direction_per_touched_seed(monkeypatch):
    """A fresh client's rebuild costs one direction per distinct touched seed, at most K,
    whatever the number of rounds (counted at the generator; rebuild times are printed)."""
    from fedtune.methods import fedkseed

    generated: list[int] = []

    def counting(params, terms, dist):
        generated.append(len(terms))
        return add_directions_(params, terms, dist)

    monkeypatch.setattr(fedkseed, "add_directions_", counting)
    model0 = tiny_llama()
    rows = []
    for k in (16, 256):
        for rounds in (2, 8):
            cfg = Config(k=k)
            server = KSeedServer(cfg, None, RUN_SEED, "examples")
            _, pid = make_pool(RUN_SEED, k)
            rng = np.random.default_rng(0)
            for r in range(rounds):  # 4 clients x 10 steps per round, synthetic scalars
                ups = [Upload(c, 5, encode_upload(3, r, pid, rng.integers(0, k, 10),
                                                  rng.normal(size=10))) for c in range(4)]
                server.aggregate(r, ups)
            fresh = KSeedClient(cfg, copy.deepcopy(model0), RUN_SEED)
            generated.clear()
            t0 = time.perf_counter()
            fresh.sync(server.download(rounds, None))
            dt = time.perf_counter() - t0
            touched = int(np.count_nonzero(server.acc))
            rows.append((k, rounds, touched, dt))
            assert touched == len(np.unique(np.concatenate(server.changed)))
            assert sum(generated) == touched <= k
    print("\nK  rounds  seeds touched  rebuild s (tiny model)")
    for row in rows:
        print(f"{row[0]:<4d} {row[1]:<6d} {row[2]:<14d} {row[3]:.4f}")
    # touched seeds saturate at K: 8 rounds x 40 steps over 16 seeds touch all 16
    assert rows[1][2] == 16 and rows[3][2] > rows[2][2]


# --- Pro -----------------------------------------------------------------------------------------


def test_pro_probabilities_on_a_hand_computed_history():
    cfg = Config(k=4, clip=1000.0)
    _, pid = make_pool(RUN_SEED, 4)
    s = KSeedProServer(cfg, None, RUN_SEED, "examples")
    client = KSeedProClient(cfg, tiny_llama(), RUN_SEED)
    client.sync(s.download(0, None))
    assert np.allclose(client.probs, 0.25)  # all histories [0]: uniform
    s.aggregate(0, [Upload(0, 1, encode_upload(4, 0, pid, np.array([0, 1]),
                                               np.array([2.0, 3000.0]))),
                    Upload(1, 1, encode_upload(4, 0, pid, np.array([0, 2]),
                                               np.array([-4.0, 1.0])))])
    # histories: s0 [0, 2, -4] -> mean |.| = 2; s1 [0, clip(3000) = 1000] -> 500;
    # s2 [0, 1] -> 0.5; s3 [0] -> 0.  min-max: [0.004, 1, 0.001, 0]
    n = np.array([0.004, 1.0, 0.001, 0.0])
    expected = np.exp(n) / np.exp(n).sum()  # [0.2150, 0.5829, 0.2144, 0.2142]-ish
    assert np.allclose(expected.sum(), 1)
    client.sync(s.download(1, None))
    assert np.allclose(client.probs, expected, rtol=1e-5, atol=0)
    assert np.allclose(s.probabilities(), client.probs, rtol=0, atol=0)
    # sampling follows p
    client.probs = np.array([0.7, 0.1, 0.1, 0.1])
    idx = client.sample_indices(4000, seed=3)
    assert abs(idx.count(0) / 4000 - 0.7) < 0.03


def test_pro_trains_and_rebuilds_like_fedkseed():
    cfg = Config(k=32, eta=2e-3, eps=1e-3)
    model0, _, _, server, _ = run_rounds(cfg, 3, pro=True, clients=(0, 1))
    assert server.hist_count.sum() == 32 + 3 * 2 * 3
    fresh = KSeedProClient(cfg, copy.deepcopy(model0), RUN_SEED)
    fresh.sync(server.download(3, None))
    assert max(rel_errors(fresh.model, reference_model(model0, server, cfg))) < 1e-6
    assert np.allclose(fresh.probs, server.probabilities())


# --- learning ------------------------------------------------------------------------------------


class _Quadratic:
    """loss = mean((x w - y)^2) for a 6-weight linear model: ZO must drive it down."""

    def collate(self, examples):
        return torch.stack([e["x"] for e in examples]), torch.stack([e["y"] for e in examples])

    def loss(self, model, batch):
        x, y = batch
        return ((model(x).squeeze(-1) - y) ** 2).mean()


def _quadratic_data(cid):
    g = torch.Generator().manual_seed(cid)
    w_true = torch.arange(1.0, 7.0) / 6
    x = torch.randn(20, 6, generator=g)
    return ClientData([{"x": x[i], "y": x[i] @ w_true} for i in range(20)])


@pytest.mark.parametrize("pro", [False, True])
def test_federated_zo_training_lowers_the_loss(pro):
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 1, bias=False)
    spec = spec_fedkseed_pro if pro else spec_fedkseed
    cfg = Config(k=64, eta=0.05, eps=1e-3)
    client, server = spec.make_client(cfg, model, 1), spec.make_server(cfg, None, 1, "examples")
    task = _Quadratic()
    datas = [_quadratic_data(c) for c in range(3)]
    probe = task.collate([e for d in datas for e in d.examples])

    def loss():
        with torch.no_grad():
            return float(task.loss(model, probe))

    start = loss()
    for r in range(25):
        ups = []
        for c, d in enumerate(datas):
            fc = FitContext(round=r, client_id=c, seed=derive_seed(1, r, c),
                            train=TrainConfig(local_steps=8, batch_size=5), task=task)
            ups.append(Upload(c, len(d), client.fit(server.download(r, None), d, fc)))
        server.aggregate(r, ups)
    client.sync(server.download(25, None))
    assert loss() < 0.2 * start, (start, loss())


def test_registered_with_their_wire_ids():
    from fedtune.methods.registry import get_method

    assert get_method("fedkseed").method_id == 3
    assert get_method("fedkseed_pro").method_id == 4
    assert get_method("fedzo").method_id == 2


# --- through the in-process engine -------------------------------------------------------------


@pytest.mark.parametrize("method", ["fedkseed", "fedkseed_pro"])
def test_in_process_engine_run_and_message_sizes(method, jsonl_data, tmp_path):
    from fedtune.config import load_config
    from fedtune.engines.inprocess import run

    from .conftest import BASE, tiny_overrides

    cfg = load_config(BASE, tiny_overrides(jsonl_data, tmp_path / "runs", **{
        "method.name": method, "method.k": 64, "method.eta": 1e-3,
        "output.save_model": "false"}))
    rows = run(cfg, tmp_path / "run", progress=False)
    steps = cfg.train.local_steps
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["bytes_up_per_client"] == wire.HEADER_SIZE + 8 + 6 * steps
        # at most the dense download: 27 bytes + 4 per seed (+ 2 per seed for Pro)
        per_seed = 6 if method == "fedkseed_pro" else 4
        assert r["bytes_down_per_client"] <= wire.HEADER_SIZE + 13 + per_seed * 64
        assert math.isfinite(r["eval_loss"])
