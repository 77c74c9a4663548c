"""The training loop: seeded, augmented, class-weighted, a fixed schedule or the best epoch kept.
Readable in one sitting."""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from monai.data import Dataset, list_data_collate
from monai.transforms import (
    Compose,
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
    predict_labels,
    predict_logits,
    require_safe_torch_load,
    resize,
    save_checkpoint,
)
from covseg.names import KAGGLE_F1, NUM_CLASSES, SHORT
from covseg.params import ModelParams, Train


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def augmentation(t: Train, size: int, seed: int) -> Compose | None:
    """MONAI transforms of a {'image', 'label'} pair (labels by nearest): random crops of `t.crop`
    pixels centred on a pixel of each class in proportion to `t.crop_ratios` (so findings are sampled
    more often than their share of the slice), then, with
    `t.augment`, flips, rotation / scale / shift, gamma, intensity and noise."""
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
    as in its DiceCELoss)."""
    weight = torch.tensor(t.class_weights, dtype=torch.float32, device=device)
    ce = torch.nn.CrossEntropyLoss(weight=weight)
    if t.loss == "dice_ce":
        from monai.losses import DiceLoss

        dice = DiceLoss(to_onehot_y=True, softmax=True, weight=weight)
        return lambda logits, target: dice(logits, target[:, None]) + ce(logits, target)
    return ce


def make_optimizer(t: Train, net: torch.nn.Module):
    """Adam or AdamW; the learning rate rises linearly for `t.warmup_epochs` (all of a run that short),
    then follows a cosine to 0."""
    opt_class = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_class(net.parameters(), lr=t.lr, weight_decay=t.weight_decay)

    def factor(epoch: int) -> float:  # epoch counts from 0
        if epoch < t.warmup_epochs:
            return (epoch + 1) / (t.warmup_epochs + 1)
        return 0.5 * (1 + math.cos(math.pi * (epoch - t.warmup_epochs) / max(1, t.epochs - t.warmup_epochs)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def warm_start(net: torch.nn.Module, spec: str, device: torch.device, member: int = 0) -> None:
    """Start from the weights of a checkpoint or a registry model (`models:/covseg-unet@champion`); an
    ensemble's member k starts from the source's member k (of an ensemble of fewer: k modulo their number)."""
    from covseg.modelstore import load

    source, _ = load(spec, device)
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


# What TrainingState.save writes: key -> the types its value may have.
STATE_FIELDS = {"recipe": (str,), "epoch": (int,), "finished": (bool,), "net": (dict,), "optimizer": (dict,),
                "scheduler": (dict,), "torch_rng": (torch.Tensor,), "loader_rng": (torch.Tensor,),
                "numpy_rngs": (list,), "history": (str,), "best": (float, int, type(None)),
                "best_net": (dict, type(None))}


def _state_problem(state) -> str | None:
    """What is wrong with a loaded training state's structure, or None."""
    if not isinstance(state, dict):
        return f"holds a {type(state).__name__}, not a dict"
    missing = [k for k in STATE_FIELDS if k not in state]
    if missing:
        return f"missing {', '.join(missing)}"
    wrong = [f"{k} is a {type(state[k]).__name__}" for k, types in STATE_FIELDS.items()
             if not isinstance(state[k], types)]
    if wrong:
        return "; ".join(wrong)
    try:
        if not isinstance(json.loads(state["history"]), list):
            return "history is not a JSON list"
    except ValueError as exc:
        return f"history is not JSON ({exc})"
    return None


def _load_error(exc: Exception) -> str:
    """One line on why torch.load failed (its messages run to many lines)."""
    text = str(exc)
    refused = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    line = f"refused by weights_only: {refused.group(1).split(' Please')[0].strip()}" if refused else next(
        (ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = line if len(line) <= 200 else line[:197] + "..."
    return f"{type(exc).__name__}: {line}" if line else f"{type(exc).__name__} (empty or cut short)"


class TrainingState:
    """A training's state after each epoch (weights, optimizer, schedule, every random generator, the
    history, the best weights so far), written atomically to `path`, so a killed run resumes exactly where
    it stopped. Tensors and plain lists only: loaded with weights_only, nothing is unpickled."""

    def __init__(self, path: str | Path | None, key: str, net, optimizer, scheduler, generator, transform):
        self.path, self.key = (Path(path) if path else None), key
        self.net, self.optimizer, self.scheduler, self.generator, self.transform = (
            net, optimizer, scheduler, generator, transform)

    def save(self, epoch: int, finished: bool, history: list[dict], best: float, best_net: dict | None) -> None:
        if self.path is None:
            return
        rngs = [[name, keys.tolist(), pos, gauss, cached]
                for name, keys, pos, gauss, cached in (r.get_state() for r in _random_states(self.transform))]
        with atomic_output(self.path) as tmp:
            torch.save({"recipe": self.key, "epoch": epoch, "finished": finished, "net": self.net.state_dict(),
                        "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "torch_rng": torch.get_rng_state(), "loader_rng": self.generator.get_state(),
                        "numpy_rngs": rngs, "history": json.dumps(history), "best": best, "best_net": best_net}, tmp)

    def load(self, finished: bool = False) -> dict | None:
        """The state of an unfinished run of the same recipe (also of a finished one, with `finished`),
        or None (start afresh). A state that cannot be read (cut short, not a torch file, refused by
        weights_only, not the structure `save` writes) is set aside (`set_aside`), never deleted, with one
        warning naming it and why; the training then starts afresh."""
        if self.path is None or not self.path.is_file():
            return None
        require_safe_torch_load()
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except PermissionError:  # not corrupt: unreadable to this user, which they have to fix
            raise
        except Exception as exc:  # torch raises many types for a file that is not what it wrote
            return self.set_aside(_load_error(exc))
        if isinstance(state, dict) and isinstance(state.get("recipe"), str) and state["recipe"] != self.key:
            return None  # another recipe's run (params, code or data): this one overwrites it
        problem = _state_problem(state)
        if problem is not None:
            return self.set_aside(problem)
        return state if finished or not state["finished"] else None

    def set_aside(self, reason: str) -> None:
        """Rename the unreadable state to `<name>.corrupt-<time>` (kept for inspection) and warn once."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while aside.exists():
            aside, n = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}"), n + 1
        os.replace(self.path, aside)
        warnings.warn(f"{self.path}: not a training state this run can resume ({reason}); set aside as {aside}, "
                      f"and training starts afresh", UserWarning, stacklevel=2)

    def restore(self, state: dict) -> None:
        """Weights, optimizer, schedule and every random generator as `state` has them."""
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        self.generator.set_state(state["loader_rng"])
        for rng, (name, keys, pos, gauss, cached) in zip(_random_states(self.transform), state["numpy_rngs"],
                                                         strict=True):
            rng.set_state((name, np.asarray(keys, dtype=np.uint32), pos, gauss, cached))


class Slices(NamedTuple):
    """What a training learns from and is scored on: images (N, H, W) in [0, 1] and their class indices."""
    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray


def _loader(x: torch.Tensor, y: torch.Tensor, transform: Compose | None, batch_size: int,
            generator: torch.Generator) -> DataLoader:
    # torch's DataLoader: MONAI's would re-seed the transforms from the generator
    dataset = Dataset([{"image": xi, "label": yi} for xi, yi in zip(x, y)], transform)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=len(dataset) > batch_size,
                      generator=generator, collate_fn=list_data_collate)


def train(t: Train, m: ModelParams, seed: int, train_images: np.ndarray, train_labels: np.ndarray,
          val_images: np.ndarray, val_labels: np.ndarray, checkpoint: str | Path,
          on_epoch: Callable[[dict], None] | None = None, state: str | Path | None = None) -> pd.DataFrame:
    """Train the U-Net and write `checkpoint`: the last epoch's model (`t.select: last`, a schedule
    fixed in advance, e.g. by cross-validation) or the one of the best validation kaggle_f1
    (`best`). Validation is scored every `t.val_every` epochs and at the last; returns the history.
    With `t.members` N > 1, N networks are trained one after another, member k from seed `seed + k`
    (member 0 is the one-network training), and the checkpoint is their Ensemble; the history holds
    their schedules one after another (column `member`, epochs counted on).
    With `state`, the run is saved after every epoch and an unfinished run of the same params and
    data resumes from it (its earlier epochs are passed to `on_epoch` again), to the same result;
    an ensemble's members that had finished are not trained again (unless `t.init` warm-starts them)."""
    if t.select == "best" and not len(val_images):
        raise ParamsError("train.select: best keeps the epoch of the best validation score, but no slice is held "
                          "out (split.fold: all): use train.select: last, or hold out a fold")
    data = Slices(train_images, train_labels, val_images, val_labels)
    with progress_bar(t.members * t.epochs, on_epoch) as on_epoch:
        if t.members == 1:
            return pd.DataFrame(_train_member(t, m, data, seed, checkpoint, on_epoch, state))
        return _train_ensemble(t, m, data, seed, checkpoint, on_epoch, state)


@contextmanager
def progress_bar(epochs: int, on_epoch: Callable[[dict], None] | None):
    """A terminal progress bar over every epoch of a training, with its ETA (none where stderr is not a
    terminal, as in CI logs, which get one line per epoch instead); yields `on_epoch` that also moves it."""
    bar = tqdm(total=epochs, desc="training", unit="epoch", dynamic_ncols=True, disable=None, position=0)

    def tick(row: dict) -> None:
        bar.update(1)
        if on_epoch is not None:
            on_epoch(row)

    try:
        yield tick
    finally:
        bar.close()


def _train_ensemble(t: Train, m: ModelParams, data: Slices, seed: int, checkpoint: str | Path,
                    on_epoch: Callable[[dict], None], state: str | Path | None) -> pd.DataFrame:
    """`t.members` networks trained one after another (train's ensemble), saved as their Ensemble."""
    history, nets, device = [], [], pick_device(t.device)
    with tempfile.TemporaryDirectory(prefix="covseg-members-") as tmp:
        for k in range(t.members):
            def log(row: dict, k: int = k) -> None:
                history.append({**row, "epoch": row["epoch"] + k * t.epochs, "member": k})
                on_epoch(history[-1])

            member_state = None if state is None else Path(state).with_name(
                f"{Path(state).stem}.member{k}{Path(state).suffix}")
            _train_member(t, m, data, seed + k, Path(tmp) / f"member{k}.pt", log, member_state, member=k)
            nets.append(load_checkpoint(Path(tmp) / f"member{k}.pt", device)[0].unet)
    model = Segmenter(Ensemble(nets), t.scale)
    score = None
    if len(data.val_images):
        preds = predict_labels(model, data.val_images, t.batch_size, device)
        score = summary_metrics(confusion_matrix(data.val_labels, preds))[KAGGLE_F1]
    save_checkpoint(model, checkpoint, epoch=t.epochs, val_kaggle_f1=score)
    return pd.DataFrame(history)


def _train_member(t: Train, m: ModelParams, data: Slices, seed: int, checkpoint: str | Path,
                  on_epoch: Callable[[dict], None] | None = None, state: str | Path | None = None,
                  member: int | None = None) -> list[dict]:
    """One network's training from `seed` (train's loop); returns its history. As an ensemble's `member`, it
    warm-starts from that member of `t.init`, and a finished run of the same recipe saved in `state` is not
    trained again: its model and history are used (not with a warm start, whose source may have changed since)."""
    set_seed(seed)
    device, autocast = pick_device(t.device), uses_bf16(t)

    # Downscale once (images bilinear, labels nearest), keep (N, 1, h, w) tensors for MONAI.
    x = resize(torch.from_numpy(data.train_images)[:, None].float(), t.scale, "bilinear")
    y = resize(torch.from_numpy(data.train_labels)[:, None].float(), t.scale, "nearest").to(torch.uint8)
    transform = augmentation(t, min(x.shape[-2:]), seed)
    generator = torch.Generator().manual_seed(seed)
    loader = _loader(x, y, transform, t.batch_size, generator)

    net = build_model(m).to(device)
    if t.init:
        warm_start(net, t.init, device, member or 0)
    model = Segmenter(net, t.scale)  # evaluated and saved at full size, without inference-time choices
    optimizer, scheduler = make_optimizer(t, net)
    loss_fn = make_loss(t, device)

    saved = TrainingState(state, recipe_key(t, m, seed, *data), net, optimizer, scheduler, generator, transform)
    history, best, best_net, first = _resume(saved, t, m, checkpoint, finished=member is not None and not t.init)
    report = on_epoch or (lambda row: None)
    for row in history:  # a resumed run's earlier epochs, reported again
        report(row)
    for epoch in range(first, t.epochs + 1):
        start = time.perf_counter()
        net.train()
        losses = []
        bar = tqdm(loader, desc=f"epoch {epoch}/{t.epochs}", leave=False, dynamic_ncols=True, disable=None,
                   position=1)
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

        score = None
        if len(data.val_images) and (epoch % t.val_every == 0 or epoch == t.epochs):
            row.update(_validate(model, loss_fn, data.val_images, data.val_labels, t.batch_size, device))
            score = row[f"val_{KAGGLE_F1}"]
        if (score is not None and score > best) if t.select == "best" else (epoch == t.epochs):
            best = score
            save_checkpoint(model, checkpoint, epoch=epoch, val_kaggle_f1=best)
            if t.select == "best":
                best_net = {k: v.detach().clone() for k, v in net.state_dict().items()}
        row["seconds"] = time.perf_counter() - start
        history.append(row)
        saved.save(epoch, epoch == t.epochs, history, best, best_net)
        tqdm.write(("" if member is None else f"member {member}  ")
                   + f"epoch {epoch:3d}  train_loss {row['train_loss']:.4f}"
                   + (f"  val_loss {row['val_loss']:.4f}  val_kaggle_f1 {row[f'val_{KAGGLE_F1}']:.4f}"
                      if "val_loss" in row else "")
                   + f"  ({row['seconds']:.1f}s)")
        report(row)
    return history


def _resume(saved: TrainingState, t: Train, m: ModelParams, checkpoint: str | Path,
            finished: bool) -> tuple[list[dict], float, dict | None, int]:
    """(history, best validation kaggle_f1, best weights, first epoch to train) of the run saved in `saved`,
    whose weights, optimizer and generators are restored and whose checkpoint is written again as the killed
    (or, with `finished`, finished) run had written it; those of a fresh start when there is none."""
    resumed = saved.load(finished)
    if resumed is None:
        return [], -1.0, None, 1
    saved.restore(resumed)
    history, best, best_net, first = (json.loads(resumed["history"]), resumed["best"], resumed["best_net"],
                                      resumed["epoch"] + 1)
    if best_net is not None or first > t.epochs:
        scored = [r for r in history if "val_loss" in r]
        kept = max(scored, key=lambda r: r[f"val_{KAGGLE_F1}"]) if best_net is not None else history[-1]
        keep_net = build_model(m)
        keep_net.load_state_dict(best_net if best_net is not None else resumed["net"])
        save_checkpoint(Segmenter(keep_net, t.scale), checkpoint, epoch=kept["epoch"], val_kaggle_f1=best)
    tqdm.write(f"resuming from epoch {resumed['epoch']} of {t.epochs} ({saved.path})")
    return history, best, best_net, first


def _validate(model: Segmenter, loss_fn: Callable, images: np.ndarray, labels: np.ndarray, batch_size: int,
              device: torch.device) -> dict:
    """A history row's validation columns (of the network as trained: no inference-time choices): the loss,
    F1 and per-slice Dice of each class, kaggle_f1."""
    logits = torch.from_numpy(predict_logits(model, images, batch_size, device))
    preds = model.postprocess(logits).numpy()
    metrics = summary_metrics(confusion_matrix(labels, preds))
    return {"val_loss": float(loss_fn(logits.to(device), torch.from_numpy(labels).long().to(device))),
            **{f"val_f1_{c}": metrics[f"f1_{c}"] for c in SHORT},
            **{f"val_{k}": v for k, v in dice_metrics(labels, preds).items()},
            f"val_{KAGGLE_F1}": metrics[KAGGLE_F1]}
