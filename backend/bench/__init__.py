"""Side-by-side speed measurements of our engines and the peers (``text2image bench``)."""
