"""Development tools of the exporters that need torch and diffusers: the template builder
(``scripts/build_templates.py``) and the full-size random SD2.1 model (``text2image bench``, ``scripts/``).

Left out of the built wheel (pyproject.toml), so the images do not carry them; the development install
(``pip install -e``) imports them."""
