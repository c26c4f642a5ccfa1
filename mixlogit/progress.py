"""Progress bars for long work (tqdm), in one place so every loop shows and hides them the same way."""

from __future__ import annotations


def progress_bar(enabled: bool, total: int | None = None, desc: str = "", unit: str = "it"):
    """A tqdm bar (``update``, ``set_postfix``, ``close``), or None when ``enabled`` is False.

    The bar disappears when closed (``leave=False``): the results table that follows is what stays on screen.
    """
    if not enabled:
        return None
    from tqdm.auto import tqdm  # imported on use: most calls run without a bar

    return tqdm(total=total, desc=desc, unit=unit, leave=False)
