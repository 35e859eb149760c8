"""Figures of a dataset written into a run folder."""
import numpy as np
from PIL import Image


def save_image_grid(path, dataset, picks, per_row, labelled, thumb=48):
    """A PNG of `dataset`'s images at the indices `picks`: one row per class (at most `per_row`) when the labels
    are known, else rows of `per_row`."""
    from PIL import ImageDraw
    picks = np.asarray(picks)
    if labelled:
        rows = [(dataset.classes[c], picks[dataset.targets[picks] == c][:per_row]) for c in range(dataset.num_classes)]
    else:
        rows = [("", picks[a:a + per_row]) for a in range(0, len(picks), per_row)]
    text_w = min(120, 7 * max([len(r[0]) for r in rows] + [0]) + 6) if labelled else 0
    cols = max([len(r[1]) for r in rows] + [1])
    img = Image.new("RGB", (text_w + cols * (thumb + 2), max(1, len(rows)) * (thumb + 2)), "white")
    draw = ImageDraw.Draw(img)
    for r, (name, items) in enumerate(rows):
        y = r * (thumb + 2)
        if labelled:
            draw.text((2, y + thumb // 2 - 5), f"{name[:16]} ({len(items)})", fill="black")
        for c, i in enumerate(items):
            im = dataset.image(int(i)).convert("RGB").resize((thumb, thumb))
            img.paste(im, (text_w + c * (thumb + 2), y))
    img.save(path)
