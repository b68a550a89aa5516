"""A stand-in for ``IPython.display.display`` in this process (which is no kernel): the
bundles the notebook view asks to show, in order.  A real kernel: ``tests/support/kernel.py``."""

from __future__ import annotations

import IPython.display

from joblib_cloud.client import progress


class Shown:
    """``display(bundle, raw=True, display_id=True)`` and its handle's ``update``."""

    def __init__(self) -> None:
        self.bundles: list[dict[str, str]] = []
        self.displays = 0

    def display(self, bundle: dict[str, str], raw: bool = False,
                display_id: bool = False) -> Shown:
        assert raw and display_id
        self.displays += 1
        self.bundles.append(bundle)
        return self

    def update(self, bundle: dict[str, str], raw: bool = False) -> None:
        assert raw
        self.bundles.append(bundle)

    def install(self, monkeypatch) -> Shown:
        """Progress believes it runs in a kernel, and shows here."""
        monkeypatch.setattr(progress, "in_notebook", lambda: True)
        monkeypatch.setattr(IPython.display, "display", self.display)
        return self
