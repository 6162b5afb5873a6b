"""The thesis's result tables as data: ``load('deit3_in1k').value('b_400ep')`` -> 83.1.

Each table is a JSON file in ``tables/`` (one row per line, so a diff shows what changed) with
its thesis table number(s), the line range of the thesis text it was read from
(``thesis_lines``, "Lnnnn" of the OCR'd thesis as cited by the notes in ``spec``), the metric, one
entry per metric column (which dataset and split it is measured on) and the rows. A row has a
unique ``key``, the printed ``label``, the zoo ``model`` that reproduces it (null when the zoo has
none, e.g. EfficientNet), its test ``resolution`` and ``crop_ratio``, other attributes (epochs,
params, ...) and one value per metric column (null where the thesis prints "-").

``scripts/reproduce.py`` evaluates a checkpoint and prints its top-1 beside these numbers; the
recipe configs quote them in their docstrings as ``83.1 [deit3_in1k/b_400ep]``, which
``tests/test_recipes.py`` checks against these files.

Tables of a paper rather than the thesis (the CrossTransformers ``ctx_table*``) say so in
``source`` (``thesis_tables`` / ``thesis_lines`` are then that paper's table number and the lines
of its text), print ``decimals`` digits, and may give a confidence interval for column ``c`` in
the row field ``c + '_ci'`` (:meth:`Table.ci`; ``scripts/fewshot_table.py`` prints them).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Optional, Sequence

from visrep_jax.registry import UnknownNameError, unknown_name_message

TABLES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tables")


@dataclasses.dataclass(frozen=True)
class Table:
  name: str
  title: str
  thesis_tables: List[str]
  thesis_lines: str
  spec: str
  metric: str
  primary: str                      # the column a row's headline number is in
  columns: Dict[str, Dict[str, Any]]
  notes: List[str]
  rows: List[Dict[str, Any]]
  source: str = "thesis"            # whose tables: "thesis" or the paper's name
  decimals: int = 1                 # digits printed by format()

  def keys(self) -> List[str]:
    return [r["key"] for r in self.rows]

  def row(self, key: str) -> Dict[str, Any]:
    for r in self.rows:
      if r["key"] == key:
        return r
    raise UnknownNameError(unknown_name_message(f"row of table {self.name!r}", key, self.keys()))

  def value(self, key: str, column: Optional[str] = None) -> Optional[float]:
    """The number in row ``key``, column ``column`` (default: the primary column)."""
    column = column or self.primary
    if column not in self.columns:
      raise UnknownNameError(unknown_name_message(f"column of table {self.name!r}", column,
                                                  self.columns))
    return self.row(key).get(column)

  def ci(self, key: str, column: Optional[str] = None) -> Optional[float]:
    """The confidence interval printed with ``value(key, column)`` (None when there is none)."""
    column = column or self.primary
    self.value(key, column)  # checks the row and the column
    return self.row(key).get(column + "_ci")

  def rows_for_model(self, model: str) -> List[Dict[str, Any]]:
    return [r for r in self.rows if r.get("model") == model]

  def format(self, columns: Optional[Sequence[str]] = None, keys: Optional[Sequence[str]] = None,
             extra: Optional[Dict[str, Dict[str, Any]]] = None) -> str:
    """A plain-text rendering; ``extra[key][header]`` adds columns (e.g. our numbers)."""
    columns = list(columns or self.columns)
    rows = [self.row(k) for k in keys] if keys else self.rows
    extra = extra or {}
    extra_headers: List[str] = []
    for e in extra.values():
      extra_headers += [h for h in e if h not in extra_headers]
    head = ["key", "label", "model", "res", "crop"] + columns + extra_headers

    def fmt(v):
      if v is None:
        return "-"
      if isinstance(v, float):
        return f"{v:.{self.decimals}f}" if abs(v) >= 1 or v == 0 else f"{v:.3g}"
      return str(v)

    def fmt_ci(r, c):
      ci = r.get(c + "_ci")
      return fmt(r.get(c)) + ("" if ci is None or r.get(c) is None else f"±{ci:.{self.decimals}f}")

    body = [[r["key"], r["label"], r.get("model") or "-", fmt(r.get("resolution")),
             fmt(r.get("crop_ratio"))] + [fmt_ci(r, c) for c in columns]
            + [fmt(extra.get(r["key"], {}).get(h)) for h in extra_headers] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    title = (f"{self.name}: {self.title}\n({self.source} Table {', '.join(self.thesis_tables)}, "
             f"{self.thesis_lines}; {self.metric})")
    return "\n".join([title, line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def list_tables() -> List[str]:
  return sorted(f[:-len(".json")] for f in os.listdir(TABLES_DIR) if f.endswith(".json"))


_CACHE: Dict[str, Table] = {}


def load(name: str) -> Table:
  """The table ``name`` (see :func:`list_tables`)."""
  if name not in _CACHE:
    names = list_tables()
    if name not in names:
      raise UnknownNameError(unknown_name_message("results table", name, names))
    with open(os.path.join(TABLES_DIR, name + ".json")) as f:
      data = json.load(f)
    fields = {f.name for f in dataclasses.fields(Table)}
    _CACHE[name] = Table(**{k: v for k, v in data.items() if k in fields})
  return _CACHE[name]


def lookup(ref: str, column: Optional[str] = None) -> Optional[float]:
  """``'table/row'`` or ``'table/row:column'`` -> the number (the form configs quote)."""
  ref, _, col = ref.partition(":")
  table, sep, key = ref.partition("/")
  if not sep:
    raise ValueError(f"expected 'table/row[:column]', got {ref!r}")
  return load(table).value(key, col or column)
