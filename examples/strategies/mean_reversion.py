"""Mean reversion on a z-score: buy when the close falls ``entry`` standard deviations below its
rolling mean, sell short when it rises as far above, and go flat when it crosses back over the mean.

The signal is stateless (it reacts to crossings of the z-score between the previous bar and this
one), so the same strategy object can be backtested and run live without carrying state over.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from qmtl_core.errors import BadInputError
from qmtl_core.sdk import Node, StreamInput, Strategy, TradeOrderPublisherNode, View


class MeanReversion(Strategy):
    """Rolling z-score mean reversion on one price series."""

    defaults: ClassVar[dict[str, Any]] = {"lookback": 20, "entry": 2.0, "allow_short": True,
                                          "interval": "1d"}

    def setup(self) -> None:
        """Price input → z-score crossing signal (window of lookback+1 closes) → order publisher."""
        lookback, entry = int(self.params["lookback"]), float(self.params["entry"])
        if lookback < 2 or entry <= 0:
            raise BadInputError(f"MeanReversion needs lookback >= 2 and entry > 0, got {lookback}, {entry}")
        self._lookback, self._entry = lookback, entry
        self._short = bool(self.params["allow_short"])
        self.price = StreamInput(name="price", interval=self.params["interval"])
        self.signal = Node(input=self.price, compute_fn=self.zscore_signal, name="zscore_signal",
                           period=lookback + 1,
                           params={"lookback": lookback, "entry": entry, "allow_short": self._short})
        self.add_nodes(self.price, self.signal, TradeOrderPublisherNode(self.signal))

    @staticmethod
    def _z(window: np.ndarray) -> float:
        std = window.std()
        return 0.0 if std == 0 else float((window[-1] - window.mean()) / std)

    def zscore_signal(self, view: View) -> float | None:
        """Target on a z-score crossing: +1 below −entry, −1 above +entry, 0 back over the mean."""
        close = view[self.price].close
        z_prev, z_now = self._z(close[:-1]), self._z(close[1:])
        entry = self._entry
        if z_prev >= -entry > z_now:
            return 1.0
        if self._short and z_prev <= entry < z_now:
            return -1.0
        if z_prev < 0 <= z_now or z_prev > 0 >= z_now:
            return 0.0
        return None
