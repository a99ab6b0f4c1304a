"""A federation whose parties sit on different devices rebuilds one model: a client on the GPU
and parties on the CPU end every round with bit-identical weights (shared randomness v3 gives
both the same directions; the fused kernels round the same way). Needs a CUDA GPU; the same
kernels are compared with the CPU ones through Triton's interpreter in test_randomness."""

from __future__ import annotations

import pytest
import torch

from fedtune.methods.base import Upload, trainable_parameters, trainable_state
from fedtune.methods.registry import get_method
from fedtune.models import place
from tests.test_ferret import _ctx, _data, _tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


@pytest.mark.parametrize("method,opts", [
    ("ferret", {"k": 64}), ("ferret", {"k": 64, "distribution": "rademacher"}),
    ("fedkseed", {"k": 16}), ("fedkseed_pro", {"k": 16, "distribution": "rademacher"})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_client_and_cpu_parties_rebuild_the_same_model(method, opts, dtype):
    spec = get_method(method)
    cfg = spec.config_cls(**opts)
    gpu_model = place(_tiny(), dtype, torch.device("cuda"))
    cpu_model = place(_tiny(), dtype, torch.device("cpu"))
    server = spec.make_server(cfg, trainable_state(cpu_model), 0, "equal")
    gpu, cpu = spec.make_client(cfg, gpu_model, 0), spec.make_client(cfg, cpu_model, 0)
    for r in range(3):
        ups = []
        for cid, party in ((0, gpu), (1, cpu)):  # one client trains on each device
            down = server.download(r, None if r == 0 else r - 1)
            ups.append(Upload(cid, 6, party.fit(down, _data(cid), _ctx(r, cid))))
        server.aggregate(r, ups)
        if method == "ferret":  # a Ferret client is back at w_r after fit: sync and compare
            for party in (gpu, cpu):
                party.sync(server.download(r + 1, r))
            a, b = trainable_parameters(gpu_model), trainable_parameters(cpu_model)
            assert all(torch.equal(_bits(a[n]), _bits(b[n])) for n in a), f"round {r}"
            assert all(torch.equal(_bits(server.weights[n]), _bits(b[n])) for n in b)
    # FedKSeed's clients keep their own local steps until the next sync (no snapshot), so
    # compare fresh parties that rebuild w_3 from w0 and the seed log, one per device
    fresh = []
    for device in ("cuda", "cpu"):
        model = place(_tiny(), dtype, torch.device(device))
        spec.make_client(cfg, model, 0).sync(server.download(3, None))
        fresh.append(trainable_parameters(model))
    assert all(torch.equal(_bits(fresh[0][n]), _bits(fresh[1][n])) for n in fresh[0])
