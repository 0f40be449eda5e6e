"""A dependency-free line chart written as PNG (zlib + struct): the learning-curve plot of the benchmark.

MiniGPT does not depend on matplotlib, so the benchmark draws its own chart: axes with numeric
ticks, polylines, dashed reference lines, markers and a legend in a built-in 3x5 pixel font.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

Color = tuple[int, int, int]
BLACK, GREY, WHITE = (0, 0, 0), (170, 170, 170), (255, 255, 255)
BLUE, RED, GREEN, ORANGE = (31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14)

# 3x5 glyphs, one string of 15 bits per character (rows top to bottom).
FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "A": "010101111101101", "B": "110101110101110", "C": "011100100100011", "D": "110101101101110",
    "E": "111100110100111", "F": "111100110100100", "G": "011100101101011", "H": "101101111101101",
    "I": "111010010010111", "K": "101101110101101", "L": "100100100100111", "M": "101111111101101",
    "N": "110101101101101", "O": "010101101101010", "P": "110101110100100", "R": "110101110101101",
    "S": "011100010001110", "T": "111010010010010", "U": "101101101101111", "V": "101101101101010",
    "W": "101101111111101", "X": "101101010101101", "Y": "101101010010010", "(": "010100100100010",
    ")": "010001001001010", "=": "000111000111000", ":": "000010000010000", "/": "001001010100100",
    "<": "001010100010001", ">": "100010001010100", "%": "101001010100101",
    " ": "000000000000000",
}


class Canvas:
    """An RGB pixel buffer with the few drawing operations the chart needs."""

    def __init__(self, width: int, height: int, background: Color = WHITE):
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(background) * (width * height))

    def set(self, x: int, y: int, color: Color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = 3 * (y * self.width + x)
            self.pixels[i:i + 3] = bytes(color)

    def line(self, x0: float, y0: float, x1: float, y1: float, color: Color, width: int = 1,
             dash: int = 0) -> None:
        """Straight line (optionally dashed every `dash` pixels), `width` pixels thick."""
        steps = max(1, int(max(abs(x1 - x0), abs(y1 - y0))))
        for i in range(steps + 1):
            if dash and (i // dash) % 2:
                continue
            x, y = x0 + (x1 - x0) * i / steps, y0 + (y1 - y0) * i / steps
            for dx in range(width):
                for dy in range(width):
                    self.set(round(x) + dx - width // 2, round(y) + dy - width // 2, color)

    def disc(self, cx: float, cy: float, radius: int, color: Color) -> None:
        for dy in range(-radius, radius + 1):
            for dx in range(-radius, radius + 1):
                if dx * dx + dy * dy <= radius * radius:
                    self.set(round(cx) + dx, round(cy) + dy, color)

    def text(self, x: int, y: int, text: str, color: Color = BLACK, scale: int = 2) -> int:
        """Draw `text` (upper-cased; unknown characters as blanks) with its top-left at (x, y); returns its width."""
        for index, char in enumerate(text.upper()):
            glyph = FONT.get(char, FONT[" "])
            for bit, on in enumerate(glyph):
                if on == "1":
                    for sx in range(scale):
                        for sy in range(scale):
                            self.set(x + index * 4 * scale + (bit % 3) * scale + sx,
                                     y + (bit // 3) * scale + sy, color)
        return len(text) * 4 * scale

    def png(self) -> bytes:
        rows = b"".join(b"\x00" + bytes(self.pixels[3 * y * self.width:3 * (y + 1) * self.width])
                        for y in range(self.height))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")


@dataclass
class Series:
    """A polyline with optional markers."""

    label: str
    points: list[tuple[float, float]]
    color: Color = BLUE
    markers: bool = True


@dataclass
class Chart:
    """A line chart: series, horizontal/vertical reference lines, axis labels, title."""

    title: str
    x_label: str
    y_label: str
    series: list[Series] = field(default_factory=list)
    hlines: list[tuple[float, str, Color]] = field(default_factory=list)
    vlines: list[tuple[float, str, Color]] = field(default_factory=list)
    y_max: float | None = None

    def render(self, width: int = 800, height: int = 500) -> Canvas:
        canvas = Canvas(width, height)
        left, right, top, bottom = 70, width - 20, 40, height - 50
        xs = [x for s in self.series for x, _ in s.points] + [x for x, _, _ in self.vlines] + [0.0]
        ys = [y for s in self.series for _, y in s.points] + [y for y, _, _ in self.hlines]
        x_lo, x_hi = 0.0, max(xs) * 1.05
        y_lo, y_hi = min(ys), max(ys) if self.y_max is None else min(max(ys), self.y_max)
        pad = 0.05 * (y_hi - y_lo or 1.0)
        y_lo, y_hi = y_lo - pad, y_hi + pad

        def px(x: float) -> float:
            return left + (x - x_lo) / (x_hi - x_lo) * (right - left)

        def py(y: float) -> float:
            return bottom - (min(max(y, y_lo), y_hi) - y_lo) / (y_hi - y_lo) * (bottom - top)

        for value in nice_ticks(x_lo, x_hi):
            canvas.line(px(value), bottom, px(value), top, (235, 235, 235))
            label = f"{value:g}"
            canvas.text(round(px(value)) - len(label) * 4, bottom + 8, label)
        for value in nice_ticks(y_lo, y_hi):
            canvas.line(left, py(value), right, py(value), (235, 235, 235))
            label = f"{value:.2f}"
            canvas.text(left - 8 - len(label) * 8, round(py(value)) - 5, label)
        canvas.line(left, bottom, right, bottom, BLACK)
        canvas.line(left, bottom, left, top, BLACK)
        for value, label, color in self.hlines:
            canvas.line(left, py(value), right, py(value), color, dash=6)
            canvas.text(right - len(label) * 8 - 4, round(py(value)) - 14, label, color)
        for value, label, color in self.vlines:
            canvas.line(px(value), bottom, px(value), top, color, dash=6)
            canvas.text(round(px(value)) - len(label) * 8 - 4, top + 4, label, color)
        for series in self.series:
            points = [(px(x), py(y)) for x, y in series.points]
            for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
                canvas.line(x0, y0, x1, y1, series.color, width=2)
            if series.markers:
                for x, y in points:
                    canvas.disc(x, y, 3, series.color)
        legend_y = top + 24
        for series in self.series:
            canvas.disc(right - 260, legend_y + 5, 4, series.color)
            canvas.text(right - 248, legend_y, series.label, series.color)
            legend_y += 16
        canvas.text(left, 12, self.title)
        canvas.text((left + right) // 2 - len(self.x_label) * 4, height - 22, self.x_label)
        canvas.text(4, top - 20, self.y_label)
        return canvas

    def save(self, path: str | Path, width: int = 800, height: int = 500) -> Path:
        path = Path(path)
        path.write_bytes(self.render(width, height).png())
        return path


def nice_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    """Round tick values (1, 2, 2.5 or 5 x 10^k apart) covering [lo, hi]."""
    span = hi - lo
    if span <= 0:
        return [lo]
    raw = span / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step) + 1)]
