"""The class table of a dataset: names, colours, void handling."""

from __future__ import annotations

from dataclasses import dataclass, field

IGNORE_INDEX = 255


@dataclass(frozen=True)
class ClassTable:
    """Classes of a segmentation task. Index ``i`` of ``names`` is label value ``i``; 255 is ignored.

    ``foreground`` names the class whose per-image Dice/IoU is reported for binary tasks.
    """

    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...] = field(default=())
    foreground: int | None = None
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        if len(self.names) < 2:
            raise ValueError("a class table needs at least two classes (binary tasks: background + object)")
        if self.colors and len(self.colors) != len(self.names):
            raise ValueError("class table: one colour per class")

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def is_binary(self) -> bool:
        return self.num_classes == 2

    @classmethod
    def binary(cls, object_name: str) -> ClassTable:
        return cls(("background", object_name), ((0, 0, 0), (255, 255, 255)), foreground=1)

    def palette(self) -> list[tuple[int, int, int]]:
        """Display colours, one per class (a default palette when the table has none)."""
        if self.colors:
            return list(self.colors)
        default = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                   (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
                   (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
                   (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128)]
        return [default[i % len(default)] for i in range(self.num_classes)]
