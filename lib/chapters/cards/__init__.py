"""chapters.cards: the H100 and the H200 side by side, from the other experiments' committed rows."""
