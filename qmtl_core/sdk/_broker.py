"""Simulated broker for backtests: fills at a bar's open with slippage and fees, FIFO round trips."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import numpy.typing as npt

from qmtl_core.sdk._orders import Order

__all__ = ["Fill", "Trade", "SimBroker"]

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
# A fill smaller than this fraction of the position it changes is float noise, not an order.
_DUST = 1e-12


def to_datetime(ts: np.datetime64) -> datetime:
    """A UTC ``datetime64`` as an aware ``datetime`` (microsecond precision)."""
    return _EPOCH + timedelta(microseconds=int(ts.astype("datetime64[us]").astype(np.int64)))


@dataclass(frozen=True)
class Fill:
    """One execution: ``size`` is signed units (+ buy, − sell), ``price`` includes slippage."""

    bar: int
    time: datetime
    size: float
    price: float
    fee: float


@dataclass(frozen=True)
class Trade:
    """A round trip (or the open part of one): entry and exit bar, time and fill price, fees."""

    entry_bar: int
    entry_time: datetime
    entry_price: float
    size: float
    exit_bar: int | None
    exit_time: datetime | None
    exit_price: float | None
    fee: float

    @property
    def is_long(self) -> bool:
        """True for a long trade (positive size)."""
        return self.size > 0

    @property
    def pnl(self) -> float | None:
        """Profit after fees in cash units; ``None`` while open."""
        if self.exit_price is None:
            return None
        return self.size * (self.exit_price - self.entry_price) - self.fee

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"entry_bar": self.entry_bar, "entry_time": self.entry_time.isoformat(),
                "entry_price": self.entry_price, "size": self.size, "exit_bar": self.exit_bar,
                "exit_time": self.exit_time.isoformat() if self.exit_time else None,
                "exit_price": self.exit_price, "fee": self.fee, "pnl": self.pnl}


class _Lot:
    """An open part of a trade: its entry and the entry fee not yet attributed to a closed trade."""

    __slots__ = ("bar", "price", "size", "fee")

    def __init__(self, bar: int, price: float, size: float, fee: float) -> None:
        self.bar = bar
        self.price = price
        self.size = size
        self.fee = fee


class SimBroker:
    """Executes normalised orders at an open price; records fills, trades and position changes."""

    def __init__(self, *, cash: float, fee_bps: float, slippage_bps: float,
                 timestamps: npt.NDArray[np.datetime64]) -> None:
        self.cash = float(cash)
        self.position = 0.0
        self._fee = fee_bps / 10_000.0
        self._slip = slippage_bps / 10_000.0
        self._ts = timestamps
        self._lots: list[_Lot] = []
        self.fills: list[Fill] = []
        self.trades: list[Trade] = []
        #: bar index -> (position, cash) after that bar's fills; forward-filled into series later
        self.changes: list[tuple[int, float, float]] = []
        self.skipped = 0

    def execute(self, bar: int, open_price: float, orders: list[Order]) -> None:
        """Fill ``orders`` (emitted on the previous bar) at this bar's open."""
        for order in orders:
            action = order["action"]
            if action == "TARGET":
                equity = self.cash + self.position * open_price
                if equity <= 0:
                    self.skipped += 1  # nothing left to size a target position from
                    continue
                delta = order["target"] * equity / open_price - self.position
            elif action == "BUY":
                delta = order["size"]
            else:
                delta = -order["size"]
            if abs(delta) > _DUST * max(1.0, abs(self.position)):
                self._fill(bar, open_price, delta)
        self.changes.append((bar, self.position, self.cash))

    def _fill(self, bar: int, open_price: float, delta: float) -> None:
        side = 1.0 if delta > 0 else -1.0
        price = open_price * (1.0 + side * self._slip)  # slippage always works against the order
        fee = abs(delta) * price * self._fee
        self.cash -= delta * price + fee
        when = to_datetime(self._ts[bar])
        self.fills.append(Fill(bar, when, delta, price, fee))
        fee_per_unit = fee / abs(delta)
        remaining = delta
        # Close opposite lots first-in first-out, then open a lot with whatever is left.
        while self._lots and remaining and (self._lots[0].size > 0) != (remaining > 0):
            lot = self._lots[0]
            closing = min(abs(remaining), abs(lot.size))
            lot_sign = 1.0 if lot.size > 0 else -1.0
            entry_fee = lot.fee * closing / abs(lot.size)
            self.trades.append(Trade(lot.bar, to_datetime(self._ts[lot.bar]), lot.price,
                                     lot_sign * closing, bar, when, price,
                                     entry_fee + fee_per_unit * closing))
            lot.size -= lot_sign * closing
            lot.fee -= entry_fee
            remaining += lot_sign * closing
            if abs(lot.size) <= _DUST * closing:
                self._lots.pop(0)
            if abs(remaining) <= _DUST * abs(delta):
                remaining = 0.0
        if remaining:
            self._lots.append(_Lot(bar, price, remaining, fee_per_unit * abs(remaining)))
        self.position += delta
        if abs(self.position) <= _DUST * abs(delta):
            self.position = 0.0

    def open_trades(self) -> list[Trade]:
        """Trades still open at the end."""
        return [Trade(lot.bar, to_datetime(self._ts[lot.bar]), lot.price, lot.size, None, None,
                      None, lot.fee) for lot in self._lots]
