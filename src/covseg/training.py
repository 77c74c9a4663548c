"""The training loop: seeded, augmented, class-weighted, best checkpoint kept. Readable in one sitting."""
from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai.transforms import Compose, RandAffined, RandFlipd, RandGaussianNoised
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from covseg.evaluation import confusion_matrix, summary_metrics
from covseg.model import Segmenter, build_model, pick_device, predict_logits, resize, save_checkpoint
from covseg.names import KAGGLE_F1, SHORT
from covseg.params import ModelParams, Train


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def augmentation(seed: int) -> Compose:
    """MONAI random flip, small affine and noise on a {'image', 'label'} pair, labels by nearest."""
    keys = ["image", "label"]
    aug = Compose([
        RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandAffined(keys, prob=0.7, rotate_range=0.15, scale_range=0.1, translate_range=(16, 16),
                    mode=("bilinear", "nearest"), padding_mode="border"),
        RandGaussianNoised(["image"], prob=0.3, std=0.01),
    ])
    aug.set_random_state(seed=seed)
    return aug


class SliceDataset(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Compose | None = None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        item = {"image": self.images[i], "label": self.labels[i]}
        if self.transform is not None:
            item = self.transform(item)
        return torch.as_tensor(item["image"]).float(), torch.as_tensor(item["label"])[0].long()


def make_loss(t: Train, device: torch.device) -> Callable:
    """train.loss: class-weighted cross-entropy (the seed's) or MONAI's Dice + cross-entropy."""
    weight = torch.tensor(t.class_weights, dtype=torch.float32, device=device)
    if t.loss == "dice_ce":
        from monai.losses import DiceCELoss

        dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, weight=weight)
        return lambda logits, target: dice_ce(logits, target[:, None])
    return torch.nn.CrossEntropyLoss(weight=weight)


def train(t: Train, m: ModelParams, seed: int, train_images: np.ndarray, train_labels: np.ndarray,
          val_images: np.ndarray, val_labels: np.ndarray, checkpoint: str | Path,
          on_epoch: Callable[[dict], None] | None = None) -> pd.DataFrame:
    """Train the U-Net; keep the checkpoint of the best validation kaggle_f1; return the history."""
    set_seed(seed)
    device = pick_device(t.device)
    scale = t.scale

    # Downscale once (images bilinear, labels nearest), keep (N, 1, h, w) tensors for MONAI.
    x = resize(torch.from_numpy(train_images)[:, None].float(), scale, "bilinear")
    y = resize(torch.from_numpy(train_labels)[:, None].float(), scale, "nearest").to(torch.uint8)
    dataset = SliceDataset(x, y, augmentation(seed) if t.augment else None)
    loader = DataLoader(dataset, batch_size=t.batch_size, shuffle=True, drop_last=len(dataset) > t.batch_size,
                        generator=torch.Generator().manual_seed(seed))

    net = build_model(m).to(device)           # trained on downscaled slices
    model = Segmenter(net, scale)             # evaluated and saved at full size
    optimizer = torch.optim.Adam(net.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t.epochs)
    loss_fn = make_loss(t, device)
    val_target = torch.from_numpy(val_labels).long()

    history, best = [], -1.0
    for epoch in range(1, t.epochs + 1):
        start = time.perf_counter()
        net.train()
        losses = []
        bar = tqdm(loader, desc=f"epoch {epoch}/{t.epochs}", leave=False, dynamic_ncols=True, disable=None)
        for xb, yb in bar:
            loss = loss_fn(net(xb.to(device)), yb.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses):.4f}")
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()

        logits = torch.from_numpy(predict_logits(model, val_images, t.batch_size, device))
        val_loss = float(loss_fn(logits.to(device), val_target.to(device)))
        metrics = summary_metrics(confusion_matrix(val_labels, logits.argmax(1).numpy()))
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val_loss, "lr": lr,
               **{f"val_f1_{c}": metrics[f"f1_{c}"] for c in SHORT},
               f"val_{KAGGLE_F1}": metrics[KAGGLE_F1], "seconds": time.perf_counter() - start}
        if metrics[KAGGLE_F1] > best:
            best = metrics[KAGGLE_F1]
            save_checkpoint(model, checkpoint, epoch=epoch, val_kaggle_f1=best)
        history.append(row)
        tqdm.write(f"epoch {epoch:3d}  train_loss {row['train_loss']:.4f}  val_loss {val_loss:.4f}  "
                   f"val_kaggle_f1 {metrics[KAGGLE_F1]:.4f}  ({row['seconds']:.1f}s)")
        if on_epoch is not None:
            on_epoch(row)
    return pd.DataFrame(history)
