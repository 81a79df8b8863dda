"""Side-by-side speed measurements of our engines and the peers (``text2image bench``), with the image and memory
measures that the scripts and tests share. Development only: left out of the built wheel (pyproject.toml)."""
