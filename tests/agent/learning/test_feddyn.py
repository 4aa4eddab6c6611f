"""FedDyn (Acar et al., ICLR 2021) as REFERENCES.md writes it: the server's h and θ, the
device's gradient state, and the point of it all: on a heterogeneous quadratic problem it
reaches the global optimum where FedAvg with uneven local work settles elsewhere."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from agent.learning.aggregation import Status
from agent.learning.fedavg import SyncFedAvg
from agent.learning.fedbuff import FedBuffAggregator
from agent.learning.feddyn import FedDynServer, client_state_update, initial_client_state
from agent.protocol.codec import decode_tensors, encode_tensors

Arr = np.ndarray[Any, Any]


def test_server_round_matches_the_formulas_with_partial_participation() -> None:
    """m = 5 devices, P_t = 2 of them, α = 0.5, two rounds written out."""
    alpha, m = 0.5, 5
    theta0 = np.array([1.0, -2.0, 0.5])
    server = FedDynServer(alpha=alpha, num_devices=m)
    t1 = [np.array([1.5, -1.0, 0.0]), np.array([0.5, -2.5, 1.5])]
    got1 = server.aggregate({"x": theta0}, [{"x": t} for t in t1])
    h1 = 0.0 - alpha * (1 / m) * ((t1[0] - theta0) + (t1[1] - theta0))
    theta1 = (t1[0] + t1[1]) / 2 - h1 / alpha
    np.testing.assert_allclose(server.h["x"], h1, rtol=1e-15)
    np.testing.assert_allclose(got1["x"], theta1, rtol=1e-15)
    t2 = [np.array([2.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, 3.0])]
    got2 = server.aggregate(got1, [{"x": t} for t in t2])
    h2 = h1 - alpha * (1 / m) * sum(t - theta1 for t in t2)
    np.testing.assert_allclose(server.h["x"], h2, rtol=1e-14)
    np.testing.assert_allclose(got2["x"], np.mean(t2, axis=0) - h2 / alpha, rtol=1e-14)


def test_step_on_mean_delta_equals_aggregate_on_models() -> None:
    rng = np.random.default_rng(3)
    theta = {"w": rng.normal(size=(2, 3)), "b": rng.normal(size=3)}
    models = [{k: v + rng.normal(size=v.shape) for k, v in theta.items()} for _ in range(3)]
    by_models = FedDynServer(alpha=0.1, num_devices=10).aggregate(theta, models)
    mean = {k: np.mean([mo[k] - theta[k] for mo in models], axis=0) for k in theta}
    by_delta = FedDynServer(alpha=0.1, num_devices=10).step(theta, mean, participants=3)
    for key in theta:
        np.testing.assert_allclose(by_delta[key], by_models[key], rtol=1e-13)


def test_full_participation_is_the_default() -> None:
    theta = {"x": np.zeros(2)}
    mean = {"x": np.array([1.0, 2.0])}
    a = FedDynServer(alpha=0.2, num_devices=4).step(theta, mean)
    b = FedDynServer(alpha=0.2, num_devices=4).step(theta, mean, participants=4)
    np.testing.assert_array_equal(a["x"], b["x"])
    # h = −α·Δ̄, θ = Δ̄ − h/α = 2Δ̄ when everyone takes part.
    np.testing.assert_allclose(a["x"], [2.0, 4.0])


def test_client_state_update_matches_the_formula_and_reads_only() -> None:
    rng = np.random.default_rng(0)
    prev = {"x": rng.normal(size=4).astype(np.float32)}
    local = {"x": rng.normal(size=4).astype(np.float32)}
    glob = {"x": rng.normal(size=4).astype(np.float32)}
    for arrays in (prev, local, glob):
        arrays["x"].flags.writeable = False
    new = client_state_update(prev, local, glob, alpha=0.3)
    expected = prev["x"].astype(np.float64) - 0.3 * (local["x"] - glob["x"].astype(np.float64))
    np.testing.assert_allclose(new["x"], expected, rtol=1e-6)
    assert new["x"].dtype == np.float32
    assert new["x"].flags.writeable
    assert initial_client_state(glob)["x"].tolist() == [0.0] * 4


def test_state_survives_the_codec_and_resumes_exactly() -> None:
    rng = np.random.default_rng(1)
    theta = {"x": rng.normal(size=5).astype(np.float32)}
    rounds = [{"x": (rng.normal(size=5) * 0.1).astype(np.float32)} for _ in range(4)]
    straight = FedDynServer(alpha=0.3, num_devices=6)
    w = theta
    for d in rounds:
        w = straight.step(w, d, participants=2)
    first = FedDynServer(alpha=0.3, num_devices=6)
    v = theta
    for d in rounds[:2]:
        v = first.step(v, d, participants=2)
    resumed = FedDynServer(alpha=0.3, num_devices=6)
    resumed.load_state_dict(decode_tensors(encode_tensors(first.state_dict())))
    for d in rounds[2:]:
        v = resumed.step(v, d, participants=2)
    np.testing.assert_array_equal(v["x"], w["x"])


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="alpha: expected a finite value"):
        FedDynServer(alpha=0.0, num_devices=3)
    with pytest.raises(ValueError, match="num_devices: expected an integer ≥ 1"):
        FedDynServer(num_devices=0)
    with pytest.raises(ValueError, match=r"participants: expected 1…3, got 4"):
        FedDynServer(num_devices=3).step({"x": np.zeros(1)}, {"x": np.zeros(1)}, participants=4)
    with pytest.raises(ValueError, match="at least one client model"):
        FedDynServer(num_devices=3).aggregate({"x": np.zeros(1)}, [])
    with pytest.raises(ValueError, match="FedDynServer needs synchronous rounds"):
        FedBuffAggregator({"x": np.zeros(1, np.float32)}, optimizer=FedDynServer(num_devices=3))
    with pytest.raises(ValueError, match="averages deltas uniformly"):
        SyncFedAvg(
            {"x": np.zeros(1, np.float32)},
            optimizer=FedDynServer(num_devices=3),
            weighting="samples",
        )


# -- a heterogeneous quadratic federation ---------------------------------------------------

RNG = np.random.default_rng(0)
DIM, DEVICES = 4, 5
CURVATURES = []
CENTRES = []
for _ in range(DEVICES):
    q = RNG.normal(size=(DIM, DIM))
    CURVATURES.append(q @ q.T / DIM + 0.5 * np.eye(DIM))
    CENTRES.append(RNG.normal(size=DIM) * 3)
OPTIMUM = np.linalg.solve(
    sum(CURVATURES), sum(a @ c for a, c in zip(CURVATURES, CENTRES, strict=True))
)
LOCAL_STEPS = [1, 3, 10, 30, 60]  # very uneven local work
LR = 0.05


def grad(k: int, theta: Arr) -> Arr:
    """∇L_k for L_k(θ) = ½(θ − c_k)ᵀA_k(θ − c_k)."""
    result: Arr = CURVATURES[k] @ (theta - CENTRES[k])
    return result


def test_feddyn_reaches_the_global_optimum_where_fedavg_drifts() -> None:
    alpha = 1.0
    rounds = 300
    # FedAvg: each device runs its own number of local GD steps, the server averages.
    theta = np.zeros(DIM)
    for _ in range(rounds):
        models = []
        for k in range(DEVICES):
            y = theta.copy()
            for _ in range(LOCAL_STEPS[k]):
                y -= LR * grad(k, y)
            models.append(y)
        theta = np.mean(models, axis=0)
    fedavg_error = float(np.linalg.norm(theta - OPTIMUM))

    # FedDyn through Ember's synchronous rounds: deltas in, FedDynServer applies them; devices
    # minimise L_k(θ) − ⟨g_k, θ⟩ + α/2‖θ − θ^{t−1}‖² with the same uneven local work, 3 of the
    # 5 taking part each round.
    rng = np.random.default_rng(7)
    sync = SyncFedAvg(
        {"x": np.zeros(DIM)}, optimizer=FedDynServer(alpha=alpha, num_devices=DEVICES)
    )
    states = [initial_client_state(sync.weights) for _ in range(DEVICES)]
    for r in range(2 * rounds):
        chosen = sorted(int(k) for k in rng.choice(DEVICES, 3, replace=False))
        sync.start_round([f"d{k}" for k in chosen])
        start = sync.weights
        for k in chosen:
            y = start["x"].copy()
            g = states[k]["x"]
            for _ in range(LOCAL_STEPS[k]):
                y -= LR * (grad(k, y) - g + alpha * (y - start["x"]))
            states[k] = client_state_update(states[k], {"x": y}, start, alpha=alpha)
            out = sync.offer(f"r{r}d{k}", r, {"x": y - start["x"]}, 10 * (k + 1), client=f"d{k}")
            assert out.status is Status.APPLIED
    feddyn_error = float(np.linalg.norm(sync.weights["x"] - OPTIMUM))
    assert fedavg_error > 1.0
    assert feddyn_error < 1e-6
