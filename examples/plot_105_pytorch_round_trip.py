"""
A PyTorch round trip
====================

A PyTorch model, one of its convolutions pruned with :mod:`torch.nn.utils.prune` and a
batch norm in eval mode, goes to sparseconv with :func:`sparseconv.from_torch`: the pruning
mask becomes the layer's ``weight_mask`` (pruned taps have no entries in its matrix), the
batch norm a per-channel affine layer. Outputs and gradients are compared with PyTorch's.
Then :func:`sparseconv.to_torch` turns the sparseconv network back into a ``torch.nn.Module``
whose convolutions run the sparse operators through autograd, and a few steps of a torch
optimiser train it exactly as they train the torch original.

PyTorch is an optional extra (its CPU build is enough); without it this example only says so.
"""

import matplotlib.pyplot as plt
import numpy as np

import sparseconv as sc

try:
    import torch
    from torch.nn.utils import prune
except ImportError:
    torch = None
    print("This example needs PyTorch (an optional extra: install its CPU build); skipped.")

# %%
# The torch model, in float64 so that agreement means machine precision. 60% of the first
# convolution's weights are pruned by magnitude; the batch norm gets running statistics and
# is frozen (eval mode, no trainable parameters), as in fine-tuning. A batch norm right after
# a convolution would instead be folded into it.
if torch is not None:
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(8), nn.MaxPool2d(2),
                          nn.Conv2d(8, 8, 3), nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(32, 4)).double()
    prune.l1_unstructured(model[0], "weight", amount=0.6)
    with torch.no_grad():
        model[2].running_mean.uniform_(-0.5, 0.5)
        model[2].running_var.uniform_(0.5, 2.0)
    model[2].requires_grad_(False)
    model.eval()

    net = sc.from_torch(model, (1, 12, 12))
    print(net)
    conv = net[0]
    print(f"first convolution: {int(conv.weight_mask.sum())} of {conv.weight_mask.size} weights kept, "
          f"{conv.op.nnz:,} stored entries (the unpruned layer's matrix: "
          f"{sc.ConvOperator(np.ones((8, 1, 3, 3)), input_shape=(1, 12, 12), padding=1).nnz:,})")

# %%
# Same batch, same output gradient, through both. sparseconv's layers compute the input
# gradient (``W.T @ dy``) and the kernel gradients over the tying map; PyTorch's autograd
# computes its own. They agree, and the kernel gradient is zero at the pruned taps, as
# ``weight_orig.grad`` is in torch.
if torch is not None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 1, 12, 12))
    xt = torch.tensor(x, requires_grad=True)
    y = model(xt)
    dy = rng.standard_normal(tuple(y.shape))
    y.backward(torch.tensor(dy))

    sc.testing.assert_allclose(net.forward(x), y.detach().numpy())
    sc.testing.assert_allclose(net.backward(dy), xt.grad.numpy())
    theirs = {name.replace("_orig", ""): p.grad.numpy() for name, p in model.named_parameters() if p.requires_grad}
    for name, p in net.named_parameters():
        if name in theirs:
            sc.testing.assert_allclose(p.grad, theirs[name], err_msg=name)
    pruned = model[0].weight_mask.numpy() == 0
    assert np.all(net[0].params["weight"].grad[pruned] == 0)
    print("outputs, input gradient and kernel gradients agree; pruned taps have zero gradient:",
          sorted(theirs))

# %%
# Back to PyTorch: :func:`sparseconv.to_torch` copies the network into a ``torch.nn.Module``
# with the same parameter names (the batch norm's ``scale`` and ``shift`` stay frozen). Ten
# SGD steps with momentum on the same batches (random images and labels) train it as they train the torch original: the
# losses agree step by step, the weights stay equal to torch's effective
# ``weight_orig * weight_mask``, and the pruned ones stay exactly zero.
if torch is not None:
    sparse_model = sc.to_torch(net)
    sparse_model[2].requires_grad_(False)
    opt_torch = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    opt_sparse = torch.optim.SGD([p for p in sparse_model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    losses, gaps = {"torch": [], "sparseconv via to_torch": []}, []
    for step in range(10):
        xb = torch.tensor(rng.standard_normal((16, 1, 12, 12)))
        labels = torch.tensor(rng.integers(0, 4, 16))
        for (name, m), opt in zip([("torch", model), ("sparseconv via to_torch", sparse_model)],
                                  [opt_torch, opt_sparse]):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(m(xb), labels)
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
        effective = (model[0].weight_orig * model[0].weight_mask).detach().numpy()
        ours = sparse_model[0].weight.detach().numpy()
        sc.testing.assert_allclose(ours, effective)
        assert np.all(ours[pruned] == 0)
        gaps.append(max(float(np.abs(ours - effective).max()),
                        *(float((mine.weight - theirs.weight).detach().abs().max())
                          for mine, theirs in [(sparse_model[4], model[4]), (sparse_model[8], model[8])])))
    sc.testing.assert_allclose(np.array(losses["sparseconv via to_torch"]), np.array(losses["torch"]))
    print("losses:", np.round(losses["torch"], 4))
    print(f"largest weight difference over the 10 steps: {max(gaps):.2e}")

# %%
# The two training runs, step by step: the losses coincide and the weights differ by rounding.
if torch is not None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4), layout="constrained")
    steps = np.arange(1, 11)
    ax1.plot(steps, losses["torch"], "o", markersize=8, fillstyle="none", label="torch original")
    ax1.plot(steps, losses["sparseconv via to_torch"], ".-", label="sparseconv via to_torch")
    ax1.set(xlabel="SGD step", ylabel="cross-entropy loss", title="same losses")
    ax1.legend()
    ax2.semilogy(steps, np.maximum(gaps, 1e-18), "o-", label="sparseconv vs torch")
    ax2.axhline(np.finfo(np.float64).eps, color="gray", linestyle=":", label="float64 machine epsilon")
    ax2.legend()
    ax2.set(xlabel="SGD step", ylabel="max |weight difference|", title="weights equal to rounding (float64)")
    plt.show()
