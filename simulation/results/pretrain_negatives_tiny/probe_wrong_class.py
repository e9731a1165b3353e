"""Does a foundation answer a prompt that names a class the image does not show?

Usage (from the repository root): python simulation/results/pretrain_negatives_tiny/probe_wrong_class.py FOUNDATION [TASKS_ROOT]
FOUNDATION: a packaged name (tiny) or a `promptsam pretrain` folder; TASKS_ROOT: default ../shared/data/tasks.

Prints the mean predicted foreground fraction and Dice (threshold 0.5), prompted as in pretraining
(text -> the foundation's text_to_sparse -> SAM), on 32 held-out scene items whose prompt is "the polyp"
(scene seed 12345, not the pretraining's) and on the last 32 busi images of the folder listing
(pretraining may have seen some: the question is whether the prompt changes the output, not how
well the foundation segments), once per prompt: the own class, and classes of other tasks.
"""
import sys

import torch

from shared_model.data.dataset import evaluation_dataset
from shared_model.data.folder import list_samples
from shared_model.data.scene_dataset import SceneDataset
from shared_model.pretrain.selection import foundation_predictor

torch.manual_seed(0)
predict, info = foundation_predictor(sys.argv[1])
tasks_root = sys.argv[2] if len(sys.argv) > 2 else "../shared/data/tasks"


def stats(images, masks, texts):
    with torch.no_grad():
        p = (predict(images, texts) > 0.5).float()
    inter = (p * masks).sum((1, 2, 3))
    dice = 2 * inter / (p.sum((1, 2, 3)) + masks.sum((1, 2, 3)) + 1e-6)
    return float(p.mean()), float(dice.mean())


scenes = SceneDataset(40, 128, seed=12345)
idx = [i for i in range(len(scenes)) if scenes[i]["text"] == "the polyp"][:32]
im = torch.stack([scenes[i]["image"] for i in idx])
ma = torch.stack([scenes[i]["mask"] for i in idx])
for t in ["the polyp", "the breast tumour", "the retinal blood vessels", "breast tumour"]:
    print("scenes (polyp target)", repr(t), "fg %.3f dice %.3f" % stats(im, ma, [t] * len(idx)))
samples, _ = list_samples(tasks_root, ["busi"])
ds = evaluation_dataset(samples[-32:], 128)
im = torch.stack([ds[i]["image"] for i in range(len(ds))])
ma = torch.stack([ds[i]["mask"] for i in range(len(ds))])
for t in ["breast tumour", "polyp", "retinal blood vessels", "a breast tumour in an ultrasound image",
          "a polyp in a colonoscopy image"]:
    print("busi (last 32 images)", repr(t), "fg %.3f dice %.3f" % stats(im, ma, [t] * len(ds)))
