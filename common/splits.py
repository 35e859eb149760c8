"""Labeled / unlabeled splits and the files that name them.

`class_balanced_split` (CIFAR/SVHN-style per-class sampling from a seed, identical on every rank),
`finegrained_split` (the pre-made image_list/train_<r>.txt files), `read_index_file` (ImageNet index CSVs / .npy),
`write_index_csv` (a selection, as usl.py writes it), `read_pseudo_label_csv` (DebiasPL's CLIP files).
"""
import csv
import os
from pathlib import Path

import numpy as np

from common import UserError
from common.datasets import FINEGRAINED, load, parse_list


def finegrained_split(root, name, label_ratio):
    """(labeled, unlabeled) subsets of the fine-grained train set: labeled = image_list/train_<r>.txt, unlabeled =
    train_100 minus train_r, in train_100's order (the reference used Python-set order, which changes per run)."""
    root = Path(root).expanduser()
    name = name.lower()
    full = load(name, root, 'train')
    lists = root / 'image_list'
    path = lists / f'train_{label_ratio}.txt'
    if not path.is_file():
        have = sorted(int(p.stem[6:]) for p in lists.glob('train_*.txt') if p.stem[6:].isdigit())
        raise UserError(f'--label_ratio {label_ratio} is not available for {name}: {path} does not exist; '
                        f'ratios shipped: {", ".join(map(str, have)) or "none"}')
    rel, y, lines = parse_list(path, FINEGRAINED[name][1], with_lines=True)
    position = {(r, int(t)): k for k, (r, t) in enumerate(zip(full.ids, full.targets))}
    labeled = []
    for (r, t), lineno in zip(zip(rel, y), lines):
        k = position.get((r, int(t)))
        if k is None:
            raise UserError(f'{path}:{lineno}: {r} (label {t}) is not in image_list/train_100.txt; the lists do not '
                            f'belong together')
        labeled.append(k)
    taken = np.zeros(len(full), dtype=bool)
    taken[labeled] = True
    return full.subset(labeled), full.subset(np.flatnonzero(~taken))


def class_balanced_split(targets, num_labeled, num_classes, seed, exclude_labeled=False, exact=False):
    """(labeled_idx, unlabeled_idx): num_labeled // num_classes indices per class, drawn without replacement with
    np.random.RandomState(seed) class by class: the same images as FixMatch's `x_u_split` after np.random.seed(seed),
    returned sorted. Depends only on the seed, never on the rank or the global RNGs. unlabeled = every index (FixMatch
    convention) or, with exclude_labeled, the others."""
    targets = np.asarray(targets, dtype=np.int64)
    if exact and num_labeled % num_classes:
        raise UserError(f'{num_labeled} labels cannot be split evenly over {num_classes} classes: choose a multiple '
                        f'of {num_classes}')
    per_class = num_labeled // num_classes
    if per_class < 1:
        raise UserError(f'{num_labeled} labels give less than one per class for {num_classes} classes: use at '
                        f'least {num_classes}')
    if num_labeled > len(targets):
        raise UserError(f'{num_labeled} labels requested but the training set has only {len(targets)} images')
    rng = np.random.RandomState(seed)
    labeled = []
    for c in range(num_classes):
        idx = np.flatnonzero(targets == c)
        if len(idx) < per_class:
            raise UserError(f'class {c} has {len(idx)} training images, fewer than the {per_class} per class that '
                            f'{num_labeled} labels need: lower the number of labels')
        labeled.append(rng.choice(idx, per_class, replace=False))
    labeled = np.sort(np.concatenate(labeled)).astype(np.int64)
    if exclude_labeled:
        mask = np.ones(len(targets), dtype=bool)
        mask[labeled] = False
        unlabeled = np.flatnonzero(mask).astype(np.int64)
    else:
        unlabeled = np.arange(len(targets), dtype=np.int64)
    return labeled, unlabeled


def _read_csv(path, required):
    """(rows as dicts, line number of each row) of a CSV file; `required` columns must be in the header."""
    path = Path(path)
    try:
        f = open(path, newline='', encoding='utf-8-sig')
    except OSError as e:
        raise UserError(f'cannot open {path}: {e.strerror or e}') from None
    with f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        for col in required:
            if col not in header:
                raise UserError(f'{path}:1: no {col!r} column (header: {",".join(header) or "empty"}); '
                                f'expected columns {", ".join(required)}')
        reader.fieldnames = header
        rows, lines = [], []
        for row in reader:
            if not any((v or '').strip() for v in row.values() if isinstance(v, str)):
                continue
            rows.append(row)
            lines.append(reader.line_num)
    return rows, lines


def _int_column(path, rows, lines, col, size=None, unique=False):
    out = np.empty(len(rows), dtype=np.int64)
    first = {}
    for k, (row, line) in enumerate(zip(rows, lines)):
        s = (row.get(col) or '').strip()
        try:
            v = int(s)
        except ValueError:
            try:
                fv = float(s)
                v = int(fv) if fv.is_integer() else None
            except ValueError:
                v = None
            if v is None:
                raise UserError(f'{path}:{line}: {col} {s!r} is not an integer') from None
        if v < 0 or (size is not None and v >= size):
            top = '' if size is None else f'..{size - 1}'
            raise UserError(f'{path}:{line}: {col} {v} is out of range 0{top}'
                            + (' (made for another dataset or another file order?)' if col == 'Index' else ''))
        if unique:
            if v in first:
                raise UserError(f'{path}:{line}: duplicate {col} {v} (first at line {first[v]})')
            first[v] = line
        out[k] = v
    return out


def read_index_file(path, size) -> np.ndarray:
    """int64 indices from a .npy file or from the 'Index' column of a CSV (other columns ignored). Each index must
    lie in 0..size-1 and appear once; errors name the file and line (entry, for .npy)."""
    path = Path(path)
    if path.suffix == '.npy':
        try:
            a = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(f'cannot read index file {path}: {e}') from None
        if a.ndim != 1 or not (np.issubdtype(a.dtype, np.integer) or (
                np.issubdtype(a.dtype, np.floating) and np.all(np.mod(a, 1) == 0))):
            raise UserError(f'{path}: expected a 1-D array of integer indices, got {a.dtype} of shape {a.shape}')
        a = a.astype(np.int64)
        bad = np.flatnonzero((a < 0) | (a >= size)) if size is not None else np.flatnonzero(a < 0)
        if len(bad):
            raise UserError(f'{path}: entry {bad[0]}: index {a[bad[0]]} is out of range 0..{size - 1}')
        _, first, counts = np.unique(a, return_index=True, return_counts=True)
        if (counts > 1).any():
            v = a[first[np.argmax(counts > 1)]]
            dup = np.flatnonzero(a == v)
            raise UserError(f'{path}: entry {dup[1]}: duplicate index {v} (first at entry {dup[0]})')
        return a
    rows, lines = _read_csv(path, ['Index'])
    return _int_column(path, rows, lines, 'Index', size, unique=True)


def write_index_csv(path, indices, ids):
    """CSV with columns Index, ImageID, one row per index; `ids` is the id list of the WHOLE set the indices
    point into (e.g. `train.ids`), so ImageID = ids[index]. Written atomically."""
    path = Path(path)
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(indices) and (indices.min() < 0 or indices.max() >= len(ids)):
        raise ValueError(f'indices out of range for {len(ids)} ids')
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + '.tmp')
    with open(tmp, 'w', newline='', encoding='utf-8') as f:
        w = csv.writer(f)
        w.writerow(['Index', 'ImageID'])
        for i in indices:
            w.writerow([int(i), ids[i]])
    os.replace(tmp, path)


def read_pseudo_label_csv(path, size, num_classes=None):
    """(indices, labels, probs or None) from a CSV with columns Index, PseudoLabel and optionally Probs (the
    DebiasPL CLIP files). Index in 0..size-1 and unique; PseudoLabel in 0..num_classes-1 when given."""
    rows, lines = _read_csv(path, ['Index', 'PseudoLabel'])
    idx = _int_column(path, rows, lines, 'Index', size, unique=True)
    labels = _int_column(path, rows, lines, 'PseudoLabel', num_classes)
    probs = None
    if rows and 'Probs' in rows[0]:
        probs = np.empty(len(rows), dtype=np.float32)
        for k, (row, line) in enumerate(zip(rows, lines)):
            try:
                probs[k] = float(row['Probs'])
            except (TypeError, ValueError):
                raise UserError(f'{path}:{line}: Probs {row["Probs"]!r} is not a number') from None
    return idx, labels, probs
