"""The classic PyTorch MNIST CNN, with checkpoints that survive preemption.

PyTorch's MNIST example trains this network with Adadelta and StepLR; the usual checkpointing
recipe added to it saves ``{"epoch", "model_state_dict", "optimizer_state_dict"}`` every epoch,
loads ``start_epoch`` on restart and then loops over ``range(1, epochs + 1)`` anyway. Here
keras_ckpt.torch.ModelCheckpoint saves the full state (model, Adadelta, StepLR, epoch, step,
RNGs, the best-so-far), keeps the 3 newest checkpoints and the 2 best by validation accuracy,
and a restarted job continues at the epoch ``on_train_begin()`` returns, with the same
shuffling and dropout as an uninterrupted run. Run it as a scheduler would: it writes to
``--output``, and the same command restarted after a preemption continues there; on SIGTERM the
checkpoint is saved at the next batch end and the restarted job goes on from that batch
(``ckpt.start_batch``; each epoch's order comes from its own seed, so it is the same). A later
job of a chain starts from an earlier job's output with ``--resume-from`` (only read, so it may
be mounted read-only) and writes its own ``--output``, which then holds that checkpoint too.

Digits from scikit-learn by default (8x8 images, no download); real MNIST with ``--data DIR``
(``mnist.npz`` or the four IDX files).

    python examples/pytorch_mnist_cnn.py --output runs/torch-demo --epochs 6 --stop-after-epoch 3
    python examples/pytorch_mnist_cnn.py --output runs/torch-demo --epochs 6      # continues at 4
    python examples/pytorch_mnist_cnn.py --output runs/fine-tune --resume-from runs/torch-demo
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _data  # noqa: E402

from keras_ckpt import cli  # noqa: E402
from keras_ckpt.torch import ModelCheckpoint  # noqa: E402


class Net(nn.Module):
    """PyTorch's MNIST example network; the classifier's input follows the image size."""

    def __init__(self, image_size: int = 28, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(64 * ((image_size - 4) // 2) ** 2, 128)
        self.fc2 = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = self.dropout1(F.max_pool2d(x, 2))
        x = self.dropout2(F.relu(self.fc1(torch.flatten(x, 1))))
        return F.log_softmax(self.fc2(x), dim=1)


def datasets(data: str | None):
    (x_train, y_train), (x_test, y_test) = _data.load(data)

    def dataset(x, y):
        x = (torch.from_numpy(x).unsqueeze(1) - 0.1307) / 0.3081
        return torch.utils.data.TensorDataset(x, torch.from_numpy(y))

    return dataset(x_train, y_train), dataset(x_test, y_test), x_train.shape[-1]


def evaluate(model: nn.Module, loader, device: torch.device) -> tuple[float, float]:
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            out = model(x)
            loss += F.nll_loss(out, y, reduction="sum").item()
            correct += (out.argmax(dim=1) == y).sum().item()
    n = len(loader.dataset)
    return loss / n, correct / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="directory with mnist.npz or the MNIST IDX files "
                    "(default: scikit-learn's 8x8 digits)")
    ap.add_argument("--output", default="runs/pytorch_mnist_cnn",
                    help="checkpoint directory; a restarted job continues from it")
    ap.add_argument("--resume-from", help="start from an earlier job's checkpoint directory or "
                    "file, which is only read (ignored once --output has newer checkpoints)")
    ap.add_argument("--epochs", type=int, default=8, help="total epochs, resumed ones included")
    ap.add_argument("--stop-after-epoch", type=int,
                    help="send this process SIGTERM at the end of this epoch (a preemption)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--test-batch-size", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=1.0)
    ap.add_argument("--gamma", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    train_set, test_set, image_size = datasets(args.data)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=args.test_batch_size)
    model = Net(image_size).to(device)
    optimizer = torch.optim.Adadelta(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=args.gamma)

    ckpt = ModelCheckpoint(
        os.path.join(args.output, "ckpt-{epoch:03d}.pt"),
        monitor="val_accuracy", mode="max", max_to_keep=3, keep_best=2,
        # A path: restore from there, unless --output went on past it (a restarted chain job).
        resume=args.resume_from or True,
        model=model, optimizer=optimizer, scheduler=scheduler,
    )
    # On SIGTERM the checkpoint saves at the next batch end, then hands the signal to the
    # handler that was there before on_train_begin: this one, so the loop can stop cleanly.
    preempted: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: preempted.append(signum))
    start_epoch = ckpt.on_train_begin()
    if ckpt.restored_path:
        at = f" batch {ckpt.start_batch + 1}" if ckpt.start_batch else ""
        print(f"resumed from {ckpt.restored_path}: continuing at epoch {start_epoch + 1}{at}",
              flush=True)
    for epoch in range(start_epoch, args.epochs):
        model.train()
        # Each epoch's order from its own seed: a run resumed mid-epoch (a preemption) replays
        # the same order and skips the batches trained before the checkpoint.
        order = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size,
                                             shuffle=True, generator=order)
        for batch, (x, y) in enumerate(loader):
            if batch < ckpt.start_batch:
                continue
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = F.nll_loss(model(x), y)
            loss.backward()
            optimizer.step()
            ckpt.on_train_batch_end(batch, logs={"loss": loss.item()})
            if preempted:
                break
        if preempted:  # mid-epoch: the checkpoint holds the batches trained so far
            print(f"epoch {epoch + 1}/{args.epochs}: SIGTERM after batch {batch + 1}; "
                  f"saved {os.path.basename(ckpt.latest_path)}, stopping", flush=True)
            break
        val_loss, val_accuracy = evaluate(model, test_loader, device)
        scheduler.step()  # before the save, so the checkpoint holds the next epoch's lr
        if epoch + 1 == args.stop_after_epoch:
            signal.raise_signal(signal.SIGTERM)  # as a scheduler would; saved by on_epoch_end
        ckpt.on_epoch_end(epoch, logs={"loss": loss.item(), "val_loss": val_loss,
                                       "val_accuracy": val_accuracy})
        kept = " ".join(r.name for r in ckpt.checkpoints)
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.4f}, val_loss {val_loss:.4f}, "
              f"val_accuracy {val_accuracy:.4f}; saved {os.path.basename(ckpt.latest_path)}, "
              f"kept {kept}" + ("; SIGTERM: stopping" if preempted else ""), flush=True)
        if preempted:
            break
    ckpt.on_train_end()
    if preempted:  # end as the scheduler expects of a preempted job: by the signal
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.raise_signal(signal.SIGTERM)
    best = "-" if ckpt.best is None else f"{ckpt.best:.4f}"
    where = os.path.basename(ckpt.best_path) if ckpt.best_path else "(not kept here)"
    print(f"best val_accuracy {best} in {where}")
    cli.main(["ls", args.output])


if __name__ == "__main__":
    main()
