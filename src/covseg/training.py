"""The training loop: seeded, augmented, class-weighted, a fixed schedule or the best epoch kept.
Readable in one sitting."""
from __future__ import annotations

import hashlib
import json
import math
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai.data import Dataset, list_data_collate
from monai.transforms import (
    Compose,
    Rand2DElasticd,
    RandAdjustContrastd,
    RandAffined,
    RandCropByLabelClassesd,
    RandFlipd,
    RandGaussianNoised,
    Randomizable,
    RandScaleIntensityd,
    RandShiftIntensityd,
)
from monai.utils import convert_to_tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from covseg.atomic import atomic_output
from covseg.errors import CovsegError, ParamsError
from covseg.evaluation import confusion_matrix, dice_metrics, summary_metrics
from covseg.model import (
    Ensemble,
    Segmenter,
    bf16_autocast,
    build_model,
    load_checkpoint,
    members,
    pick_device,
    predict_logits,
    resize,
    save_checkpoint,
    segmenter,
)
from covseg.names import IGNORE_LABEL, KAGGLE_F1, NUM_CLASSES, SHORT
from covseg.params import ModelParams, Train
from covseg.preprocessing import member_subsets, stratified_subset


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def augmentation(t: Train, size: int, seed: int) -> Compose | None:
    """MONAI transforms of a {'image', 'label'} pair (labels by nearest): random crops of `t.crop`
    pixels centred on a pixel of each class in proportion to `t.crop_ratios` (so findings are sampled
    more often than their share of the slice), then, with
    `t.augment`, flips, rotation / scale / shift, elastic deformation, gamma, intensity and noise."""
    keys = ["image", "label"]
    steps = []
    if t.crop and t.crop < size:
        steps.append(RandCropByLabelClassesd(keys, label_key="label", spatial_size=(t.crop, t.crop),
                                             ratios=list(t.crop_ratios), num_classes=NUM_CLASSES,
                                             num_samples=t.crops_per_slice, warn=False))
    if t.augment:
        steps += [
            RandFlipd(keys, prob=0.5, spatial_axis=1),
            RandAffined(keys, prob=0.7, rotate_range=t.aug_rotate, scale_range=t.aug_scale,
                        translate_range=(16, 16), mode=("bilinear", "nearest"),
                        padding_mode="border"),
        ]
        if t.aug_elastic:  # control points a quarter of the side apart, moved by N(0, 1) x up to this share of it
            side = min(t.crop or size, size)
            steps.append(Rand2DElasticd(keys, spacing=(side // 4, side // 4),
                                        magnitude_range=(t.aug_elastic * side / 2, t.aug_elastic * side), prob=0.5,
                                        mode=("bilinear", "nearest"), padding_mode="border"))
        if t.aug_gamma:
            steps.append(RandAdjustContrastd(["image"], prob=0.3, gamma=(1 - t.aug_gamma, 1 + t.aug_gamma)))
        if t.aug_intensity:
            steps += [RandScaleIntensityd(["image"], factors=t.aug_intensity, prob=0.3),
                      RandShiftIntensityd(["image"], offsets=t.aug_intensity, prob=0.3)]
        steps.append(RandGaussianNoised(["image"], prob=0.3, std=0.01))
    if not steps:
        return None
    aug = Compose(steps)
    aug.set_random_state(seed=seed)
    return aug


def make_loss(t: Train, device: torch.device) -> Callable:
    """train.loss: class-weighted cross-entropy (the seed's) or Dice + cross-entropy (MONAI's DiceLoss,
    as in its DiceCELoss). Pixels labelled IGNORE_LABEL (unsure self-training labels) add nothing."""
    weight = torch.tensor(t.class_weights, dtype=torch.float32, device=device)
    ce = torch.nn.CrossEntropyLoss(weight=weight, ignore_index=IGNORE_LABEL)
    if t.loss == "dice_ce":
        from monai.losses import DiceLoss

        dice = DiceLoss(to_onehot_y=True, softmax=True, weight=weight, ignore_index=IGNORE_LABEL)
        return lambda logits, target: dice(logits, target[:, None]) + ce(logits, target)
    return ce


def make_optimizer(t: Train, net: torch.nn.Module):
    """Adam or AdamW; the learning rate rises linearly for `t.warmup_epochs` (all of a run that short),
    then follows a cosine to 0; self-training's `t.pseudo_epochs` start a second cosine from `t.lr`."""
    opt_class = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_class(net.parameters(), lr=t.lr, weight_decay=t.weight_decay)

    def factor(epoch: int) -> float:  # epoch counts from 0
        if epoch >= t.epochs and t.pseudo_epochs:
            return 0.5 * (1 + math.cos(math.pi * (epoch - t.epochs) / t.pseudo_epochs))
        if epoch < t.warmup_epochs:
            return (epoch + 1) / (t.warmup_epochs + 1)
        return 0.5 * (1 + math.cos(math.pi * (epoch - t.warmup_epochs) / max(1, t.epochs - t.warmup_epochs)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def warm_start(net: torch.nn.Module, spec: str, device: torch.device, member: int = 0) -> None:
    """Start from the weights of a checkpoint or a registry model (`models:/covseg-unet@champion`); an
    ensemble's member k starts from the source's member k (of an ensemble of fewer: k modulo their number)."""
    from covseg.model import load_model

    source, _ = load_model(spec, device)
    nets = members(source.unet)
    try:
        net.load_state_dict(nets[member % len(nets)].state_dict())
    except RuntimeError as exc:
        raise CovsegError(f"train.init = {spec!r}: its network does not match params.yaml:model "
                          f"({str(exc).splitlines()[0]})") from None


def _random_states(transform: Compose | None) -> list[np.random.RandomState]:
    """Every random generator of the augmentation (the Compose's, each transform's and those inside
    them, such as a cropper's), in a fixed order."""
    found, todo, seen = [], [transform] if transform is not None else [], set()
    while todo:
        obj = todo.pop(0)
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        for value in vars(obj).values():
            if isinstance(value, np.random.RandomState) and id(value) not in seen:
                seen.add(id(value))
                found.append(value)
            elif isinstance(value, Randomizable | Compose):
                todo.append(value)
            elif isinstance(value, list | tuple):
                todo += [v for v in value if isinstance(v, Randomizable | Compose)]
    return found


def code_version() -> str:
    """A hash of covseg's source: a training state saved by other code is not resumed (its earlier
    epochs would be another code's)."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def uses_bf16(t: Train) -> bool:
    """Whether training runs in bfloat16 autocast here (train.amp on CUDA or a CPU with native bfloat16)."""
    return t.amp and bf16_autocast(pick_device(t.device))


def recipe_key(t: Train, m: ModelParams, seed: int, *arrays: np.ndarray) -> str:
    """What a training's result depends on: params (not the device), the precision, the code and the data."""
    h = hashlib.sha256(json.dumps([t.model_dump(exclude={"device", "amp"}), m.model_dump(), seed,
                                   code_version(), uses_bf16(t)]).encode())
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


class TrainingState:
    """A training's state after each epoch (weights, optimizer, schedule, every random generator, the
    history, the best weights so far, the self-training labels), written atomically to `path`, so a
    killed run resumes exactly where it stopped. Tensors and plain lists only: loaded with weights_only,
    nothing is unpickled."""

    def __init__(self, path: str | Path | None, key: str):
        self.path, self.key = (Path(path) if path else None), key

    def save(self, epoch: int, finished: bool, net, optimizer, scheduler, generator, transform, history, best,
             best_net, pseudo) -> None:
        if self.path is None:
            return
        rngs = [[name, keys.tolist(), pos, gauss, cached]
                for name, keys, pos, gauss, cached in (r.get_state() for r in _random_states(transform))]
        with atomic_output(self.path) as tmp:
            torch.save({"recipe": self.key, "epoch": epoch, "finished": finished, "net": net.state_dict(),
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "torch_rng": torch.get_rng_state(), "loader_rng": generator.get_state(), "numpy_rngs": rngs,
                        "history": json.dumps(history), "best": best, "best_net": best_net, "pseudo": pseudo}, tmp)

    def load(self, finished: bool = False) -> dict | None:
        """The state of an unfinished run of the same recipe (also of a finished one, with `finished`),
        or None (start afresh)."""
        if self.path is None or not self.path.is_file():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        return state if state.get("recipe") == self.key and (finished or not state.get("finished")) else None

    @staticmethod
    def restore(state: dict, net, optimizer, scheduler, generator, transform) -> None:
        net.load_state_dict(state["net"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        generator.set_state(state["loader_rng"])
        for rng, (name, keys, pos, gauss, cached) in zip(_random_states(transform), state["numpy_rngs"], strict=True):
            rng.set_state((name, np.asarray(keys, dtype=np.uint32), pos, gauss, cached))


def pseudo_labels(model: Segmenter, images: np.ndarray, confidence: float, batch_size: int,
                  device: torch.device) -> torch.Tensor:
    """Self-training labels of unlabelled `images` (N, H, W): the model's own, post-processed as it
    predicts, and IGNORE_LABEL where its most likely class has a softmax probability below `confidence`."""
    logits = torch.from_numpy(predict_logits(model, images, batch_size, device))
    labels = model.postprocess(logits)
    labels[logits.softmax(1).amax(1) < confidence] = IGNORE_LABEL
    return labels


def unlabelled_images(t: Train, val_images: np.ndarray, test_images: np.ndarray) -> np.ndarray | None:
    """What self-training labels: the test images, with `t.pseudo_images` test_and_val the validation
    (held-out) images before them; None when it is off."""
    if not t.pseudo_epochs:
        return None
    return np.concatenate([val_images, test_images]) if t.pseudo_images == "test_and_val" else test_images


def _loader(x: torch.Tensor, y: torch.Tensor, transform: Compose | None, batch_size: int,
            generator: torch.Generator) -> DataLoader:
    # torch's DataLoader: MONAI's would re-seed the transforms from the generator
    dataset = Dataset([{"image": xi, "label": yi} for xi, yi in zip(x, y)], transform)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=len(dataset) > batch_size,
                      generator=generator, collate_fn=list_data_collate)


def train(t: Train, m: ModelParams, seed: int, train_images: np.ndarray, train_labels: np.ndarray,
          val_images: np.ndarray, val_labels: np.ndarray, checkpoint: str | Path,
          on_epoch: Callable[[dict], None] | None = None, state: str | Path | None = None,
          unlabelled: np.ndarray | None = None) -> pd.DataFrame:
    """Train the U-Net and write `checkpoint`: the last epoch's model (`t.select: last`, a schedule
    fixed in advance, e.g. by cross-validation) or the one of the best validation kaggle_f1
    (`best`). Validation is scored every `t.val_every` epochs and at the last; returns the history.
    Self-training (`t.pseudo_epochs`): after `t.epochs`, the model as it is then (with `best` too)
    labels the `unlabelled` images (pseudo_labels) and trains on them and the labelled slices for
    `t.pseudo_epochs` more epochs.
    With `t.members` N > 1, N networks are trained one after another, member k from seed `seed + k`
    (member 0 is the one-network training), and the checkpoint is their Ensemble; the history holds
    their schedules one after another (column `member`, epochs counted on).
    With `state`, the run is saved after every epoch and an unfinished run of the same params and
    data resumes from it (its earlier epochs are passed to `on_epoch` again), to the same result;
    an ensemble's members that had finished are not trained again (unless `t.init` warm-starts them).
    With `t.data_fraction` below 1, only that share of the training slices is trained on
    (`stratified_subset`): a learning curve, how much more labelled slices would add.
    With `t.member_folds` K, member k leaves out fold k of those slices dealt into K folds (`member_subsets`):
    a fold ensemble, whose members see different slices."""
    if t.data_fraction < 1:
        keep = stratified_subset(train_labels, t.data_fraction)
        train_images, train_labels = train_images[keep], train_labels[keep]
    if t.pseudo_epochs and (unlabelled is None or not len(unlabelled)):
        raise ParamsError("train.pseudo_epochs: self-training needs unlabelled images (validation or test "
                          "slices), and none were given; set it to 0")
    subsets = member_subsets(train_labels, t.members, t.member_folds, seed)
    args = [(t, m, train_images[s], train_labels[s], val_images, val_labels) for s in subsets]
    if t.members == 1:
        return pd.DataFrame(_train_member(*args[0], seed, checkpoint, on_epoch, state, unlabelled))
    last, history, nets, device = t.epochs + t.pseudo_epochs, [], [], pick_device(t.device)
    with tempfile.TemporaryDirectory(prefix="covseg-members-") as tmp:
        for k in range(t.members):
            def log(row: dict, k: int = k) -> None:
                history.append({**row, "epoch": row["epoch"] + k * last, "member": k})
                if on_epoch is not None:
                    on_epoch(history[-1])

            member_state = None if state is None else Path(state).with_name(
                f"{Path(state).stem}.member{k}{Path(state).suffix}")
            _train_member(*args[k], seed + k, Path(tmp) / f"member{k}.pt", log, member_state, unlabelled,
                          member=k)
            nets.append(load_checkpoint(Path(tmp) / f"member{k}.pt", device)[0].unet)
    model = segmenter(Ensemble(nets), t.scale, m)
    preds = model.postprocess(torch.from_numpy(predict_logits(model, val_images, t.batch_size, device))).numpy()
    save_checkpoint(model, checkpoint, epoch=last,
                    val_kaggle_f1=summary_metrics(confusion_matrix(val_labels, preds))[KAGGLE_F1])
    return pd.DataFrame(history)


def _train_member(t: Train, m: ModelParams, train_images: np.ndarray, train_labels: np.ndarray,
                  val_images: np.ndarray, val_labels: np.ndarray, seed: int, checkpoint: str | Path,
                  on_epoch: Callable[[dict], None] | None, state: str | Path | None,
                  unlabelled: np.ndarray | None, member: int | None = None) -> list[dict]:
    """One network's training (train's loop); returns its history. As an ensemble's `member`, it warm-starts
    from that member of `t.init`, and a finished run of the same recipe saved in `state` is not trained
    again: its model and history are used (not with a warm start, whose source may have changed since)."""
    set_seed(seed)
    device, autocast = pick_device(t.device), uses_bf16(t)

    # Downscale once (images bilinear, labels nearest), keep (N, 1, h, w) tensors for MONAI.
    x = resize(torch.from_numpy(train_images)[:, None].float(), t.scale, "bilinear")
    y = resize(torch.from_numpy(train_labels)[:, None].float(), t.scale, "nearest").to(torch.uint8)
    transform = augmentation(t, min(x.shape[-2:]), seed)
    generator = torch.Generator().manual_seed(seed)
    loader = _loader(x, y, transform, t.batch_size, generator)

    net = build_model(m).to(device)
    if t.init:
        warm_start(net, t.init, device, member or 0)
    model = segmenter(net, t.scale, m)  # evaluated and saved at full size
    optimizer, scheduler = make_optimizer(t, net)
    loss_fn = make_loss(t, device)
    val_target = torch.from_numpy(val_labels).long()

    data = (train_images, train_labels, val_images, val_labels, *((unlabelled,) if t.pseudo_epochs else ()))
    saved = TrainingState(state, recipe_key(t, m, seed, *data))
    history, best, best_net, pseudo, first = [], -1.0, None, None, 1
    last = t.epochs + t.pseudo_epochs
    resumed = saved.load(finished=member is not None and not t.init)
    if resumed is not None:
        saved.restore(resumed, net, optimizer, scheduler, generator, transform)
        history, best, best_net = json.loads(resumed["history"]), resumed["best"], resumed["best_net"]
        pseudo, first = resumed["pseudo"], resumed["epoch"] + 1
        if best_net is not None or first > last:  # the checkpoint as the killed (or finished) run had written it
            scored = [r for r in history if "val_loss" in r]
            kept = max(scored, key=lambda r: r[f"val_{KAGGLE_F1}"]) if best_net is not None else scored[-1]
            keep_net = build_model(m)
            keep_net.load_state_dict(best_net if best_net is not None else resumed["net"])
            save_checkpoint(segmenter(keep_net, t.scale, m), checkpoint, epoch=kept["epoch"],
                            val_kaggle_f1=best)
        tqdm.write(f"resuming from epoch {resumed['epoch']} of {last} ({saved.path})")
        for row in history if on_epoch is not None else []:
            on_epoch(row)
    for epoch in range(first, last + 1):
        if epoch == max(first, t.epochs + 1):  # self-training from here on (also when resumed in it)
            if pseudo is None:
                pseudo = pseudo_labels(model, unlabelled, t.pseudo_confidence, t.batch_size, device)
                tqdm.write(f"self-training: {len(pseudo)} unlabelled slices labelled by the model, "
                           f"{(pseudo != IGNORE_LABEL).float().mean():.1%} of their pixels confident")
            sure = (pseudo != IGNORE_LABEL).flatten(1).any(1)  # a slice with no sure pixel teaches nothing
            ux = resize(torch.from_numpy(unlabelled)[sure][:, None].float(), t.scale, "bilinear")
            uy = resize(pseudo[sure][:, None].float(), t.scale, "nearest").to(torch.uint8)
            loader = _loader(torch.cat([x, ux]), torch.cat([y, uy]), transform, t.batch_size, generator)
        start = time.perf_counter()
        net.train()
        losses = []
        bar = tqdm(loader, desc=f"epoch {epoch}/{last}", leave=False, dynamic_ncols=True, disable=None)
        for batch in bar:
            # MetaTensors after MONAI transforms, plain tensors without any (the seed: no augmentation)
            xb = convert_to_tensor(batch["image"], track_meta=False).float()
            yb = convert_to_tensor(batch["label"], track_meta=False)[:, 0].long()
            with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
                logits = net(xb.to(device))
            loss = loss_fn(logits.float(), yb.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses):.4f}")
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)), "lr": optimizer.param_groups[0]["lr"]}
        scheduler.step()

        if epoch % t.val_every == 0 or epoch in (t.epochs, last):
            logits = torch.from_numpy(predict_logits(model, val_images, t.batch_size, device))
            preds = model.postprocess(logits).numpy()
            metrics = summary_metrics(confusion_matrix(val_labels, preds))
            unbiased = logits - torch.tensor(model.class_bias)[:, None, None]  # the loss of the network as trained
            row.update(val_loss=float(loss_fn(unbiased.to(device), val_target.to(device))),
                       **{f"val_f1_{c}": metrics[f"f1_{c}"] for c in SHORT},
                       **{f"val_{k}": v for k, v in dice_metrics(val_labels, preds).items()},
                       **{f"val_{KAGGLE_F1}": metrics[KAGGLE_F1]})
            keep = metrics[KAGGLE_F1] > best if t.select == "best" else epoch == last
            if keep:
                best = metrics[KAGGLE_F1]
                save_checkpoint(model, checkpoint, epoch=epoch, val_kaggle_f1=best)
                if t.select == "best":
                    best_net = {k: v.detach().clone() for k, v in net.state_dict().items()}
        row["seconds"] = time.perf_counter() - start
        history.append(row)
        saved.save(epoch, epoch == last, net, optimizer, scheduler, generator, transform, history, best, best_net,
                   pseudo)
        tqdm.write(("" if member is None else f"member {member}  ")
                   + f"epoch {epoch:3d}  train_loss {row['train_loss']:.4f}"
                   + (f"  val_loss {row['val_loss']:.4f}  val_kaggle_f1 {row[f'val_{KAGGLE_F1}']:.4f}"
                      if "val_loss" in row else "") + f"  ({row['seconds']:.1f}s)")
        if on_epoch is not None:
            on_epoch(row)
    return history
