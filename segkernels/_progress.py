"""A progress bar for the long loops over user batches (pruning's calibration, BatchNorm
recalibration): tqdm's when it is installed, the plain iterable otherwise."""

from typing import Iterable, Optional


def progress_bar(iterable: Iterable, desc: str, total: Optional[int] = None) -> Iterable:
    try:
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, leave=False)
    except Exception:  # tqdm is optional
        return iterable
