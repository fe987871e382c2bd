"""A dataset that fails part-way through an epoch, for the tests of resuming an interrupted training."""

from __future__ import annotations

import torch


class Interrupt(Exception):
    pass


class Crashing(torch.utils.data.Dataset):
    """Wraps a dataset and raises after ``after`` item reads: a run killed mid-epoch."""

    def __init__(self, ds, after):
        self.ds, self.after, self.reads = ds, after, 0

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        self.reads += 1
        if self.reads > self.after:
            raise Interrupt
        return self.ds[i]
