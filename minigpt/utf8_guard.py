"""Keep generated text whole: allow a byte-fallback piece only where it builds a valid UTF-8 character.

A byte-fallback tokenizer spells characters it has no piece for as `<0xE5><0xBA><0x8A>`. A model, trained
or not, may pick a lone continuation byte, or a lead byte followed by a word piece, and the decoded text
then shows U+FFFD. `Utf8Guard` masks, at each decoding step, the pieces that cannot extend the row's
pending sequence: while a character is incomplete only the bytes it expects (RFC 3629's ranges, so no
overlong forms or surrogates); otherwise no continuation byte, and no lead byte whose character would not
fit in the steps left. The masks are a few precomputed rows of 0 / -inf added to the logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

NOT_A_BYTE = -1
"""`byte_values` entry of a piece that is not a byte-fallback piece."""
_OUTSIDE = -2
_CONTINUATION = (0x80, 0xBF)
# RFC 3629: the second byte after these lead bytes has a narrower range (no overlong forms, no surrogates,
# nothing above U+10FFFF).
_SECOND_BYTE = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}
_RANGES = [_CONTINUATION, *sorted(set(_SECOND_BYTE.values()))]
_MAX_LENGTH = 4


def sequence_length(byte: int) -> int:
    """Bytes in the UTF-8 character that `byte` starts: 1 for ASCII, 2-4 for a lead byte, 0 for a byte
    that cannot start one (a continuation byte, 0xC0, 0xC1, 0xF5-0xFF)."""
    if byte < 0x80:
        return 1
    if 0xC2 <= byte <= 0xDF:
        return 2
    if 0xE0 <= byte <= 0xEF:
        return 3
    if 0xF0 <= byte <= 0xF4:
        return 4
    return 0


class Utf8Guard:
    """Per-row UTF-8 state of a decoding batch and the logit masks that keep it valid.

    `byte_values[i]` is the byte of piece i if it is a byte-fallback piece, else `NOT_A_BYTE`; ids from
    `len(byte_values)` to `vocab_size` (a model wider than its tokenizer) are never allowed.
    """

    def __init__(self, byte_values: Sequence[int], vocab_size: int, device: torch.device | str):
        values = torch.full((vocab_size,), _OUTSIDE, dtype=torch.long)
        values[:len(byte_values)] = torch.tensor(list(byte_values), dtype=torch.long)
        self.byte_of = [int(v) for v in byte_values]
        is_text = values == NOT_A_BYTE
        lengths = torch.tensor([sequence_length(b) for b in range(256)])[values.clamp(min=0)]
        lengths = torch.where(values >= 0, lengths, 0)
        # Rows 0-3: no pending character and 1-4 steps left; then one row per continuation range.
        allowed = [is_text | ((lengths > 0) & (lengths <= steps)) for steps in range(1, _MAX_LENGTH + 1)]
        allowed += [(values >= low) & (values <= high) for low, high in _RANGES]
        zero = torch.zeros((), dtype=torch.float32)
        self.masks = torch.where(torch.stack(allowed), zero, float("-inf")).to(device)
        self.needed: dict[int, int] = {}
        self.range_row: dict[int, int] = {}

    def mask(self, rows: Sequence[int], steps_left: int) -> torch.Tensor:
        """(len(rows), vocab) additive mask for the next token of each row, `steps_left` steps including it."""
        free_row = min(steps_left, _MAX_LENGTH) - 1
        index = [self.range_row[row] if self.needed.get(row) else free_row for row in rows]
        return self.masks[torch.tensor(index, device=self.masks.device)]

    def advance(self, row: int, token_id: int) -> None:
        """Record that `row` took `token_id`."""
        byte = self.byte_of[token_id] if token_id < len(self.byte_of) else NOT_A_BYTE
        if byte == NOT_A_BYTE:
            self.needed[row] = 0
        elif self.needed.get(row):
            self.needed[row] -= 1
            self.range_row[row] = _MAX_LENGTH
        else:
            self.needed[row] = max(sequence_length(byte) - 1, 0)
            low_high = _SECOND_BYTE.get(byte, _CONTINUATION)
            self.range_row[row] = _MAX_LENGTH + _RANGES.index(low_high)


__all__ = ["NOT_A_BYTE", "Utf8Guard", "sequence_length"]
