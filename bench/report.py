"""Targets, the table, the JSON."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Target:
    name: str
    figure: float | None
    unit: str
    limit: float
    at_least: bool = False  # the figure must be >= limit (else <=)
    load: float | None = None  # 1-minute load average when the figure was taken

    @property
    def met(self) -> bool | None:
        if self.figure is None:
            return None
        return self.figure >= self.limit if self.at_least else self.figure <= self.limit

    @property
    def status(self) -> str:
        return {None: "n/a", True: "met", False: "NOT MET"}[self.met]


@dataclass
class Report:
    sections: dict[str, Any] = field(default_factory=dict)
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # section, measure, value
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def row(self, section: str, measure: str, value: str) -> None:
        self.rows.append((section, measure, value))

    def target(
        self, name: str, figure: float | None, unit: str, limit: float, load: float | None = None
    ) -> None:
        """load: the 1-minute load average when the figure was taken (now if not given)."""
        self.targets.append(Target(name, figure, unit, limit, False, _load(load)))

    def target_min(
        self, name: str, figure: float | None, unit: str, limit: float, load: float | None = None
    ) -> None:
        self.targets.append(Target(name, figure, unit, limit, True, _load(load)))

    def add(self, name: str, data: Any) -> None:
        self.sections[name] = _plain(data)

    def table(self) -> str:
        w = max(len(m) for _, m, _ in self.rows) if self.rows else 10
        out: list[str] = []
        last = ""
        for section, measure, value in self.rows:
            if section != last:
                out.append(f"\n== {section}")
                last = section
            out.append(f"  {measure:<{w}}  {value}")
        out.append("\n== targets (load: the 1-minute load average when the figure was taken)")
        tw = max(len(t.name) for t in self.targets) if self.targets else 10
        for t in self.targets:
            fig = "-" if t.figure is None else f"{t.figure:.3g}"
            op = ">=" if t.at_least else "<="
            out.append(
                f"  {t.name:<{tw}}  {fig:>8} {t.unit:<4} {op} {t.limit:<6g} {t.status:<7}"
                f"  load {fmt(t.load, '.2f')}"
            )
        out.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(out)

    def write_json(self, path: str, meta: dict[str, Any]) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        data = {
            "meta": meta,
            **self.sections,
            "targets": [asdict(t) | {"met": t.met} for t in self.targets],
            "notes": self.notes,
        }
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")


def _plain(x: Any) -> Any:
    if hasattr(x, "__dataclass_fields__"):
        return {k: _plain(v) for k, v in asdict(x).items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    return x


def _load(load: float | None) -> float:
    return os.getloadavg()[0] if load is None else load


def fmt(x: float | None, spec: str = ".0f", unit: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{unit}"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None
