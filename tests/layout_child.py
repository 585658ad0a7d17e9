"""Child process of test_layout.py: float32 gradients and Hessian-vector products of the
scripts' networks on inputs from the scripts' data path (`common.load_data`), against float64
references on contiguous inputs. Run in a subprocess so that a crash (the heap corruption of the
channels-last oneDNN fault) fails a test instead of ending the test run.

    python tests/layout_child.py THREADS DATASET DATA_ROOT N

prints one JSON object: config name -> {"grad": [error, rounding], "hvp": [error, rounding]},
errors relative (||a - r|| / ||r||): "error" of the data path's float32, "rounding" of float32 on
contiguous inputs (the float32 rounding of the same model).
"""
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

# Every network a committed run trains (plots/*/*_runs.json, plots/README.md): name, width, BN.
CONFIGS = [("vgg11", 0.125, True), ("vgg11", 0.125, False), ("vgg11", 0.0625, True),
           ("vgg11", 0.0625, False), ("resnet18", 0.0625, True), ("resnet18", 0.0625, False),
           ("resnet18", 0.125, True)]


def build(name, width, batch_norm):
    torch.manual_seed(0)
    if name == "mlp":  # small_network.py's MLP
        return common.MLP(3 * 32 * 32, 10, width=width, depth=3, activation="relu")
    return common.build_model(name, num_classes=10, width=width, batch_norm=batch_norm)


def gradient_and_hvp(model, x, y, v):
    """(flat gradient (P,), flat Hessian-vector product (P,)) of the mean cross entropy, in
    train mode (BN with the batch's statistics)."""
    model.train()
    params = list(model.parameters())
    loss = torch.nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])  # (P,)
    hvp = torch.autograd.grad(flat @ v.to(flat.dtype), params)
    return flat.detach().double(), torch.cat([h.reshape(-1) for h in hvp]).double()


def relative(a, b):
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


def main(threads, dataset, root, n):
    torch.set_num_threads(threads)
    data = common.load_data(dataset, root, train_size=n, train_seed=0, test_size=1)
    x, y = data.x_train, data.y_train  # (N, 3, 32, 32) as the scripts get it
    out = {}
    for name, width, bn in CONFIGS + [("mlp", 200, False)]:
        model = build(name, width, bn)
        reference = copy.deepcopy(model).double()
        v = torch.randn(sum(p.numel() for p in model.parameters()),
                        generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        g64, h64 = gradient_and_hvp(reference, x.double().contiguous(), y, v)
        g32c, h32c = gradient_and_hvp(copy.deepcopy(model), x.contiguous(), y, v)
        g32, h32 = gradient_and_hvp(model, x, y, v)
        key = f"{name} width {width:g}" + ("" if name == "mlp" else f" BN {'on' if bn else 'off'}")
        out[key] = {"grad": [relative(g32, g64), relative(g32c, g64)],
                    "hvp": [relative(h32, h64), relative(h32c, h64)]}
    print(json.dumps(out))


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]))
